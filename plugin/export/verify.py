"""Verification of an exported copy (pure): the reference walk re-run on what the destination holds, the
comparison with the site's manifest under pseudonyms, and the PHI scan.

The walk is the project's own: :func:`manifest_of_copy` turns the exported objects' references into the
tracker rows :func:`rtharvest.core.manifest.build_manifest` reads, so the copy is judged by the very rule that
judged the harvest (one rule, one place). :func:`expected_rows` maps the site's manifest through the
site key (UIDs, pseudonyms, shifted dates) and :func:`compare` lists every difference, row by row; the
Table-1 counts of the selection (:func:`summary_of_rows`) are compared too (:func:`compare_summaries`), with
the image series' modalities read from the site's originals on one side and from the copy on the other.

A copy cannot know what only the site's job history knew: a missing link whose reason is a failed
*search* or a *partially stored* series (the object or series itself is present) is not visible in the
copy, so those links are left out of the expected rows (:func:`knowable`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag

from ..core.manifest import VISIBLE_IN_A_COPY, Manifest, MissingCause, PlanRow, build_manifest, summarize_plans
from ..core.references import ObjectKind, ObjectRefs
from ..core.rulebook import LinkName, names
from ..core.sopclass import Modality
from ..store.tracking import Decision, ObjectRecord
from .deid import DatePolicy, DescriptorPolicy, Profile, SiteKey, shift_date

__all__ = ["PhiHit", "Verification", "compare", "compare_summaries", "expected_rows", "knowable",
           "find_phi", "manifest_of_copy", "phi_values", "scan_for_phi", "summary_of_rows"]

#: Row fields compared between the site's manifest and the copy's (UIDs mapped, dates shifted).
ROW_FIELDS = ("PatientID", "PlanUID", "PlanIntent", "Status", "Treatments", "Fractions", "FractionsPlanned",
              "Records", "SummaryRecords", "FirstTreatment", "LastTreatment", "RecordUIDs", "SummaryRecordUIDs",
              "StructureSetUID", "DoseUIDs", "PlanningSeriesUIDs", "PlanningForSeriesUIDs",
              "RegistrationUIDs", "RegistrationTypes", "RegisteredSeriesUIDs", "RegisteredForSeriesUIDs",
              "Missing")
_UID_LISTS = ("RecordUIDs", "SummaryRecordUIDs", "DoseUIDs", "PlanningSeriesUIDs", "PlanningForSeriesUIDs",
              "RegistrationUIDs", "RegisteredSeriesUIDs", "RegisteredForSeriesUIDs")


def _record(refs: ObjectRefs, harvest_id: str) -> ObjectRecord:
    is_record = refs.record is not None
    return ObjectRecord(
        harvest_id=harvest_id, sop_uid=refs.sop_uid, orthanc_id=refs.sop_uid, decision=Decision.KEPT, reason="",
        role="RECORD" if is_record else "", hop="", source="", job_id=None, moved=False,
        patient_id=refs.patient_id, study_uid=refs.study_uid, series_uid=refs.series_uid, modality=refs.modality,
        sop_class_uid=refs.sop_class_uid, frame_of_reference_uid=refs.frame_of_reference_uid,
        plan_uids=names(LinkName.PLAN_RECORD, refs),
        treatment_date=refs.record.treatment_date if refs.record else None)


def manifest_of_copy(objects: Iterable[ObjectRefs], label: str = "export") -> Manifest:
    """The manifest of an exported copy: every readable object kept, every treatment record a seed."""
    by_uid = {r.sop_uid: r for r in objects if r.kind is not ObjectKind.UNREADABLE and r.sop_uid}
    rows = [_record(r, label) for r in by_uid.values()]
    return build_manifest(label, rows, lambda obj: by_uid.get(obj.sop_uid))


def knowable(link: Mapping[str, Any]) -> bool:
    """Whether a missing link of the site's manifest can be seen in a copy (see the module docstring): by its
    ``Cause`` code, never its words (a link without one is taken as visible)."""
    cause = link.get("Cause")
    return not cause or MissingCause(str(cause)) in VISIBLE_IN_A_COPY


def expected_rows(site_rows: Sequence[Mapping[str, Any]], key: SiteKey, profile: Profile,
                  pseudonym_of: Callable[[str], str]) -> list[dict[str, Any]]:
    """The site's plan rows as the copy must show them (only :data:`ROW_FIELDS`, plus ``PlanLabel`` when
    descriptors are kept)."""
    out = []
    for row in site_rows:
        pid = str(row.get("PatientID") or "")
        shift = key.day_shift(pid, profile.max_shift_days)

        def date(value: Any, shift: int = shift) -> Any:
            if not value or profile.dates is DatePolicy.KEEP:
                return value
            return shift_date(str(value), shift) if profile.dates is DatePolicy.SHIFT else "19000101"

        missing = [{"What": m["What"], "UID": key.uid(m["UID"])} for m in row.get("Missing", []) if knowable(m)]
        status = row["Status"]
        if status == "Incomplete" and not missing:
            status = "Complete"
        exp: dict[str, Any] = {
            "PatientID": pseudonym_of(pid), "PlanUID": key.uid(row["PlanUID"]), "PlanIntent": row.get("PlanIntent"),
            "Status": status, "Treatments": row.get("Treatments"), "Fractions": row.get("Fractions"),
            "FractionsPlanned": row.get("FractionsPlanned"), "Records": row.get("Records"),
            "SummaryRecords": row.get("SummaryRecords"),
            "FirstTreatment": date(row.get("FirstTreatment")), "LastTreatment": date(row.get("LastTreatment")),
            "StructureSetUID": key.uid(row["StructureSetUID"]) if row.get("StructureSetUID") else None,
            "RegistrationTypes": {key.uid(u): t for u, t in (row.get("RegistrationTypes") or {}).items()},
            "Missing": sorted(missing, key=lambda m: (m["What"], m["UID"])),
        }
        for name in _UID_LISTS:
            exp[name] = sorted(key.uid(u) for u in row.get(name) or [])
        if profile.descriptors is DescriptorPolicy.KEEP:
            exp["PlanLabel"] = row.get("PlanLabel")
        out.append(exp)
    return out


def _comparable(row: Mapping[str, Any], with_label: bool) -> dict[str, Any]:
    got = {name: row.get(name) for name in ROW_FIELDS}
    for name in _UID_LISTS:
        got[name] = sorted(got[name] or [])
    got["Missing"] = sorted(({"What": m["What"], "UID": m["UID"]} for m in row.get("Missing", [])),
                            key=lambda m: (m["What"], m["UID"]))
    got["RegistrationTypes"] = dict(got["RegistrationTypes"] or {})
    if with_label:
        got["PlanLabel"] = row.get("PlanLabel")
    return got


def compare(expected: Sequence[Mapping[str, Any]], copy_rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Every difference between the expected rows and the copy's rows (empty: equal). Rows of the copy
    whose plan is not expected (a record also naming a plan outside the selection) are ignored."""
    problems: list[str] = []
    got = {r["PlanUID"]: r for r in copy_rows}
    for exp in expected:
        row = got.get(exp["PlanUID"])
        if row is None:
            problems.append(f"plan {exp['PlanUID']}: absent from the copy")
            continue
        actual = _comparable(row, "PlanLabel" in exp)
        for name, value in exp.items():
            if actual.get(name) != value:
                problems.append(f"plan {exp['PlanUID']}: {name} is {actual.get(name)!r}, expected {value!r}")
    return problems


