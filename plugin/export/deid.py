"""De-identification of one dataset for a research archive (pure: dataset in, new dataset out).

The rules are DICOM PS3.15 Annex E's *Basic Application Level Confidentiality Profile* (Table E.1-1),
read from the ``dicom-anonymizer`` package's transcription of the standard (``dicomfields_2026c``) rather
than a table typed in here, plus the options research needs, each stated in the output
(``DeidentificationMethod`` and ``DeidentificationMethodCodeSequence``, CID 7050):

* dates: ``shift`` (*Retain Longitudinal Temporal Information with Modified Dates Option*: every DA/DT
  value of a patient moves by the same number of days, derived from the site key, so intervals between
  fractions and studies survive and every export run gives the same dates), ``keep`` (*... Full Dates
  Option*) or ``remove`` (the Basic Profile's own action). Patient's Birth Date is emptied in every mode.
* RT descriptors: ``keep`` (ROI names, plan and structure set labels/names, series/study descriptions and
  the other labels listed in :data:`RT_DESCRIPTORS`, which the Basic Profile would clean; research needs
  them and they rarely carry identity) or ``clean`` (the Basic Profile's actions).
* *Retain Patient Characteristics Option* (sex, age, size, weight) and *Retain Institution Identity
  Option*, both off by default.

Where the Basic Profile leaves a choice (``X/Z``, ``X/D``, ``X/Z/D``, ``Z/D``), the action that keeps any
IOD conformant is taken (the dummy or empty value, never deletion), because the Type of an attribute
depends on the IOD and module it sits in.

UIDs (every ``U`` attribute of the table, and any other attribute whose keyword ends in ``InstanceUID`` or
``FrameOfReferenceUID``, at any depth of any sequence) are replaced by ``2.25.<128-bit integer>`` taken
from an HMAC-SHA256 of the original UID keyed with the site's secret: the same UID always maps to the same
new UID (across objects, studies and export runs), so every reference (record → plan → structure set →
contour images, dose → plan, registration → series and frames of reference, shared frames of reference)
still resolves; two sites with different secrets never produce the same UID, even for the same original
(a patient treated at both). Private attributes are removed at every depth.

PatientID and PatientName become the patient's pseudonym (``<SITE>-<16 hex digits>``: 64 bits, from the
same key; pseudonyms an older version recorded with 10 hex digits stay as recorded);
the Clinical Trial Subject module (``ClinicalTrialSiteID``, ``ClinicalTrialSubjectID``, sponsor and
protocol) names the site, so datasets of several sites stay separable in one archive.
"""

from __future__ import annotations

import copy
import datetime as _dt
import hashlib
import hmac
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from dicomanonymizer.dicom_anonymization_databases import dicomfields_2026c as _ps315
from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag, Tag

__all__ = [
    "RT_DESCRIPTORS",
    "DatePolicy",
    "DescriptorPolicy",
    "PhiAction",
    "Profile",
    "ProfileError",
    "SiteKey",
    "deidentify",
    "shift_date",
    "table_action",
]

# ---------------------------------------------------------------------------------------------------
# Profile


class ProfileError(ValueError):
    """A profile (or site) setting is invalid; ``field`` names it."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


class DatePolicy(StrEnum):
    """What happens to dates and date-times (DA, DT)."""

    SHIFT = "shift"
    KEEP = "keep"
    REMOVE = "remove"


class PhiAction(StrEnum):
    """What the check before sending (:mod:`rtharvest.export.presend`) does with an object in which it finds
    an identifying value of the export's patients or of the site: clean the value out, or hold the object."""

    CLEAN = "clean"
    HOLD = "hold"


class DescriptorPolicy(StrEnum):
    """What happens to the RT descriptors of :data:`RT_DESCRIPTORS`."""

    KEEP = "keep"
    CLEAN = "clean"


#: Labels and descriptions research on RT data needs (ROI names first of all). Kept with
#: ``Descriptors: keep``; cleaned as Table E.1-1 says with ``Descriptors: clean``.
RT_DESCRIPTORS = frozenset({
    "ROIName", "ROIObservationLabel", "ROIDescription", "ROIGenerationDescription",
    "StructureSetLabel", "StructureSetName", "StructureSetDescription",
    "RTPlanLabel", "RTPlanName", "RTPlanDescription", "FractionGroupDescription",
    "BeamDescription", "DoseReferenceDescription", "SeriesDescription", "StudyDescription",
    "ProtocolName", "TreatmentSite", "RTTreatmentApproachLabel",
})
_PATIENT_CHARACTERISTICS = frozenset({"PatientSex", "PatientAge", "PatientSize", "PatientWeight",
                                      "PatientSexNeutered", "SmokingStatus", "PregnancyStatus"})
