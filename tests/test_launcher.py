"""The launcher turns the Docker configuration into one that runs on this machine."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from rtharvest.edge import launcher
from rtharvest.edge.launcher import (
    DEFAULT_CONFIG,
    OrthancProcess,
    effective_config,
    load_json_config,
    plugin_environment,
    set_dotted,
)
from rtharvest.edge.postgres import (
    PostgresError,
    check_section,
    find_index_plugin,
    index_enabled,
    parse_url,
    plugins_with_index,
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


def test_postgres_url_becomes_the_index_section_with_the_settings_that_work(tmp_path: Path) -> None:
    target = parse_url("postgresql://orthanc:s%40cret@db.example:6543/pacs")
    assert (target.host, target.port, target.database, target.username, target.password) == (
        "db.example", 6543, "pacs", "orthanc", "s@cret")
    assert "s@cret" not in target.redacted_url
    config = effective_config(load_json_config(DEFAULT_CONFIG), DEFAULT_CONFIG.parent, run_dir=tmp_path,
                              postgres=target)
    section = config["PostgreSQL"]
    assert section["EnableIndex"] is True and section["EnableStorage"] is False
    assert section["Lock"] is True and section["IndexConnectionsCount"] == 1
    assert (section["Host"], section["Port"], section["Database"]) == ("db.example", 6543, "pacs")
    library = find_index_plugin()
    assert library is not None, "orthanc-postgresql is in run.sh's APT_PACKAGES"
    # Loaded exactly once: by the plugins folder it lives in, or by its own path.
    assert any(Path(p) == library or Path(p) == library.parent for p in config["Plugins"])
    # The one configuration names the compose service and keeps the index off unless asked for.
    assert index_enabled(load_json_config(DEFAULT_CONFIG)) is False
    assert load_json_config(DEFAULT_CONFIG)["PostgreSQL"]["Host"] == "postgres"


@pytest.mark.parametrize("url", ["mysql://u@h/db", "postgresql://u@h/", "postgresql:///db", "postgresql://u@h:x/db"])
def test_bad_postgres_url_is_a_clear_error(url: str) -> None:
    with pytest.raises(PostgresError, match="PostgreSQL URL|expected postgresql"):
        parse_url(url)


def test_orthanc_process_with_postgres_url_configures_the_index_without_starting(tmp_path: Path) -> None:
    # What `rtharvest-orthanc --postgres URL` builds: the URL becomes the PostgreSQL section.
    proc = OrthancProcess(tmp_path, postgres="postgresql://u@h:6543/db")
    section = proc.config["PostgreSQL"]
    assert (section["Host"], section["Port"], section["Database"], section["Username"]) == ("h", 6543, "db", "u")
    assert section["EnableIndex"] is True and index_enabled(proc.config)
    # The constructor only computes the configuration: no process, nothing written yet.
    assert proc.process is None and proc.pid is None
    assert not proc.config_path.exists() and not (tmp_path / "storage").exists()


def test_launcher_refuses_a_non_postgres_url_naming_the_problem(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    code = launcher.main(["--postgres", "mysql://x/y", "--run-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 1
    assert "rtharvest-orthanc:" in err and "'mysql'" in err and "postgresql://" in err
    assert not (tmp_path / "orthanc.json").exists()  # Orthanc was not started


def test_index_plugin_is_added_by_path_when_no_plugin_folder_holds_it(tmp_path: Path) -> None:
    library = tmp_path / "lib" / "libOrthancPostgreSQLIndex.so.4.0"
    library.parent.mkdir()
    library.write_bytes(b"")
    assert find_index_plugin([str(tmp_path / "none.so"), str(tmp_path / "lib" / "libOrthancPostgreSQLIndex.so*")]) \
        == library
    assert plugins_with_index(["/usr/share/orthanc/plugins/libOrthancPython.so"], library)[-1] == str(library)
    assert plugins_with_index([str(library.parent)], library) == [str(library.parent)]
    assert check_section({"IndexConnectionsCount": 4, "Lock": True})[0].startswith("PostgreSQL.IndexConnectionsCount")


def test_the_written_config_is_readable_by_its_owner_only(tmp_path: Path) -> None:
    """The effective orthanc.json holds the RegisteredUsers and PostgreSQL passwords: mode 0600 whatever the
    umask, and a file left readable by an older run is restricted before the passwords go in."""
    old = os.umask(0o022)
    try:
        proc = OrthancProcess(tmp_path / "run", postgres="postgresql://u:secret-pw@h:6543/db")
        proc.config_path.parent.mkdir(parents=True)
        proc.config_path.write_text("{}")
        proc.config_path.chmod(0o644)
        path = proc.write_config()
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o600
    written = json.loads(path.read_text())
    assert written["PostgreSQL"]["Password"] == "secret-pw" and written["RegisteredUsers"]


def test_the_first_run_credential_is_warned_about_until_changed() -> None:
    shipped = json.loads(launcher.DEFAULT_CONFIG.read_text())
    assert shipped["RegisteredUsers"] == {launcher.FIRST_RUN_USER: launcher.FIRST_RUN_PASSWORD}
    warning = launcher.first_run_credential_warning(shipped)
    assert warning is not None and repr(launcher.FIRST_RUN_USER) in warning
    assert launcher.FIRST_RUN_PASSWORD not in warning
    changed = {**shipped, "RegisteredUsers": {launcher.FIRST_RUN_USER: "a long random password 7f3k"}}
    assert launcher.first_run_credential_warning(changed) is None
    renamed = {**shipped, "RegisteredUsers": {"admin": launcher.FIRST_RUN_PASSWORD}}
    assert "'admin'" in (launcher.first_run_credential_warning(renamed) or "")
