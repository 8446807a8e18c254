"""``/rtharvest/central/...`` routes, the consortium page and its SVG chart (served by the plugin itself:
no CDN, no script; hospital and consortium networks may have no internet access)."""

from __future__ import annotations

import csv
import html
import io
from collections.abc import Mapping
from typing import Any

from ..core.manifest import csv_cell
from ..web.httpapi import ApiError, HttpRequest, HttpResponse, Router
from ..web.openapi import Param, RouteDoc
from .service import CentralService, basic_user

__all__ = ["plans_by_year_svg", "register", "summary_csv"]

_SITE = r"([0-9A-Za-z_-]{1,16})"
_UID = r"([0-9.]{1,64})"
_PLAN_CSV = ("Site", "PatientID", "PlanUID", "PlanIntent", "SiteStatus", "HeldStatus", "Check", "Differences",
             "Treatments", "FirstTreatment", "LastTreatment", "Delivery", "Withdrawn", "WithdrawnReason")
_PALETTE = ("#3366cc", "#dc7633", "#28a745", "#8e44ad", "#c0392b", "#16a085", "#7f8c8d")


def _csv(header: tuple[str, ...] | list[str], rows: list[list[Any]]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header)
    writer.writerows([[csv_cell(v) for v in row] for row in rows])
    return out.getvalue()


def _flat(table: Mapping[str, Any]) -> dict[str, Any]:
    """Table 1 as flat columns: ``PlansByIntent.CURATIVE``, ``ImageSeries.CT``, ..."""
    out: dict[str, Any] = {}
    for name, value in table.items():
        if isinstance(value, Mapping):
            out.update({f"{name}.{k}": v for k, v in value.items()})
        else:
            out[name] = value
    return out


def summary_csv(summary: Mapping[str, Any]) -> str:
    """One row per site and a last ``ALL`` row (the pooled counts); absent categories are 0."""
    tables = {**summary["Sites"], "ALL": summary["Pooled"]}
    flat = {name: _flat(t) for name, t in tables.items()}
    columns: list[str] = []
    for f in flat.values():
        columns += [c for c in f if c not in columns]
    return _csv(["Site", *columns], [[name, *(f.get(c, 0) for c in columns)] for name, f in flat.items()])


