"""``GET /rtharvest/openapi.json``: every routed path is described and every described path is routed.

The description is built from the router (each route is described where it is registered), so the real
harvester is asked: its document must list no undescribed route, and each path and method it describes
must reach a handler of the plugin (any answer but Orthanc's own "unknown resource" 404 or a 405).
"""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

import pytest

from rtharvest.web.openapi import path_template

from .conftest import Clinic
from .servers import RestClient

#: Values for path parameters: well-formed, naming nothing, so handlers answer 404 (nothing changes).
DUMMY = {"id": "0123456789abcdef", "name": "no-such-asset.js"}


def test_path_templates() -> None:
    assert path_template(r"/rtharvest/harvests/([0-9a-zA-Z_-]{1,64})/manifest", ["id"]) == \
        "/rtharvest/harvests/{id}/manifest"
    assert path_template(r"/rtharvest/jobs/([^/]+)/retry", []) == "/rtharvest/jobs/{param1}/retry"
    assert path_template(r"/rtharvest/openapi\.json", []) == "/rtharvest/openapi.json"
    with pytest.raises(ValueError):
        path_template(r"/rtharvest/(x", ["id"])


@pytest.mark.servers
def test_every_route_is_described_and_every_description_is_routed(clinic: Clinic) -> None:
    doc = clinic.api.get("/rtharvest/openapi.json")
    assert doc["openapi"].startswith("3.") and doc["info"]["title"] == "rtharvest"
    assert doc["x-undescribed"] == [], "routes registered without a RouteDoc"
    paths = doc["paths"]
    for required in ("/rtharvest/status", "/rtharvest/harvests", "/rtharvest/harvests/{id}/manifest",
                     "/rtharvest/jobs", "/rtharvest/log", "/rtharvest/openapi.json"):
        assert required in paths, required
    checked = 0
    for path, methods in paths.items():
        assert path.startswith("/rtharvest/"), path
        declared = set(re.findall(r"{(\w+)}", path))
        for method, op in methods.items():
            assert op["summary"] and "200" in op["responses"] and "401" in op["responses"], (path, method)
            assert {p["name"] for p in op["parameters"] if p["in"] == "path"} == declared, (path, method)
            concrete = re.sub(r"{(\w+)}", lambda m: DUMMY.get(m.group(1), "x"), path)
            # A POST gets an empty JSON object: refused (400/404/409) by a handler, so nothing starts.
            status, body = clinic.api.request(method.upper(), concrete, {} if method == "post" else None)
            # Unrouted, a path reaches the catch-all ("no route ...") or Orthanc (no "Error"), a method 405.
            error = body.get("Error", "") if isinstance(body, dict) else None
            routed = status != 405 and not (status == 404 and (error is None or error.startswith("no route")))
            assert routed, f"{method.upper()} {path} is described but not routed: {status} {body}"
            if status >= 400:
                assert str(status) in op["responses"], f"{method.upper()} {path} answered an undescribed {status}"
            checked += 1
    assert checked >= 20


@pytest.mark.servers
def test_every_described_route_requires_authentication(clinic: Clinic) -> None:
    """The description lists every route (the test above), so routes added later (exports, schedules) are
    covered too: each answers 401 without credentials, the manifest included."""
    anonymous = RestClient(clinic.harvester.url, None)
    paths = clinic.api.get("/rtharvest/openapi.json")["paths"]
    for path, methods in paths.items():
        concrete = re.sub(r"{(\w+)}", lambda m: DUMMY.get(m.group(1), "x"), path)
        for method in methods:
            status, _ = anonymous.request(method.upper(), concrete, {} if method == "post" else None)
            assert status == 401, (method, path, status)
    assert anonymous.request("GET", "/rtharvest/openapi.json")[0] == 401


@dataclass(frozen=True)
class Answer:
    """One HTTP answer as a client sees it."""

    status: int
    content_type: str
    allow: str
    body: bytes

    @property
    def media(self) -> str:
        return self.content_type.split(";")[0].strip().lower()

    def error(self) -> Any:
        return json.loads(self.body)["Error"] if self.body else None


def exchange(client: RestClient, method: str, path: str, raw: bytes | None = None) -> Answer:
    """Send one request and keep what the conformance check reads: status, Content-Type, Allow, body."""
    request = urllib.request.Request(client.url + path, data=raw, method=method, headers=client.headers)
    try:
        with urllib.request.urlopen(request, timeout=60, context=client.context) as resp:
            return Answer(resp.status, resp.headers.get("Content-Type", ""), resp.headers.get("Allow", ""),
                          resp.read())
    except urllib.error.HTTPError as exc:
        return Answer(exc.code, exc.headers.get("Content-Type", ""), exc.headers.get("Allow", ""), exc.read())


