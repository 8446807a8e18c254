"""docker/compose.yml and docker/Dockerfile agree with docker/orthanc.json (no Docker needed to check that).

The compose file is never run by the test suite (no Docker daemon in CI), so what it promises is read here:
the harvester waits for a healthy PostgreSQL, its environment switches the index on, and the database,
user and password it is given are the ones the ``postgres`` service creates.

The orthancteam/orthanc images turn ``ORTHANC__A__B_C`` variables into configuration keys; the PostgreSQL
ones are in the image's list of non-standard names (orthanc-builder ``docker/orthanc/env-var-non-standards.json``:
``ORTHANC__POSTGRESQL__ENABLE_INDEX`` is ``PostgreSQL.EnableIndex``), reproduced in :data:`IMAGE_PG_KEYS`.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from rtharvest.edge.config import load_config
from rtharvest.edge.launcher import DEFAULT_CONFIG, load_json_config, set_dotted
from rtharvest.edge.postgres import RECOMMENDED, index_enabled

DOCKER = Path(__file__).resolve().parent.parent / "docker"

#: How the Orthanc image names the PostgreSQL section's keys in its environment.
IMAGE_PG_KEYS = {
    "ORTHANC__POSTGRESQL__ENABLE_INDEX": "PostgreSQL.EnableIndex",
    "ORTHANC__POSTGRESQL__ENABLE_STORAGE": "PostgreSQL.EnableStorage",
    "ORTHANC__POSTGRESQL__HOST": "PostgreSQL.Host",
    "ORTHANC__POSTGRESQL__PORT": "PostgreSQL.Port",
    "ORTHANC__POSTGRESQL__DATABASE": "PostgreSQL.Database",
    "ORTHANC__POSTGRESQL__USERNAME": "PostgreSQL.Username",
    "ORTHANC__POSTGRESQL__PASSWORD": "PostgreSQL.Password",
    "ORTHANC__POSTGRESQL__LOCK": "PostgreSQL.Lock",
}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded = yaml.safe_load((DOCKER / "compose.yml").read_text(encoding="utf-8"))
    assert isinstance(loaded, dict)
    return loaded


def _yaml_value(text: str) -> Any:
    """An environment string as the image reads it into JSON ("true" -> True, "5432" -> 5432)."""
    return yaml.safe_load(text)


def harvester_config(compose: dict[str, Any]) -> dict[str, Any]:
    """docker/orthanc.json with the harvester service's PostgreSQL environment and DicomModalities applied, as
    the image does (a JSON value replaces the whole section)."""
    config = copy.deepcopy(load_json_config(DEFAULT_CONFIG))
    for name, value in compose["services"]["harvester"]["environment"].items():
        if name == "ORTHANC__DICOM_MODALITIES":
            config["DicomModalities"] = json.loads(value)
        elif name.startswith("ORTHANC__POSTGRESQL__"):
            assert name in IMAGE_PG_KEYS, f"{name} is not a PostgreSQL setting the Orthanc image knows"
            set_dotted(config, IMAGE_PG_KEYS[name], _yaml_value(str(value)))
    return config


def test_harvester_waits_for_a_healthy_postgres(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert services["harvester"]["depends_on"]["postgres"] == {"condition": "service_healthy"}
    # service_healthy needs a health check, and it must ask for the database the harvester uses.
    check = " ".join(services["postgres"]["healthcheck"]["test"])
    env = services["postgres"]["environment"]
    assert "pg_isready" in check
    assert f"-U {env['POSTGRES_USER']}" in check and f"-d {env['POSTGRES_DB']}" in check
    # The index survives the container: its data directory is a named volume.
    assert any(v.endswith(":/var/lib/postgresql/data") and v.split(":")[0] in compose["volumes"]
               for v in services["postgres"]["volumes"])


def test_harvester_environment_enables_the_postgres_index(compose: dict[str, Any]) -> None:
    env = compose["services"]["harvester"]["environment"]
    # The image loads the plugin only when told to.
    assert _yaml_value(env["POSTGRESQL_PLUGIN_ENABLED"]) is True
    # The shipped file keeps the index off (the launcher and tests run SQLite unless asked) ...
    assert index_enabled(load_json_config(DEFAULT_CONFIG)) is False
    # ... and compose switches it on, keeping the settings known to work with the plugin.
    config = harvester_config(compose)
    assert index_enabled(config)
    section = config["PostgreSQL"]
    for key, want in RECOMMENDED.items():
        assert section[key] == want, key
    # The configuration the plugin reads from that still validates, without warnings about the section.
    assert not [w for w in load_config(config).warnings if "PostgreSQL" in w]


def test_postgres_credentials_match_orthanc_json(compose: dict[str, Any]) -> None:
    services = compose["services"]
    pg_env = services["postgres"]["environment"]
    section = harvester_config(compose)["PostgreSQL"]
    assert section["Host"] in services  # the compose service name is the host name on its network
    assert section["Host"] == "postgres"
    assert section["Port"] == 5432  # the postgres image's port (no other is configured)
    assert section["Database"] == pg_env["POSTGRES_DB"]
    assert section["Username"] == pg_env["POSTGRES_USER"]
    assert section["Password"] == pg_env["POSTGRES_PASSWORD"]


def test_harvester_image_is_built_from_the_dockerfile_that_ships_orthanc_json(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name in ("harvester", "demo-loader"):
        build = services[name]["build"]
        assert build["dockerfile"] == "docker/Dockerfile" and (DOCKER / build["context"]).resolve() == DOCKER.parent
    dockerfile = (DOCKER / "Dockerfile").read_text(encoding="utf-8")
    assert "COPY docker/orthanc.json /etc/orthanc/orthanc.json" in dockerfile
    shipped = load_json_config(DEFAULT_CONFIG)
    # Image files and the harvester's queue live on the harvest-storage volume, as compose mounts it.
    mount = next(v for v in services["harvester"]["volumes"] if v.startswith("harvest-storage:"))
    assert mount.split(":", 1)[1] == shipped["StorageDirectory"]
    assert shipped["RtHarvest"]["DatabasePath"].startswith(shipped["StorageDirectory"] + "/")
    assert f'VOLUME ["{shipped["StorageDirectory"]}"]' in dockerfile


def test_every_configured_source_is_a_modality_of_the_compose_harvester(compose: dict[str, Any]) -> None:
    """The environment replaces DicomModalities as a whole: a source of RtHarvest.Sources missing from it
    would be ignored (with a warning) inside the container although orthanc.json configures it."""
    config = harvester_config(compose)
    sources = set(config["RtHarvest"]["Sources"])
    assert sources and sources <= set(config["DicomModalities"])
    assert not [w for w in load_config(config).warnings if "Sources" in w]