_INSTITUTION = frozenset({"InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName",
                          "InstitutionCodeSequence", "InstitutionalDepartmentTypeCodeSequence"})
SITE_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,16}$")
_TEXT_RE = re.compile(r"^[ -~]{1,64}$")


@dataclass(frozen=True)
class Profile:
    """The de-identification options of one export (REST ``Profile``)."""

    dates: DatePolicy = DatePolicy.SHIFT
    descriptors: DescriptorPolicy = DescriptorPolicy.KEEP
    patient_characteristics: bool = False
    institution: bool = False
    #: Dates move back by 1 to ``max_shift_days`` days (per patient).
    max_shift_days: int = 3650
    sponsor: str = "rtharvest"
    protocol: str = "RTHARVEST"
    #: What the check before sending does with an identifying value found in a kept element.
    on_phi: PhiAction = PhiAction.CLEAN

    _FIELDS = ("Dates", "Descriptors", "RetainPatientCharacteristics", "RetainInstitutionIdentity",
               "MaxShiftDays", "Sponsor", "Protocol", "OnPhiFound")

    @classmethod
    def from_json(cls, body: Any, prefix: str = "Profile") -> Profile:
        """Parse the REST form; :class:`ProfileError` names the offending field."""
        if body is None:
            return cls()
        if not isinstance(body, Mapping):
            raise ProfileError(prefix, f"must be an object, got {type(body).__name__}")
        unknown = sorted(set(body) - set(cls._FIELDS))
        if unknown:
            raise ProfileError(f"{prefix}.{unknown[0]}", f"unknown field; allowed: {', '.join(cls._FIELDS)}")

        def choice(name: str, enum: type[StrEnum], default: StrEnum) -> Any:
            value = body.get(name, default.value)
            try:
                return enum(str(value).lower()) if isinstance(value, str) else enum(value)
            except ValueError:
                allowed = ", ".join(e.value for e in enum)
                raise ProfileError(f"{prefix}.{name}", f"must be one of {allowed}, got {str(value)[:30]!r}") from None

        def flag(name: str) -> bool:
            value = body.get(name, False)
            if not isinstance(value, bool):
                raise ProfileError(f"{prefix}.{name}", "must be true or false")
            return value

        def text(name: str, default: str) -> str:
            value = body.get(name, default)
            if not isinstance(value, str) or not _TEXT_RE.match(value):
                raise ProfileError(f"{prefix}.{name}", "must be 1-64 printable ASCII characters")
            return value

        days = body.get("MaxShiftDays", 3650)
        if isinstance(days, bool) or not isinstance(days, int) or not 1 <= days <= 36500:
            raise ProfileError(f"{prefix}.MaxShiftDays", "must be an integer from 1 to 36500")
        return cls(dates=choice("Dates", DatePolicy, DatePolicy.SHIFT),
                   descriptors=choice("Descriptors", DescriptorPolicy, DescriptorPolicy.KEEP),
                   patient_characteristics=flag("RetainPatientCharacteristics"),
                   institution=flag("RetainInstitutionIdentity"), max_shift_days=days,
                   sponsor=text("Sponsor", "rtharvest"), protocol=text("Protocol", "RTHARVEST"),
                   on_phi=choice("OnPhiFound", PhiAction, PhiAction.CLEAN))

    def to_json(self) -> dict[str, Any]:
        """The REST form (every field, defaults included)."""
        return {"Dates": self.dates.value, "Descriptors": self.descriptors.value,
                "RetainPatientCharacteristics": self.patient_characteristics,
                "RetainInstitutionIdentity": self.institution, "MaxShiftDays": self.max_shift_days,
                "Sponsor": self.sponsor, "Protocol": self.protocol, "OnPhiFound": self.on_phi.value}

    def method(self) -> list[str]:
        """``DeidentificationMethod`` values (LO: at most 64 characters each)."""
        out = ["rtharvest: PS3.15 E.1-1 Basic Profile",
               {DatePolicy.SHIFT: "dates shifted per patient", DatePolicy.KEEP: "dates retained",
                DatePolicy.REMOVE: "dates removed"}[self.dates],
               "UIDs remapped per site (2.25 from keyed hash)", "private attributes removed"]
        if self.descriptors is DescriptorPolicy.KEEP:
            out.append("RT descriptors retained (ROI names, labels)")
        return out

    def method_codes(self) -> list[tuple[str, str]]:
        """CID 7050 codes (DCM) of the profile and the options applied."""
        codes = [("113100", "Basic Application Confidentiality Profile")]
        if self.dates is DatePolicy.SHIFT:
            codes.append(("113107", "Retain Longitudinal Temporal Information Modified Dates Option"))
        elif self.dates is DatePolicy.KEEP:
            codes.append(("113106", "Retain Longitudinal Temporal Information Full Dates Option"))
        if self.patient_characteristics:
            codes.append(("113108", "Retain Patient Characteristics Option"))
        if self.institution:
            codes.append(("113112", "Retain Institution Identity Option"))
        return codes


