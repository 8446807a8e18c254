"""Session-wide fixtures: the harvester Orthanc with the plugin and one source of each kind."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from rtharvest.launcher import DEFAULT_CONFIG, OrthancProcess, free_port

from .servers import (
    HARVEST_AET,
    DicomSource,
    RestClient,
    start_dcmqrscp,
    start_orthanc_source,
    start_pynetdicom_qrscp,
)


@dataclass
class Clinic:
    """A harvester and the sources it knows, all running on loopback."""

    harvester: OrthancProcess
    api: RestClient
    sources: dict[str, DicomSource]


@pytest.fixture(scope="session")
def clinic(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Clinic]:
    """Start every source kind and the harvester once per session; stop them all by PID afterwards."""
    base = tmp_path_factory.mktemp("clinic")
    harvest_dicom_port = free_port()
    sources: dict[str, DicomSource] = {}
    harvester: OrthancProcess | None = None
    try:
        for source in (
            start_orthanc_source(base / "orthanc-src", harvest_dicom_port),
            start_dcmqrscp(base / "dcmqrscp", harvest_dicom_port),
            start_dcmqrscp(base / "dcmqrscp-strict", harvest_dicom_port, strict=True),
            start_pynetdicom_qrscp(base / "pynetdicom", harvest_dicom_port),
        ):
            sources[source.name] = source
        modalities = {s.name: s.modality_entry for s in sources.values()}
        harvester = OrthancProcess(
            base / "harvester", DEFAULT_CONFIG, dicom_port=harvest_dicom_port, aet=HARVEST_AET,
            modalities=modalities,
            overrides={"RtHarvest.Sources": {
                "DCMQRSCP_STRICT": {"Backend": "pynetdicom", "QueryModel": "hierarchical"},
                "PYNETDICOM": {"Backend": "pynetdicom"},
            }},
        )
        harvester.start()
        yield Clinic(harvester, RestClient(harvester.url, harvester.credentials), sources)
    finally:
        if harvester is not None:
            harvester.stop()
        for source in sources.values():
            source.stop()
