"""Fixtures of the DIMSE backend tests: the harvester's loopback client, runtime modalities, and ``via``,
one of the two backends behind the same :class:`~rtharvest.dimse.base.SourceBackend` contract."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from rtharvest.dimse.base import SourceBackend
from rtharvest.dimse.via_orthanc import OrthancRestBackend
from rtharvest.dimse.via_pynetdicom import PynetdicomBackend
from rtharvest.edge.config import Modality
from rtharvest.edge.launcher import free_port
from rtharvest.edge.loopback import LoopbackClient

from ..servers import HARVEST_AET, LOCALHOST
from . import loopback_for
from .fault_scp import FaultScp

#: Sources that answer queries below STUDY level with any identifier (the strict dcmqrscp does not).
RELATIONAL = ["ORTHANC_SRC", "DCMQRSCP", "PYNETDICOM"]
ALL = RELATIONAL + ["DCMQRSCP_STRICT"]
#: The two backends (``Backend`` in a source's settings).
BACKENDS = ["orthanc", "pynetdicom"]


@pytest.fixture(scope="module")
def loopback(clinic: Any) -> LoopbackClient:
    return loopback_for(clinic)


@pytest.fixture
def runtime_modality(clinic: Any) -> Iterator[Callable[[str, int], str]]:
    """Register ``FAULT`` (AET, port) in the harvester for one test; removed afterwards."""
    names: list[str] = []

    def register(aet: str, port: int) -> str:
        status, body = clinic.api.request("PUT", "/modalities/FAULT", {"AET": aet, "Host": LOCALHOST, "Port": port})
        assert status == 200, body
        names.append("FAULT")
        return "FAULT"

    yield register
    for name in names:
        clinic.api.request("DELETE", f"/modalities/{name}")


@dataclass
class Via:
    """One backend as the tests drive it: against a session source, the fault SCP or a closed port."""

    kind: str
    clinic: Any
    loopback: LoopbackClient
    register: Callable[[str, int], str]

    @property
    def counts_known(self) -> bool:
        """Whether a move reports its sub-operation counts (Orthanc's REST move does not)."""
        return self.kind == "pynetdicom"

    def _at(self, name: str, aet: str, port: int, **kw: Any) -> SourceBackend:
        if self.kind == "orthanc":
            return OrthancRestBackend(self.loopback, name, HARVEST_AET, **kw)
        return PynetdicomBackend(Modality(name, aet, LOCALHOST, port), HARVEST_AET, **kw)

    def source(self, name: str, **kw: Any) -> SourceBackend:
        """The backend to one of the session's sources (the harvester knows each by name)."""
        source = self.clinic.sources[name]
        return self._at(name, source.aet, source.port, **kw)

    def fault(self, scp: FaultScp, **kw: Any) -> SourceBackend:
        """The backend to the fault SCP (a runtime modality ``FAULT`` of the harvester for Orthanc)."""
        name = self.register(scp.aet, scp.port) if self.kind == "orthanc" else "FAULT"
        return self._at(name, scp.aet, scp.port, **kw)

    def closed(self) -> SourceBackend:
        """The backend to a port nobody listens on."""
        port = free_port()
        name = self.register("CLOSED", port) if self.kind == "orthanc" else "CLOSED"
        return self._at(name, "CLOSED", port)


@pytest.fixture
def via(request: pytest.FixtureRequest, clinic: Any, loopback: LoopbackClient,
        runtime_modality: Callable[[str, int], str]) -> Via:
    """The backend named by the test's ``via`` parameter (``indirect``)."""
    return Via(request.param, clinic, loopback, runtime_modality)
