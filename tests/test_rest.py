"""REST routes against the real harvester: bad input is a 4xx with a JSON message, never a 500."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path
from urllib.parse import quote

import pytest

from .browser.apiserver import ApiServer
from .conftest import Clinic


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b"", "empty"),
        (b"{\"Source\": ", "not valid JSON"),
        (b"[\"ORTHANC_SRC\"]", "must be a JSON object"),
        (json.dumps({"From": "20200101"}).encode(), "Source is required"),
        (json.dumps({"Source": "NOPE", "From": "20200101"}).encode(), "unknown source 'NOPE'"),
        (json.dumps({"Source": 42, "From": "20200101"}).encode(), "Source must be the name of a source"),
        (json.dumps({"Source": "ORTHANC_SRC"}).encode(), "needs From/To dates and/or PatientIDs"),
        (json.dumps({"Source": "ORTHANC_SRC", "From": "2020-01-01"}).encode(), "YYYYMMDD"),
        (json.dumps({"Source": "ORTHANC_SRC", "From": "20201301"}).encode(), "not a calendar date"),
        (json.dumps({"Source": "ORTHANC_SRC", "From": "20200201", "To": "20200101"}).encode(), "is after"),
        (json.dumps({"Source": "ORTHANC_SRC", "From": 20200101}).encode(), "From must be a date"),
        (json.dumps({"Source": "ORTHANC_SRC", "PatientIDs": "P1"}).encode(), "PatientIDs must be a list"),
        (json.dumps({"Source": "ORTHANC_SRC", "PatientIDs": ["A\\B"]}).encode(), "not a valid PatientID"),
        (json.dumps({"Source": "ORTHANC_SRC", "PatientIDs": ["x" * 65]}).encode(), "not a valid PatientID"),
        (json.dumps({"Source": "ORTHANC_SRC", "From": "20200101", "Colour": "red"}).encode(), "unknown field"),
        (json.dumps({"Source": "ORTHANC_SRC", "From": "20200101", "LookupSources": []}).encode(),
         "LookupSources must be a non-empty list"),
        (json.dumps({"Source": "ORTHANC_SRC", "From": "20200101", "LookupSources": ["ORTHANC_SRC", "X"]}).encode(),
         "LookupSources[1]: unknown source 'X'"),
        (json.dumps({"Source": "ORTHANC_SRC", "From": "20200101", "Label": ["x"]}).encode(), "Label must be"),
    ],
)
def test_bad_start_requests_are_400(clinic: Clinic, body: bytes, fragment: str) -> None:
    status, answer = clinic.api.request("POST", "/rtharvest/harvests", raw=body)
    assert status == 400, answer
    assert fragment in answer["Error"]


def test_bad_requests_leave_no_harvest_behind(clinic: Clinic) -> None:
    before = clinic.api.get("/rtharvest/harvests")
    clinic.api.request("POST", "/rtharvest/harvests", raw=b'{"Source": "NOPE", "From": "20200101"}')
    assert clinic.api.get("/rtharvest/harvests") == before


@pytest.mark.parametrize(
    ("method", "path", "status", "fragment"),
    [
        ("GET", "/rtharvest/harvests/0123456789abcdef", 404, "unknown harvest"),
        ("POST", "/rtharvest/harvests/0123456789abcdef/pause", 404, "unknown harvest"),
        ("GET", "/rtharvest/harvests/0123456789abcdef/manifest", 404, "unknown harvest"),
        ("GET", "/rtharvest/jobs?state=exploded", 400, "state must be one of"),
        ("GET", "/rtharvest/jobs?limit=-4", 400, "limit"),
        ("GET", "/rtharvest/jobs?harvest=nope", 404, "unknown harvest"),
        ("POST", "/rtharvest/jobs/999999/retry", 404, "unknown job"),
        ("POST", "/rtharvest/jobs/abc/retry", 400, "job id must be a number"),
        ("GET", "/rtharvest/log?level=loud", 400, "level"),
        ("GET", "/rtharvest/log?since=yesterday-ish", 400, "since"),
        ("GET", "/rtharvest/log?limit=many", 400, "limit"),
    ],
)
def test_bad_parameters(clinic: Clinic, method: str, path: str, status: int, fragment: str) -> None:
    got, answer = clinic.api.request(method, path, {} if method == "POST" else None)
    assert got == status, answer
    assert fragment in answer["Error"]


def test_injection_strings_in_filters_are_harmless(clinic: Clinic) -> None:
    jobs_before = clinic.api.get("/rtharvest/jobs")
    for evil in ("' OR 1=1 --", "\"; DROP TABLE jobs; --", "%", "_", "1) OR (1=1"):
        for route in ("/rtharvest/log?harvest=", "/rtharvest/log?component=", "/rtharvest/log?source="):
            status, answer = clinic.api.request("GET", route + quote(evil))
            assert status == 200 and answer == [], (route, evil, answer)
        status, answer = clinic.api.request("GET", "/rtharvest/jobs?harvest=" + quote(evil))
        assert status == 404, answer
    assert clinic.api.get("/rtharvest/jobs") == jobs_before


def test_harvest_list_pages_reach_every_harvest_once(tmp_path: Path) -> None:
    """``GET /rtharvest/harvests`` is paged (default 100, newest first): two pages of a store with more
    harvests than one page hold every harvest exactly once (no cap, no repeat, no gap across the boundary).
    The real routes and queue over HTTP (tests/browser/apiserver.py); harvests are created through the
    queue, which is all a harvest row needs."""
    api = ApiServer(tmp_path).start()
    try:
        # Many in the same clock tick: the order must still be total for offsets to be stable.
        created = [api.queue.create_harvest("ARIA", f"h{i}", {"LookupSources": ["ARIA"]}).id for i in range(130)]

        def page(query: str) -> list[str]:
            with urllib.request.urlopen(f"{api.url}/rtharvest/harvests?{query}", timeout=30) as resp:
                return [h["ID"] for h in json.loads(resp.read())]

        first = page("limit=100&offset=0")
        second = page("limit=100&offset=100")
        assert page("") == first  # the default page is the first 100
    finally:
        api.stop()
    assert len(first) == 100 and len(second) == 30
    assert len(set(first + second)) == 130 and set(first + second) == set(created)
    assert first + second == created[::-1]  # newest first, the newest of a tie being the last created
