"""Transport-neutral HTTP request/response values and a small router for the plugin's REST routes.

The Orthanc adapter in :mod:`rtharvest.edge.sdk` turns Orthanc's REST callback into an :class:`HttpRequest`
and writes the :class:`HttpResponse` back; everything in between is plain Python and testable without
Orthanc. Handlers raise :class:`ApiError` for bad input; the router turns it (and any unexpected
exception) into a JSON body ``{"Error": ...}`` so a client never sees a bare 500 without a message.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("rtharvest.httpapi")


class ApiError(Exception):
    """A request the API refuses, with the HTTP status to answer and a message saying how to fix it."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


#: Deepest array/object nesting a request body may have (the API's own bodies nest two levels).
MAX_JSON_DEPTH = 32


def _nesting_exceeds(text: str, limit: int) -> bool:
    """Whether JSON ``text`` opens more than ``limit`` nested arrays/objects (brackets in strings ignored)."""
    if text.count("[") + text.count("{") <= limit:
        return False
    depth, in_string, escaped = 0, False, False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            if depth > limit:
                return True
        elif ch in "]}":
            depth -= 1
    return False


@dataclass(frozen=True)
class HttpRequest:
    """One REST call as the route handlers see it."""

    method: str
    path: str
    groups: tuple[str, ...] = ()
    query: Mapping[str, str] = field(default_factory=dict)
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes = b""

    def json_body(self) -> Any:
        """The body parsed as JSON; :class:`ApiError` 400 with the parser's position otherwise."""
        if not self.body.strip():
            raise ApiError(400, "the request body is empty: send a JSON object")
        try:
            text = self.body.decode("utf-8")
        except UnicodeDecodeError:
            raise ApiError(400, "the request body is not UTF-8 text") from None
        if _nesting_exceeds(text, MAX_JSON_DEPTH):
            # json.loads recurses per level: deep enough, it overflows the C stack of Orthanc's HTTP thread
            # (a crash, not a RecursionError). No request of this API nests more than a few levels.
            raise ApiError(400, f"the request body nests arrays/objects deeper than {MAX_JSON_DEPTH} levels")
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ApiError(400, f"the request body is not valid JSON: {exc.msg} at line {exc.lineno} "
                                f"column {exc.colno}") from None
        try:
            # "\ud800" escapes decode to lone surrogates, which no UTF-8 store (SQLite, logs) accepts.
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise ApiError(400, "the request body holds an invalid \\u escape (a lone UTF-16 surrogate)") from None
        except ValueError:
            pass  # NaN/Infinity: the field validators say what is wrong with them
        return value

    def json_object(self) -> dict[str, Any]:
        """The body as a JSON object (dict); :class:`ApiError` 400 for arrays, strings, numbers."""
        body = self.json_body()
        if not isinstance(body, dict):
            raise ApiError(400, f"the request body must be a JSON object, not {type(body).__name__}")
        return body

    def query_int(self, name: str, default: int, minimum: int = 0, maximum: int = 100_000) -> int:
        """An integer query parameter within bounds; :class:`ApiError` 400 otherwise."""
        raw = self.query.get(name)
        if raw is None or raw == "":
            return default
        try:
            value = int(raw)
        except ValueError:
            raise ApiError(400, f"query parameter {name!r} must be an integer, got {raw!r}") from None
        if not minimum <= value <= maximum:
            raise ApiError(400, f"query parameter {name!r} must be between {minimum} and {maximum}")
        return value


@dataclass(frozen=True)
class HttpResponse:
    """What a handler answers: status, body, content type and any further headers (``Allow`` of a 405)."""

    status: int
    body: bytes
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()

    @staticmethod
    def json(value: Any, status: int = 200) -> HttpResponse:
        """A JSON answer (indented: people read these in a browser)."""
        return HttpResponse(status, json.dumps(value, indent=2, sort_keys=False).encode("utf-8"))

    @staticmethod
    def text(value: str, content_type: str = "text/plain; charset=utf-8", status: int = 200) -> HttpResponse:
        """A text answer (CSV, JavaScript, HTML)."""
        return HttpResponse(status, value.encode("utf-8"), content_type)

    @staticmethod
    def error(status: int, message: str) -> HttpResponse:
        """The contract's error body ``{"Error": message}``."""
        return HttpResponse.json({"Error": message}, status)

    @staticmethod
    def method_not_allowed(method: str, path: str, allowed: list[str]) -> HttpResponse:
        """405 naming the methods ``path`` takes, in the body and in the ``Allow`` header (RFC 9110)."""
        answer = HttpResponse.error(405, f"{method} is not allowed on {path}; use {', '.join(allowed)}")
        return HttpResponse(answer.status, answer.body, answer.content_type, (("Allow", ", ".join(allowed)),))

    @property
    def allow(self) -> list[str]:
        """The methods of an ``Allow`` header (empty when there is none)."""
        return [m.strip() for name, value in self.headers if name.lower() == "allow" for m in value.split(",")]


