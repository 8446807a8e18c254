"""MOSAIQ (Elekta record-and-verify) -> RT Beams Treatment Records.

MOSAIQ keeps delivered fractions in its SQL Server database, not in DICOM. :mod:`.reader` reads the
tables that matter through SQLAlchemy Core (SQL Server via pymssql/pyodbc, SQLite in tests),
:mod:`.mapping` turns deliveries into sessions and records (every rule documented where applied),
:mod:`.record` builds the DICOM objects and :mod:`.cli` is ``rtharvest-convert mosaiq``.
"""
