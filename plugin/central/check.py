"""What the archive checks on arrival (pure): the delivery's shape, the reference walk re-run on what the
archive holds, and identifying values it can recognise without the site's originals.

The walk is the project's own rule: :func:`rtharvest.export.verify.manifest_of_copy` (the manifest's
:func:`~rtharvest.core.manifest.build_manifest` over the held objects' references) and
:func:`~rtharvest.export.verify.compare`, the comparison a site's export already makes against its copy, so
the archive judges a delivered plan exactly as the site judged it.

The archive has no original to compare with, so its identifying-value scan (:func:`scan_identifying`)
looks for what a de-identified object must not hold whatever the site: a PatientID that is not a
pseudonym of the delivering site, a person name other than the pseudonym or the profile's dummy, a DICOM-style
name (``FAMILY^GIVEN``) inside free text, a birth date, and dates the profile cannot have produced
(``Dates: remove`` leaves only the dummy 19000101; ``Dates: shift`` moves every date at least one day
back, so a date on or after the day of delivery was not shifted). See docs/central.md.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from ..core.references import ObjectRefs
from ..export.deid import DatePolicy, Profile, ProfileError
from ..export.verify import ROW_FIELDS, PhiHit, compare, manifest_of_copy
from ..web.httpapi import ApiError

__all__ = ["Delivery", "PlanCheck", "check_plans", "parse_delivery", "pseudonym_pattern", "scan_identifying"]

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_EXPORT_ID = re.compile(r"^[0-9a-zA-Z_-]{1,64}$")
_MODALITY = re.compile(r"^[A-Z0-9_]{0,16}$")
#: At most this many plans / instances in one delivery (a body is held in memory).
MAX_PLANS, MAX_INSTANCES = 100_000, 2_000_000
#: What the Basic Profile's dummy puts in text and person-name elements (plugin/export/deid.py).
DUMMY_TEXT = "ANONYMIZED"
#: DICOM person-name form inside free text: two alphabetic components joined by ``^``.
_NAME_IN_TEXT = re.compile(r"(?<![A-Z0-9])[A-Z][A-Z'\-]+\^[A-Z][A-Z'\-]+", re.IGNORECASE)
_TEXT_VRS = frozenset({"LO", "SH", "ST", "LT", "UT", "UC"})
_DATE_VRS = frozenset({"DA", "DT"})


@dataclass(frozen=True)
class Delivery:
    """A validated delivery body."""

    site: str
    export_id: str
    profile: Profile
    rows: list[dict[str, Any]]
    instances: list[str]
    summary: dict[str, Any]
    series_modalities: dict[str, str]
    site_verification: dict[str, Any]


def parse_delivery(body: Mapping[str, Any]) -> Delivery:
    """Validate ``POST /rtharvest/central/deliveries``; :class:`ApiError` 400 naming the field (never
    echoing a value that might identify someone)."""
    allowed = {"Site", "Export", "Profile", "Plans", "Instances", "Summary", "SeriesModalities", "SiteVerification"}
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise ApiError(400, f"{unknown[0][:40]}: unknown field; allowed: {', '.join(sorted(allowed))}")
    site, export_id = body.get("Site"), body.get("Export")
    if not isinstance(site, str) or not site:
        raise ApiError(400, "Site: required, the site's export Site name")
    if not isinstance(export_id, str) or not _EXPORT_ID.match(export_id):
        raise ApiError(400, "Export: required, the site's export ID (1-64 letters, digits, '-' or '_')")
    try:
        profile = Profile.from_json(body.get("Profile"))
    except ProfileError as exc:
        raise ApiError(400, str(exc)) from None
    plans = body.get("Plans")
    if not isinstance(plans, list) or not plans or len(plans) > MAX_PLANS:
        raise ApiError(400, f"Plans: a non-empty list of plan rows (at most {MAX_PLANS})")
    pseudonym = pseudonym_pattern(site)
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    for i, row in enumerate(plans):
        if not isinstance(row, Mapping) or not isinstance(row.get("PlanUID"), str) or not _UID.match(row["PlanUID"]):
            raise ApiError(400, f"Plans[{i}].PlanUID: required, a UID")
        if not isinstance(row.get("PatientID"), str) or not pseudonym.match(row["PatientID"]):
            # The value is not echoed: if it is not a pseudonym it may be a real PatientID.
            raise ApiError(400, f"Plans[{i}].PatientID: not a pseudonym of site {site} (<SITE>-<16 hex digits>, "
                                "10 from an older site database); the delivery is refused")
        if row["PlanUID"] in seen:
            raise ApiError(400, f"Plans[{i}].PlanUID: delivered twice in one delivery")
        seen.add(row["PlanUID"])
        if not isinstance(row.get("Status"), str):
            raise ApiError(400, f"Plans[{i}].Status: required")
        # Every compared field, present or not (a field left out is a difference, not a pass).
        kept: dict[str, Any] = {name: row.get(name) for name in ROW_FIELDS}
        if "PlanLabel" in row:
            kept["PlanLabel"] = row.get("PlanLabel")
        for name, value in kept.items():
            if name.endswith("UIDs") and isinstance(value, list):
                kept[name] = sorted(str(v) for v in value)
        kept["Missing"] = [{"What": str(m.get("What")), "UID": str(m.get("UID"))}
                           for m in row.get("Missing") or [] if isinstance(m, Mapping)]
        rows.append(kept)
    instances = body.get("Instances")
    if not isinstance(instances, list) or len(instances) > MAX_INSTANCES or \
            not all(isinstance(u, str) and _UID.match(u) for u in instances):
        raise ApiError(400, f"Instances: a list of the SOP Instance UIDs sent (at most {MAX_INSTANCES})")
    summary = body.get("Summary", {})
    modalities = body.get("SeriesModalities", {})
    verification = body.get("SiteVerification", {})
    if not isinstance(summary, Mapping) or not isinstance(verification, Mapping):
        raise ApiError(400, "Summary and SiteVerification: objects")
    if not isinstance(modalities, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) and _MODALITY.match(v) for k, v in modalities.items()):
        raise ApiError(400, "SeriesModalities: {\"<series UID>\": \"CT\", ...}")
    return Delivery(site, export_id, profile, rows, sorted(set(instances)), dict(summary), dict(modalities),
                    dict(verification))


@dataclass
class PlanCheck:
    """One delivered plan as the archive found it."""

    plan_uid: str
    #: The archive's own row for the plan (JSON form; ``None`` when not even its records are held).
    held: dict[str, Any] | None
    differences: list[str] = field(default_factory=list)

    @property
    def held_status(self) -> str:
        """The plan's status from what the archive holds (``Missing`` when nothing of it is held)."""
        return str(self.held["Status"]) if self.held else "Missing"


