"""SQLite state: the database, job queue, event log, tracking of objects, C-FIND cache."""
