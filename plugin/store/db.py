"""Thread-safe access to the harvester's SQLite file through apsw.

Why apsw and not :mod:`sqlite3`: apsw releases the GIL while SQLite works (important inside Orthanc,
where a blocked GIL freezes every Python callback), does not open transactions behind our back, and
bundles a recent SQLite (``RETURNING``, ``json_each``, partial indexes) whatever the host ships.

Design:

* **One connection per thread** (``threading.local``). An SQLite connection is cheap and keeps its own
  statement cache; sharing one between threads would serialise them on apsw's connection mutex and mix
  their transactions.
* **WAL journal**: readers never block the single writer and vice versa; writers queue on the database
  lock, waited for by ``busy_timeout`` rather than failing at once.
* **synchronous=NORMAL** (default): in WAL mode a commit is appended to the ``-wal`` file with a plain
  ``write()`` before ``COMMIT`` returns; only checkpoints ``fsync``. The data is then in the operating
  system's page cache, so a crashed or SIGKILLed *process* (the common failure: Orthanc killed or
  restarted) loses nothing that was committed. Only an operating-system crash or power cut can roll back
  the last few transactions, and even then the file stays consistent (never corrupt). A job that "un-does"
  itself that way is simply run again: every job is idempotent thanks to dedupe keys and leases.
  ``synchronous="FULL"`` fsyncs the WAL on every commit for machines that lose power; it costs one disk
  flush per transition (hundreds per second instead of thousands on a spinning disk or slow SSD).
* **foreign_keys=ON** (off by default in SQLite, per connection).
* Values are always bound as parameters; the helpers take SQL text and a parameter sequence separately
  so that no caller is tempted to build SQL with values.
* A small **schema-migration registry** lets any module (queue, event log, the harvester's tracking
  tables) add versioned DDL to the same file: :func:`register_schema`.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import apsw

__all__ = [
    "Database",
    "DatabaseError",
    "Params",
    "SchemaStep",
    "register_schema",
    "registered_schemas",
]

Params = Sequence[Any] | Mapping[str, Any]
"""Bound parameters: a sequence for ``?`` placeholders or a mapping for ``:name`` ones."""

Synchronous = Literal["NORMAL", "FULL"]


class DatabaseError(RuntimeError):
    """The database file cannot be used as configured (bad path, WAL unavailable, schema conflict)."""


@dataclass(frozen=True)
class SchemaStep:
    """One migration step: the DDL that brings schema ``name`` from ``version - 1`` to ``version``."""

    name: str
    version: int
    statements: tuple[str, ...]


# Global registry, filled at import time by the modules that own tables. A Database applies every step
# it does not have yet when it opens (and again on demand, for modules imported later).
_REGISTRY: dict[str, dict[int, SchemaStep]] = {}
_REGISTRY_LOCK = threading.Lock()


def register_schema(name: str, version: int, statements: Iterable[str]) -> SchemaStep:
    """Declare migration step ``version`` (1, 2, ...) of schema ``name``.

    Steps of one schema are applied in version order, each once per database file, inside one
    transaction together with the bump of its recorded version. Registering the same step twice with the
    same statements is a no-op (modules may be re-imported); with different statements it is an error,
    because a released step must never change (files in the field already ran it).
    """
    if not name or not isinstance(name, str):
        raise ValueError("schema name must be a non-empty string")
    if not isinstance(version, int) or version < 1:
        raise ValueError(f"schema {name!r}: version must be an integer >= 1, got {version!r}")
    step = SchemaStep(name, version, tuple(statements))
    if not step.statements:
        raise ValueError(f"schema {name!r} version {version}: no statements")
    with _REGISTRY_LOCK:
        steps = _REGISTRY.setdefault(name, {})
        known = steps.get(version)
        if known is not None and known.statements != step.statements:
            raise DatabaseError(
                f"schema {name!r} version {version} is already registered with different statements; "
                "add a new version instead of editing a released one"
            )
        steps[version] = step
    return step


def registered_schemas() -> dict[str, list[SchemaStep]]:
    """A snapshot of the registry: schema name -> steps in version order."""
    with _REGISTRY_LOCK:
        return {name: [steps[v] for v in sorted(steps)] for name, steps in _REGISTRY.items()}


def _live_native_threads() -> set[int] | None:
    """Native IDs of this process's live threads (Linux ``/proc``), or None where unknown."""
    try:
        return {int(name) for name in os.listdir("/proc/self/task")}
    except (OSError, ValueError):
        return None


class _ThreadState(threading.local):
    """Per-thread connection and transaction nesting depth."""

    conn: apsw.Connection | None = None
    depth: int = 0


