"""``rtharvest backup DIR`` / ``rtharvest restore DIR``: everything a site needs to come back, in one folder.

A harvester's state is in five places, all named by its orthanc.json:

* the **queue database** (``RtHarvest.DatabasePath``): harvests, jobs, schedules, decisions, the event log;
* the **export database** (``RtHarvest.Export.DatabasePath``): the site secret and the pseudonym map —
  without them a later export of the same patients gets new pseudonyms and UIDs;
* **Orthanc's index**: PostgreSQL (``PostgreSQL`` section with ``EnableIndex``) or the SQLite file
  ``index`` in ``IndexDirectory`` (default: ``StorageDirectory``);
* the **image files** in ``StorageDirectory``.

The backup is taken in that order, while the harvester runs where the engine allows: the two SQLite
databases with SQLite's online backup API (a consistent copy while others write), PostgreSQL with
``pg_dump -Fc`` (a consistent snapshot). The order makes the parts agree: what the older queue believes
missing and the newer index holds is found in the store and planned from there at start-up; every file
the index names is in the (newest) copy of the files, which are never changed once written. Orthanc holds
its SQLite index exclusively: that one is copied only while Orthanc is stopped (the backup says so).

``restore`` needs the harvester stopped (it checks the queue's lock) and puts each part back where the
target orthanc.json says, PostgreSQL with ``pg_restore`` into the configured (existing) database.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import shutil
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import apsw

from ..edge.config import ConfigError, load_config
from ..edge.postgres import PostgresTarget, index_enabled
from ..export.settings import SECRET_ENV

__all__ = ["BackupError", "Layout", "add_parser", "backup", "layout_of", "restore"]

#: The files of a backup folder.
QUEUE_FILE = "queue.sqlite"
EXPORTS_FILE = "exports.sqlite"
SECRET_FILE = "exports.secret"
INDEX_SQLITE_FILE = "index.sqlite"
INDEX_DUMP_FILE = "index.pgdump"
STORAGE_DIR = "storage"
DESCRIPTION_FILE = "backup.json"


class BackupError(RuntimeError):
    """The backup or restore cannot be done as asked (the message says why and what to do)."""


@dataclass(frozen=True)
class Layout:
    """Where one harvester keeps its state (from its orthanc.json)."""

    storage: Path
    index_directory: Path
    postgres: PostgresTarget | None
    queue: Path
    exports: Path
    #: The file holding the export's site secret (``None``: the secret comes from the configuration or the
    #: environment, which the operator keeps; it is not in the backup).
    secret: Path | None = None

    @property
    def sqlite_index(self) -> Path:
        return self.index_directory / "index"

    def own_files(self) -> set[Path]:
        """Files in the storage folder that are not image files (copied by their own step, or locks)."""
        names: set[Path] = set()
        for db in (self.queue, self.exports, self.sqlite_index):
            names |= {db, Path(f"{db}-wal"), Path(f"{db}-shm"), Path(f"{db}-journal"), Path(f"{db}.lock")}
        if self.secret is not None:
            names.add(self.secret)
        return {p.resolve() for p in names}


def layout_of(config_path: Path) -> Layout:
    """The layout an orthanc.json describes (relative paths resolved against its folder, as Orthanc does)."""
    try:
        orthanc = json.loads(config_path.read_text())
    except (OSError, ValueError) as exc:
        raise BackupError(f"cannot read {config_path}: {exc}") from None
    base = config_path.resolve().parent
    try:
        config = load_config(orthanc, base)
    except ConfigError as exc:
        raise BackupError(f"{config_path}: {exc}") from None

    def resolved(value: Any, default: Path) -> Path:
        path = Path(str(value)) if value else default
        return path if path.is_absolute() else base / path

    storage = resolved(orthanc.get("StorageDirectory"), Path("OrthancStorage"))
    index_dir = resolved(orthanc.get("IndexDirectory"), storage)
    postgres: PostgresTarget | None = None
    if index_enabled(orthanc):
        section = orthanc["PostgreSQL"]
        postgres = PostgresTarget(host=str(section.get("Host", "localhost")), port=int(section.get("Port", 5432)),
                                  database=str(section.get("Database", "orthanc")),
                                  username=str(section.get("Username", "postgres")),
                                  password=str(section.get("Password", "")))
    rt = orthanc.get("RtHarvest", {})
    export = rt.get("Export", {}) if isinstance(rt, Mapping) else {}
    queue = config.database_path
    # As rtharvest.export.settings: next to the queue unless configured.
    default_exports = queue.with_name(queue.stem + "-exports.sqlite")
    exports = resolved(export.get("DatabasePath") if isinstance(export, Mapping) else None, default_exports)
    # As ExportSettings.secret_path: the secret from the environment or the configuration wins over a file.
    secret: Path | None = None
    if not os.environ.get(SECRET_ENV) and not (isinstance(export, Mapping) and export.get("Secret")):
        secret = resolved(export.get("SecretFile") if isinstance(export, Mapping) else None,
                          exports.with_name(exports.stem + ".secret"))
    return Layout(storage=storage, index_directory=index_dir, postgres=postgres, queue=queue, exports=exports,
                  secret=secret)


def _pg_env(target: PostgresTarget) -> dict[str, str]:
    # The password through the environment: never on a command line another user can read in ps.
    env = dict(os.environ)
    if target.password:
        env["PGPASSWORD"] = target.password
    return env


def _pg_args(target: PostgresTarget) -> list[str]:
    return ["-h", target.host, "-p", str(target.port), "-U", target.username]


def _pg_tool(name: str) -> str:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))
    if not candidates:
        raise BackupError(f"{name} not found: install the PostgreSQL client (Debian: postgresql-client)")
    return str(candidates[-1])


def _sqlite_copy(source: Path, target: Path) -> None:
    """SQLite's online backup API: a consistent copy while other connections write."""
    src = apsw.Connection(str(source), flags=apsw.SQLITE_OPEN_READONLY)
    src.set_busy_timeout(30_000)
    dst = apsw.Connection(str(target))
    try:
        with dst.backup("main", src, "main") as copy:
            while not copy.done:
                copy.step(1024)
    finally:
        dst.close()
        src.close()


