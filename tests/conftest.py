"""Session-wide fixtures: the harvester Orthanc with the plugin and one source of each kind."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from rtharvest.core.strategies import SourceCapability
from rtharvest.edge.launcher import DEFAULT_CONFIG, OrthancProcess, free_port
from rtharvest.synth.generator import SynthOptions, generate
from rtharvest.synth.groundtruth import GroundTruth
from rtharvest.synth.loader import dicom_files, index_for_dcmqrscp, store_to_scp

from .fakes import World
from .planner_fixtures import MiniClinic
from .servers import (
    HARVEST_AET,
    LOCALHOST,
    DicomSource,
    PostgresCluster,
    RestClient,
    start_dcmqrscp,
    start_orthanc_source,
    start_postgres,
    start_pynetdicom_qrscp,
)

#: Per-source harvest settings the test harvester runs with (what a site would configure).
SOURCE_SETTINGS = {
    "ORTHANC_SRC": {"Backend": "orthanc", "QueryModel": "relational", "InstanceReturnKeys": True,
                    "UpperLevelKeys": True},
    "DCMQRSCP": {"Backend": "orthanc", "QueryModel": "relational"},
    "DCMQRSCP_STRICT": {"Backend": "pynetdicom", "QueryModel": "hierarchical"},
    "PYNETDICOM": {"Backend": "pynetdicom", "QueryModel": "relational"},
}


def start_harvester(run_dir: Path, dicom_port: int, sources: dict[str, DicomSource], http_port: int | None = None,
                    overrides: dict | None = None) -> OrthancProcess:
    """The harvester Orthanc with the plugin, knowing ``sources`` (same docker/orthanc.json as users)."""
    settings = {name: SOURCE_SETTINGS.get(name, {}) for name in sources}
    harvester = OrthancProcess(
        run_dir, DEFAULT_CONFIG, dicom_port=dicom_port, http_port=http_port, aet=HARVEST_AET,
        modalities={s.name: s.modality_entry for s in sources.values()},
        # MinFreeStorageMB: the test stores are a few MB; a test machine's disk may have less than the
        # production default free (tests/test_store_faults.py sets its own to test the guard).
        overrides={"RtHarvest.Sources": settings, "RtHarvest.BackoffSeconds": 0.5,
                   "RtHarvest.BackoffMaxSeconds": 2, "RtHarvest.MinFreeStorageMB": 64, **(overrides or {})},
    )
    return harvester.start()


@dataclass
class Clinic:
    """A harvester and the sources it knows, all running on loopback."""

    harvester: OrthancProcess
    api: RestClient
    sources: dict[str, DicomSource]
    base: Path
    #: The overrides the running harvester was started with (kept by restarts on the same store).
    overrides: dict | None = None

    def restart_harvester(self, fresh: bool = True, extra_sources: dict[str, DicomSource] | None = None,
                          overrides: dict | None = None, run_dir: Path | None = None) -> None:
        """Stop the harvester and start it again on the same ports (a new store when ``fresh``, or ``run_dir``).

        A restart on the same store (``fresh=False``) without ``overrides`` keeps the running harvester's
        (e.g. its PostgreSQL index).
        """
        if overrides is None and not fresh:
            overrides = self.overrides
        self.overrides = overrides
        self.harvester.stop()
        if run_dir is None:  # else a prepared directory (e.g. restored from a backup)
            index = len(list(self.base.glob("harvester*")))
            run_dir = self.base / f"harvester{index}" if fresh else self.harvester.run_dir
        sources = {**self.sources, **(extra_sources or {})}
        self.harvester = start_harvester(run_dir, self.harvester.dicom_port, sources,
                                         http_port=self.harvester.http_port, overrides=overrides)
        self.api = RestClient(self.harvester.url, self.harvester.credentials)


@pytest.fixture(scope="session")
def clinic(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Clinic]:
    """Start every source kind and the harvester once per session; stop them all by PID afterwards."""
    base = tmp_path_factory.mktemp("clinic")
    harvest_dicom_port = free_port()
    sources: dict[str, DicomSource] = {}
    harvester: OrthancProcess | None = None
    running: Clinic | None = None
    try:
        for source in (
            start_orthanc_source(base / "orthanc-src", harvest_dicom_port),
            start_dcmqrscp(base / "dcmqrscp", harvest_dicom_port),
            start_dcmqrscp(base / "dcmqrscp-strict", harvest_dicom_port, strict=True),
            start_pynetdicom_qrscp(base / "pynetdicom", harvest_dicom_port),
        ):
            sources[source.name] = source
        harvester = start_harvester(base / "harvester", harvest_dicom_port, sources)
        running = Clinic(harvester, RestClient(harvester.url, harvester.credentials), sources, base)
        yield running
    finally:
        if running is not None:
            running.harvester.stop()
        elif harvester is not None:
            harvester.stop()
        for source in sources.values():
            source.stop()


@pytest.fixture(scope="session")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, GroundTruth]:
    """A small clinic with every trap (seeded, so every run sees the same data)."""
    out = tmp_path_factory.mktemp("synthetic")
    truth = generate(out, SynthOptions(patients=6, seed=7))
    return out, truth


@pytest.fixture(scope="session")
def loaded(clinic: Clinic, synthetic: tuple[Path, GroundTruth]) -> GroundTruth:
    """The synthetic clinic stored into every source of the session."""
    out, truth = synthetic
    files = dicom_files(out)
    for source in clinic.sources.values():
        if source.kind.startswith("dcmqrscp"):
            # dcmqrscp's own way in: files in its storage area, indexed with dcmqridx.
            assert source.storage is not None
            stored = index_for_dcmqrscp(files, source.storage)
        else:
            stored = store_to_scp(files, LOCALHOST, source.port, source.aet)
        assert stored == len(files)
    return truth


# -- in-memory edges (tests/fakes.py): no Orthanc, no network ---------------------------------------------


@pytest.fixture
def mini_clinic() -> MiniClinic:
    """A fresh hand-built clinic (tests/planner_fixtures.py) per test: tests edit its objects."""
    return MiniClinic()


@pytest.fixture
def fake_capability() -> SourceCapability | None:
    """What the fake source of ``fake_world`` answers (None: World's relational default).

    A module overrides this fixture to run its tests against another shape of source."""
    return None


@pytest.fixture
def fake_world(tmp_path: Path, mini_clinic: MiniClinic, fake_capability: SourceCapability | None) -> Iterator[World]:
    """Queue, tracker, ingest and harvester over a fake source holding ``mini_clinic``."""
    world = World(tmp_path / "q.sqlite", mini_clinic.datasets(), fake_capability)
    yield world
    world.ingest.stop()  # a test may have started the ingest thread; stopping one never started is a no-op
    world.close()


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresCluster]:
    """A PostgreSQL server for one module's tests (tests/servers.py; each test creates its own databases)."""
    cluster = start_postgres()
    try:
        yield cluster
    finally:
        cluster.stop()