# ---------------------------------------------------------------------------------------------------
# Site key: UIDs, pseudonyms and date shifts


@dataclass(frozen=True)
class SiteKey:
    """A site's name and secret; everything derived from them is deterministic.

    The secret never leaves the site (it lives in its own file, apart from the pseudonym mapping, or in the
    configuration; see :mod:`rtharvest.export.settings`).
    """

    site: str
    secret: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if not SITE_PATTERN.match(self.site):
            raise ProfileError("Site", f"must be 1-16 letters, digits, '-' or '_', got {self.site[:30]!r}")
        if len(self.secret) < 16:
            raise ProfileError("Secret", "must be at least 16 bytes")

    def _digest(self, purpose: str, value: str) -> bytes:
        return hmac.new(self.secret, f"{purpose}\x00{self.site}\x00{value}".encode(), hashlib.sha256).digest()

    def uid(self, uid: str) -> str:
        """The site's replacement for ``uid``: ``2.25.`` + 128 bits of the keyed hash (≤ 44 characters)."""
        return "2.25." + str(int.from_bytes(self._digest("uid", uid.strip("\x00 "))[:16], "big"))

    def pseudonym(self, patient_id: str, attempt: int = 0) -> str:
        """The patient's pseudonym: ``<SITE>-<16 upper-case hex digits>`` (64 bits: a collision among a
        million patients has a chance of about 3e-8). ``attempt`` > 0 draws another one for the rare patient
        whose first pseudonym another patient of the site already has."""
        value = patient_id if attempt == 0 else f"{patient_id}\x00{attempt}"
        return f"{self.site}-{self._digest('patient', value).hex()[:16].upper()}"

    def day_shift(self, patient_id: str, max_days: int) -> int:
        """Days (negative) every date of this patient moves by under ``Dates: shift``."""
        return -(1 + int.from_bytes(self._digest("dates", patient_id)[:8], "big") % max_days)


# ---------------------------------------------------------------------------------------------------
# The PS3.15 table


_ACTION_LISTS = {"D": "D_TAGS", "Z": "Z_TAGS", "X": "X_TAGS", "U": "U_TAGS", "Z/D": "Z_D_TAGS",
                 "X/Z": "X_Z_TAGS", "X/D": "X_D_TAGS", "X/Z/D": "X_Z_D_TAGS", "X/Z/U*": "X_Z_U_STAR_TAGS"}


def _load_table() -> tuple[dict[int, str], list[tuple[int, int, int, int, str]]]:
    exact: dict[int, str] = {}
    masked: list[tuple[int, int, int, int, str]] = []
    for action, name in _ACTION_LISTS.items():
        for entry in getattr(_ps315, name):
            if len(entry) == 2:
                exact[Tag(entry[0], entry[1])] = action
            else:
                masked.append((entry[0], entry[1], entry[2], entry[3], action))
    return exact, masked


_EXACT, _MASKED = _load_table()
_KEEP = "K"
_UID_SUFFIXES = ("InstanceUID", "FrameOfReferenceUID")
_STANDARD_UID_ROOT = "1.2.840.10008."
_TEXT_VRS = frozenset({"AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UT"})
_NUMBER_VRS = frozenset({"FD", "FL", "SS", "US", "SL", "UL", "SV", "UV"})