#: The counts of :func:`summary_of_rows`: those a selection of plans shows by itself.
SELECTION_COUNTS = ("Patients", "PlansReferenced", "PlansCollected", "SuccessRate", "PlansByIntent",
                    "PlansByStatus", "InvalidPlans", "ImageSeries", "PlanningSeries", "Registrations",
                    "TreatmentRecords", "Fractions", "SummaryRecords")


def summary_of_rows(rows: Sequence[Mapping[str, Any]], modality_of_series: Mapping[str, str]) -> dict[str, Any]:
    """The Table-1 counts of a selection of plan rows (JSON form): :func:`rtharvest.core.manifest.summarize_plans`,
    the manifest's own rule, restricted to :data:`SELECTION_COUNTS` (orphans, failed jobs and PatientID
    mismatches belong to a whole harvest, not to a selection of plans)."""
    doc = summarize_plans([PlanRow.from_json(r) for r in rows], modality_of_series).to_json()
    return {name: doc[name] for name in SELECTION_COUNTS}


def compare_summaries(expected: Mapping[str, Any], copy: Mapping[str, Any]) -> list[str]:
    """Every count of :func:`summary_of_rows` that differs (``Summary.<name> is ..., expected ...``)."""
    return [f"Summary.{name} is {copy.get(name)!r}, expected {value!r}"
            for name, value in expected.items() if copy.get(name) != value]


