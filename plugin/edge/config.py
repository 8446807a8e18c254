"""The ``RtHarvest`` section of orthanc.json, validated once into frozen dataclasses.

Orthanc hands the plugin its whole configuration as JSON; :func:`load_config` turns the parts the
harvester needs (its own ``RtHarvest`` section plus Orthanc's ``DicomAet``, ports, users and
``DicomModalities``) into typed values. Every mistake is reported with the JSON path that caused it, so a
physicist editing orthanc.json sees exactly what to fix when Orthanc refuses to start the plugin.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, time
from enum import Enum, StrEnum
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from ..core.schedule import ScheduleError, parse_schedule
from ..core.strategies import DEFAULT_LOOK_BACK_DAYS, RecordDiscovery, SourceCapability
from .postgres import check_section, index_enabled


class ConfigError(ValueError):
    """orthanc.json holds a value the harvester cannot use; the message names the setting."""


class Backend(StrEnum):
    """How the workers talk DICOM to a source."""

    #: Orthanc's own DicomModalities client, driven over Orthanc's REST API on loopback.
    ORTHANC = "orthanc"
    #: pynetdicom from the worker thread: strict hierarchical queries and sequence return keys.
    PYNETDICOM = "pynetdicom"


class QueryModel(StrEnum):
    """What the source's C-FIND accepts."""

    #: Finds an instance by SOPInstanceUID alone (ARIA, Orthanc, dcmqrscp default mode).
    RELATIONAL = "relational"
    #: Needs the full Patient/Study/Series hierarchy in every query (dcmqrscp -XF -XM, many PACS).
    HIERARCHICAL = "hierarchical"


class CandidatePolicy(StrEnum):
    """What happens to objects retrieved only to inspect their references that turn out not to belong."""

    DELETE = "delete"
    QUARANTINE = "quarantine"


@dataclass(frozen=True)
class Modality:
    """One entry of Orthanc's ``DicomModalities``."""

    name: str
    aet: str
    host: str
    port: int


@dataclass(frozen=True)
class SourceSettings:
    """Per-source harvest settings (``RtHarvest.Sources.<name>``, falling back to ``SourceDefaults``)."""

    backend: Backend = Backend.ORTHANC
    model: QueryModel = QueryModel.RELATIONAL
    sequence_return_keys: bool = False
    #: The source returns instance attributes it does not index (FrameOfReferenceUID, TreatmentDate) as
    #: C-FIND return keys. Off by default: dcmqrscp and many PACS do not, and then one instance per
    #: candidate series is retrieved to read its FoR (and deleted again if it does not belong).
    instance_return_keys: bool = False
    max_concurrent: int = 2
    quiet_hours: tuple[time, time] | None = None
    #: IANA time zone of ``quiet_hours`` (``"Europe/Zurich"``); None: the machine's local time.
    time_zone: str | None = None
    find_timeout: float = 60.0
    move_timeout: float = 600.0
    #: How a dated window's treatment records are found (see :class:`RecordDiscovery`).
    record_discovery: RecordDiscovery = RecordDiscovery.STUDY_DATE
    #: StudyDate pre-filter: how many days before the window a record's study may be dated.
    look_back_days: int = DEFAULT_LOOK_BACK_DAYS
    #: The source (relational) matches study- and series-level keys in IMAGE-level C-FINDs (Orthanc, ARIA).
    #: Off by default: dcmqrscp ignores them there and would answer with every instance of the archive.
    upper_level_keys: bool = False

    def capability(self, supports_sequence_keys: bool = False) -> SourceCapability:
        """What the search strategies may use at this source (sequence keys only if the backend sends them)."""
        return SourceCapability(
            relational=self.model is QueryModel.RELATIONAL,
            sequence_return_keys=self.sequence_return_keys and supports_sequence_keys,
            instance_return_keys=self.instance_return_keys,
            record_discovery=self.record_discovery,
            look_back_days=self.look_back_days,
            upper_level_keys=self.upper_level_keys,
        )

    def __post_init__(self) -> None:
        if self.max_concurrent < 1:
            raise ConfigError("MaxConcurrent must be at least 1")
        if self.find_timeout <= 0 or self.move_timeout <= 0:
            raise ConfigError("FindTimeout and MoveTimeout must be positive")


