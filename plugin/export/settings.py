"""``RtHarvest.Export`` settings and the destinations an export may name.

```json
"RtHarvest": {"Export": {
    "Site": "SITEA",                       // ClinicalTrialSiteID and pseudonym prefix (default: DicomAet)
    "Secret": "...",                       // optional (or RTHARVEST_EXPORT_SECRET in the environment); else
    "SecretFile": "...",                   // generated once into this file, mode 0600 (default: next to
                                           // DatabasePath, <name without .sqlite>.secret)
    "DatabasePath": "...",                 // default: <DatabasePath without .sqlite>-exports.sqlite
    "BatchSize": 50,                       // instances per C-STORE association / STOW-RS request
    "Folders": {"ARCHIVE": "/data/exports"},
    "ResearchArchives": ["CENTRAL"],       // destinations allowed although a harvest or schedule uses them
                                           // as a source (see ExportService.refusal)
    "DicomWeb": {"CENTRALWEB": {"Url": "https://host/dicom-web", "Username": "u", "Password": "p"}},
    "AllowCredentialsOverHttp": false,     // true, or "loopback" (127.0.0.0/8, ::1, localhost): Basic
                                           // credentials over plain http:// (default: refused)
    "Central": {"CENTRALWEB": {"Url": "https://host", "Username": "u", "Password": "p"}}  // see rtharvest.central
}}
```

A destination name is looked up in ``DicomModalities`` (C-STORE), then ``RtHarvest.Export.DicomWeb`` and
Orthanc's own ``DicomWeb.Servers`` (STOW-RS), then ``RtHarvest.Export.Folders``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..central.settings import CentralEndpoint, parse_endpoints
from ..edge.config import ConfigError, HarvesterConfig
from .deid import SITE_PATTERN
from .destinations import Destination, DicomNode, DicomWebServer, Folder, PlainHttpCredentials, plain_http_problem

__all__ = ["SECRET_ENV", "ExportSettings", "load_settings"]


@dataclass(frozen=True)
class ExportSettings:
    """What the export service needs from orthanc.json."""

    site: str
    database_path: Path
    calling_aet: str
    modalities: Mapping[str, tuple[str, str, int]]
    secret: bytes | None = field(default=None, repr=False)
    #: Where a generated secret is kept (``None``: :attr:`secret_path`'s default next to the database).
    secret_file: Path | None = None
    batch_size: int = 50
    folders: Mapping[str, Path] = field(default_factory=dict)
    dicomweb: Mapping[str, DicomWebServer] = field(default_factory=dict)
    #: Destination name → the consortium archive its exports are announced to (``Central``).
    central: Mapping[str, CentralEndpoint] = field(default_factory=dict)
    #: ``ResearchArchives``: destinations explicitly marked as research archives; only these may also be a
    #: source or lookup source of a harvest or schedule.
    research_archives: frozenset[str] = frozenset()

    @property
    def secret_path(self) -> Path:
        """The file holding the generated secret: apart from the database and its pseudonym map, so one
        copied file does not re-identify anyone."""
        if self.secret_file is not None:
            return self.secret_file
        return self.database_path.with_name(self.database_path.stem + ".secret")

    def destination_names(self) -> list[str]:
        """Every name an export may use."""
        return sorted({*self.modalities, *self.dicomweb, *self.folders})

    def kind_of(self, name: str) -> str | None:
        """``dicom``, ``dicomweb``, ``folder`` or ``None`` for an unknown name."""
        if name in self.modalities:
            return "dicom"
        if name in self.dicomweb:
            return "dicomweb"
        if name in self.folders:
            return "folder"
        return None

    def destination(self, name: str, export_id: str) -> Destination:
        """The destination ``name`` for one export (a folder gets a subfolder per export)."""
        if name in self.modalities:
            aet, host, port = self.modalities[name]
            return DicomNode(name, aet, host, port, self.calling_aet)
        if name in self.dicomweb:
            return self.dicomweb[name]
        if name in self.folders:
            return Folder(name, self.folders[name] / export_id)
        raise KeyError(name)


def _dicomweb_entry(name: str, value: Any, where: str, plain_http: PlainHttpCredentials) -> DicomWebServer:
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        # Orthanc's own DicomWeb.Servers short form: [url, username, password]
        url, user, password = (value + [None, None])[:3]
        return DicomWebServer(name, url, user, password, plain_http=plain_http)
    if isinstance(value, Mapping) and isinstance(value.get("Url"), str):
        user, password = value.get("Username"), value.get("Password")
        if user is not None and not isinstance(user, str) or password is not None and not isinstance(password, str):
            raise ConfigError(f"{where}.{name}: Username and Password must be strings")
        return DicomWebServer(name, value["Url"], user, password, plain_http=plain_http)
    raise ConfigError(f"{where}.{name}: expected {{\"Url\": ..., \"Username\": ..., \"Password\": ...}} "
                      "or [url, username, password]")


#: The environment variable that gives the export secret (takes precedence over ``Secret``).
SECRET_ENV = "RTHARVEST_EXPORT_SECRET"


def load_settings(orthanc: Mapping[str, Any], config: HarvesterConfig,
                  environ: Mapping[str, str] | None = None) -> ExportSettings:
    """Validate ``RtHarvest.Export``; :class:`ConfigError` names the setting."""
    environ = os.environ if environ is None else environ
    rt = orthanc.get("RtHarvest", {})
    section = rt.get("Export", {}) if isinstance(rt, Mapping) else {}
    where = "RtHarvest.Export"
    if not isinstance(section, Mapping):
        raise ConfigError(f"{where}: expected an object")
    site = section.get("Site", config.aet)
    if not isinstance(site, str) or not SITE_PATTERN.match(site):
        raise ConfigError(f"{where}.Site: 1-16 letters, digits, '-' or '_', got {str(site)[:30]!r}")
    secret_raw = section.get("Secret")
    if secret_raw is not None and (not isinstance(secret_raw, str) or len(secret_raw) < 16):
        raise ConfigError(f"{where}.Secret: a string of at least 16 characters (or leave it out: one is generated)")
    if environ.get(SECRET_ENV):
        secret_raw = environ[SECRET_ENV]
        if len(secret_raw) < 16:
            raise ConfigError(f"{SECRET_ENV}: at least 16 characters")
    secret_file = section.get("SecretFile")
    if secret_file is not None and (not isinstance(secret_file, str) or not secret_file):
        raise ConfigError(f"{where}.SecretFile: a file path")
    default_db = config.database_path.with_name(config.database_path.stem + "-exports.sqlite")
    db_path = Path(str(section.get("DatabasePath", default_db)))
    batch = section.get("BatchSize", 50)
    if isinstance(batch, bool) or not isinstance(batch, int) or not 1 <= batch <= 1000:
        raise ConfigError(f"{where}.BatchSize: an integer from 1 to 1000")
    folders_raw = section.get("Folders", {})
    if not isinstance(folders_raw, Mapping) or not all(isinstance(v, str) and v for v in folders_raw.values()):
        raise ConfigError(f"{where}.Folders: expected {{\"NAME\": \"/path\"}}")
    plain = section.get("AllowCredentialsOverHttp", False)
    if plain not in (False, True, "loopback"):
        raise ConfigError(f"{where}.AllowCredentialsOverHttp: false, true or \"loopback\"")
    plain_http = PlainHttpCredentials.ALWAYS if plain is True else \
        PlainHttpCredentials.LOOPBACK if plain == "loopback" else PlainHttpCredentials.NEVER
    web: dict[str, DicomWebServer] = {}
    orthanc_web = orthanc.get("DicomWeb", {})
    servers = orthanc_web.get("Servers", {}) if isinstance(orthanc_web, Mapping) else {}
    if isinstance(servers, Mapping):
        for name, value in servers.items():
            try:
                web[name] = _dicomweb_entry(name, value, "DicomWeb.Servers", plain_http)
            except ConfigError:
                continue  # Orthanc validates its own section; an entry we cannot use is simply not offered
    own = section.get("DicomWeb", {})
    if not isinstance(own, Mapping):
        raise ConfigError(f"{where}.DicomWeb: expected an object keyed by destination name")
    for name, value in own.items():
        web[name] = _dicomweb_entry(name, value, f"{where}.DicomWeb", plain_http)
    archives = section.get("ResearchArchives", [])
    if not isinstance(archives, list) or not all(isinstance(a, str) and a for a in archives):
        raise ConfigError(f"{where}.ResearchArchives: expected a list of destination names")
    modalities = {name: (m.aet, m.host, m.port) for name, m in config.modalities.items()}
    central = parse_endpoints(section.get("Central", {}), f"{where}.Central", {*modalities, *web, *folders_raw})
    for name, endpoint in central.items():
        # The archive's user/password or token travel with every announcement: the same rule as DICOMweb.
        if endpoint.username is not None or endpoint.password is not None or endpoint.token is not None:
            problem = plain_http_problem(f"{where}.Central.{name}", endpoint.url, plain_http)
            if problem:
                raise ConfigError(problem)
    return ExportSettings(site=site, database_path=db_path, calling_aet=config.aet, modalities=modalities,
                          secret=secret_raw.encode() if secret_raw else None, batch_size=batch,
                          folders={k: Path(v) for k, v in folders_raw.items()}, dicomweb=web,
                          central=central,
                          research_archives=frozenset(archives),
                          secret_file=Path(secret_file) if secret_file else None)
