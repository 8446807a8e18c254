"""docker/orthanc.json is the one configuration: it must validate, and bad values must be named."""

from __future__ import annotations

import copy
from datetime import time
from pathlib import Path

import pytest

from rtharvest.edge.config import Backend, CandidatePolicy, ConfigError, QueryModel, load_config
from rtharvest.edge.launcher import DEFAULT_CONFIG, load_json_config

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture()
def shipped() -> dict:
    return load_json_config(DEFAULT_CONFIG)


def test_shipped_config_validates_with_safe_defaults(shipped: dict) -> None:
    cfg = load_config(shipped)
    assert cfg.aet == "HARVEST"
    assert cfg.max_attempts == 10
    assert cfg.candidate_policy is CandidatePolicy.DELETE
    assert set(cfg.modalities) == {"ARIA", "MIM"}
    assert cfg.source("MIM").max_concurrent == 1
    assert cfg.warnings == ()
    # Safe defaults the issue asks for.
    assert shipped["AuthenticationEnabled"] is True and shipped["RegisteredUsers"]
    assert shipped["DicomAlwaysAllowStore"] is False
    assert shipped["DicomCheckModalityHost"] is True
    for modality in shipped["DicomModalities"].values():
        assert modality["AllowFind"] is False and modality["AllowMove"] is False
    names = set(shipped["UserMetadata"])
    # The contract's five, plus HarvestMimSession (the MIM session an unpacked REG/RTSTRUCT came from).
    assert names == {"HarvestId", "HarvestSource", "HarvestJob", "HarvestHop", "HarvestedAt", "HarvestMimSession"}
    assert cfg.unpack_mim_sessions is False
    assert all(index >= 1024 for index in shipped["UserMetadata"].values())


def test_dockerfile_uses_the_same_config() -> None:
    dockerfile = (REPO / "docker" / "Dockerfile").read_text()
    assert "COPY docker/orthanc.json /etc/orthanc/orthanc.json" in dockerfile
    assert "TCP_NODELAY=1" in dockerfile
    shipped = load_json_config(DEFAULT_CONFIG)
    assert shipped["PythonScript"] == "/etc/orthanc/rtharvest_entry.py"
    assert "COPY docker/rtharvest_entry.py /etc/orthanc/rtharvest_entry.py" in dockerfile


def test_source_settings_inherit_defaults(shipped: dict) -> None:
    cfg = copy.deepcopy(shipped)
    cfg["RtHarvest"]["SourceDefaults"] = {"Backend": "pynetdicom", "QueryModel": "hierarchical",
                                          "QuietHours": ["07:00", "19:30"]}
    cfg["RtHarvest"]["Sources"] = {"ARIA": {"MaxConcurrent": 3}}
    loaded = load_config(cfg)
    aria = loaded.source("ARIA")
    assert aria.backend is Backend.PYNETDICOM and aria.model is QueryModel.HIERARCHICAL
    assert aria.max_concurrent == 3
    assert aria.quiet_hours == (time(7, 0), time(19, 30))
    assert aria.time_zone is None  # the machine's local time unless TimeZone says otherwise
    cfg["RtHarvest"]["SourceDefaults"]["TimeZone"] = "Europe/Zurich"
    assert load_config(cfg).source("ARIA").time_zone == "Europe/Zurich"
    assert loaded.source("MIM") == loaded.source_defaults


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (("Workers",), 0, "RtHarvest.Workers: must be at least 1"),
        (("Workers",), "four", "RtHarvest.Workers: expected an integer"),
        (("MaxAttempts",), True, "RtHarvest.MaxAttempts: expected an integer"),
        (("CandidatePolicy",), "shred", "RtHarvest.CandidatePolicy: 'shred' is not one of"),
        (("SourceDefaults", "QuietHours"), ["25:00", "07:00"], "QuietHours[0]"),
        (("SourceDefaults", "QuietHours"), "night", "RtHarvest.SourceDefaults.QuietHours"),
        (("Sources", "ARIA", "Backend"), "telnet", "RtHarvest.Sources.ARIA.Backend"),
        (("Sources", "ARIA", "SequenceReturnKeys"), "yes", "SequenceReturnKeys: expected true or false"),
        (("Sources", "ARIA", "MaxConcurrent"), 0, "MaxConcurrent: must be at least 1"),
        (("Sources", "ARIA", "TimeZone"), "Mars/Olympus", "RtHarvest.Sources.ARIA.TimeZone: unknown time zone"),
        (("SourceDefaults", "TimeZone"), 2, "RtHarvest.SourceDefaults.TimeZone: expected an IANA time zone"),
        # A move that outlives its lease would be run twice at once by two workers.
        (("Sources", "MIM", "MoveTimeout"), 900, "RtHarvest.Sources.MIM.MoveTimeout (900 s) must be shorter than "
                                                 "RtHarvest.LeaseSeconds (900 s)"),
        (("LeaseSeconds",), 300, "RtHarvest.SourceDefaults.MoveTimeout (600 s) must be shorter than"),
    ],
)
def test_bad_values_are_named(shipped: dict, path: tuple[str, ...], value: object, message: str) -> None:
    cfg = copy.deepcopy(shipped)
    node = cfg["RtHarvest"]
    for key in path[:-1]:
        node = node.setdefault(key, {})
    node[path[-1]] = value
    with pytest.raises(ConfigError) as info:
        load_config(cfg)
    assert message in str(info.value)


def test_sources_for_unknown_modalities_are_ignored_with_a_warning(shipped: dict) -> None:
    cfg = copy.deepcopy(shipped)
    cfg["DicomModalities"] = {"ARIA": ["ARIA", "aria", 4242]}
    loaded = load_config(cfg)
    assert set(loaded.sources) == {"ARIA"}
    assert loaded.warnings == ("RtHarvest.Sources.MIM ignored: no DicomModalities entry of that name",)
    assert loaded.modalities["ARIA"].host == "aria"


def test_unknown_source_error_lists_known_ones(shipped: dict) -> None:
    loaded = load_config(shipped)
    with pytest.raises(ConfigError, match=r"unknown source 'PACS'.*\(ARIA, MIM\)"):
        loaded.require_modality("PACS")


def test_relative_database_path_resolves_against_config_dir(shipped: dict, tmp_path: Path) -> None:
    cfg = copy.deepcopy(shipped)
    cfg["RtHarvest"]["DatabasePath"] = "queue.sqlite"
    assert load_config(cfg, tmp_path).database_path == tmp_path / "queue.sqlite"