# ---------------------------------------------------------------------------------------------------
# PHI scan


@dataclass(frozen=True)
class PhiHit:
    """A site PHI value found in an exported object (the value itself is never reported)."""

    sop_uid: str
    attribute: str
    kind: str


def phi_values(originals: Iterable[Dataset], profile: Profile) -> dict[str, str]:
    """Identifying values of the site's originals → what they are (``PatientID``, ``PatientName``, ...).

    Whole values are looked for as substrings. Person names are also looked for component by component
    (``DOE``, ``JOHN``; at least 4 characters) as whole words (kind ``...:component``), except components
    shared by more than half of the patients of two or more (a common prefix identifies nobody: the
    synthetic clinic names everyone ``SYNTH^...``; a single patient's components all identify, an export of
    one patient is common). Institution names only when the profile removes them; birth dates always.
    """
    keywords = ["PatientID", "PatientName", "PatientBirthDate", "AccessionNumber", "OtherPatientIDs",
                "ReferringPhysicianName", "OperatorsName", "PhysiciansOfRecord"]
    if not profile.institution:
        keywords += ["InstitutionName", "InstitutionAddress"]
    found: dict[str, str] = {}
    components: dict[str, str] = {}
    patients_of: dict[str, set[str]] = {}
    patients: set[str] = set()
    for ds in originals:
        pid = str(ds.get("PatientID", ""))
        patients.add(pid)
        for keyword in keywords:
            value = ds.get(keyword)
            if value is None or value == "":
                continue
            for v in (value if isinstance(value, (list, MultiValue)) else [value]):
                text = str(v).strip().upper()
                if len(text) >= 4:
                    found.setdefault(text, keyword)
                    if "^" in text:
                        found.setdefault(text.replace("^", " ").strip(), keyword)
                if keyword == "PatientName":
                    for part in _WORD.findall(text):
                        if len(part) >= 4:
                            components.setdefault(part, keyword + ":component")
                            patients_of.setdefault(part, set()).add(pid)
    for part, kind in components.items():
        if (len(patients) < 2 or len(patients_of[part]) * 2 <= len(patients)) and part not in found:
            found[part] = kind
    return found


#: A word: letters and digits of any script ("MÜLLER" is one word, not "M" and "LLER"); "_", "^", "-",
#: spaces and punctuation separate words.
_WORD = re.compile(r"[^\W_]+")
_BINARY_VRS = frozenset({"OB", "OW", "OF", "OD", "OL", "OV", "UN"})
_STRING_VRS = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UI",
                         "UR", "UT"})


def _dictionary_vr(tag: BaseTag) -> str:
    try:
        return str(dictionary_VR(tag))
    except KeyError:
        return "UN"


def _token_pattern(needle: str) -> re.Pattern[str]:
    return re.compile(r"(?<![^\W_])" + re.escape(needle) + r"(?![^\W_])")