@dataclass(frozen=True)
class HarvesterConfig:
    """Everything the harvester reads from orthanc.json."""

    aet: str
    dicom_port: int
    http_port: int
    ssl: bool
    database_path: Path
    workers: int
    max_attempts: int
    backoff_base: float
    backoff_max: float
    lease_seconds: float
    log_retention_days: int
    candidate_policy: CandidatePolicy
    modalities: Mapping[str, Modality]
    sources: Mapping[str, SourceSettings] = field(default_factory=dict)
    source_defaults: SourceSettings = field(default_factory=SourceSettings)
    #: Settings that were ignored, with why (shown by /rtharvest/status).
    warnings: tuple[str, ...] = ()
    #: Where Orthanc keeps its index: "SQLite" (default) or "PostgreSQL" (the index plugin).
    store_index: str = "SQLite"
    #: ``RtHarvest.Schedules``: recurring incremental harvests (validated definitions).
    schedules: tuple[Mapping[str, Any], ...] = ()
    #: ``RtHarvest.ScheduleNow``: a fixed "now" for the scheduler (tests, dry runs); None: the wall clock.
    schedule_now: str | None = None
    #: ``UnpackMimSessions``: REG searches also retrieve Raw Data objects (MIM sessions), which are unpacked
    #: in the harvester; their RTSTRUCT/REG objects are planned like any other.
    unpack_mim_sessions: bool = False
    #: ``OutageBackoffMaxSeconds``: longest wait between two tries of a job held back by an outage (a source
    #: or the store down); such waits never spend the job's attempts.
    outage_backoff_max: float = 3600.0
    #: Orthanc's ``StorageDirectory`` (resolved like ``DatabasePath``): where free space is checked.
    storage_directory: Path = Path("OrthancStorage")
    #: Orthanc's ``IndexDirectory`` (default: its ``StorageDirectory``): where its SQLite index lives.
    index_directory: Path = Path("OrthancStorage")
    #: ``MinFreeStorageMB``: no move starts while the storage has less free space than this.
    min_free_storage_mb: float = 1024.0

    def source(self, name: str) -> SourceSettings:
        """Settings for source ``name`` (its own section, else the defaults)."""
        return self.sources.get(name, self.source_defaults)

    def require_modality(self, name: str) -> Modality:
        """The DicomModalities entry ``name``; :class:`ConfigError` naming the known ones otherwise."""
        try:
            return self.modalities[name]
        except KeyError:
            known = ", ".join(sorted(self.modalities)) or "none"
            raise ConfigError(
                f"unknown source {name!r}: it must be one of the DicomModalities of orthanc.json ({known})"
            ) from None


_HHMM = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)$")


def _parse_time(value: Any, where: str) -> time:
    if not isinstance(value, str) or not _HHMM.match(value):
        raise ConfigError(f"{where}: expected a time as \"HH:MM\", got {value!r}")
    hours, minutes = value.split(":")
    return time(int(hours), int(minutes))


def _number(section: Mapping[str, Any], key: str, default: float, where: str, minimum: float) -> float:
    value = section.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{where}.{key}: expected a number, got {value!r}")
    if value < minimum:
        raise ConfigError(f"{where}.{key}: must be at least {minimum}, got {value!r}")
    return float(value)


def _integer(section: Mapping[str, Any], key: str, default: int, where: str, minimum: int) -> int:
    value = section.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{where}.{key}: expected an integer, got {value!r}")
    if value < minimum:
        raise ConfigError(f"{where}.{key}: must be at least {minimum}, got {value!r}")
    return value


def _enum(section: Mapping[str, Any], key: str, enum: type[Enum], default: Enum, where: str) -> Any:
    value = section.get(key, default.value)
    try:
        return enum(str(value).lower())
    except ValueError:
        allowed = ", ".join(repr(m.value) for m in enum)
        raise ConfigError(f"{where}.{key}: {value!r} is not one of {allowed}") from None


