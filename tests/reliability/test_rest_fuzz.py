"""Malformed REST bodies and parameters on every /rtharvest route: a 4xx with a JSON message, never a 500.

Complements tests/test_rest.py (named cases) with a systematic sweep: every route x every parameter x a
list of hostile values, every body-taking route x a list of hostile bodies, every route x wrong methods.
A 200 is fine where the input is merely unusual; what must never happen is a 500 or a non-JSON error.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import pytest

from ..conftest import Clinic

pytestmark = pytest.mark.servers

HOSTILE_VALUES = [
    "", " ", "abc", "-1", "0", "1e3", "1.5", "99999999999999999999999", "-99999999999999999999999", "0x10",
    "nan", "inf", "-inf", "1e400", "NaN", "١٢", "１２", "null", "true", "[]", "{}", "%", "%00", "\x00", "\t\n",
    "' OR 1=1 --", "\"; DROP TABLE jobs; --", "ü" * 300, "x" * 2000, "9999-99-99", "2024-13-01",
    "0000-00-00T00:00:00Z", "2024-05-01T25:61:61Z", "../../etc/passwd", "<script>alert(1)</script>",
]

HOSTILE_BODIES: list[bytes] = [
    b"", b" ", b"null", b"true", b"42", b"\"text\"", b"[]", b"{", b"}", b"\xff\xfe\x00", b"\xef\xbb\xbf{}",
    b"[" * 100_000 + b"]" * 100_000, b"{\"a\":" * 50_000 + b"1" + b"}" * 50_000,
    b"{\"Source\": NaN, \"From\": \"20200101\"}",
    b"{\"Source\": \"ORTHANC_SRC\", \"From\": Infinity}",
    b"{\"Source\": \"ORTHANC_SRC\", \"From\": \"20200101\", \"Label\": \"\\ud800\"}",
    b"{\"Source\": \"ORTHANC_SRC\", \"PatientIDs\": [\"\\udfff\"]}",
    b"{\"Source\": \"\\ud800\", \"From\": \"20200101\"}",
    b"{\"Source\": \"ORTHANC_SRC\", \"From\": \"20200101\", \"LookupSources\": [\"\\ud800\"]}",
    b"{\"Source\": \"ORTHANC_SRC\", \"From\": \"\\u0000\"}",
    b"{\"Source\": \"ORTHANC_SRC\", \"From\": \"20200101\", \"To\": 1e999}",
    b"{\"Source\": \"ORTHANC_SRC\", \"PatientIDs\": [1, 2, 3]}",
    b"{\"Source\": \"ORTHANC_SRC\", \"PatientIDs\": [[[]]]}",
    b"{\"Source\": \"ORTHANC_SRC\", \"PatientIDs\": {\"a\": 1}}",
    b"{\"Source\": {\"x\": 1}, \"From\": \"20200101\"}",
    b"{\"Source\": [\"ORTHANC_SRC\"], \"From\": \"20200101\"}",
    b"{\"Source\": \"ORTHANC_SRC\", \"Source\": \"NOPE\", \"From\": \"20200101\"}",
    json.dumps({"Source": "ORTHANC_SRC", "From": "20200101", "Label": "x" * 1_000_000}).encode(),
    json.dumps({"Source": "ORTHANC_SRC", "PatientIDs": ["P"] * 20_000}).encode(),
    json.dumps({"Source": "ORTHANC_SRC", "From": "20200101", "To": "20200101" * 1000}).encode(),
    json.dumps({"Source": "ORTHANC_SRC", "From": "00000000"}).encode(),
    json.dumps({"Source": "ORTHANC_SRC", "From": "99991231", "To": "99991231"}).encode(),
]


def _check(method: str, path: str, status: int, answer: Any) -> None:
    assert status != 500 and status < 500, f"{method} {path[:200]} -> {status}: {str(answer)[:300]}"
    if status >= 400 and status != 405:
        # The plugin's own errors carry {"Error"}; a path Orthanc normalised away from every plugin route
        # (``..``) gets Orthanc's own JSON 404.
        assert isinstance(answer, dict) and (answer.get("Error") or answer.get("HttpStatus") == 404), \
            f"{method} {path[:200]} -> {status}: {answer!r:.300}"


@pytest.fixture(scope="module")
def ids(clinic: Clinic) -> Iterator[tuple[str, int]]:
    """A harvest and a job to aim at, on a harvester of its own (the sweep starts harvests of its own too)."""
    clinic.restart_harvester(fresh=True)
    answer = clinic.api.post("/rtharvest/harvests", {"Source": "ORTHANC_SRC", "PatientIDs": ["NOBODY-FUZZ"],
                                                     "Label": "fuzz"})
    jobs = clinic.api.get(f"/rtharvest/jobs?harvest={answer['ID']}")
    yield str(answer["ID"]), int(jobs[0]["ID"])
    clinic.restart_harvester(fresh=True)


def _routes(harvest_id: str, job_id: int) -> list[tuple[str, str, tuple[str, ...]]]:
    """(method, path, query parameters it reads) for every route."""
    return [
        ("GET", "/rtharvest/status", ()),
        ("GET", "/rtharvest/harvests", ("limit",)),
        ("POST", "/rtharvest/harvests", ()),
        ("GET", f"/rtharvest/harvests/{harvest_id}", ()),
        ("POST", f"/rtharvest/harvests/{harvest_id}/pause", ()),
        ("POST", f"/rtharvest/harvests/{harvest_id}/resume", ()),
        ("GET", f"/rtharvest/harvests/{harvest_id}/manifest", ("format",)),
        ("GET", "/rtharvest/manifest", ("format",)),
        ("GET", "/rtharvest/jobs", ("harvest", "state", "limit", "offset")),
        ("POST", f"/rtharvest/jobs/{job_id}/retry", ()),
        ("GET", "/rtharvest/log", ("level", "harvest", "since", "limit", "component", "source")),
        ("GET", "/rtharvest/ui", ()),
        ("GET", "/rtharvest/ui/harvests.js", ()),
    ]


def test_every_parameter_of_every_route(clinic: Clinic, ids: tuple[str, int]) -> None:
    tried = 0
    for method, path, params in _routes(*ids):
        for param in params:
            for value in HOSTILE_VALUES:
                full = f"{path}?{param}={quote(value, safe='')}"
                status, answer = clinic.api.request(method, full, {} if method == "POST" else None)
                _check(method, full, status, answer)
                tried += 1
        # Repeated and unknown parameters.
        full = f"{path}?limit=1&limit=abc&zzz=1"
        status, answer = clinic.api.request(method, full, {} if method == "POST" else None)
        _check(method, full, status, answer)
    assert tried > 300


@pytest.mark.parametrize("segment", ["99999999999999999999999", "-1", "0", "0x10", "1e3", "١٢", "%20", "a" * 64,
                                     "a" * 65, "..", "%2e%2e", "' OR 1=1 --", "%00"])
def test_hostile_path_segments(clinic: Clinic, segment: str) -> None:
    for method, template in (("POST", "/rtharvest/jobs/{}/retry"), ("GET", "/rtharvest/harvests/{}"),
                             ("POST", "/rtharvest/harvests/{}/pause"), ("POST", "/rtharvest/harvests/{}/cancel"),
                             ("GET", "/rtharvest/harvests/{}/manifest"), ("GET", "/rtharvest/ui/{}")):
        path = template.format(quote(segment, safe="%"))
        status, answer = clinic.api.request(method, path, {} if method == "POST" else None)
        _check(method, path, status, answer)
        # Orthanc normalises "..", "%2e%2e" and "%00" away before routing: they reach another real route.
        assert status >= 400 or segment in ("..", "%2e%2e", "%00"), (path, status, answer)


def test_hostile_bodies(clinic: Clinic, ids: tuple[str, int]) -> None:
    harvest_id, job_id = ids
    before = len(clinic.api.get("/rtharvest/harvests?limit=10000"))
    created = 0
    for body in HOSTILE_BODIES:
        for path in ("/rtharvest/harvests", f"/rtharvest/harvests/{harvest_id}/pause",
                     f"/rtharvest/jobs/{job_id}/retry"):
            status, answer = clinic.api.request("POST", path, raw=body,
                                                headers={"Content-Type": "application/json"})
            _check("POST", f"{path} <- {body[:60]!r}", status, answer)
            created += int(path == "/rtharvest/harvests" and status == 200)
    assert len(clinic.api.get("/rtharvest/harvests?limit=10000")) == before + created


def test_wrong_methods(clinic: Clinic, ids: tuple[str, int]) -> None:
    routes = _routes(*ids)
    for _, path, _ in routes:
        for wrong in {"GET", "POST", "PUT", "DELETE"} - {m for m, p, _ in routes if p == path}:
            status, answer = clinic.api.request(wrong, path, {} if wrong in ("POST", "PUT") else None)
            assert status == 405, (wrong, path, status, answer)
