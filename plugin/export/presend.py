"""The check of each de-identified object before it is sent (pure): no identifying value of the export's
patients or of the site may leave in an element the profile keeps.

De-identification empties or replaces what PS3.15 Table E.1-1 lists, but the profile keeps free text
research needs (ROI names, plan labels, series descriptions: :data:`rtharvest.export.deid.RT_DESCRIPTORS`)
and every element the table does not list. Such text sometimes names the patient (phantoms are often
named after their anatomy or plan, and a planner may type a surname into a ROI name). The verification of
the copy would find it, but only once the archive holds it; this check runs on the outgoing object, with
the same values (:func:`rtharvest.export.verify.phi_values`) and the same scan
(:func:`rtharvest.export.verify.find_phi`), so the verification stays a second line that finds nothing.

Per the profile's ``OnPhiFound`` (:class:`PhiAction`):

* ``clean`` (default): every occurrence, as a whole word and whatever its case, is replaced by
  :data:`REPLACEMENT` in text elements (AE, CS, LO, LT, PN, SH, ST, UC, UT). The replacement is never longer
  than a value looked for (those are at least 4 characters), so a value stays within its VR's length. A hit
  that cleaning cannot remove (a UID, a date, a number, or a value that still matches after cleaning) holds
  the object back.
* ``hold``: an object with any hit is not sent.

Each cleaning and hold is reported with the de-identified SOP Instance UID, the attribute and the kind of
value (``PatientName:component``, ``InstitutionName``...), never the value.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from .deid import PhiAction
from .verify import find_phi

__all__ = ["REPLACEMENT", "Finding", "FindingAction", "PhiAction", "check_before_send", "cleaned_label"]

#: What a value found in kept text becomes (shorter than any value looked for, valid in every text VR).
REPLACEMENT = "XXXX"
_CLEANABLE_VRS = frozenset({"AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UT"})


class FindingAction(StrEnum):
    """What happened to one finding."""

    CLEANED = "cleaned"
    HELD = "held"


@dataclass(frozen=True)
class Finding:
    """An identifying value found in an outgoing object (the value itself is never kept)."""

    sop_uid: str
    attribute: str
    kind: str
    action: FindingAction

    def to_json(self) -> dict[str, str]:
        """REST form."""
        return {"SOPInstanceUID": self.sop_uid, "Attribute": self.attribute, "Kind": self.kind,
                "Action": self.action.value}


def _word_pattern(needle: str) -> re.Pattern[str]:
    # The scan's whole-token rule (no letter or digit either side), case-insensitive.
    return re.compile(r"(?<![^\W_])" + re.escape(needle) + r"(?![^\W_])", re.IGNORECASE)


def _clean(text: str, needles: list[str]) -> str:
    # Longest first: a whole name ("DOE^JOHN") before its components.
    for needle in sorted(set(needles), key=len, reverse=True):
        text = _word_pattern(needle).sub(REPLACEMENT, text)
    return text


def check_before_send(ds: Dataset, values: Mapping[str, str], action: PhiAction) -> tuple[bool, list[Finding]]:
    """Check (and with ``clean``, clean in place) one de-identified dataset against ``values`` (value → kind,
    from :func:`rtharvest.export.verify.phi_values`). Returns ``(send, findings)``: ``send`` is False when the
    object must be held back; ``findings`` lists each attribute and kind found, with what was done."""
    sop = str(ds.get("SOPInstanceUID", ""))
    hits = list(find_phi(ds, values))
    if not hits:
        return True, []
    if action is PhiAction.HOLD:
        return False, _unique(Finding(sop, name, kind, FindingAction.HELD) for name, _, _, m in hits for _, kind in m)
    findings: list[Finding] = []
    for name, _, elem, matched in hits:
        kinds = [kind for _, kind in matched]
        if elem.VR not in _CLEANABLE_VRS:
            findings += [Finding(sop, name, k, FindingAction.HELD) for k in kinds]
            continue
        needles = [needle for needle, _ in matched]
        if isinstance(elem.value, (list, MultiValue)):
            elem.value = [_clean(str(v), needles) for v in elem.value]
        else:
            elem.value = _clean(str(elem.value), needles)
        findings += [Finding(sop, name, k, FindingAction.CLEANED) for k in kinds]
    # What cleaning could not remove (a value that matches only once upper-cased, say) holds the object.
    left = [Finding(sop, name, kind, FindingAction.HELD) for name, _, _, m in find_phi(ds, values) for _, kind in m]
    if left or any(f.action is FindingAction.HELD for f in findings):
        return False, _unique([*findings, *left])
    return True, _unique(findings)


def cleaned_label(label: str, values: Mapping[str, str]) -> str:
    """A plan label as :func:`check_before_send` (``clean``) sends it: the verification expects the copy's
    manifest to show this, not the site's label."""
    ds = Dataset()
    ds.RTPlanLabel = label
    check_before_send(ds, values, PhiAction.CLEAN)
    return str(ds.RTPlanLabel)


def _unique(findings: Iterable[Finding]) -> list[Finding]:
    seen: dict[tuple[str, str, str], Finding] = {}
    for f in findings:
        key = (f.sop_uid, f.attribute, f.kind)
        if key not in seen or f.action is FindingAction.HELD:
            seen[key] = f
    return list(seen.values())
