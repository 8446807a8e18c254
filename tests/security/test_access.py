"""Security: Orthanc authentication on every route, DICOM access control, no PHI in logs, parameterised SQL.

* every ``/rtharvest`` route (the page and its assets included) answers 401 without credentials and with
  wrong ones;
* only configured AETs may store into the harvester: an unknown calling AET is refused, a configured AET
  calling from another host than its DicomModalities entry is refused (DicomCheckModalityHost), the same
  AET from its own host is accepted; no modality may query (C-FIND) or retrieve (C-MOVE, C-GET) from it;
* after harvests (one at a strict source), none of the synthetic clinic's PatientIDs, names, birth dates or
  treatment dates appears in the event log, the job table's messages or Orthanc's log file;
* injection strings fed through every filter of every route and every text field of a start request
  change nothing and are stored verbatim where they are data.
"""

from __future__ import annotations

import base64
import re
import sqlite3
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    PatientRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelMove,
)

from rtharvest.synth.groundtruth import GroundTruth
from rtharvest.synth.loader import dicom_files

from ..conftest import Clinic
from ..harvesting import wait_completed
from ..servers import LOCALHOST, DicomSource, RestClient

pytestmark = pytest.mark.servers

ROUTES = [
    ("GET", "/rtharvest/status"), ("GET", "/rtharvest/harvests"), ("POST", "/rtharvest/harvests"),
    ("GET", "/rtharvest/harvests/0123456789abcdef"), ("POST", "/rtharvest/harvests/0123456789abcdef/pause"),
    ("POST", "/rtharvest/harvests/0123456789abcdef/resume"), ("POST", "/rtharvest/harvests/0123456789abcdef/cancel"),
    ("GET", "/rtharvest/harvests/0123456789abcdef/manifest"), ("GET", "/rtharvest/manifest"),
    ("GET", "/rtharvest/jobs"), ("POST", "/rtharvest/jobs/1/retry"), ("GET", "/rtharvest/log"),
    ("GET", "/rtharvest/ui"), ("GET", "/rtharvest/ui/harvests.js"), ("GET", "/rtharvest/ui/charts.js"),
    ("GET", "/rtharvest/ui/harvests.css"),
]

INJECTIONS = ["' OR 1=1 --", "\"; DROP TABLE jobs; --", "x'); DELETE FROM harvests; --", "%", "_", "*",
              "1) OR (1=1", "' UNION SELECT name, sql FROM sqlite_master --", "\\", "`", "?", ":now", "$1",
              "0 OR 1", "done' OR state != 'done"]


@pytest.mark.parametrize(("method", "path"), ROUTES)
def test_every_route_requires_authentication(clinic: Clinic, method: str, path: str) -> None:
    creds = clinic.harvester.credentials
    assert creds is not None, "the shipped configuration must enable authentication"
    anonymous = RestClient(clinic.harvester.url, None)
    wrong_password = RestClient(clinic.harvester.url, (creds[0], creds[1] + "x"))
    wrong_user = RestClient(clinic.harvester.url, ("intruder", creds[1]))
    body: dict[str, Any] | None = {} if method == "POST" else None
    for client in (anonymous, wrong_password, wrong_user):
        status, answer = client.request(method, path, body)
        assert status == 401, (method, path, status, answer)
    garbage = {"Authorization": "Basic " + base64.b64encode(b"\xff\xfe:").decode()}
    assert anonymous.request(method, path, body, headers=garbage)[0] == 401
    assert anonymous.request(method, path, body, headers={"Authorization": "Bearer abc"})[0] == 401
    assert clinic.api.request(method, path, body)[0] != 401


def _store(calling_aet: str, port: int, bind: str = LOCALHOST) -> tuple[bool, int | None, str]:
    """C-STORE one CT from ``calling_aet``; (association accepted, status, SOP UID)."""
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientID, ds.Modality = "SEC-TEST", "CT"
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ae = AE(ae_title=calling_aet)
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    assoc = ae.associate(LOCALHOST, port, ae_title="HARVEST", bind_address=(bind, 0))
    if not assoc.is_established:
        return False, None, ds.SOPInstanceUID
    try:
        status = assoc.send_c_store(ds)
        return True, int(status.Status) if "Status" in status else None, ds.SOPInstanceUID
    finally:
        if assoc.is_established:
            assoc.release()


