"""Smoke tests: the plugin runs inside a real Orthanc and reaches every source kind on loopback."""

from __future__ import annotations

import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelMove,
)

from rtharvest import __version__

from .conftest import Clinic
from .dimse import ct, store, wait_for_arrival
from .servers import HARVEST_AET, LOCALHOST, RestClient

SOURCE_NAMES = ["ORTHANC_SRC", "DCMQRSCP", "DCMQRSCP_STRICT", "PYNETDICOM"]


def test_plugin_is_loaded(clinic: Clinic) -> None:
    plugins = clinic.api.get("/plugins")
    assert "python" in plugins
    status = clinic.api.get("/rtharvest/status")
    assert status["PluginVersion"] == __version__
    assert status["OrthancVersion"] == clinic.api.get("/system")["Version"]
    assert status["PythonPluginVersion"] == clinic.api.get("/plugins/python")["Version"]
    assert "ConfigurationError" not in status, status.get("ConfigurationError")
    assert sorted(status["Sources"]) == sorted(SOURCE_NAMES)


def test_routes_require_authentication(clinic: Clinic) -> None:
    anonymous = RestClient(clinic.harvester.url, None)
    assert anonymous.request("GET", "/rtharvest/status")[0] == 401
    wrong = RestClient(clinic.harvester.url, ("rtharvest", "wrong-password"))
    assert wrong.request("GET", "/rtharvest/status")[0] == 401


def test_wrong_method_is_refused(clinic: Clinic) -> None:
    status, _ = clinic.api.request("DELETE", "/rtharvest/status")
    assert status == 405


@pytest.mark.parametrize("name", SOURCE_NAMES)
def test_echo_from_harvester(clinic: Clinic, name: str) -> None:
    status, body = clinic.api.request("POST", f"/modalities/{name}/echo", {})
    assert status == 200, body


@pytest.mark.parametrize("name", ["ORTHANC_SRC", "DCMQRSCP", "PYNETDICOM"])
def test_find_and_retrieve_through_orthanc(clinic: Clinic, name: str) -> None:
    """Orthanc's own Q/R client finds an instance by SOP UID alone and moves it into the harvester."""
    ds = ct(f"SMOKE-{name}")
    store(clinic.sources[name], ds)
    query = clinic.api.post(f"/modalities/{name}/query", {
        "Level": "Instance",
        "Query": {"SOPInstanceUID": ds.SOPInstanceUID, "StudyInstanceUID": "", "SeriesInstanceUID": ""},
    })
    answers = clinic.api.get(f"/queries/{query['ID']}/answers?expand&simplify")
    assert [a.get("SOPInstanceUID") for a in answers] == [ds.SOPInstanceUID]
    clinic.api.post(f"/queries/{query['ID']}/retrieve", {"TargetAet": HARVEST_AET})
    assert not wait_for_arrival(clinic.api, [ds.SOPInstanceUID]), f"instance from {name} never arrived"


def test_find_and_retrieve_strict_hierarchical(clinic: Clinic) -> None:
    """A strict source (dcmqrscp -XF -XM) answers a proper hierarchical query; C-MOVE brings it in."""
    source = clinic.sources["DCMQRSCP_STRICT"]
    ds = ct("SMOKE-STRICT")
    store(source, ds)
    # Orthanc's client is refused below study level here (it adds PatientID and other keys).
    status, _ = clinic.api.request("POST", "/modalities/DCMQRSCP_STRICT/query", {
        "Level": "Instance", "Query": {"SOPInstanceUID": ds.SOPInstanceUID}})
    assert status != 200
    ae = AE(ae_title=HARVEST_AET)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
    assoc = ae.associate(LOCALHOST, source.port, ae_title=source.aet)
    assert assoc.is_established
    try:
        query = Dataset()
        query.QueryRetrieveLevel = "IMAGE"
        query.StudyInstanceUID = ds.StudyInstanceUID
        query.SeriesInstanceUID = ds.SeriesInstanceUID
        query.SOPInstanceUID = ds.SOPInstanceUID
        found = [ident.SOPInstanceUID for status, ident in
                 assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind)
                 if status and status.Status in (0xFF00, 0xFF01) and ident is not None]
        assert found == [ds.SOPInstanceUID]
        results = list(assoc.send_c_move(query, HARVEST_AET, StudyRootQueryRetrieveInformationModelMove))
        final = results[-1][0]
        assert final.Status == 0, f"C-MOVE status 0x{final.Status:04X}"
        assert final.NumberOfCompletedSuboperations == 1
    finally:
        assoc.release()
    assert not wait_for_arrival(clinic.api, [ds.SOPInstanceUID])