def _source_settings(section: Any, where: str, base: SourceSettings) -> SourceSettings:
    if not isinstance(section, Mapping):
        raise ConfigError(f"{where}: expected an object")
    quiet: tuple[time, time] | None = base.quiet_hours
    if "QuietHours" in section:
        raw = section["QuietHours"]
        if raw is None or raw == []:
            quiet = None
        elif isinstance(raw, list) and len(raw) == 2:
            quiet = (_parse_time(raw[0], f"{where}.QuietHours[0]"), _parse_time(raw[1], f"{where}.QuietHours[1]"))
        else:
            raise ConfigError(f"{where}.QuietHours: expected [\"HH:MM\", \"HH:MM\"] or null, got {raw!r}")
    time_zone = section.get("TimeZone", base.time_zone)
    if time_zone is not None:
        if not isinstance(time_zone, str) or not time_zone:
            raise ConfigError(f"{where}.TimeZone: expected an IANA time zone name such as \"Europe/Zurich\", "
                              f"got {time_zone!r}")
        try:
            ZoneInfo(time_zone)
        except (ZoneInfoNotFoundError, ValueError):
            raise ConfigError(f"{where}.TimeZone: unknown time zone {time_zone!r} (IANA names such as "
                              "\"Europe/Zurich\" or \"UTC\")") from None
    seq = section.get("SequenceReturnKeys", base.sequence_return_keys)
    if not isinstance(seq, bool):
        raise ConfigError(f"{where}.SequenceReturnKeys: expected true or false, got {seq!r}")
    inst = section.get("InstanceReturnKeys", base.instance_return_keys)
    if not isinstance(inst, bool):
        raise ConfigError(f"{where}.InstanceReturnKeys: expected true or false, got {inst!r}")
    upper = section.get("UpperLevelKeys", base.upper_level_keys)
    if not isinstance(upper, bool):
        raise ConfigError(f"{where}.UpperLevelKeys: expected true or false, got {upper!r}")
    return SourceSettings(
        backend=_enum(section, "Backend", Backend, base.backend, where),
        model=_enum(section, "QueryModel", QueryModel, base.model, where),
        sequence_return_keys=seq,
        instance_return_keys=inst,
        max_concurrent=_integer(section, "MaxConcurrent", base.max_concurrent, where, 1),
        quiet_hours=quiet,
        time_zone=time_zone,
        find_timeout=_number(section, "FindTimeout", base.find_timeout, where, 0.1),
        move_timeout=_number(section, "MoveTimeout", base.move_timeout, where, 0.1),
        record_discovery=_enum(section, "RecordDiscovery", RecordDiscovery, base.record_discovery, where),
        look_back_days=_integer(section, "StudyDateLookBackDays", base.look_back_days, where, 0),
        upper_level_keys=upper,
    )


def _modalities(raw: Any) -> dict[str, Modality]:
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise ConfigError("DicomModalities: expected an object")
    result: dict[str, Modality] = {}
    for name, entry in raw.items():
        # Orthanc accepts both the array form [AET, host, port] and the object form.
        if isinstance(entry, list) and len(entry) >= 3:
            aet, host, port = entry[0], entry[1], entry[2]
        elif isinstance(entry, Mapping):
            aet, host, port = entry.get("AET"), entry.get("Host"), entry.get("Port")
        else:
            raise ConfigError(f"DicomModalities.{name}: expected [AET, host, port] or an object with AET/Host/Port")
        if not isinstance(aet, str) or not isinstance(host, str):
            raise ConfigError(f"DicomModalities.{name}: AET and Host must be strings")
        try:
            port_number = int(port)
        except (TypeError, ValueError):
            raise ConfigError(f"DicomModalities.{name}: Port must be a number, got {port!r}") from None
        result[name] = Modality(name=name, aet=aet, host=host, port=port_number)
    return result