def find_phi(ds: Dataset, values: Mapping[str, str]) -> Iterator[tuple[str, Dataset, DataElement,
                                                                       list[tuple[str, str]]]]:
    """Every string element, at any depth, that contains one of ``values`` (case-insensitive):
    ``(attribute path, dataset holding it, element, [(value, kind), ...])`` with one ``(value, kind)`` per
    matching value of each item of a multi-valued element.

    A value counts only as a whole token: not preceded or followed by a letter or digit. ``SYN001`` in
    ``"plan of SYN001."`` is a hit; the accession number ``0010001`` inside the 39 random digits of a
    ``2.25.`` UID (or a birth date inside a decimal string) is not: with thousands of UIDs in an export,
    substring matching of short numeric values fails a clean export every few runs.

    The one PHI scan of the export: the check before sending (:mod:`rtharvest.export.presend`) and the
    verification of the copy (:func:`scan_for_phi`) both use it, so what one finds the other finds.
    """
    patterns = {needle: _token_pattern(needle) for needle in values}
    components = {needle for needle, kind in values.items() if kind.endswith(":component")}
    wholes = sorted((needle for needle in values if needle not in components), key=len, reverse=True)
    # One pass over an element's whole text first (all items joined by a separator that is no token
    # character, and no value holds it): most elements, contour points above all, hold none of the values,
    # and testing each item against each value one by one would cost more than the de-identification.

    def maybe(text: str) -> bool:
        if components and not components.isdisjoint(_WORD.findall(text)):
            return True
        return any(patterns[needle].search(text) is not None for needle in wholes if needle in text)

    def visit(dataset: Dataset, path: str) -> Iterator[tuple[str, Dataset, DataElement, list[tuple[str, str]]]]:
        for tag in list(dataset.keys()):
            raw = dataset.get_item(tag)
            if isinstance(raw, RawDataElement):
                # Not converted yet: an ASCII text value is tested as its bytes say, and converted (which
                # costs more than the test) only when it may hold a value. Other encodings are converted.
                vr = raw.VR or _dictionary_vr(tag)
                if vr in _BINARY_VRS or raw.value is None:
                    continue
                if vr in _STRING_VRS and raw.value.isascii() and not maybe(raw.value.decode("ascii").upper()):
                    continue
            elem = dataset[tag]
            name = f"{path}{elem.keyword or str(elem.tag)}"
            if elem.VR == "SQ":
                for i, item in enumerate(elem.value or []):
                    yield from visit(item, f"{name}[{i}].")
                continue
            if elem.VR in _BINARY_VRS or elem.value is None:
                continue
            items = elem.value if isinstance(elem.value, (list, MultiValue)) else [elem.value]
            if not maybe("\\".join(str(v) for v in items).upper()):
                continue
            matched: list[tuple[str, str]] = []
            for v in items:
                text = str(v).upper()
                words = set(_WORD.findall(text))
                for needle, kind in values.items():
                    if (needle in words) if kind.endswith(":component") else \
                            (needle in text and patterns[needle].search(text) is not None):
                        matched.append((needle, kind))
            if matched:
                yield name, dataset, elem, matched

    yield from visit(ds, "")


def scan_for_phi(ds: Dataset, values: Mapping[str, str]) -> list[PhiHit]:
    """Every hit of :func:`find_phi` as a :class:`PhiHit` (one per matching value and element item)."""
    sop = str(ds.get("SOPInstanceUID", ""))
    return [PhiHit(sop, name, kind) for name, _, _, matched in find_phi(ds, values) for _, kind in matched]


@dataclass
class Verification:
    """What verifying one export found (REST ``Verification``)."""

    instances_expected: int = 0
    instances_found: int = 0
    plans_compared: int = 0
    differences: list[str] = field(default_factory=list)
    phi_hits: list[PhiHit] = field(default_factory=list)
    absent: list[str] = field(default_factory=list)
    unexpected: int = 0
    site_values: int = 0
    #: Table-1 counts of the selection: the site's (as the copy must show them) and the copy's.
    site_summary: dict[str, Any] = field(default_factory=dict)
    copy_summary: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """Everything arrived, the manifests agree and no PHI was found."""
        return not (self.differences or self.phi_hits or self.absent)

    def to_json(self) -> dict[str, Any]:
        """JSON form (PHI hits name the object, the attribute and the kind of value, never the value)."""
        return {
            "Passed": self.ok, "InstancesExpected": self.instances_expected, "InstancesFound": self.instances_found,
            "Absent": self.absent[:50], "AbsentCount": len(self.absent), "Unexpected": self.unexpected,
            "PlansCompared": self.plans_compared, "ManifestDifferences": self.differences[:50],
            "PhiValuesChecked": self.site_values,
            "PhiHits": [{"SOPInstanceUID": h.sop_uid, "Attribute": h.attribute, "Kind": h.kind}
                        for h in self.phi_hits[:50]],
            "PhiHitCount": len(self.phi_hits),
            "Summary": {"Site": self.site_summary, "Copy": self.copy_summary},
        }


def is_record(refs: ObjectRefs) -> bool:
    """Whether an object is a treatment record (by SOP class or Modality)."""
    return refs.record is not None or (refs.modality or "").upper() == Modality.RTRECORD.value
