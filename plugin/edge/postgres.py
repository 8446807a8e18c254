"""Orthanc's PostgreSQL index as a deployment choice: the ``PostgreSQL`` section and its plugin library.

Orthanc keeps its index (patients, studies, series, instances, metadata) in SQLite by default. A store of
tens of millions of instances wants the PostgreSQL index plugin (Debian package ``orthanc-postgresql``).
This module turns a ``postgresql://user:password@host:port/database`` URL into the plugin's
configuration section and finds the plugin library on the machine at start (Debian 12 ships
``/usr/share/orthanc/plugins/libOrthancPostgreSQLIndex.so``; other releases and the Docker images put
it elsewhere).

The settings that work with plugin 4.0 (measured on Debian 12, Orthanc 1.10.1): ``EnableIndex: true``,
``EnableStorage: false`` (image files stay on the filesystem), ``Lock: true`` (one Orthanc per database),
``IndexConnectionsCount: 1`` (more connections cause serialization retries on 4.0).
"""

from __future__ import annotations

import glob
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: Where the index plugin library is looked for, first match wins (Debian 12/13, Docker images).
PLUGIN_SEARCH = (
    "/usr/share/orthanc/plugins/libOrthancPostgreSQLIndex.so",
    "/usr/lib/orthanc/libOrthancPostgreSQLIndex.so*",
    "/usr/share/orthanc/plugins-available/libOrthancPostgreSQLIndex.so",
    "/usr/local/share/orthanc/plugins/libOrthancPostgreSQLIndex.so",
)

#: What the deployment needs regardless of where the database is.
RECOMMENDED = {"EnableIndex": True, "EnableStorage": False, "Lock": True, "IndexConnectionsCount": 1}


class PostgresError(ValueError):
    """The PostgreSQL URL or section is unusable, or the plugin is not installed."""


@dataclass(frozen=True)
class PostgresTarget:
    """Where the index lives."""

    host: str
    port: int
    database: str
    username: str
    password: str

    def section(self, base: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The ``PostgreSQL`` configuration section: ``base`` with this target and the recommended settings."""
        section = dict(base or {})
        section.update(RECOMMENDED)
        section.update({"Host": self.host, "Port": self.port, "Database": self.database,
                        "Username": self.username, "Password": self.password})
        return section

    @property
    def redacted_url(self) -> str:
        """The URL without its password (for messages)."""
        return f"postgresql://{self.username}@{self.host}:{self.port}/{self.database}"


def parse_url(url: str) -> PostgresTarget:
    """``postgresql://user[:password]@host[:port]/database`` (``postgres://`` too).

    Raises:
        PostgresError: naming what is missing.
    """
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("postgresql", "postgres"):
        raise PostgresError(f"expected postgresql://user:password@host:port/database, got scheme {parts.scheme!r}")
    database = urllib.parse.unquote(parts.path.lstrip("/"))
    if not parts.hostname or not database or "/" in database:
        raise PostgresError("a PostgreSQL URL needs a host and a database: postgresql://user:password@host:5432/db")
    try:
        port = parts.port or 5432
    except ValueError:
        raise PostgresError(f"invalid port in PostgreSQL URL {parts.netloc.rpartition('@')[2]!r}") from None
    return PostgresTarget(host=parts.hostname, port=port, database=database,
                          username=urllib.parse.unquote(parts.username or "postgres"),
                          password=urllib.parse.unquote(parts.password or ""))


def index_enabled(config: Mapping[str, Any]) -> bool:
    """Whether the configuration asks for the PostgreSQL index."""
    section = config.get("PostgreSQL")
    return isinstance(section, Mapping) and bool(section.get("EnableIndex"))


def find_index_plugin(search: Sequence[str] = PLUGIN_SEARCH) -> Path | None:
    """The PostgreSQL index plugin library installed here, or None."""
    for pattern in search:
        for match in sorted(glob.glob(pattern)):
            if Path(match).is_file():
                return Path(match)
    return None


def plugins_with_index(plugins: Sequence[str], library: Path) -> list[str]:
    """``Plugins`` that load the index library exactly once.

    A folder entry (``/usr/share/orthanc/plugins``) already loads every library in it, the index one
    included when it lives there; otherwise the library is added by path.
    """
    result = list(plugins)
    for entry in result:
        path = Path(entry)
        if path == library or (path.is_dir() and library.parent == path):
            return result
        if path.name.startswith("libOrthancPostgreSQLIndex"):
            return result
    result.append(str(library))
    return result


def check_section(section: Mapping[str, Any]) -> list[str]:
    """Warnings about a ``PostgreSQL`` section that differs from what is known to work (plugin 4.0)."""
    warnings = []
    for key, want in RECOMMENDED.items():
        if key in section and section[key] != want:
            warnings.append(f"PostgreSQL.{key} is {section[key]!r}; {want!r} is what works with the index plugin "
                            "4.0 (docs/operations.md)")
    return warnings