def load_config(orthanc: Mapping[str, Any], config_dir: Path | None = None) -> HarvesterConfig:
    """Validate Orthanc's configuration and return the harvester's view of it.

    ``config_dir`` resolves a relative ``RtHarvest.DatabasePath`` (Orthanc resolves its own relative
    paths against the configuration file's folder; we do the same).

    Raises:
        ConfigError: with the JSON path of the first invalid setting.
    """
    section = orthanc.get("RtHarvest", {})
    if not isinstance(section, Mapping):
        raise ConfigError("RtHarvest: expected an object")
    where = "RtHarvest"
    modalities = _modalities(orthanc.get("DicomModalities"))

    defaults = _source_settings(section.get("SourceDefaults", {}), f"{where}.SourceDefaults", SourceSettings())
    sources_raw = section.get("Sources", {})
    if not isinstance(sources_raw, Mapping):
        raise ConfigError(f"{where}.Sources: expected an object keyed by DicomModalities names")
    sources: dict[str, SourceSettings] = {}
    warnings: list[str] = []
    for name, sub in sources_raw.items():
        settings = _source_settings(sub, f"{where}.Sources.{name}", defaults)
        if name in modalities:
            sources[name] = settings
        else:
            # Deployments override DicomModalities (environment, tests) without editing RtHarvest.
            warnings.append(f"{where}.Sources.{name} ignored: no DicomModalities entry of that name")

    if index_enabled(orthanc):
        warnings.extend(check_section(orthanc["PostgreSQL"]))

    schedules_raw = section.get("Schedules", [])
    if not isinstance(schedules_raw, list):
        raise ConfigError(f"{where}.Schedules: expected a list of schedule objects")
    names: set[str] = set()
    for i, definition in enumerate(schedules_raw):
        try:
            parsed = parse_schedule(definition, list(modalities), where=f"{where}.Schedules[{i}]")
        except ScheduleError as exc:
            raise ConfigError(str(exc)) from None
        if parsed.id in names:
            raise ConfigError(f"{where}.Schedules[{i}].Name: {parsed.id!r} is used twice")
        names.add(parsed.id)
    schedule_now = section.get("ScheduleNow")
    if schedule_now is not None:
        try:
            moment = datetime.fromisoformat(str(schedule_now).replace("Z", "+00:00"))
        except ValueError:
            moment = None
        if moment is None or moment.tzinfo is None:
            raise ConfigError(f"{where}.ScheduleNow: an ISO 8601 time with its zone, e.g. \"2030-01-02T01:30:00Z\" "
                              f"(for tests only; leave it out to use the clock), got {schedule_now!r}")
        warnings.append(f"{where}.ScheduleNow is set: schedules see the time as {schedule_now} (testing only)")

    storage = Path(str(orthanc.get("StorageDirectory", "OrthancStorage")))
    db_raw = section.get("DatabasePath")
    if db_raw is None:
        database_path = storage / "rtharvest.sqlite"
    elif isinstance(db_raw, str) and db_raw:
        database_path = Path(db_raw)
    else:
        raise ConfigError(f"{where}.DatabasePath: expected a file path")
    if not database_path.is_absolute() and config_dir is not None:
        database_path = config_dir / database_path
    index_directory = Path(str(orthanc.get("IndexDirectory") or storage))
    if not storage.is_absolute() and config_dir is not None:
        storage = config_dir / storage
    if not index_directory.is_absolute() and config_dir is not None:
        index_directory = config_dir / index_directory

    lease_seconds = _number(section, "LeaseSeconds", 900.0, where, 1.0)
    # A move that outlives its job's lease would be taken over by another worker and run twice at once.
    # Workers extend the lease while a move runs, but a worker that dies mid-move cannot: the lease must
    # outlast the longest move the configuration allows.
    for key, settings in (("SourceDefaults", defaults), *((f"Sources.{n}", s) for n, s in sources.items())):
        if settings.move_timeout >= lease_seconds:
            raise ConfigError(f"{where}.{key}.MoveTimeout ({settings.move_timeout:g} s) must be shorter than "
                              f"{where}.LeaseSeconds ({lease_seconds:g} s)")

    unpack = section.get("UnpackMimSessions", False)
    if not isinstance(unpack, bool):
        raise ConfigError(f"{where}.UnpackMimSessions: expected true or false, got {unpack!r}")

    return HarvesterConfig(
        aet=str(orthanc.get("DicomAet", "ORTHANC")),
        dicom_port=int(orthanc.get("DicomPort", 4242)),
        http_port=int(orthanc.get("HttpPort", 8042)),
        ssl=bool(orthanc.get("SslEnabled", False)),
        database_path=database_path,
        workers=_integer(section, "Workers", 4, where, 1),
        max_attempts=_integer(section, "MaxAttempts", 10, where, 1),
        backoff_base=_number(section, "BackoffSeconds", 5.0, where, 0.0),
        backoff_max=_number(section, "BackoffMaxSeconds", 600.0, where, 0.0),
        lease_seconds=lease_seconds,
        log_retention_days=_integer(section, "LogRetentionDays", 365, where, 1),
        candidate_policy=_enum(section, "CandidatePolicy", CandidatePolicy, CandidatePolicy.DELETE, where),
        modalities=modalities,
        sources=sources,
        source_defaults=defaults,
        warnings=tuple(warnings),
        store_index="PostgreSQL" if index_enabled(orthanc) else "SQLite",
        schedules=tuple(schedules_raw),
        schedule_now=None if schedule_now is None else str(schedule_now),
        unpack_mim_sessions=unpack,
        outage_backoff_max=_number(section, "OutageBackoffMaxSeconds", 3600.0, where, 1.0),
        storage_directory=storage,
        index_directory=index_directory,
        min_free_storage_mb=_number(section, "MinFreeStorageMB", 1024.0, where, 0.0),
    )