class Database:
    """One SQLite file shared by the threads of this process (and by other processes).

    ``busy_timeout`` (seconds) is how long a writer waits for another writer before
    :class:`apsw.BusyError`; 10 s absorbs checkpoints and bursts without hiding a real deadlock.
    """

    def __init__(
        self,
        path: str,
        *,
        busy_timeout: float = 10.0,
        synchronous: Synchronous = "NORMAL",
        journal_size_limit: int = 64 * 1024 * 1024,
    ) -> None:
        if not path or path == ":memory:" or path.startswith("file::memory:"):
            # Every thread gets its own connection, so an in-memory database would be a different,
            # empty database per thread.
            raise ValueError("Database needs a file path; in-memory databases are per connection")
        if synchronous not in ("NORMAL", "FULL"):
            raise ValueError(f"synchronous must be 'NORMAL' or 'FULL', got {synchronous!r}")
        if busy_timeout < 0:
            raise ValueError("busy_timeout must be >= 0 seconds")
        self.path = path
        self.busy_timeout = busy_timeout
        self.synchronous: Synchronous = synchronous
        self.journal_size_limit = int(journal_size_limit)
        self._local = _ThreadState()
        # Every connection handed out, with the thread that owns it, so close() can reach them all and
        # connections of threads that died (restarted workers, finished request threads) are reaped.
        self._conns: list[tuple[weakref.ref[threading.Thread], apsw.Connection]] = []
        # The same connections by OS thread: a thread-local is lost whenever the interpreter drops the
        # thread state of a native thread between calls (Orthanc calls OnStoredInstance from its own
        # threads, and the Python plugin creates and destroys a thread state around every call), so
        # without this every callback opened a new connection and leaked it (2 file descriptors each).
        self._by_native: dict[int, apsw.Connection] = {}
        self._conns_lock = threading.Lock()
        self._closed = False
        self.migrate()

    # -- connections -------------------------------------------------------------------------------

    def _open(self) -> apsw.Connection:
        try:
            conn = apsw.Connection(self.path)
        except apsw.Error as exc:
            raise DatabaseError(f"cannot open database {self.path!r}: {exc}") from exc
        conn.set_busy_timeout(int(self.busy_timeout * 1000))
        # journal_mode is persistent in the file, but setting it is cheap and covers new files. It can
        # fail to switch (e.g. some network filesystems): refuse rather than run without WAL, because
        # the locking and durability reasoning above assumes it.
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchall()
        if not mode or str(mode[0][0]).lower() != "wal":
            conn.close()
            raise DatabaseError(
                f"{self.path!r}: could not enable WAL journal mode (got {mode!r}); "
                "put the database on a local filesystem"
            )
        conn.execute(f"PRAGMA synchronous={self.synchronous}")  # validated literal, not user input
        conn.execute("PRAGMA foreign_keys=ON")
        # Bound the -wal file left after checkpoints: weeks of traffic must not grow it forever.
        conn.execute(f"PRAGMA journal_size_limit={self.journal_size_limit:d}")
        return conn

    def connection(self) -> apsw.Connection:
        """This thread's connection (opened on first use)."""
        if self._closed:
            raise DatabaseError(f"database {self.path!r} is closed")
        conn = self._local.conn
        if conn is None:
            native = threading.get_native_id()
            with self._conns_lock:
                conn = self._by_native.get(native)
            if conn is None:
                conn = self._open()
                with self._conns_lock:
                    self._reap_dead_threads()
                    self._conns.append((weakref.ref(threading.current_thread()), conn))
                    self._by_native[native] = conn
            self._local.conn = conn
            self._local.depth = 0
        return conn

    def _reap_dead_threads(self) -> None:
        alive: list[tuple[weakref.ref[threading.Thread], apsw.Connection]] = []
        live_natives = _live_native_threads()
        for native in list(self._by_native):
            if live_natives is not None and native not in live_natives:
                del self._by_native[native]
        kept = {id(c) for c in self._by_native.values()}
        for ref, conn in self._conns:
            thread = ref()
            # A native thread's dummy Thread object never stops: its OS thread's exit is what counts.
            dead = thread is None or not thread.is_alive() or (live_natives is not None and id(conn) not in kept)
            if dead:
                # A new thread may already have the dead one's native ID: it must not adopt a closed conn.
                for native, mapped in list(self._by_native.items()):
                    if mapped is conn:
                        del self._by_native[native]
                try:
                    conn.close()
                except apsw.Error:  # pragma: no cover - best effort cleanup
                    pass
            else:
                alive.append((ref, conn))
        self._conns = alive

    def close(self) -> None:
        """Close every thread's connection. The object is unusable afterwards."""
        self._closed = True
        with self._conns_lock:
            conns, self._conns = self._conns, []
            self._by_native.clear()
        for _ref, conn in conns:
            try:
                conn.close()
            except apsw.Error:  # pragma: no cover - a thread may still be using it
                pass
        self._local.conn = None

    def __enter__(self) -> Database:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- transactions ------------------------------------------------------------------------------

    @contextmanager
    def transaction(self) -> Iterator[apsw.Connection]:
        """``BEGIN IMMEDIATE`` ... ``COMMIT`` (``ROLLBACK`` on any exception).

        IMMEDIATE takes the write lock up front: a read-then-write transaction (like claiming a job)
        can then never fail half-way with SQLITE_BUSY because another writer slipped in between, and
        two claimers are strictly serialised. Nested use on the same thread becomes a SAVEPOINT, so a
        helper that opens its own transaction composes with a caller's.
        """
        conn = self.connection()
        state = self._local
        if state.depth > 0:
            name = f"rth_sp{state.depth}"  # derived from an int: no value reaches the SQL text
            conn.execute(f"SAVEPOINT {name}")
            state.depth += 1
            try:
                yield conn
            except BaseException:
                conn.execute(f"ROLLBACK TO {name}")
                conn.execute(f"RELEASE {name}")
                raise
            else:
                conn.execute(f"RELEASE {name}")
            finally:
                state.depth -= 1
            return
        conn.execute("BEGIN IMMEDIATE")
        state.depth = 1
        try:
            yield conn
        except BaseException:
            if not conn.get_autocommit():
                conn.execute("ROLLBACK")
            raise
        else:
            try:
                conn.execute("COMMIT")
            except BaseException:
                if not conn.get_autocommit():
                    conn.execute("ROLLBACK")
                raise
        finally:
            state.depth = 0

    @property
    def in_transaction(self) -> bool:
        """Whether this thread is inside :meth:`transaction`."""
        return self._local.depth > 0

    # -- statements --------------------------------------------------------------------------------

    def execute(self, sql: str, params: Params = ()) -> int:
        """Run one statement with bound ``params``; returns the number of rows changed."""
        conn = self.connection()
        for _row in conn.execute(sql, params):  # drain RETURNING rows, if any
            pass
        return conn.changes()

    def executemany(self, sql: str, seq_of_params: Iterable[Params]) -> None:
        """Run one statement for each parameter set (call inside :meth:`transaction` to batch commits)."""
        conn = self.connection()
        for _row in conn.executemany(sql, seq_of_params):
            pass

    def query(self, sql: str, params: Params = ()) -> list[tuple[Any, ...]]:
        """Rows of one statement with bound ``params``."""
        return list(self.connection().execute(sql, params))

    def query_one(self, sql: str, params: Params = ()) -> tuple[Any, ...] | None:
        """The first row, or ``None``."""
        cursor = self.connection().execute(sql, params)
        for row in cursor:
            cursor.close()
            return tuple(row)
        return None

    def scalar(self, sql: str, params: Params = (), default: Any = None) -> Any:
        """The first column of the first row, or ``default``."""
        row = self.query_one(sql, params)
        return default if row is None else row[0]

    def last_insert_rowid(self) -> int:
        """Rowid of this thread's last INSERT."""
        return int(self.connection().last_insert_rowid())

    # -- schema ------------------------------------------------------------------------------------

    def register_schema(self, name: str, version: int, statements: Iterable[str]) -> None:
        """Register a step globally (see :func:`register_schema`) and apply it to this file now."""
        register_schema(name, version, statements)
        self.migrate()

    def schema_version(self, name: str) -> int:
        """The applied version of schema ``name`` in this file (0: none)."""
        return int(self.scalar("SELECT version FROM rth_schema WHERE name = ?", (name,), 0))

    def migrate(self, on_step: Callable[[SchemaStep], None] | None = None) -> list[SchemaStep]:
        """Apply every registered step this file lacks; returns the steps applied.

        Runs in one IMMEDIATE transaction, re-reading the versions inside it, so two processes opening
        a new file at once do not both run the same DDL.
        """
        applied: list[SchemaStep] = []
        schemas = registered_schemas()
        with self.transaction():
            self.execute(
                "CREATE TABLE IF NOT EXISTS rth_schema ("
                " name TEXT PRIMARY KEY, version INTEGER NOT NULL, applied_at TEXT NOT NULL)"
            )
            for name, steps in schemas.items():
                current = self.schema_version(name)
                expected = 1
                for step in steps:
                    if step.version != expected:
                        raise DatabaseError(
                            f"schema {name!r}: version {expected} is missing (have {step.version})"
                        )
                    expected += 1
                    if step.version <= current:
                        continue
                    for statement in step.statements:
                        self.execute(statement)
                    self.execute(
                        "INSERT INTO rth_schema(name, version, applied_at)"
                        " VALUES (?, ?, strftime('%Y-%m-%dT%H:%M:%fZ','now'))"
                        " ON CONFLICT(name) DO UPDATE SET version = excluded.version,"
                        " applied_at = excluded.applied_at",
                        (name, step.version),
                    )
                    applied.append(step)
                    if on_step is not None:
                        on_step(step)
        return applied

    def __repr__(self) -> str:
        return f"Database({self.path!r}, synchronous={self.synchronous!r})"
