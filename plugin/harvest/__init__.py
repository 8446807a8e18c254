"""Harvest services and their threads: the harvester, ingest, schedules, reconciliation."""
