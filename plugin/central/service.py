"""The archive's record of deliveries: who delivered which plans, what the archive holds of them, what
differs and what was quarantined or withdrawn (apsw tables in the plugin's database).

A delivery is keyed by (site, export ID): the same export announced again (the site's verification job
retried, or an operator re-posting it) updates that delivery and re-runs the check, never adds a second
one. Plans are keyed by (site, de-identified plan UID): a later export of the same plan points the plan at
the newer delivery; the pooled counts count each plan once.
"""

from __future__ import annotations

import base64
import hmac
import io
import json
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import pydicom

from ..core.manifest import PlanRow, summarize_plans
from ..core.references import ObjectKind, ObjectRefs, extract
from ..export.verify import SELECTION_COUNTS, PhiHit, compare_summaries
from ..store.db import Database, register_schema
from ..store.eventlog import EventLog, Level
from ..web.httpapi import ApiError
from .check import Delivery, PlanCheck, check_plans, parse_delivery, scan_identifying
from .settings import TOKEN_HEADER, CentralSettings, SiteEntry

__all__ = ["CentralService", "CheckState", "HeldStore"]

_SCHEMA = [
    """CREATE TABLE rth_central_deliveries (
        id INTEGER PRIMARY KEY, site TEXT NOT NULL, export_id TEXT NOT NULL,
        first_received_at REAL NOT NULL, received_at REAL NOT NULL, checked_at REAL, times_received INTEGER NOT NULL,
        state TEXT NOT NULL DEFAULT 'Received', plans INTEGER NOT NULL, instances INTEGER NOT NULL,
        instances_held INTEGER NOT NULL DEFAULT 0, document TEXT NOT NULL, problems TEXT, quarantine TEXT,
        UNIQUE (site, export_id))""",
    """CREATE TABLE rth_central_plans (
        site TEXT NOT NULL, plan_uid TEXT NOT NULL, delivery_id INTEGER NOT NULL, patient_id TEXT NOT NULL,
        site_row TEXT NOT NULL, held_row TEXT, site_status TEXT NOT NULL, held_status TEXT NOT NULL,
        check_state TEXT NOT NULL, differences TEXT NOT NULL, first_treatment TEXT, checked_at REAL NOT NULL,
        withdrawn_at REAL, withdrawn_reason TEXT, withdrawn_by TEXT,
        PRIMARY KEY (site, plan_uid))""",
    """CREATE TABLE rth_central_instances (
        site TEXT NOT NULL, sop_uid TEXT NOT NULL, series_uid TEXT, modality TEXT, delivery_id INTEGER NOT NULL,
        PRIMARY KEY (site, sop_uid))""",
    "CREATE INDEX rth_central_instances_series ON rth_central_instances (site, series_uid)",
]
register_schema("central", 1, _SCHEMA)


class CheckState:
    """A delivered plan's (and a delivery's) verdict."""

    VERIFIED = "Verified"        # what the archive holds gives the site's manifest row
    DIFFERENCES = "Differences"  # listed per plan
    QUARANTINED = "Quarantined"  # an object of the plan held an identifying value: deleted, plan not pooled


class HeldStore(Protocol):
    """The archive's Orthanc store (:class:`rtharvest.edge.localstore.OrthancLocalStore`)."""

    def lookup_many(self, sop_uids: Sequence[str]) -> dict[str, str]: ...
    def read(self, orthanc_id: str) -> bytes: ...
    def metadata(self, orthanc_id: str) -> dict[str, str]: ...
    def delete(self, orthanc_id: str) -> None: ...


def _iso(epoch: float | None) -> str | None:
    return None if epoch is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def basic_user(headers: Mapping[str, str]) -> str | None:
    """The user name of a Basic ``Authorization`` header (Orthanc has checked the password)."""
    value = headers.get("authorization", "")
    if not value.lower().startswith("basic "):
        return None
    try:
        return base64.b64decode(value[6:].strip()).decode("utf-8").split(":", 1)[0]
    except (ValueError, UnicodeDecodeError):
        return None


def row_uids(row: Mapping[str, Any]) -> tuple[set[str], set[str]]:
    """(object UIDs, series UIDs) a plan row names."""
    objects = {str(row["PlanUID"]), *(row.get("RecordUIDs") or []), *(row.get("DoseUIDs") or []),
               *(row.get("RegistrationUIDs") or [])}
    if row.get("StructureSetUID"):
        objects.add(str(row["StructureSetUID"]))
    series = {str(s) for name in ("PlanningSeriesUIDs", "PlanningForSeriesUIDs", "RegisteredSeriesUIDs",
                                  "RegisteredForSeriesUIDs") for s in row.get(name) or []}
    return objects, series


