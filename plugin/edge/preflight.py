"""Start-up checks of orthanc.json beyond the values :func:`rtharvest.edge.config.load_config` parses.

Configurations that would only fail later, and quietly, are refused or warned about here, naming the key:

* ``UserMetadata`` without the five provenance names: every provenance write would fail (refused);
* unknown keys in ``RtHarvest`` (typos such as ``MaxAtempts``): warned, with the closest known key. The
  known keys are the ones the parsers actually read (recorded while they run, see
  :class:`RecordingConfiguration`), so a setting added to a parser is known here without a second list;
* ``SequenceReturnKeys`` on a source whose backend cannot send sequence keys: warned (the strategy falls
  back to retrieving candidates);

* ``SslEnabled``: the loopback client speaks HTTPS when Orthanc does (``loopback.loopback_url``); on an
  Orthanc build known to crash on HTTPS requests it is warned about.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from .config import Backend, ConfigError, HarvesterConfig, QueryModel, load_config

__all__ = ["CRASHES_ON_HTTPS", "PROVENANCE_METADATA", "RecordingConfiguration", "load_checked", "startup_problems",
           "with_warnings"]

#: The metadata names provenance is written under (docs/contract.md), in ``tracking.ProvenanceItem`` order.
PROVENANCE_METADATA = ("HarvestSource", "HarvestJob", "HarvestHop", "HarvestedAt", "HarvestId")

#: Backends that can send sequence return keys in a C-FIND (``SourceBackend.supports_sequence_keys``).
_SEQUENCE_KEY_BACKENDS = frozenset({Backend.PYNETDICOM})


class _Recorder(Mapping[str, Any]):
    """A read-only view of a JSON object that remembers which keys were asked for (at any depth)."""

    def __init__(self, data: Mapping[str, Any], path: str, seen: set[str]) -> None:
        self._data = data
        self._path = path
        self._seen = seen

    def _child(self, key: str, value: Any) -> Any:
        self._seen.add(f"{self._path}.{key}")
        if isinstance(value, Mapping):
            return _Recorder(value, f"{self._path}.{key}", self._seen)
        return value

    def __getitem__(self, key: str) -> Any:
        self._seen.add(f"{self._path}.{key}")  # asked for, even when absent (``get`` with a default)
        return self._child(key, self._data[key])

    def __contains__(self, key: object) -> bool:
        if isinstance(key, str):
            self._seen.add(f"{self._path}.{key}")
        return key in self._data

    def __iter__(self) -> Iterator[str]:
        # Iterating an object (Sources, keyed by modality names) reads every key of it.
        for key in self._data:
            self._seen.add(f"{self._path}.{key}")
            yield key

    def __len__(self) -> int:
        return len(self._data)


def _unknown_keys(section: Mapping[str, Any], path: str, seen: set[str]) -> list[str]:
    warnings: list[str] = []
    siblings = [k.rsplit(".", 1)[1] for k in seen if k.rsplit(".", 1)[0] == path]
    for key, value in section.items():
        full = f"{path}.{key}"
        if full not in seen:
            close = difflib.get_close_matches(key, siblings, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            warnings.append(f"{full} is not a setting the harvester knows{hint}; ignored")
        elif isinstance(value, Mapping):
            warnings += _unknown_keys(value, full, seen)
    return warnings


class RecordingConfiguration:
    """Orthanc's configuration with an ``RtHarvest`` section that records which keys its parsers read.

    Hand :attr:`orthanc` to every parser (``load_config``, ``build_runtime`` and the sections it parses:
    exports, schedules, ...); afterwards :meth:`unknown_keys` names what none of them read.
    """

    def __init__(self, orthanc: Mapping[str, Any]) -> None:
        self.raw = orthanc
        self.seen: set[str] = set()
        self.section = orthanc.get("RtHarvest", {})
        view = dict(orthanc)
        if isinstance(self.section, Mapping):
            view["RtHarvest"] = _Recorder(self.section, "RtHarvest", self.seen)
        self.orthanc: Mapping[str, Any] = view

    def unknown_keys(self) -> list[str]:
        """A warning per ``RtHarvest`` key no parser asked for, with the closest known key."""
        return _unknown_keys(self.section, "RtHarvest", self.seen) if isinstance(self.section, Mapping) else []


def load_checked(orthanc: Mapping[str, Any] | RecordingConfiguration,
                 config_dir: Path | None = None, orthanc_version: str | None = None) -> HarvesterConfig:
    """:func:`load_config`, then the checks of this module: refusals raise :class:`ConfigError`, warnings
    are added to ``HarvesterConfig.warnings`` (shown by ``/rtharvest/status`` and logged at start-up).

    Given a :class:`RecordingConfiguration`, unknown keys are left to the caller (other sections are
    parsed later, see ``app.install``); given a plain mapping, they are checked against ``load_config``.
    """
    recording = orthanc if isinstance(orthanc, RecordingConfiguration) else RecordingConfiguration(orthanc)
    config = load_config(recording.orthanc, config_dir)
    refusals, warnings = startup_problems(recording.raw, config, orthanc_version)
    if refusals:
        raise ConfigError("; ".join(refusals))
    if not isinstance(orthanc, RecordingConfiguration):
        warnings = recording.unknown_keys() + warnings
    return with_warnings(config, warnings)


def with_warnings(config: HarvesterConfig, warnings: list[str]) -> HarvesterConfig:
    """``config`` with ``warnings`` appended."""
    return replace(config, warnings=config.warnings + tuple(warnings)) if warnings else config


#: Orthanc builds whose HTTPS server crashes (SIGSEGV) on the first HTTPS request: Debian's 1.10.1 package
#: (its civetweb with OpenSSL 3), with or without this plugin (tested with curl and Python clients).
CRASHES_ON_HTTPS = frozenset({"1.10.1"})


def startup_problems(orthanc: Mapping[str, Any], config: HarvesterConfig,
                     orthanc_version: str | None = None) -> tuple[list[str], list[str]]:
    """(refusals, warnings) about the rest of the configuration, each naming its key."""
    refusals: list[str] = []
    warnings: list[str] = []
    if config.ssl and orthanc_version in CRASHES_ON_HTTPS:
        warnings.append(
            f"SslEnabled: Orthanc {orthanc_version} as packaged by Debian crashes on the first HTTPS request, "
            "the harvester's own loopback calls included; keep SslEnabled false and terminate TLS in a reverse "
            "proxy (docs/operations.md)")
    declared = orthanc.get("UserMetadata")
    names = set(declared) if isinstance(declared, Mapping) else set()
    missing = [n for n in PROVENANCE_METADATA if n not in names]
    if missing:
        refusals.append(
            f"UserMetadata lacks {', '.join(missing)}: provenance is written as these metadata, so each must be "
            "declared with a number from 1024 up (see docker/orthanc.json)")
    for name in sorted(config.sources):
        settings = config.sources[name]
        if settings.sequence_return_keys and settings.backend not in _SEQUENCE_KEY_BACKENDS:
            warnings.append(
                f"RtHarvest.Sources.{name}.SequenceReturnKeys is true but its Backend {settings.backend.value!r} "
                "cannot send sequence keys (use \"pynetdicom\"); searches retrieve candidates instead")
    defaults = config.source_defaults
    for name, settings in [*sorted(config.sources.items()), ("", defaults)]:
        if settings.upper_level_keys and settings.model is not QueryModel.RELATIONAL:
            where = f"RtHarvest.Sources.{name}" if name else "RtHarvest.SourceDefaults"
            warnings.append(f"{where}.UpperLevelKeys is true but its QueryModel is "
                            f"{settings.model.value!r}: ignored (a hierarchical source is searched level by level)")
    if defaults.sequence_return_keys and defaults.backend not in _SEQUENCE_KEY_BACKENDS:
        warnings.append(
            f"RtHarvest.SourceDefaults.SequenceReturnKeys is true but Backend {defaults.backend.value!r} cannot "
            "send sequence keys (use \"pynetdicom\"); searches retrieve candidates instead")
    return refusals, warnings