def _count(path: Path, sql: str) -> int | None:
    try:
        conn = apsw.Connection(str(path), flags=apsw.SQLITE_OPEN_READONLY)
        try:
            row = conn.execute(sql).fetchone()
            return None if row is None else int(row[0])
        finally:
            conn.close()
    except apsw.Error:
        return None


def _harvester_running(layout: Layout) -> bool:
    """Whether a harvester holds the queue (the plugin locks ``<DatabasePath>.lock`` while it runs)."""
    lock = Path(f"{layout.queue}.lock")
    if not lock.exists():
        return False
    fd = os.open(lock, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def backup(layout: Layout, target: Path, out: IO[str] | None = None) -> dict[str, Any]:
    """Back ``layout`` up into the empty or new folder ``target``; returns what ``backup.json`` says."""
    def say(text: str) -> None:
        if out is not None:
            print(text, file=out)

    if target.exists() and any(target.iterdir()):
        raise BackupError(f"{target} is not empty: back up into a new folder")
    if not layout.queue.exists():
        raise BackupError(f"no queue database at {layout.queue} (RtHarvest.DatabasePath): wrong --config?")
    target.mkdir(parents=True, exist_ok=True)
    started = time.time()
    running = _harvester_running(layout)
    # 1. the queue, 2. the export database (secret, pseudonyms): consistent copies while they are written.
    _sqlite_copy(layout.queue, target / QUEUE_FILE)
    say(f"queue database {layout.queue} -> {QUEUE_FILE}")
    has_exports = layout.exports.exists()
    if has_exports:
        _sqlite_copy(layout.exports, target / EXPORTS_FILE)
        say(f"export database (site secret, pseudonyms) {layout.exports} -> {EXPORTS_FILE}")
    else:
        say(f"no export database at {layout.exports} (no export yet): nothing to keep")
    # The site secret lives apart from the pseudonym map (one stolen file must not re-identify anyone): the
    # backup keeps both, each readable by its owner only; keep the backup folder as safe as the site.
    has_secret = layout.secret is not None and layout.secret.exists()
    if has_secret:
        assert layout.secret is not None
        _private_copy(layout.secret, target / SECRET_FILE)
        say(f"export site secret {layout.secret} -> {SECRET_FILE} (mode 0600)")
    elif layout.secret is None:
        say("export site secret: from the configuration or the environment (keep it with them: not copied)")
    # 3. the index.
    if layout.postgres is not None:
        pg = layout.postgres
        done = subprocess.run([_pg_tool("pg_dump"), *_pg_args(pg), "-Fc", "-f", str(target / INDEX_DUMP_FILE),
                               pg.database], env=_pg_env(pg), capture_output=True, text=True)
        if done.returncode != 0:
            raise BackupError(f"pg_dump of {pg.redacted_url} failed: {done.stderr.strip()[-500:]}")
        say(f"index {pg.redacted_url} -> {INDEX_DUMP_FILE} (pg_dump -Fc)")
    else:
        if running:
            raise BackupError("Orthanc holds its SQLite index exclusively while it runs: stop Orthanc for the "
                              "backup (or put the index in PostgreSQL, which is dumped while running)")
        if not layout.sqlite_index.exists():
            raise BackupError(f"no SQLite index at {layout.sqlite_index} (IndexDirectory)")
        _sqlite_copy(layout.sqlite_index, target / INDEX_SQLITE_FILE)
        say(f"index {layout.sqlite_index} -> {INDEX_SQLITE_FILE}")
    # 4. the image files, last: every file the index copy names is older than this copy.
    skip = layout.own_files()
    files = 0
    for root, _dirs, names in os.walk(layout.storage):
        for name in names:
            path = Path(root) / name
            if path.resolve() in skip:
                continue
            dest = target / STORAGE_DIR / path.relative_to(layout.storage)
            dest.parent.mkdir(parents=True, exist_ok=True)
            try:
                shutil.copy2(path, dest)
            except FileNotFoundError:
                continue  # deleted meanwhile (a rejected candidate): the index copy may name it, see docs
            files += 1
    say(f"{files} file(s) of {layout.storage} -> {STORAGE_DIR}/")
    description = {
        "Format": 1,
        "TakenAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "WhileRunning": running,
        "Index": "PostgreSQL" if layout.postgres is not None else "SQLite",
        "Files": files,
        "ExportDatabase": has_exports,
        "ExportSecretFile": has_secret,
        "Harvests": _count(target / QUEUE_FILE, "SELECT count(*) FROM harvests"),
        "Schedules": _count(target / QUEUE_FILE, "SELECT count(*) FROM rth_schedules"),
        "Pseudonyms": _count(target / EXPORTS_FILE, "SELECT count(*) FROM rth_pseudonyms") if has_exports else 0,
    }
    (target / DESCRIPTION_FILE).write_text(json.dumps(description, indent=2) + "\n")
    say(f"described in {DESCRIPTION_FILE}")
    return description


def restore(source: Path, layout: Layout, out: IO[str] | None = None) -> dict[str, Any]:
    """Put the backup in ``source`` back where ``layout`` says; the harvester must be stopped."""
    def say(text: str) -> None:
        if out is not None:
            print(text, file=out)

    try:
        description = json.loads((source / DESCRIPTION_FILE).read_text())
    except (OSError, ValueError):
        raise BackupError(f"{source} is not an rtharvest backup (no readable {DESCRIPTION_FILE})") from None
    if _harvester_running(layout):
        raise BackupError(f"a harvester is running on {layout.queue}: stop Orthanc before restoring")
    for db in (layout.queue, layout.exports, *(() if layout.secret is None else (layout.secret,))):
        if db.exists():
            raise BackupError(f"{db} exists: restore into a new location (or move it away first)")
    layout.queue.parent.mkdir(parents=True, exist_ok=True)
    layout.storage.mkdir(parents=True, exist_ok=True)
    # The image files first: the index restored next names them.
    copied = 0
    storage = source / STORAGE_DIR
    if storage.is_dir():
        for root, _dirs, names in os.walk(storage):
            for name in names:
                path = Path(root) / name
                dest = layout.storage / path.relative_to(storage)
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, dest)
                copied += 1
    say(f"{copied} file(s) -> {layout.storage}")
    if description.get("Index") == "PostgreSQL":
        if layout.postgres is None:
            raise BackupError("the backup's index is PostgreSQL but the target orthanc.json has no enabled "
                              "PostgreSQL section: configure the database to restore into")
        pg = layout.postgres
        done = subprocess.run([_pg_tool("pg_restore"), *_pg_args(pg), "-d", pg.database, "--no-owner",
                               "--clean", "--if-exists", str(source / INDEX_DUMP_FILE)],
                              env=_pg_env(pg), capture_output=True, text=True)
        if done.returncode != 0:
            raise BackupError(f"pg_restore into {pg.redacted_url} failed (the database must exist: createdb "
                              f"it first): {done.stderr.strip()[-500:]}")
        say(f"{INDEX_DUMP_FILE} -> {pg.redacted_url}")
    else:
        if layout.postgres is not None:
            raise BackupError("the backup's index is SQLite but the target orthanc.json enables PostgreSQL")
        if layout.sqlite_index.exists():
            raise BackupError(f"{layout.sqlite_index} exists: restore into a new location")
        layout.index_directory.mkdir(parents=True, exist_ok=True)
        _sqlite_copy(source / INDEX_SQLITE_FILE, layout.sqlite_index)
        say(f"{INDEX_SQLITE_FILE} -> {layout.sqlite_index}")
    _sqlite_copy(source / QUEUE_FILE, layout.queue)
    say(f"{QUEUE_FILE} -> {layout.queue}")
    if (source / EXPORTS_FILE).exists():
        layout.exports.parent.mkdir(parents=True, exist_ok=True)
        _sqlite_copy(source / EXPORTS_FILE, layout.exports)
        say(f"{EXPORTS_FILE} -> {layout.exports}")
    if (source / SECRET_FILE).exists():
        if layout.secret is None:
            say(f"{SECRET_FILE} not restored: the target configuration takes the secret from the configuration "
                "or the environment")
        else:
            layout.secret.parent.mkdir(parents=True, exist_ok=True)
            _private_copy(source / SECRET_FILE, layout.secret)
            say(f"{SECRET_FILE} -> {layout.secret} (mode 0600)")
    return dict(description)


