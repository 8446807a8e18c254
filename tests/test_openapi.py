"""``GET /rtharvest/openapi.json``: every routed path is described and every described path is routed.

The description is built from the router (each route is described where it is registered), so the real
harvester is asked: its document must list no undescribed route, and each path and method it describes
must reach a handler of the plugin (any answer but Orthanc's own "unknown resource" 404 or a 405).
"""

from __future__ import annotations

import re

import pytest

from rtharvest.openapi import path_template

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
            routed = status != 405 and not (status == 404 and not (isinstance(body, dict) and "Error" in body))
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
