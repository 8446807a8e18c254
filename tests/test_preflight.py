"""Start-up checks: configurations that would fail later are refused or warned about, naming the key."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from rtharvest.edge.config import ConfigError
from rtharvest.edge.launcher import DEFAULT_CONFIG, load_json_config
from rtharvest.edge.loopback import loopback_url
from rtharvest.edge.preflight import PROVENANCE_METADATA, RecordingConfiguration, load_checked
from rtharvest.export.settings import load_settings
from rtharvest.store.tracking import ProvenanceItem


@pytest.fixture()
def shipped() -> dict:
    cfg = load_json_config(DEFAULT_CONFIG)
    cfg["DicomModalities"] = {"ARIA": ["ARIA", "127.0.0.1", 104], "MIM": ["MIM", "127.0.0.1", 105]}
    return cfg


def test_the_shipped_configuration_passes_without_warnings(shipped: dict) -> None:
    assert load_checked(shipped).warnings == ()


def test_provenance_names_are_the_ones_written() -> None:
    item = ProvenanceItem("oid", "h", "1.2", "SRC", 1, "HOP", "2024-01-01T00:00:00Z", 0)
    assert tuple(item.metadata()) == PROVENANCE_METADATA


@pytest.mark.parametrize("missing", [None, "HarvestId", "HarvestedAt"])
def test_user_metadata_without_the_provenance_names_is_refused(shipped: dict, missing: str | None) -> None:
    cfg = copy.deepcopy(shipped)
    if missing is None:
        del cfg["UserMetadata"]
    else:
        del cfg["UserMetadata"][missing]
    with pytest.raises(ConfigError) as err:
        load_checked(cfg)
    assert "UserMetadata lacks" in str(err.value)
    assert (missing or "HarvestSource") in str(err.value)


def test_unknown_keys_are_warned_with_the_closest_known_one(shipped: dict) -> None:
    cfg = copy.deepcopy(shipped)
    cfg["RtHarvest"]["MaxAtempts"] = 3
    cfg["RtHarvest"].setdefault("Sources", {})["ARIA"] = {"Backend": "pynetdicom", "FindTimeOut": 5}
    cfg["RtHarvest"].setdefault("SourceDefaults", {})["QuietHour"] = ["22:00", "06:00"]
    warnings = load_checked(cfg).warnings
    assert any(w.startswith("RtHarvest.MaxAtempts is not a setting") and "did you mean MaxAttempts?" in w
               for w in warnings), warnings
    assert any(w.startswith("RtHarvest.Sources.ARIA.FindTimeOut") and "FindTimeout" in w for w in warnings), warnings
    assert any(w.startswith("RtHarvest.SourceDefaults.QuietHour ") and "QuietHours" in w for w in warnings), warnings
    assert len(warnings) == 3


def test_sequence_return_keys_with_a_backend_that_cannot_send_them(shipped: dict) -> None:
    cfg = copy.deepcopy(shipped)
    sources = cfg["RtHarvest"].setdefault("Sources", {})
    sources["ARIA"] = {"Backend": "orthanc", "SequenceReturnKeys": True}
    sources["MIM"] = {"Backend": "pynetdicom", "SequenceReturnKeys": True}
    warnings = load_checked(cfg).warnings
    assert [w for w in warnings if "SequenceReturnKeys" in w] == [
        "RtHarvest.Sources.ARIA.SequenceReturnKeys is true but its Backend 'orthanc' cannot send sequence keys "
        "(use \"pynetdicom\"); searches retrieve candidates instead"]


def test_upper_level_keys_reach_the_capability_and_are_ignored_on_hierarchical_sources(shipped: dict) -> None:
    cfg = copy.deepcopy(shipped)
    sources = cfg["RtHarvest"].setdefault("Sources", {})
    sources["ARIA"] = {"QueryModel": "relational", "UpperLevelKeys": True}
    sources["MIM"] = {"QueryModel": "hierarchical", "UpperLevelKeys": True}
    checked = load_checked(cfg)
    assert [w for w in checked.warnings if "UpperLevelKeys" in w] == [
        "RtHarvest.Sources.MIM.UpperLevelKeys is true but its QueryModel is 'hierarchical': ignored (a "
        "hierarchical source is searched level by level)"]
    assert checked.sources["ARIA"].capability().image_level_search
    assert not checked.sources["MIM"].capability().image_level_search
    sources["ARIA"]["UpperLevelKeys"] = "yes"
    with pytest.raises(ConfigError, match="UpperLevelKeys: expected true or false"):
        load_checked(cfg)


def test_ssl_enabled_makes_the_loopback_client_speak_https(shipped: dict) -> None:
    cfg = copy.deepcopy(shipped)
    plain = load_checked(cfg)
    assert loopback_url(plain.ssl, plain.http_port).startswith("http://127.0.0.1:")
    cfg["SslEnabled"] = True
    secure = load_checked(cfg)
    assert loopback_url(secure.ssl, secure.http_port) == f"https://127.0.0.1:{cfg.get('HttpPort', 8042)}"


def test_sections_parsed_by_other_services_are_known(shipped: dict, tmp_path: Path) -> None:
    """Keys read by another section's parser (the export settings, which build_runtime loads from the same
    recording view) are known; a typo inside them is still named."""
    cfg = copy.deepcopy(shipped)
    cfg["RtHarvest"]["Export"] = {"Site": "SITEA", "BatchSize": 10, "BatchSise": 5}
    recording = RecordingConfiguration(cfg)
    config = load_checked(recording, tmp_path)
    assert any("Export" in w for w in recording.unknown_keys())  # not parsed yet
    load_settings(recording.orthanc, config)
    assert recording.unknown_keys() == [
        "RtHarvest.Export.BatchSise is not a setting the harvester knows (did you mean BatchSize?); ignored"]


def test_ssl_on_an_orthanc_that_crashes_on_https_is_warned(shipped: dict) -> None:
    cfg = copy.deepcopy(shipped)
    cfg["SslEnabled"] = True
    assert any(w.startswith("SslEnabled: Orthanc 1.10.1") for w in load_checked(cfg, None, "1.10.1").warnings)
    assert not any(w.startswith("SslEnabled") for w in load_checked(cfg, None, "1.12.4").warnings)
    cfg["SslEnabled"] = False
    assert not any(w.startswith("SslEnabled") for w in load_checked(cfg, None, "1.10.1").warnings)