class _RemoteSource(DicomSource):
    """A configured source whose DicomModalities entry names another host (127.0.0.2)."""

    @property
    def modality_entry(self) -> dict[str, Any]:
        return {**super().modality_entry, "Host": "127.0.0.2"}


def _lookup(clinic: Clinic, sop_uid: str) -> list[Any]:
    _, found = clinic.api.request("POST", "/tools/lookup", raw=sop_uid.encode())
    return list(found or [])


def test_only_configured_aets_from_their_host_may_store(clinic: Clinic) -> None:
    remote = _RemoteSource("REMOTE", "REMOTEAET", 1, "remote")
    clinic.restart_harvester(fresh=True, extra_sources={"REMOTE": remote})
    try:
        port = clinic.harvester.dicom_port
        accepted, status, uid = _store("INTRUDER", port)
        assert not (accepted and status == 0), "an unknown AET stored into the harvester"
        assert not _lookup(clinic, uid)
        accepted, status, uid = _store("REMOTEAET", port)  # right AET, wrong host (127.0.0.1)
        assert not (accepted and status == 0), "a configured AET stored from another host"
        assert not _lookup(clinic, uid)
        accepted, status, uid = _store("REMOTEAET", port, bind="127.0.0.2")  # right AET, right host
        assert accepted and status == 0, (accepted, status)
        assert _lookup(clinic, uid)
        accepted, status, uid = _store(clinic.sources["ORTHANC_SRC"].aet, port)
        assert accepted and status == 0, (accepted, status)
    finally:
        clinic.restart_harvester(fresh=True)


def test_no_modality_may_query_or_retrieve_from_the_harvester(clinic: Clinic, loaded: GroundTruth) -> None:
    clinic.restart_harvester(fresh=True)
    # Something to find: store one instance the regular way.
    accepted, status, uid = _store(clinic.sources["ORTHANC_SRC"].aet, clinic.harvester.dicom_port)
    assert accepted and status == 0
    for calling in (clinic.sources["ORTHANC_SRC"].aet, "INTRUDER"):
        ae = AE(ae_title=calling)
        for context in (StudyRootQueryRetrieveInformationModelFind, StudyRootQueryRetrieveInformationModelMove,
                        PatientRootQueryRetrieveInformationModelGet):
            ae.add_requested_context(context)
        ae.acse_timeout = ae.network_timeout = 10
        ae.dimse_timeout = 3  # a refused C-MOVE gets no response at all: do not wait long for it
        assoc = ae.associate(LOCALHOST, clinic.harvester.dicom_port, ae_title="HARVEST")
        if not assoc.is_established:
            continue  # refused outright: nothing to ask
        try:
            query = Dataset()
            query.QueryRetrieveLevel, query.SOPInstanceUID = "IMAGE", uid
            query.StudyInstanceUID = query.SeriesInstanceUID = ""
            answers = [(s.Status if s else None, i) for s, i in
                       assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind)]
            assert not any(i is not None for _, i in answers), (calling, "C-FIND answered", answers)
            assert all(st not in (0x0000, 0xFF00, 0xFF01) for st, _ in answers if st is not None), answers
            if assoc.is_established:
                moves = [s.Status for s, _ in assoc.send_c_move(query, calling,
                                                                 StudyRootQueryRetrieveInformationModelMove) if s]
                # Refused: a failure status, or no response at all (the association is aborted).
                assert all(st not in (0x0000, 0xFF00) for st in moves), (calling, "C-MOVE", moves)
        finally:
            if assoc.is_established:
                assoc.release()