def _private_copy(src: Path, dest: Path) -> None:
    """Copy a secret so that only its owner can read the copy, whatever the umask."""
    data = src.read_bytes()
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.chmod(dest, 0o600)


# -- the command line (``rtharvest backup`` / ``rtharvest restore``) ----------------------------------------


def cmd_backup(_client: Any, args: argparse.Namespace, out: IO[str]) -> int:
    """``rtharvest backup DIR --config orthanc.json``."""
    from ..cli.commands import CliError

    try:
        description = backup(layout_of(Path(args.config)), Path(args.dir), out)
    except BackupError as exc:
        raise CliError(str(exc), 1) from None
    print(json.dumps(description), file=out)
    return 0


def cmd_restore(_client: Any, args: argparse.Namespace, out: IO[str]) -> int:
    """``rtharvest restore DIR --config orthanc.json``."""
    from ..cli.commands import CliError

    try:
        restore(Path(args.dir), layout_of(Path(args.config)), out)
    except BackupError as exc:
        raise CliError(str(exc), 1) from None
    return 0


def add_parser(sub: Any) -> None:
    """Add ``backup`` and ``restore`` to the ``rtharvest`` command line (local: they read files, not REST)."""
    b = sub.add_parser("backup", help="copy queue, export database (secret, pseudonyms), index and image files "
                                      "into a new folder (while running, except a SQLite index)")
    b.add_argument("dir", metavar="DIR", help="a new or empty folder")
    b.add_argument("--config", required=True, metavar="ORTHANC_JSON",
                   help="the harvester's orthanc.json (the one Orthanc runs with: it names every path)")
    b.set_defaults(func=cmd_backup)
    r = sub.add_parser("restore", help="put a backup back where an orthanc.json says (Orthanc stopped)")
    r.add_argument("dir", metavar="DIR", help="a folder written by rtharvest backup")
    r.add_argument("--config", required=True, metavar="ORTHANC_JSON",
                   help="the orthanc.json of the harvester to restore (its PostgreSQL database must exist)")
    r.set_defaults(func=cmd_restore)
