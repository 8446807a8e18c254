"""The harvests page and the Orthanc Explorer extension, served by the plugin itself.

Hospital networks have no internet access, so the page is self-contained: one HTML file, its script,
its hand-written SVG charts and stylesheet, all shipped in ``rtharvest/web/explorer/`` (package data) and
fetched from the same origin as the REST API. Every URL in the assets is relative, so the page also works
behind a reverse proxy that mounts Orthanc under a path prefix.

Routes (registered by :func:`register`):

* ``GET /rtharvest/ui`` — the page;
* ``GET /rtharvest/ui/{file}`` — its assets (a fixed allow-list: no path ever reaches the file system).

:func:`explorer_extension` is the JavaScript to hand to ``sdk.extend_explorer`` (Orthanc Explorer's
``/plugins/explorer.js``): a link to the page on the home page, and the harvest provenance of a study.
"""

from __future__ import annotations

from functools import cache
from importlib import resources

from .httpapi import ApiError, HttpRequest, HttpResponse, Router
from .openapi import Param, RouteDoc

#: Served assets and their content types (the allow-list of ``/rtharvest/ui/{file}``).
ASSETS: dict[str, str] = {
    "harvests.js": "application/javascript; charset=utf-8",
    "charts.js": "application/javascript; charset=utf-8",
    "exports.js": "application/javascript; charset=utf-8",
    "harvests.css": "text/css; charset=utf-8",
}
PAGE = "harvests.html"
EXTENSION = "explorer-extension.js"
UI_ROUTE = r"/rtharvest/ui"
ASSET_ROUTE = r"/rtharvest/ui/([A-Za-z0-9_.-]{1,64})"


@cache
def asset_text(name: str) -> str:
    """The text of one shipped asset (read once: the files do not change while Orthanc runs)."""
    return resources.files("rtharvest.web").joinpath("explorer", name).read_text(encoding="utf-8")


def ui_page(_: HttpRequest) -> HttpResponse:
    """``GET /rtharvest/ui``: the harvests page."""
    return HttpResponse.text(asset_text(PAGE), "text/html; charset=utf-8")


def ui_asset(request: HttpRequest) -> HttpResponse:
    """``GET /rtharvest/ui/{file}``: a script or stylesheet of the page."""
    name = request.groups[0] if request.groups else ""
    content_type = ASSETS.get(name)
    if content_type is None:
        raise ApiError(404, f"no page asset {name[:64]!r}; the page is GET /rtharvest/ui")
    return HttpResponse.text(asset_text(name), content_type)


def explorer_extension() -> str:
    """JavaScript for ``orthanc.ExtendOrthancExplorer`` (via ``sdk.extend_explorer``)."""
    return asset_text(EXTENSION)


def register(router: Router) -> None:
    """Add the page routes to ``router`` (they read no database: safe on the error router too)."""
    router.add("GET", UI_ROUTE, ui_page, RouteDoc("The harvester's page: harvests, failed jobs, warnings, manifest, "
                                                  "charts", response="HTML page", content_type="text/html",
                                                  tag="page"))
    router.add("GET", ASSET_ROUTE, ui_asset, RouteDoc(
        "A script or style sheet of the page", (Param("name", "asset file name", "path"),),
        response="JavaScript or CSS", content_type="application/javascript", other_content_types=("text/css",),
        tag="page", errors=((404, "unknown asset"),)))