def check_plans(rows: Sequence[Mapping[str, Any]], held: Iterable[ObjectRefs], label: str) -> list[PlanCheck]:
    """Re-run the reference walk on the held objects and compare each delivered row with the archive's."""
    copy_rows = manifest_of_copy(held, label).to_json()["Plans"]
    by_plan = {r["PlanUID"]: r for r in copy_rows}
    out = []
    for row in rows:
        prefix = f"plan {row['PlanUID']}: "
        diffs = [d[len(prefix):] if d.startswith(prefix) else d for d in compare([row], copy_rows)]
        out.append(PlanCheck(str(row["PlanUID"]), by_plan.get(row["PlanUID"]), diffs))
    return out


def _values(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (list, MultiValue)) else [value]


def pseudonym_pattern(site: str) -> re.Pattern[str]:
    """A pseudonym of ``site`` (plugin/export/deid.py: ``<SITE>-<16 upper-case hex digits>``; a site database
    older than the 64-bit pseudonyms keeps the 10 digits it recorded)."""
    return re.compile(rf"^{re.escape(site)}-(?:[0-9A-F]{{16}}|[0-9A-F]{{10}})$")


def scan_identifying(ds: Dataset, site: str, profile: Profile, delivery_day: str) -> list[PhiHit]:
    """Identifying values the archive can recognise in one object delivered by ``site`` (the values never
    reported).

    ``delivery_day`` is YYYYMMDD of the arrival (the latest date a shifted date can be is the day before).
    """
    sop = str(ds.get("SOPInstanceUID", ""))
    hits: list[PhiHit] = []
    own = str(ds.get("PatientID", ""))
    if not pseudonym_pattern(site).match(own):
        hits.append(PhiHit(sop, "PatientID", "not a pseudonym of the site"))
    allowed_names = {"", DUMMY_TEXT, own}

    def visit(dataset: Dataset, path: str) -> None:
        for elem in dataset:
            name = f"{path}{elem.keyword or str(elem.tag)}"
            if elem.VR == "SQ":
                for i, item in enumerate(elem.value or []):
                    visit(item, f"{name}[{i}].")
                continue
            if elem.value is None or elem.value == "":
                continue
            if elem.keyword == "PatientBirthDate":
                hits.append(PhiHit(sop, name, "birth date"))
                continue
            if elem.VR == "PN":
                if any(str(v).strip() not in allowed_names for v in _values(elem.value)):
                    hits.append(PhiHit(sop, name, "person name"))
            elif elem.VR in _TEXT_VRS:
                if any(_NAME_IN_TEXT.search(str(v)) for v in _values(elem.value)):
                    hits.append(PhiHit(sop, name, "name-shaped text"))
            elif elem.VR in _DATE_VRS and profile.dates is not DatePolicy.KEEP:
                for v in _values(elem.value):
                    day = str(v)[:8]
                    if not day:
                        continue
                    if profile.dates is DatePolicy.REMOVE and day != "19000101":
                        hits.append(PhiHit(sop, name, "date kept although the profile removes dates"))
                        break
                    if profile.dates is DatePolicy.SHIFT and day >= delivery_day:
                        hits.append(PhiHit(sop, name, "date not shifted (on or after the day of delivery)"))
                        break

    visit(ds, "")
    return hits