@dataclass(frozen=True)
class PlanEntry:
    """One plan as recorded at the archive."""

    site: str
    plan_uid: str
    delivery_id: int
    patient_id: str
    site_row: dict[str, Any]
    held_row: dict[str, Any] | None
    site_status: str
    held_status: str
    check_state: str
    differences: list[str]
    first_treatment: str | None
    withdrawn_at: float | None
    withdrawn_reason: str | None

    @property
    def active(self) -> bool:
        """Counted in the pooled tables: not withdrawn, not quarantined."""
        return self.withdrawn_at is None and self.check_state != CheckState.QUARANTINED

    def pooled_row(self) -> PlanRow:
        """The archive's own row (what it holds), or the delivered row as ``Missing`` when nothing is held."""
        if self.held_row is not None:
            return PlanRow.from_json(self.held_row)
        return PlanRow.from_json({**self.site_row, "Status": "Missing", "Missing": []})

    def to_json(self) -> dict[str, Any]:
        """JSON form (all values de-identified)."""
        return {"Site": self.site, "PlanUID": self.plan_uid, "PatientID": self.patient_id,
                "PlanIntent": self.site_row.get("PlanIntent"), "Delivery": self.delivery_id,
                "SiteStatus": self.site_status, "HeldStatus": self.held_status, "Check": self.check_state,
                "Differences": self.differences, "Treatments": self.site_row.get("Treatments"),
                "FirstTreatment": self.first_treatment, "LastTreatment": self.site_row.get("LastTreatment"),
                "Withdrawn": None if self.withdrawn_at is None else
                {"At": _iso(self.withdrawn_at), "Reason": self.withdrawn_reason}}


_PLAN_COLUMNS = ("site, plan_uid, delivery_id, patient_id, site_row, held_row, site_status, held_status, check_state,"
                 " differences, first_treatment, withdrawn_at, withdrawn_reason")


def _plan(row: Sequence[Any]) -> PlanEntry:
    return PlanEntry(row[0], row[1], int(row[2]), row[3], json.loads(row[4]),
                     json.loads(row[5]) if row[5] else None, row[6], row[7], row[8], json.loads(row[9]), row[10],
                     row[11], row[12])


def table_one(rows: Sequence[PlanRow], modalities: Mapping[str, str | None]) -> dict[str, Any]:
    """The paper's Table 1 of a selection of plans (the manifest's own rule, :func:`summarize_plans`).

    Rows are taken in the manifest's order (patient, first treatment, plan): a registration serving two
    plans counts with its type for the first of them, as in the manifest of the copy a site verified.
    """
    ordered = sorted(rows, key=lambda r: (r.patient_id or "", r.first_treatment or "", r.plan_uid))
    doc = summarize_plans(ordered, modalities).to_json()
    return {name: doc[name] for name in SELECTION_COUNTS}