def table_action(tag: BaseTag) -> str | None:
    """Table E.1-1's action for ``tag`` (``None``: not listed, kept)."""
    action = _EXACT.get(tag)
    if action is not None:
        return action
    for group, element, gmask, emask, masked_action in _MASKED:
        if tag.group & gmask == group & gmask and tag.element & emask == element & emask:
            return masked_action
    return None


# ---------------------------------------------------------------------------------------------------
# Applying it


def shift_date(value: str, days: int) -> str | None:
    """A DA value (or the date part of a DT) moved by ``days``; ``None`` if it is not a date."""
    text = value.strip()
    if len(text) < 8 or not text[:8].isdigit():
        return None
    try:
        day = _dt.date(int(text[:4]), int(text[4:6]), int(text[6:8]))
    except ValueError:
        return None
    try:
        shifted = day + _dt.timedelta(days=days)
    except OverflowError:
        return None
    return shifted.strftime("%Y%m%d") + text[8:]


@dataclass
class _Context:
    key: SiteKey
    profile: Profile
    pseudonym: str
    day_shift: int
    overrides: dict[str, str]


def _dummy(elem: DataElement, ctx: _Context) -> None:
    vr = elem.VR
    if vr == "UI":
        _remap(elem, ctx)
    elif vr in ("DA", "DT", "TM"):
        elem.value = {"DA": "19000101", "DT": "19000101000000", "TM": "000000"}[vr]
    elif vr in _TEXT_VRS:
        elem.value = "ANONYMIZED"
    elif vr == "AS":
        elem.value = "000Y"
    elif vr in ("DS", "IS"):
        elem.value = "0"
    elif vr in _NUMBER_VRS:
        elem.value = 0
    elif vr == "UR":
        elem.value = "http://anonymized.invalid"
    else:
        elem.value = b"" if vr.startswith("O") or vr == "UN" else None


def _empty(elem: DataElement) -> None:
    if elem.VR == "SQ":
        elem.value = Sequence()
    elif elem.VR.startswith("O") or elem.VR == "UN":
        elem.value = b""
    else:
        elem.value = None if elem.VR in _NUMBER_VRS or elem.VR in ("DS", "IS") else ""


def _remap(elem: DataElement, ctx: _Context) -> None:
    def new(uid: Any) -> str:
        text = str(uid).strip("\x00 ")
        if not text or text.startswith(_STANDARD_UID_ROOT):
            return text
        return ctx.key.uid(text)

    if isinstance(elem.value, (list, MultiValue)):
        elem.value = [new(u) for u in elem.value]
    elif elem.value:
        elem.value = new(elem.value)


def _date(elem: DataElement, action: str, ctx: _Context, ds: Dataset) -> None:
    policy = ctx.profile.dates
    if elem.keyword == "PatientBirthDate":
        _empty(elem)
    elif policy is DatePolicy.KEEP or (policy is DatePolicy.SHIFT and elem.VR == "TM"):
        return
    elif policy is DatePolicy.SHIFT:
        values = list(elem.value) if isinstance(elem.value, (list, MultiValue)) else [elem.value]
        shifted = [shift_date(str(v), ctx.day_shift) if v else "" for v in values]
        if any(v is None for v in shifted):
            _empty(elem)  # not a date we can shift consistently: no value is safer than a real one
        else:
            elem.value = shifted if len(shifted) > 1 else shifted[0]
    else:
        _apply_basic(elem, action, ctx, ds)


def _apply_basic(elem: DataElement, action: str, ctx: _Context, ds: Dataset) -> None:
    if action == "X":
        del ds[elem.tag]
    elif action in ("Z", "X/Z"):
        _empty(elem)
    elif action in ("U", "X/Z/U*"):
        if elem.VR == "UI":
            _remap(elem, ctx)
        elif elem.VR == "SQ":
            for item in elem.value:
                _walk(item, ctx)
    elif elem.VR == "SQ":  # D, Z/D, X/D, X/Z/D on a sequence: keep the items, de-identify inside them
        for item in elem.value:
            _walk(item, ctx)
    else:
        _dummy(elem, ctx)