#: The Orthanc callback pattern that sends every other ``/rtharvest/...`` path to :meth:`Router.handle`, so an
#: unknown route answers the API's ``{"Error"}`` 404 instead of Orthanc's own error format. Registered last:
#: Orthanc gives a request to the first registered pattern that matches it.
CATCH_ALL = r"/rtharvest(/.*)?"

#: What an unknown ``/rtharvest`` path answers, after the path.
UNKNOWN_ROUTE_HINT = "; the routes are listed by GET /rtharvest/openapi.json"


Handler = Callable[[HttpRequest], HttpResponse]


@dataclass
class _Route:
    pattern: re.Pattern[str]
    methods: dict[str, Handler]
    docs: dict[str, Any] = field(default_factory=dict)


class Router:
    """Maps (method, path regex) to handlers; one Orthanc REST callback per distinct path pattern."""

    def __init__(self) -> None:
        self._routes: dict[str, _Route] = {}

    def add(self, method: str, pattern: str, handler: Handler, doc: Any = None) -> None:
        """Register ``handler`` for ``method`` on ``pattern`` (a full-match regex with groups).

        ``doc`` (an :class:`rtharvest.web.openapi.RouteDoc`) describes the route in ``/rtharvest/openapi.json``;
        describe every route where you register it (tests/test_openapi.py fails on one without).
        """
        route = self._routes.setdefault(pattern, _Route(re.compile(pattern), {}))
        route.methods[method.upper()] = handler
        if doc is not None:
            route.docs[method.upper()] = doc

    def described(self) -> list[tuple[str, str, Any]]:
        """Every (method, pattern, doc or None), in registration order."""
        return [(method, pattern, route.docs.get(method))
                for pattern, route in self._routes.items() for method in route.methods]

    @property
    def patterns(self) -> list[str]:
        """The distinct path patterns, for registering one Orthanc callback each."""
        return list(self._routes)

    def allowed(self, pattern: str) -> list[str]:
        """Methods registered on ``pattern``."""
        return sorted(self._routes[pattern].methods)

    def dispatch(self, pattern: str, request: HttpRequest) -> HttpResponse:
        """Run the handler of ``pattern`` for the request's method, turning errors into JSON answers."""
        route = self._routes.get(pattern)
        if route is None:
            return HttpResponse.error(404, f"no route {request.path[:200]}{UNKNOWN_ROUTE_HINT}")
        handler = route.methods.get(request.method.upper())
        if handler is None:
            return HttpResponse.method_not_allowed(request.method.upper()[:20], request.path[:200],
                                                   sorted(route.methods))
        try:
            return handler(request)
        except ApiError as exc:
            log.info("REST %s %s refused (%d): %s", request.method, request.path, exc.status, exc.message)
            return HttpResponse.error(exc.status, exc.message)
        except Exception:  # a bug must still answer a message, never a bare 500
            log.exception("REST %s %s failed", request.method, request.path)
            return HttpResponse.error(500, "internal error in the rtharvest plugin; see Orthanc's log")

    def handle(self, request: HttpRequest) -> HttpResponse:
        """Find the route whose pattern matches ``request.path`` and dispatch (used outside Orthanc)."""
        for pattern, route in self._routes.items():
            match = route.pattern.fullmatch(request.path)
            if match:
                req = HttpRequest(request.method, request.path, match.groups(), request.query,
                                  request.headers, request.body)
                return self.dispatch(pattern, req)
        return HttpResponse.error(404, f"no route {request.path[:200]}{UNKNOWN_ROUTE_HINT}")
