"""OpenAPI 3 description of the ``/rtharvest`` routes, built from the router itself.

Each route is described where it is registered: ``router.add(method, pattern, handler, doc=RouteDoc(...))``.
:func:`openapi_document` turns the router's patterns into OpenAPI paths (each regex group becomes the
path parameter of that position) and lists under ``x-undescribed`` every route registered without a
description, so a new route cannot go unnoticed (tests/test_openapi.py fails on it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["Param", "RouteDoc", "error_statuses", "openapi_document", "path_template"]


@dataclass(frozen=True)
class Param:
    """A query or path parameter. Path parameters are given in the order of the pattern's groups."""

    name: str
    description: str
    where: str = "query"  # "query" or "path"
    type: str = "string"  # "string", "integer", "boolean"
    required: bool = False


@dataclass(frozen=True)
class RouteDoc:
    """What one method on one route does, for the OpenAPI description."""

    summary: str
    params: tuple[Param, ...] = ()
    #: Description of the JSON request body (``None``: no body).
    body: str | None = None
    #: Description of the successful answer.
    response: str = "JSON document"
    content_type: str = "application/json"
    tag: str = "rtharvest"
    #: Error statuses the route may answer, with what they mean (each answers ``{"Error": ...}``). A 400 for
    #: a bad body (routes with ``body``) or a bad integer parameter, the 500 of a bug and Orthanc's 401 are
    #: added by :func:`openapi_document` when not listed here.
    errors: tuple[tuple[int, str], ...] = ()
    #: Further content types of the successful answer (a manifest as CSV, a style sheet besides scripts).
    other_content_types: tuple[str, ...] = ()


def path_template(pattern: str, names: list[str]) -> str:
    """``/rtharvest/harvests/([0-9a-f]+)/manifest`` → ``/rtharvest/harvests/{id}/manifest``.

    Each top-level capturing group is replaced by the next name (``{param1}``... when names run out);
    escaped characters are unescaped. Raises ValueError on a pattern the router could not have meant as a
    path (unbalanced parentheses).
    """
    out: list[str] = []
    depth = 0
    i = 0
    group = 0
    while i < len(pattern):
        c = pattern[i]
        if c == "\\" and i + 1 < len(pattern):
            if depth == 0:
                out.append(pattern[i + 1])
            i += 2
            continue
        if c == "(":
            if depth == 0:
                name = names[group] if group < len(names) else f"param{group + 1}"
                out.append("{" + name + "}")
                group += 1
            depth += 1
        elif c == ")":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ')' in route pattern {pattern!r}")
        elif depth == 0:
            out.append(c)
        i += 1
    if depth != 0:
        raise ValueError(f"unbalanced '(' in route pattern {pattern!r}")
    return "".join(out)


def _parameter(p: Param) -> dict[str, Any]:
    return {"name": p.name, "in": p.where, "description": p.description, "required": p.where == "path" or p.required,
            "schema": {"type": p.type}}


def error_statuses(doc: RouteDoc) -> list[tuple[int, str]]:
    """Every ``{"Error"}`` answer of the route besides 200: its own ``errors``, then what every route of
    its kind may answer (a bad body or integer parameter, a bug), each status once."""
    found = dict(doc.errors)
    integers = [p.name for p in doc.params if p.where == "query" and p.type == "integer"]
    if doc.body is not None and 400 not in found:
        found[400] = "the body is not a JSON object, or a field is invalid (the message names it)"
    if integers and 400 not in found:
        found[400] = f"{' or '.join(integers)} is not an integer in range"
    found.setdefault(500, "a bug in the plugin (the message says to read Orthanc's log)")
    return sorted(found.items())


def _operation(method: str, doc: RouteDoc) -> dict[str, Any]:
    op: dict[str, Any] = {
        "summary": doc.summary,
        "operationId": None,
        "tags": [doc.tag],
        "parameters": [_parameter(p) for p in doc.params],
        "responses": {"200": {"description": doc.response, "content": {
            ct: {} for ct in (doc.content_type, *doc.other_content_types)}}},
    }
    if doc.body is not None:
        op["requestBody"] = {"required": True, "description": doc.body,
                             "content": {"application/json": {"schema": {"type": "object"}}}}
    for status, meaning in error_statuses(doc):
        op["responses"][str(status)] = {"description": meaning, "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
    # Orthanc answers 401 itself, before the plugin sees the request: a challenge without a body.
    op["responses"]["401"] = {"description": "no or wrong credentials (Orthanc's authentication; no body)"}
    return op


def openapi_document(routes: list[tuple[str, str, RouteDoc | None]], version: str) -> dict[str, Any]:
    """The OpenAPI 3.0 document of ``routes`` (``(method, pattern, doc)``, as ``Router.described`` gives)."""
    paths: dict[str, dict[str, Any]] = {}
    undescribed: list[str] = []
    for method, pattern, doc in routes:
        if doc is None:
            undescribed.append(f"{method} {pattern}")
            continue
        names = [p.name for p in doc.params if p.where == "path"]
        path = path_template(pattern, names)
        op = _operation(method, doc)
        op["operationId"] = f"{method.lower()}{''.join(ch if ch.isalnum() else '_' for ch in path)}"
        paths.setdefault(path, {})[method.lower()] = op
    return {
        "openapi": "3.0.3",
        "info": {"title": "rtharvest", "version": version,
                 "description": "Harvests complete radiotherapy datasets from clinical DICOM systems. Every "
                                "route sits behind Orthanc's authentication; errors answer 4xx (a bug 500) "
                                "with {\"Error\": \"...\"} as application/json. Any other /rtharvest path "
                                "answers 404 the same way; a method a path does not take answers 405 with "
                                "an Allow header naming those it takes (Orthanc sends a 405 without a "
                                "body)."},
        "security": [{"basicAuth": []}],
        "paths": dict(sorted(paths.items())),
        "components": {
            "securitySchemes": {"basicAuth": {"type": "http", "scheme": "basic"}},
            "schemas": {"Error": {"type": "object", "required": ["Error"],
                                  "properties": {"Error": {"type": "string"}}}},
        },
        "x-undescribed": undescribed,
    }