def _action_for(tag: BaseTag, keyword: str, vr: str, ctx: _Context) -> str | None:
    if keyword in ctx.overrides:
        return ctx.overrides[keyword]
    action = table_action(tag)
    if action is None and vr == "UI" and keyword.endswith(_UID_SUFFIXES):
        return "U"  # a reference the table does not list by name: remapped all the same
    return action


def _vr_of(raw: Any, tag: BaseTag) -> str:
    vr = getattr(raw, "VR", None)
    if vr:
        return str(vr)
    try:
        return str(dictionary_VR(tag))
    except KeyError:
        return "UN"


def _walk(ds: Dataset, ctx: _Context) -> None:
    for tag in list(ds.keys()):
        if tag.is_private:
            del ds[tag]  # PS3.15: private attributes are removed (no Retain Safe Private option)
            continue
        # Decide from the tag and VR before touching the value: converting every raw value (contour
        # points, LUTs) would cost more than the whole de-identification.
        raw = ds.get_item(tag)
        vr = _vr_of(raw, tag)
        action = _action_for(tag, keyword_for_tag(tag), vr, ctx)
        if (action is None or action == _KEEP) and vr != "SQ":
            continue
        elem = ds[tag]
        if action is None or action == _KEEP:
            for item in elem.value or []:
                _walk(item, ctx)
            continue
        if elem.VR in ("DA", "DT", "TM") and action not in ("X", "U"):
            _date(elem, action, ctx, ds)
        elif elem.VR in ("DA", "DT") and action == "X" and ctx.profile.dates is not DatePolicy.REMOVE \
                and elem.keyword != "PatientBirthDate":
            _date(elem, action, ctx, ds)
        else:
            _apply_basic(elem, action, ctx, ds)


def _overrides(profile: Profile) -> dict[str, str]:
    out: dict[str, str] = {"PatientID": _KEEP, "PatientName": _KEEP, "PatientBirthDate": "Z"}
    if profile.descriptors is DescriptorPolicy.KEEP:
        out.update(dict.fromkeys(RT_DESCRIPTORS, _KEEP))
    if profile.patient_characteristics:
        out.update(dict.fromkeys(_PATIENT_CHARACTERISTICS, _KEEP))
    if profile.institution:
        out.update(dict.fromkeys(_INSTITUTION, _KEEP))
    return out


def deidentify(ds: Dataset, key: SiteKey, profile: Profile, pseudonym: str | None = None, *,
               in_place: bool = False) -> Dataset:
    """A de-identified deep copy of ``ds`` (``ds`` itself is left untouched unless ``in_place``).

    ``pseudonym`` defaults to ``key.pseudonym(PatientID)``; pass the one stored in the site's database
    when the mapping is kept there. ``in_place`` saves the copy when the caller parsed ``ds`` only to
    export it.
    """
    patient_id = str(ds.get("PatientID", "") or "")
    out = ds if in_place else copy.deepcopy(ds)
    ctx = _Context(key, profile, pseudonym or key.pseudonym(patient_id),
                   key.day_shift(patient_id, profile.max_shift_days), _overrides(profile))
    _walk(out, ctx)
    out.PatientID = ctx.pseudonym
    out.PatientName = ctx.pseudonym
    out.PatientIdentityRemoved = "YES"
    out.DeidentificationMethod = profile.method()
    codes = []
    for value, meaning in profile.method_codes():
        item = Dataset()
        item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, "DCM", meaning
        codes.append(item)
    out.DeidentificationMethodCodeSequence = codes
    out.LongitudinalTemporalInformationModified = {
        DatePolicy.SHIFT: "MODIFIED", DatePolicy.KEEP: "UNMODIFIED", DatePolicy.REMOVE: "REMOVED"}[profile.dates]
    out.ClinicalTrialSponsorName = profile.sponsor
    out.ClinicalTrialProtocolID = profile.protocol
    out.ClinicalTrialSiteID = key.site
    out.ClinicalTrialSiteName = key.site
    out.ClinicalTrialSubjectID = ctx.pseudonym
    if "ClinicalTrialProtocolName" not in out:
        out.ClinicalTrialProtocolName = ""  # Type 2 of the Clinical Trial Subject module
    meta = getattr(ds, "file_meta", None)
    if meta is not None:
        out.file_meta = meta if in_place else copy.deepcopy(meta)
        if "SOPInstanceUID" in out:
            out.file_meta.MediaStorageSOPInstanceUID = out.SOPInstanceUID
    return out