def _phi_values(out: Path) -> tuple[set[str], set[str]]:
    """(words, dates) of the synthetic clinic that must never be logged: PatientID, PatientName and its
    parts, PatientBirthDate, TreatmentDate."""
    words: set[str] = set()
    dates: set[str] = set()
    for path in dicom_files(out):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        name = str(ds.get("PatientName", "") or "")
        if name:
            words.add(name)
            words.update(part for part in re.split(r"[\^=]", name) if len(part) >= 4)
        words.add(str(ds.get("PatientID", "") or ""))
        for kw in ("PatientBirthDate", "TreatmentDate"):
            dates.add(str(ds.get(kw, "") or ""))
    return words - {""}, dates - {""}


def _free_date(start: str, taken: set[str], step: int) -> str:
    """The nearest calendar date from ``start`` (YYYYMMDD) in direction ``step`` that no patient has."""
    from datetime import date, timedelta

    d = date(int(start[:4]), int(start[4:6]), int(start[6:]))
    while d.strftime("%Y%m%d") in taken:
        d += timedelta(days=step)
    return d.strftime("%Y%m%d")


def test_no_phi_in_logs(clinic: Clinic, loaded: GroundTruth, synthetic: tuple[Path, GroundTruth]) -> None:
    """Harvests of a clinic whose PHI is known (one at a strict source, which moves other patients' and
    out-of-window records in only to reject them); every event, every job's error and note and every line
    of Orthanc's log is scanned for each PatientID, name, birth date and treatment date."""
    out, _ = synthetic
    words, dates = _phi_values(out)
    assert words and dates, "the synthetic clinic has no PHI values to look for"
    clinic.restart_harvester(fresh=True)
    # Window bounds are the operator's input, logged with the harvest: chosen off every patient's dates.
    year = loaded.window("year")
    assert year.date_from and year.date_to
    windows = [("ORTHANC_SRC", "20100101", "20231231"),
               ("DCMQRSCP_STRICT", _free_date(year.date_from, dates, 1), _free_date(year.date_to, dates, -1))]
    for source, date_from, date_to in windows:
        harvest_id = clinic.api.post("/rtharvest/harvests", {"Source": source, "From": date_from,
                                                              "To": date_to})["ID"]
        wait_completed(clinic.api, harvest_id)
    rejected = clinic.api.get("/rtharvest/log?level=debug&limit=10000&component=ingest")
    assert any("rejected" in e["Message"] for e in rejected), "nothing rejected: the scan proves little"
    texts = [str(e) for e in clinic.api.get("/rtharvest/log?level=debug&limit=10000")]
    db = Path(clinic.harvester.config["RtHarvest"]["DatabasePath"])
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        texts += [" ".join(str(c) for c in row) for row in conn.execute("SELECT * FROM events")]
        texts += [f"{e} {n}" for e, n in conn.execute("SELECT last_error, note FROM jobs")]
    finally:
        conn.close()
    clinic.harvester.stop()  # flush Orthanc's log
    texts += clinic.harvester.log_path.read_text(errors="replace").splitlines()
    clinic.restart_harvester(fresh=False)
    leaked: dict[str, str] = {}
    for text in texts:
        for value in words | dates:
            # Dates are digits: one inside a UID (digits and dots) is not a date.
            if re.search(rf"(?<![\w.]){re.escape(value)}(?![\w.])", text):
                leaked.setdefault(value, text[:300])
    assert not leaked, f"PHI values in the logs: {list(leaked.items())[:5]}"