def variants(method: str, op: dict[str, Any]) -> list[tuple[str, bytes | None]]:
    """Query strings and bodies to send to one operation: as is, each query parameter with a value it must
    refuse (and ``format=csv``, the other answer of the manifest), and for a body both ``{}`` and
    text that is not JSON."""
    found: list[tuple[str, bytes | None]] = [("", b"{}" if method == "post" else None)]
    for param in op["parameters"]:
        if param["in"] != "query":
            continue
        bad = "not-a-number" if param["schema"]["type"] == "integer" else "zz" * 40
        found.append((f"?{param['name']}={bad}", None))
        if param["name"] == "format":
            found.append(("?format=csv", None))
    if "requestBody" in op:
        found.append(("", b'{"Source": '))
    return found


@pytest.mark.servers
def test_every_answer_is_one_the_description_lists(clinic: Clinic) -> None:
    """Walk the description and send each operation what a client may send (real IDs where the harvester
    has them, well-formed unknown ones elsewhere, refusable parameters and bodies): every status answered
    is listed for that operation, a 200 has a content type the description gives, and every other answer
    is ``{"Error": ...}`` as application/json."""
    harvest = clinic.api.post("/rtharvest/harvests", {"Source": "ORTHANC_SRC", "PatientIDs": ["OPENAPI-NOBODY"],
                                                      "Label": "openapi conformance"})["ID"]
    jobs = clinic.api.get(f"/rtharvest/jobs?harvest={harvest}")
    ids = {"/rtharvest/harvests/": harvest, "/rtharvest/jobs/": str(jobs[0]["ID"]) if jobs else "1"}
    paths = clinic.api.get("/rtharvest/openapi.json")["paths"]
    seen: set[tuple[str, str, int]] = set()
    wrong: list[str] = []
    for path, methods in paths.items():
        prefix = next((p for p in ids if path.startswith(p + "{")), None)
        concrete = path
        for name in re.findall(r"{(\w+)}", path):
            concrete = concrete.replace("{" + name + "}", ids[prefix] if prefix else DUMMY.get(name, "x"))
        for method, op in methods.items():
            documented = op["responses"]
            for query, body in variants(method, op):
                answer = exchange(clinic.api, method.upper(), concrete + query, body)
                where = f"{method.upper()} {concrete}{query} -> {answer.status} {answer.content_type!r}"
                seen.add((method, path, answer.status))
                if str(answer.status) not in documented:
                    wrong.append(f"{where}: status not listed ({answer.body[:120]!r})")
                elif answer.status == 200:
                    if answer.media not in documented["200"]["content"]:
                        wrong.append(f"{where}: 200 content type not listed")
                elif answer.media != "application/json" or not answer.error():
                    wrong.append(f"{where}: not a JSON {{'Error'}} ({answer.body[:120]!r})")
        # A method the path does not take: 405, and Allow names exactly the documented ones.
        other = next(m for m in ("PUT", "DELETE", "POST", "GET") if m.lower() not in methods)
        answer = exchange(clinic.api, other, concrete, b"{}" if other in ("PUT", "POST") else None)
        if answer.status != 405 or answer.allow != ", ".join(sorted(m.upper() for m in methods)):
            wrong.append(f"{other} {concrete} -> {answer.status}, Allow {answer.allow!r}: expected 405 naming "
                         f"{sorted(methods)}")
    assert not wrong, "\n".join(wrong)
    # The walk reached handlers, not only refusals: real documents, and the refusals the issue was about.
    assert ("get", "/rtharvest/harvests/{id}/manifest", 200) in seen
    assert ("get", "/rtharvest/exports", 400) in seen  # ?limit=not-a-number
    assert ("get", "/rtharvest/harvests/{id}", 200) in seen
    assert len({(m, p) for m, p, status in seen if status == 200}) >= 12


@pytest.mark.servers
def test_unknown_routes_and_wrong_methods(clinic: Clinic) -> None:
    """Any other /rtharvest path answers the API's JSON 404 (not Orthanc's error document); a method a
    route does not take answers 405 with the methods it takes in ``Allow`` (Orthanc's plugin interface
    sends a 405 without a body)."""
    for method, path in (("GET", "/rtharvest/nope"), ("POST", "/rtharvest/harvests/0123456789abcdef/explode"),
                         ("DELETE", "/rtharvest/"), ("GET", "/rtharvest"), ("GET", "/rtharvest/harvests/" + "a" * 65)):
        answer = exchange(clinic.api, method, path, b"{}" if method == "POST" else None)
        assert answer.status == 404 and answer.media == "application/json", (method, path, answer)
        assert "no route" in answer.error() and "/rtharvest/openapi.json" in answer.error()
    for method, path, allowed in (("DELETE", "/rtharvest/harvests/0123456789abcdef", "GET"),
                                  ("PUT", "/rtharvest/harvests", "GET, POST"),
                                  ("POST", "/rtharvest/status", "GET"),
                                  ("GET", "/rtharvest/schedules/0123456789abcdef", None)):
        answer = exchange(clinic.api, method, path, b"{}" if method in ("POST", "PUT") else None)
        if allowed is None:  # a method the route takes is not refused
            assert answer.status == 404 and answer.error().startswith("unknown schedule"), answer
            continue
        assert answer.status == 405, (method, path, answer)
        assert answer.allow == allowed, (method, path, answer.allow)