def plans_by_year_svg(counts: Mapping[str, Mapping[str, int]]) -> str:
    """Grouped bars: delivered plans per year of (shifted) first treatment, one colour per site."""
    sites = list(counts)
    years = sorted({y for c in counts.values() for y in c})
    width, height, left, bottom, top = 640, 260, 40, 30, 30
    top_value = max([n for c in counts.values() for n in c.values()] or [1])
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img" aria-label="Plans per site and year">',
             '<style>text{font:11px sans-serif}</style>',
             f'<line x1="{left}" y1="{height - bottom}" x2="{width - 10}" y2="{height - bottom}" stroke="#333"/>']
    if not years:
        parts.append(f'<text x="{left + 10}" y="{height // 2}">no plan delivered yet</text>')
    group = (width - left - 10) / max(len(years), 1)
    bar = max(group * 0.8 / max(len(sites), 1), 1)
    plot = height - bottom - top
    for yi, year in enumerate(years):
        x0 = left + yi * group + group * 0.1
        for si, site in enumerate(sites):
            n = counts[site].get(year, 0)
            h = plot * n / top_value
            x = x0 + si * bar
            parts.append(f'<rect x="{x:.1f}" y="{height - bottom - h:.1f}" width="{bar:.1f}" height="{h:.1f}" '
                         f'fill="{_PALETTE[si % len(_PALETTE)]}"><title>{html.escape(site)} {html.escape(year)}: '
                         f'{n} plan(s)</title></rect>')
        parts.append(f'<text x="{x0 + group * 0.4:.1f}" y="{height - bottom + 14}" text-anchor="middle">'
                     f'{html.escape(year)}</text>')
    parts.append(f'<text x="4" y="{top - 8}">{top_value} plans</text>')
    for si, site in enumerate(sites):
        x = left + 10 + si * 110
        parts.append(f'<rect x="{x}" y="4" width="10" height="10" fill="{_PALETTE[si % len(_PALETTE)]}"/>'
                     f'<text x="{x + 14}" y="13">{html.escape(site)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape('' if v is None else str(v))}</td>" for v in row) + "</tr>"
                   for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def page(service: CentralService) -> str:
    """The consortium page (server-rendered HTML; every value escaped)."""
    sites = service.sites()
    summary = service.summary()
    site_rows = [[s["Site"], s["Deliveries"], s["PlansDelivered"],
                  ", ".join(f"{k} {v}" for k, v in s["PlansByHeldStatus"].items()), s["PlansWithdrawn"],
                  s["Verification"] or "-", (s["LastDelivery"] or {}).get("At", "-")] for s in sites]
    flat = {name: _flat(t) for name, t in {**summary["Sites"], "Pooled": summary["Pooled"]}.items()}
    columns: list[str] = []
    for f in flat.values():
        columns += [c for c in f if c not in columns]
    table1 = [[c, *(f.get(c, 0) for f in flat.values())] for c in columns]
    recent = service.deliveries(limit=20)
    delivery_rows = [[d["ID"], d["Site"], d["Export"], d["State"], d["Plans"], f"{d['InstancesHeld']}/{d['Instances']}",
                      d["PlansWithDifferences"], d["InstancesQuarantined"], d["ReceivedAt"]] for d in recent]
    flagged = [[p.site, p.plan_uid, p.check_state, "; ".join(p.differences[:5])]
               for p in service.plans() if p.withdrawn_at is None and p.check_state != "Verified"]
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>rtharvest consortium</title>
<style>body{{font:14px sans-serif;margin:1.5em}}table{{border-collapse:collapse;margin-bottom:1.5em}}
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:left}}th{{background:#f3f3f3}}</style></head>
<body><h1>Consortium archive</h1>
<p>Data: <a href="summary">Table 1 JSON</a> · <a href="summary?format=csv">CSV</a> ·
<a href="plans?format=csv">plans CSV</a> · <a href="deliveries">deliveries</a> · <a href="../openapi.json">API</a></p>
<h2>Sites</h2>{_table(["Site", "Deliveries", "Plans", "Held status", "Withdrawn", "Verification", "Last delivery"],
                      site_rows)}
<h2>Table 1 (pooled: active plans as held)</h2>{_table(["Count", *flat], table1)}
<h2>Plans per site and year</h2><img src="charts/plans-by-year.svg" alt="plans per site and year">
<h2>Plans not verified</h2>{_table(["Site", "Plan", "Check", "Differences"], flagged) if flagged else "<p>none</p>"}
<h2>Recent deliveries</h2>{_table(["ID", "Site", "Export", "State", "Plans", "Instances held", "Plans differing",
                                  "Quarantined", "Received"], delivery_rows)}
</body></html>"""


def _format(request: HttpRequest) -> str:
    fmt = request.query.get("format", "json")
    if fmt not in ("json", "csv"):
        raise ApiError(400, f"query parameter 'format' must be json or csv, got {fmt[:10]!r}")
    return fmt


def _delivery_id(request: HttpRequest) -> int:
    return int(request.groups[0])


def register(router: Router, service: CentralService) -> None:
    """Add the central routes to ``router`` (central mode only)."""

    def deliver(request: HttpRequest) -> HttpResponse:
        return HttpResponse.json(service.deliver(request.json_object(), request.headers))

    def list_deliveries(request: HttpRequest) -> HttpResponse:
        return HttpResponse.json(service.deliveries(request.query.get("site") or None,
                                                    request.query_int("limit", 100, 1, 10_000)))

    def get_delivery(request: HttpRequest) -> HttpResponse:
        return HttpResponse.json(service.delivery(_delivery_id(request)))

    def get_manifest(request: HttpRequest) -> HttpResponse:
        return HttpResponse.json(service.delivery_manifest(_delivery_id(request)))

    def recheck(request: HttpRequest) -> HttpResponse:
        return HttpResponse.json(service.recheck(_delivery_id(request)))

    def sites(_: HttpRequest) -> HttpResponse:
        return HttpResponse.json(service.sites())

    def plans(request: HttpRequest) -> HttpResponse:
        entries = service.plans(request.query.get("site") or None)
        if _format(request) == "csv":
            rows = [[p.site, p.patient_id, p.plan_uid, p.site_row.get("PlanIntent"), p.site_status, p.held_status,
                     p.check_state, len(p.differences), p.site_row.get("Treatments"), p.first_treatment,
                     p.site_row.get("LastTreatment"), p.delivery_id, p.withdrawn_at is not None,
                     p.withdrawn_reason or ""] for p in entries]
            return HttpResponse.text(_csv(_PLAN_CSV, rows), "text/csv; charset=utf-8")
        return HttpResponse.json([p.to_json() for p in entries])

    def summary(request: HttpRequest) -> HttpResponse:
        doc = service.summary()
        if _format(request) == "csv":
            return HttpResponse.text(summary_csv(doc), "text/csv; charset=utf-8")
        return HttpResponse.json(doc)

    def withdraw(request: HttpRequest) -> HttpResponse:
        body = request.json_object()
        unknown = sorted(set(body) - {"Reason"})
        if unknown:
            raise ApiError(400, f"{unknown[0][:40]}: unknown field; allowed: Reason")
        return HttpResponse.json(service.withdraw(request.groups[0], request.groups[1], body.get("Reason"),
                                                  basic_user(request.headers)))

    def chart(_: HttpRequest) -> HttpResponse:
        return HttpResponse.text(plans_by_year_svg(service.plans_by_year()), "image/svg+xml")

    def ui(_: HttpRequest) -> HttpResponse:
        return HttpResponse.text(page(service), "text/html; charset=utf-8")

    delivery = Param("id", "delivery ID", "path", "integer")
    site_q = Param("site", "only this site")
    fmt = Param("format", "json (default) or csv (one row per plan / per site, for pandas.read_csv)")
    unknown = (404, "unknown delivery")
    tag = "central"
    router.add("POST", r"/rtharvest/central/deliveries", deliver, RouteDoc(
        "A site announces an export it sent and verified; the archive records and checks it at once",
        body='{"Site", "Export", "Profile", "Plans": [de-identified plan rows], "Instances": [SOP UIDs], '
             '"Summary", "SeriesModalities", "SiteVerification"}',
        response="the delivery with its per-plan checks (as GET /rtharvest/central/deliveries/{id})", tag=tag,
        errors=((400, "invalid body, naming the field; a PatientID that is not a pseudonym refuses the delivery"),
                (403, "unknown site, or the caller is not that site"),
                (503, "the archive is still starting"))))
    router.add("GET", r"/rtharvest/central/deliveries", list_deliveries, RouteDoc(
        "Deliveries, newest first", (site_q, Param("limit", "at most this many (1-10000, default 100)",
                                                   type="integer")),
        response="[delivery, ...]", tag=tag, errors=((404, "unknown site"),)))
    router.add("GET", r"/rtharvest/central/deliveries/([0-9]{1,12})", get_delivery, RouteDoc(
        "One delivery: State (Verified, Differences, Quarantined), instances held and absent, quarantine "
        "reasons, and each plan's check with its differences", (delivery,), tag=tag, errors=(unknown,)))
    router.add("GET", r"/rtharvest/central/deliveries/([0-9]{1,12})/manifest", get_manifest, RouteDoc(
        "The delivered document as received", (delivery,), tag=tag, errors=(unknown,)))
    router.add("POST", r"/rtharvest/central/deliveries/([0-9]{1,12})/check", recheck, RouteDoc(
        "Check a delivery again against what the archive holds now", (delivery,), tag=tag,
        errors=(unknown, (503, "the archive is still starting"))))
    router.add("GET", r"/rtharvest/central/sites", sites, RouteDoc(
        "Per site: deliveries, plans delivered, held status (Complete, Incomplete, Missing), checks, "
        "withdrawn plans, last delivery", response="[site, ...]", tag=tag))
    router.add("GET", r"/rtharvest/central/plans", plans, RouteDoc(
        "Every delivered plan with its site and held status, check and differences", (site_q, fmt),
        response="[plan, ...] or CSV", tag=tag, errors=((400, "bad format"), (404, "unknown site"))))
    router.add("GET", r"/rtharvest/central/summary", summary, RouteDoc(
        "Table 1 pooled across sites and per site (patients, plans, success rate, intents, image series by "
        "modality, registration types), over active plans as held", (fmt,),
        response='{"Pooled", "Sites": {SITE: ...}} or CSV', tag=tag, errors=((400, "bad format"),)))
    router.add("POST", rf"/rtharvest/central/sites/{_SITE}/plans/{_UID}/withdraw", withdraw, RouteDoc(
        "Withdraw a delivered plan (e.g. consent revoked): its objects are deleted, the plan stays listed "
        "with the reason", (Param("site", "site name", "path"), Param("plan", "de-identified plan UID", "path")),
        body='{"Reason": str}', tag=tag,
        errors=((400, "Reason missing"), (403, "a user of another site"), (404, "unknown site or plan"),
                (409, "already withdrawn"))))
    router.add("GET", r"/rtharvest/central/charts/plans-by-year\.svg", chart, RouteDoc(
        "SVG chart: plans per site and year of (shifted) first treatment", response="SVG image",
        content_type="image/svg+xml", tag=tag))
    router.add("GET", r"/rtharvest/central/ui", ui, RouteDoc(
        "The consortium page: sites, pooled Table 1, chart, plans not verified, recent deliveries",
        response="HTML page", content_type="text/html", tag=tag))