def test_injection_strings_through_every_filter(clinic: Clinic, loaded: GroundTruth) -> None:
    clinic.restart_harvester(fresh=True)
    harvest_id = clinic.api.post("/rtharvest/harvests", {"Source": "ORTHANC_SRC", "PatientIDs": ["NOBODY"],
                                                         "Label": "before"})["ID"]
    wait_completed(clinic.api, harvest_id)
    snapshot = (clinic.api.get("/rtharvest/harvests?limit=10000"), clinic.api.get("/rtharvest/jobs?limit=10000"))
    filters = {
        "/rtharvest/jobs": ("harvest", "state", "limit", "offset"),
        "/rtharvest/log": ("level", "harvest", "since", "limit", "component", "source"),
        "/rtharvest/harvests": ("limit",),
        f"/rtharvest/harvests/{harvest_id}/manifest": ("format",),
        "/rtharvest/manifest": ("format",),
    }
    for evil in INJECTIONS:
        for route, params in filters.items():
            for param in params:
                status, answer = clinic.api.request("GET", f"{route}?{param}={quote(evil, safe='')}")
                assert status in (200, 400, 404), (route, param, evil, status, answer)
                if status == 200 and route == "/rtharvest/log" and param in ("harvest", "component", "source"):
                    assert answer == [], (route, param, evil, answer)  # matched literally: nothing
                if status == 200 and route == "/rtharvest/jobs" and param == "harvest":
                    raise AssertionError(f"unknown harvest {evil!r} listed jobs: {answer}")
        for path in (f"/rtharvest/jobs/{quote(evil, safe='')}/retry", f"/rtharvest/harvests/{quote(evil, safe='')}"):
            status, answer = clinic.api.request("POST" if path.endswith("retry") else "GET", path,
                                                {} if path.endswith("retry") else None)
            # Orthanc turns "\\" into "/" before routing: the harvests listing answers, harmlessly.
            assert status in (400, 404) or (evil == "\\" and isinstance(answer, list)), (path, status, answer)
    assert (clinic.api.get("/rtharvest/harvests?limit=10000"), clinic.api.get("/rtharvest/jobs?limit=10000")) \
        == snapshot

    # Injection strings as data: refused by validation, or stored verbatim.
    for evil in INJECTIONS:
        status, answer = clinic.api.request("POST", "/rtharvest/harvests", {
            "Source": "ORTHANC_SRC", "PatientIDs": [evil], "Label": evil})
        if status == 200:
            doc = clinic.api.get(f"/rtharvest/harvests/{answer['ID']}")
            assert doc["Label"] == evil and doc["PatientIDs"] == [evil], doc
            # A harvest of an unknown patient may already be Completed (409): either way it stops here.
            status, _ = clinic.api.request("POST", f"/rtharvest/harvests/{answer['ID']}/cancel", {})
            assert status in (200, 409), status
        else:
            assert status == 400 and "PatientID" in answer["Error"], (evil, answer)
        status, answer = clinic.api.request("POST", "/rtharvest/harvests", {"Source": evil, "From": "20200101"})
        assert status == 400 and "unknown source" in answer["Error"], (evil, answer)
    tables = {r[0] for r in sqlite3.connect(
        f"file:{clinic.harvester.config['RtHarvest']['DatabasePath']}?mode=ro", uri=True).execute(
        "SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"jobs", "harvests", "events"} <= tables
    assert clinic.api.get(f"/rtharvest/harvests/{harvest_id}")["Label"] == "before"


def test_harvester_serves_no_dicomweb(clinic: Clinic) -> None:
    """Debian's plugin folder loads the DICOMweb plugin; STOW-RS into the harvester would bypass the AET checks."""
    plugins = clinic.api.get("/plugins")
    status, _ = clinic.api.request("GET", "/dicom-web/studies")
    assert status == 404, f"/dicom-web answered {status} (plugins loaded: {plugins})"
    status, _ = clinic.api.request("POST", "/dicom-web/studies", raw=b"--x--",
                                   headers={"Content-Type": 'multipart/related; type="application/dicom"; boundary=x'})
    assert status == 404


def test_the_first_run_credential_is_warned_about(clinic: Clinic) -> None:
    """The session's harvester runs docker/orthanc.json unchanged: the status and Orthanc's log say so (the
    user, never the password)."""
    warnings = clinic.api.get("/rtharvest/status").get("ConfigurationWarnings", [])
    [warning] = [w for w in warnings if "first-run password" in w]
    assert "change-me-on-first-run" not in warning
    assert "first-run password" in clinic.harvester.log_path.read_text(errors="replace")
