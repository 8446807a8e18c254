"""The router answers every outcome with JSON; bad bodies and parameters are 4xx with a message."""

from __future__ import annotations

import json

import pytest

from rtharvest.web.httpapi import ApiError, HttpRequest, HttpResponse, Router


def _router() -> Router:
    router = Router()
    router.add("GET", r"/things/([a-z0-9]+)", lambda r: HttpResponse.json({"id": r.groups[0],
                                                                          "limit": r.query_int("limit", 10)}))
    router.add("POST", r"/things", lambda r: HttpResponse.json(r.json_object()))
    router.add("GET", r"/boom", lambda r: HttpResponse.json({"result": 1 / 0}))  # raises ZeroDivisionError
    return router


def _call(method: str, path: str, body: bytes = b"", query: dict[str, str] | None = None) -> tuple[int, dict]:
    response = _router().handle(HttpRequest(method, path, query=query or {}, body=body))
    return response.status, json.loads(response.body)


def test_groups_and_query() -> None:
    assert _call("GET", "/things/ab12", query={"limit": "5"}) == (200, {"id": "ab12", "limit": 5})


@pytest.mark.parametrize(
    ("body", "fragment"),
    [(b"", "empty"), (b"{not json", "not valid JSON"), (b"[1, 2]", "must be a JSON object"),
     (b"\xff\xfe", "not UTF-8"), (b'"text"', "must be a JSON object")],
)
def test_bad_bodies_are_400(body: bytes, fragment: str) -> None:
    status, answer = _call("POST", "/things", body)
    assert status == 400
    assert fragment in answer["Error"]


@pytest.mark.parametrize("value", ["abc", "-1", "100001", "1e3"])
def test_bad_integer_parameters_are_400(value: str) -> None:
    status, answer = _call("GET", "/things/x", query={"limit": value})
    assert status == 400 and "limit" in answer["Error"]


def test_unknown_route_and_method() -> None:
    assert _call("GET", "/nothing")[0] == 404
    status, answer = _call("DELETE", "/things")
    assert status == 405 and "POST" in answer["Error"]
    response = _router().handle(HttpRequest("PUT", "/things/x"))
    assert response.allow == ["GET"] and response.content_type == "application/json"


def test_a_bug_answers_500_with_a_message_not_a_traceback() -> None:
    status, answer = _call("GET", "/boom")
    assert status == 500
    assert "internal error" in answer["Error"] and "ZeroDivision" not in answer["Error"]


def test_api_error_keeps_status() -> None:
    router = Router()

    def refuse(_: HttpRequest) -> HttpResponse:
        raise ApiError(409, "harvest is cancelled")

    router.add("POST", "/x", refuse)
    response = router.handle(HttpRequest("POST", "/x"))
    assert response.status == 409 and json.loads(response.body) == {"Error": "harvest is cancelled"}
