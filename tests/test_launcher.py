"""The launcher turns the Docker configuration into one that runs on this machine."""

from __future__ import annotations

from pathlib import Path

from rtharvest.launcher import (
    DEFAULT_CONFIG,
    effective_config,
    load_json_config,
    plugin_environment,
    set_dotted,
)


def test_effective_config_overrides_only_local_things(tmp_path: Path) -> None:
    base = load_json_config(DEFAULT_CONFIG)
    cfg = effective_config(base, DEFAULT_CONFIG.parent, run_dir=tmp_path, http_port=18042, dicom_port=14242,
                           modalities={"ARIA": ["ARIA", "127.0.0.1", 11112]})
    assert cfg["HttpPort"] == 18042 and cfg["DicomPort"] == 14242
    assert cfg["StorageDirectory"] == str(tmp_path / "storage")
    assert Path(cfg["PythonScript"]).is_file() and Path(cfg["PythonScript"]).name == "rtharvest_entry.py"
    assert cfg["RtHarvest"]["DatabasePath"] == str(tmp_path / "rtharvest.sqlite")
    assert set(cfg["RtHarvest"]["Sources"]) == {"ARIA"}
    # Security settings pass through untouched.
    for key in ("AuthenticationEnabled", "RegisteredUsers", "DicomAlwaysAllowStore", "DicomCheckModalityHost",
                "UserMetadata"):
        assert cfg[key] == base[key]


def test_plain_orthanc_has_no_plugin(tmp_path: Path) -> None:
    cfg = effective_config({"Plugins": ["/x"], "PythonScript": "a.py", "RtHarvest": {}}, tmp_path,
                           run_dir=tmp_path, plugin=False)
    assert cfg["Plugins"] == [] and "PythonScript" not in cfg and "RtHarvest" not in cfg


def test_environment_sets_tcp_nodelay_and_pythonpath() -> None:
    env = plugin_environment()
    assert env["TCP_NODELAY"] == "1"
    assert "site-packages" in env["PYTHONPATH"].split(":")[0]


def test_set_dotted_creates_objects() -> None:
    cfg: dict = {}
    set_dotted(cfg, "RtHarvest.Sources.ARIA.MaxConcurrent", 3)
    assert cfg == {"RtHarvest": {"Sources": {"ARIA": {"MaxConcurrent": 3}}}}