class CentralService:
    """Records, checks and reports deliveries. ``store()`` gives the archive's store (``ApiError`` 503 while
    Orthanc is starting); ``clock`` is injectable for tests."""

    def __init__(self, settings: CentralSettings, db: Database, events: EventLog,
                 store: Callable[[], HeldStore], clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.db = db
        self.events = events
        self.store = store
        self.clock = clock

    # -- deliveries ---------------------------------------------------------------------------------

    def authenticate(self, site_name: str, headers: Mapping[str, str]) -> SiteEntry:
        """The site a delivery comes from; :class:`ApiError` 403 unless the caller is that site."""
        site = self.settings.sites.get(site_name)
        if site is None:
            raise ApiError(403, f"Site: {site_name[:20]!r} is not a site of this archive (RtHarvest.Central.Sites)")
        user = basic_user(headers)
        token = headers.get(TOKEN_HEADER.lower())
        if user is not None and user in site.users:
            return site
        if site.token is not None and token is not None and hmac.compare_digest(site.token, token):
            return site
        raise ApiError(403, f"not authenticated as site {site.name}: deliver as one of its Users or with its "
                            f"{TOKEN_HEADER}")

    def deliver(self, body: Mapping[str, Any], headers: Mapping[str, str]) -> dict[str, Any]:
        """``POST /rtharvest/central/deliveries``: record the delivery, check it, answer its document."""
        delivery = parse_delivery(body)
        site = self.authenticate(delivery.site, headers)
        now = self.clock()
        with self.db.transaction():
            self.db.execute(
                "INSERT INTO rth_central_deliveries (site, export_id, first_received_at, received_at, times_received,"
                " plans, instances, document) VALUES (?, ?, ?, ?, 1, ?, ?, ?)"
                " ON CONFLICT (site, export_id) DO UPDATE SET received_at = excluded.received_at,"
                " times_received = times_received + 1, plans = excluded.plans, instances = excluded.instances,"
                " document = excluded.document",
                (site.name, delivery.export_id, now, now, len(delivery.rows), len(delivery.instances),
                 json.dumps(dict(body))))
            delivery_id = int(self.db.scalar("SELECT id FROM rth_central_deliveries WHERE site = ? AND export_id = ?",
                                             (site.name, delivery.export_id)))
        self.events.write(Level.INFO, "central", f"delivery {delivery_id} from {site.name} (export "
                          f"{delivery.export_id}): {len(delivery.rows)} plan(s), {len(delivery.instances)} instance(s)")
        return self._check(delivery_id, site, delivery)

    def recheck(self, delivery_id: int) -> dict[str, Any]:
        """``POST /rtharvest/central/deliveries/{id}/check``: check the delivery again on what is held now."""
        row = self.db.query_one("SELECT site, document FROM rth_central_deliveries WHERE id = ?", (delivery_id,))
        if row is None:
            raise ApiError(404, f"unknown delivery {delivery_id}; list them with GET /rtharvest/central/deliveries")
        site = self.settings.sites.get(row[0]) or SiteEntry(row[0])
        return self._check(delivery_id, site, parse_delivery(json.loads(row[1])))

    def _check(self, delivery_id: int, site: SiteEntry, delivery: Delivery) -> dict[str, Any]:
        store = self.store()
        now = self.clock()
        day = time.strftime("%Y%m%d", time.gmtime(now))
        held = store.lookup_many(delivery.instances)
        refs: list[ObjectRefs] = []
        hits: list[PhiHit] = []
        quarantined_series: set[str] = set()
        problems: list[str] = []
        instance_rows = []
        for uid in sorted(held):
            orthanc_id = held[uid]
            try:
                ds = pydicom.dcmread(io.BytesIO(store.read(orthanc_id)), stop_before_pixels=True)
            except Exception as exc:
                problems.append(f"instance {uid}: not readable at the archive ({type(exc).__name__})")
                continue
            owner = str(ds.get("PatientID", "")).rsplit("-", 1)[0]
            if owner != site.name and owner in self.settings.sites:
                # Another site's object: not this delivery's to judge, and never deleted on its account.
                problems.append(f"instance {uid}: belongs to site {owner}, not to {site.name}")
                continue
            found = scan_identifying(ds, site.name, delivery.profile, day)
            if found:
                hits += found
                quarantined_series.add(str(ds.get("SeriesInstanceUID", "")))
                # No identifying value stays at the centre: the object goes, the reason stays.
                store.delete(orthanc_id)
                continue
            if site.aet is not None:
                meta = store.metadata(orthanc_id)
                if meta.get("Origin") == "DicomProtocol" and meta.get("RemoteAET") != site.aet:
                    problems.append(f"instance {uid}: arrived by C-STORE from another AET than the site's "
                                    f"{site.aet}")
            ref = extract(ds)
            if ref.kind is not ObjectKind.UNREADABLE:
                refs.append(ref)
            instance_rows.append((site.name, uid, ref.series_uid, ref.modality, delivery_id))
        absent = sorted(set(delivery.instances) - set(held))
        quarantined = {h.sop_uid for h in hits}
        checks = check_plans(delivery.rows, refs, f"delivery {delivery_id}")
        if delivery.summary:
            # The site's Table-1 counts of its selection against the same counts of what is held.
            held_rows = [PlanRow.from_json(c.held) if c.held else
                         PlanRow.from_json({**r, "Status": "Missing", "Missing": []})
                         for c, r in zip(checks, delivery.rows, strict=True)]
            held_modalities = {r.series_uid: r.modality for r in refs if r.series_uid}
            problems += compare_summaries({k: v for k, v in delivery.summary.items() if k in SELECTION_COUNTS},
                                          table_one(held_rows, held_modalities))
        states = {c.plan_uid: self._verdict(c, delivery.rows, quarantined, quarantined_series) for c in checks}
        if hits:
            state = CheckState.QUARANTINED
        elif absent or problems or any(s != CheckState.VERIFIED for s in states.values()):
            state = CheckState.DIFFERENCES
        else:
            state = CheckState.VERIFIED
        rows_by_plan = {r["PlanUID"]: r for r in delivery.rows}
        quarantine_doc = [{"SOPInstanceUID": h.sop_uid, "Attribute": h.attribute, "Kind": h.kind} for h in hits]
        with self.db.transaction():
            self.db.executemany(
                "INSERT INTO rth_central_instances (site, sop_uid, series_uid, modality, delivery_id)"
                " VALUES (?, ?, ?, ?, ?) ON CONFLICT (site, sop_uid) DO UPDATE SET series_uid = excluded.series_uid,"
                " modality = excluded.modality, delivery_id = excluded.delivery_id", instance_rows)
            self.db.executemany("DELETE FROM rth_central_instances WHERE site = ? AND sop_uid = ?",
                                [(site.name, uid) for uid in (*quarantined, *absent)])
            for check in checks:
                row = rows_by_plan[check.plan_uid]
                self.db.execute(
                    "INSERT INTO rth_central_plans (site, plan_uid, delivery_id, patient_id, site_row, held_row,"
                    " site_status, held_status, check_state, differences, first_treatment, checked_at)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (site, plan_uid) DO UPDATE SET"
                    " delivery_id = excluded.delivery_id, patient_id = excluded.patient_id,"
                    " site_row = excluded.site_row, held_row = excluded.held_row, site_status = excluded.site_status,"
                    " held_status = excluded.held_status, check_state = excluded.check_state,"
                    " differences = excluded.differences, first_treatment = excluded.first_treatment,"
                    " checked_at = excluded.checked_at",
                    (site.name, check.plan_uid, delivery_id, row["PatientID"], json.dumps(row),
                     json.dumps(check.held) if check.held else None, row["Status"], check.held_status,
                     states[check.plan_uid], json.dumps(check.differences), row.get("FirstTreatment"), now))
            self.db.execute(
                "UPDATE rth_central_deliveries SET state = ?, checked_at = ?, instances_held = ?, problems = ?,"
                " quarantine = ? WHERE id = ?",
                (state, now, len(held) - len(quarantined), json.dumps({"Absent": absent, "Other": problems}),
                 json.dumps(quarantine_doc), delivery_id))
        # A withdrawn plan stays withdrawn (consent does not come back with a re-export): what arrived again
        # of it is removed as at the withdrawal.
        entries = {p.plan_uid: p for p in self.plans(site.name)}
        again = [entries[c.plan_uid] for c in checks if entries[c.plan_uid].withdrawn_at is not None]
        if again:
            removed = self._remove(site.name, again, entries.values())
            self.events.write(Level.WARNING, "central", f"delivery {delivery_id} from {site.name} named "
                              f"{len(again)} withdrawn plan(s): {removed} instance(s) removed again")
        level = Level.INFO if state == CheckState.VERIFIED else Level.WARNING if state == CheckState.DIFFERENCES \
            else Level.ERROR
        self.events.write(level, "central", f"delivery {delivery_id} from {site.name} checked: {state}; "
                          f"{len(held) - len(quarantined)}/{len(delivery.instances)} instance(s) held, "
                          f"{sum(1 for s in states.values() if s == CheckState.DIFFERENCES)} plan(s) with "
                          f"differences, {len(quarantined)} instance(s) quarantined")
        return self.delivery(delivery_id)

    @staticmethod
    def _verdict(check: PlanCheck, rows: Sequence[Mapping[str, Any]], quarantined: set[str],
                 quarantined_series: set[str]) -> str:
        row = next(r for r in rows if r["PlanUID"] == check.plan_uid)
        objects, series = row_uids(row)
        if objects & quarantined or series & quarantined_series:
            return CheckState.QUARANTINED
        return CheckState.VERIFIED if not check.differences else CheckState.DIFFERENCES

    # -- reading --------------------------------------------------------------------------------------

    def delivery(self, delivery_id: int) -> dict[str, Any]:
        """``GET /rtharvest/central/deliveries/{id}``: the delivery with its plans' checks."""
        row = self.db.query_one(
            "SELECT id, site, export_id, first_received_at, received_at, checked_at, times_received, state, plans,"
            " instances, instances_held, problems, quarantine, json_extract(document, '$.SiteVerification')"
            " FROM rth_central_deliveries WHERE id = ?", (delivery_id,))
        if row is None:
            raise ApiError(404, f"unknown delivery {delivery_id}; list them with GET /rtharvest/central/deliveries")
        problems = json.loads(row[11]) if row[11] else {"Absent": [], "Other": []}
        quarantine = json.loads(row[12]) if row[12] else []
        plans = [_plan(r) for r in self.db.query(f"SELECT {_PLAN_COLUMNS} FROM rth_central_plans"  # noqa: S608
                                                  " WHERE delivery_id = ? ORDER BY plan_uid", (delivery_id,))]
        return {
            "ID": row[0], "Site": row[1], "Export": row[2], "State": row[7], "FirstReceivedAt": _iso(row[3]),
            "ReceivedAt": _iso(row[4]), "CheckedAt": _iso(row[5]), "TimesReceived": row[6], "Plans": row[8],
            "Instances": row[9], "InstancesHeld": row[10], "InstancesAbsent": problems["Absent"][:100],
            "InstancesAbsentCount": len(problems["Absent"]), "Problems": problems["Other"][:100],
            "InstancesQuarantined": len({q["SOPInstanceUID"] for q in quarantine}), "Quarantine": quarantine[:100],
            "PlansWithDifferences": sum(1 for p in plans if p.check_state == CheckState.DIFFERENCES),
            "SiteVerification": json.loads(row[13]) if row[13] else None,
            "PlanChecks": [p.to_json() for p in plans],
        }

    def delivery_manifest(self, delivery_id: int) -> dict[str, Any]:
        """The delivered document as received (de-identified)."""
        document = self.db.scalar("SELECT document FROM rth_central_deliveries WHERE id = ?", (delivery_id,))
        if document is None:
            raise ApiError(404, f"unknown delivery {delivery_id}; list them with GET /rtharvest/central/deliveries")
        return dict(json.loads(document))

    def deliveries(self, site: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        """Deliveries, newest first (without their per-plan checks)."""
        self._known(site)
        ids = [r[0] for r in self.db.query(
            "SELECT id FROM rth_central_deliveries WHERE ?1 IS NULL OR site = ?1 ORDER BY received_at DESC, id DESC"
            " LIMIT ?2", (site, limit))]
        out = []
        for i in ids:
            doc = self.delivery(i)
            doc.pop("PlanChecks")
            out.append(doc)
        return out

    def _known(self, site: str | None) -> None:
        if site is not None and site not in self.settings.sites:
            raise ApiError(404, f"unknown site {site[:20]!r}; the sites are {', '.join(self.settings.sites)}")

    def plans(self, site: str | None = None) -> list[PlanEntry]:
        """Every plan delivered (withdrawn ones too), by site and plan UID."""
        self._known(site)
        return [_plan(r) for r in self.db.query(
            f"SELECT {_PLAN_COLUMNS} FROM rth_central_plans WHERE ?1 IS NULL OR site = ?1"  # noqa: S608
            " ORDER BY site, patient_id, plan_uid", (site,))]

    def modalities(self) -> dict[str, str | None]:
        """Series UID → modality of every series the archive holds."""
        return dict(self.db.query("SELECT DISTINCT series_uid, modality FROM rth_central_instances"
                                  " WHERE series_uid IS NOT NULL"))

    def summary(self) -> dict[str, Any]:
        """``GET /rtharvest/central/summary``: Table 1 pooled and per site (active plans, what is held)."""
        plans = [p for p in self.plans() if p.active]
        modalities = self.modalities()
        per_site = {name: table_one([p.pooled_row() for p in plans if p.site == name], modalities)
                    for name in self.settings.sites}
        return {"Pooled": table_one([p.pooled_row() for p in plans], modalities), "Sites": per_site}

    def sites(self) -> list[dict[str, Any]]:
        """``GET /rtharvest/central/sites``: per site, what it delivered and how it checked."""
        plans = self.plans()
        out = []
        for name in self.settings.sites:
            mine = [p for p in plans if p.site == name]
            active = [p for p in mine if p.withdrawn_at is None]
            last = self.db.query_one("SELECT id, received_at, state FROM rth_central_deliveries WHERE site = ?"
                                     " ORDER BY received_at DESC, id DESC LIMIT 1", (name,))
            checks = {state: sum(1 for p in active if p.check_state == state)
                      for state in (CheckState.VERIFIED, CheckState.DIFFERENCES, CheckState.QUARANTINED)}
            verification = None if not active else CheckState.QUARANTINED if checks[CheckState.QUARANTINED] \
                else CheckState.DIFFERENCES if checks[CheckState.DIFFERENCES] else CheckState.VERIFIED
            out.append({
                "Site": name,
                "Deliveries": self.db.scalar("SELECT count(*) FROM rth_central_deliveries WHERE site = ?", (name,), 0),
                "PlansDelivered": len(active),
                "PlansWithdrawn": len(mine) - len(active),
                "PlansByHeldStatus": {s: n for s in ("Complete", "Incomplete", "Missing", "Invalid")
                                      if (n := sum(1 for p in active if p.held_status == s))},
                "PlansByCheck": checks,
                "Verification": verification,
                "LastDelivery": None if last is None else {"ID": last[0], "At": _iso(last[1]), "State": last[2]},
            })
        return out

    def plans_by_year(self) -> dict[str, dict[str, int]]:
        """Active plans per site and year of (shifted) first treatment (``?`` when unknown)."""
        counts: dict[str, dict[str, int]] = {name: {} for name in self.settings.sites}
        for p in self.plans():
            if p.active:
                year = (p.first_treatment or "?")[:4]
                counts.setdefault(p.site, {})
                counts[p.site][year] = counts[p.site].get(year, 0) + 1
        return counts

    # -- withdrawal -----------------------------------------------------------------------------------

    def withdraw(self, site: str, plan_uid: str, reason: Any, by: str | None) -> dict[str, Any]:
        """Remove a plan a site withdrew (e.g. consent revoked): its objects not shared with another of the
        site's plans are deleted, the plan stays listed as withdrawn with the reason, out of every count.

        ``by`` is the Orthanc user asking: the archive's own users may withdraw any site's plan, a site's
        ``Users`` only their site's."""
        self._known(site)
        other = next((s.name for s in self.settings.sites.values() if by is not None and by in s.users), None)
        if other is not None and other != site:
            raise ApiError(403, f"a user of site {other} cannot withdraw a plan of site {site}")
        if not isinstance(reason, str) or not reason.strip() or len(reason) > 500:
            raise ApiError(400, "Reason: required, why the plan is withdrawn (at most 500 characters)")
        entries = {p.plan_uid: p for p in self.plans(site)}
        entry = entries.get(plan_uid)
        if entry is None:
            raise ApiError(404, f"site {site} delivered no plan {plan_uid[:64]!r}")
        if entry.withdrawn_at is not None:
            raise ApiError(409, f"plan {plan_uid} of {site} was already withdrawn at {_iso(entry.withdrawn_at)}")
        deleted = self._remove(site, [entry], entries.values())
        now = self.clock()
        with self.db.transaction():
            self.db.execute("UPDATE rth_central_plans SET withdrawn_at = ?, withdrawn_reason = ?, withdrawn_by = ?"
                            " WHERE site = ? AND plan_uid = ?", (now, reason.strip(), by, site, plan_uid))
        self.events.write(Level.WARNING, "central", f"plan {plan_uid} of {site} withdrawn: {deleted} instance(s) "
                          "deleted")
        return {"Site": site, "PlanUID": plan_uid, "Withdrawn": _iso(now), "InstancesDeleted": deleted}

    def _remove(self, site: str, removed: Sequence[PlanEntry], every: Iterable[PlanEntry]) -> int:
        """Delete the held objects of ``removed`` that no other active plan of the site names; how many."""
        gone = {p.plan_uid for p in removed}
        objects, series = self._held_of(site, removed)
        keep_objects, keep_series = self._held_of(site, [p for p in every
                                                         if p.plan_uid not in gone and p.withdrawn_at is None])
        doomed = sorted((objects | series) - keep_objects - keep_series)
        store = self.store()
        held = store.lookup_many(doomed)
        for orthanc_id in held.values():
            store.delete(orthanc_id)
        with self.db.transaction():
            self.db.executemany("DELETE FROM rth_central_instances WHERE site = ? AND sop_uid = ?",
                                [(site, uid) for uid in doomed])
        return len(held)

    def _held_of(self, site: str, plans: Iterable[PlanEntry]) -> tuple[set[str], set[str]]:
        """(object UIDs, instance UIDs of the series) the plans' delivered rows name, as held."""
        objects: set[str] = set()
        series: set[str] = set()
        for p in plans:
            o, s = row_uids(p.site_row)
            objects |= o
            series |= s
        in_series = {r[0] for uid in sorted(series) for r in self.db.query(
            "SELECT sop_uid FROM rth_central_instances WHERE site = ? AND series_uid = ?", (site, uid))}
        return objects, in_series
