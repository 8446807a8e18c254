"""Plan classification, harvest windows and registration types: pure functions shared by the
planner (what to follow) and the manifest (how to report it)."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date
from enum import StrEnum
from typing import Any

from .references import PlanRefs


class PlanClass(StrEnum):
    """What a treated plan is, for following it and for the manifest's ``Status``/``InvalidPlans``."""

    VALID = "VALID"  # a patient treatment plan: followed (steps 2-10)
    VERIFICATION = "VERIFICATION"  # phantom/QA verification plan: collected, not followed
    MACHINE_QA = "MACHINE_QA"  # machine QA plan: collected, not followed
    NON_PATIENT = "NON_PATIENT"  # SERVICE intent (machine service, non-patient delivery): not followed
    OUTSIDE_WINDOW = "OUTSIDE_WINDOW"  # valid, but none of its treatments lies in the window
    MISSING = "MISSING"  # referenced by a record, absent from every source


#: PlanIntent (300A,000A) defined terms that mean "not a patient treatment" (harvest rule 2).
INVALID_INTENTS: dict[str, PlanClass] = {
    "VERIFICATION": PlanClass.VERIFICATION,
    "MACHINE_QA": PlanClass.MACHINE_QA,
    "SERVICE": PlanClass.NON_PATIENT,
}
#: Why a plan of an invalid class is ``Invalid`` in the manifest (its ``InvalidReason``): what the intent means
#: and that the harvest keeps the plan but follows none of its links (harvest rule 2).
INVALID_REASONS: dict[PlanClass, str] = {
    PlanClass.VERIFICATION: "PlanIntent VERIFICATION: a verification (phantom/QA) plan, not a patient treatment; "
                            "collected, its links not followed",
    PlanClass.MACHINE_QA: "PlanIntent MACHINE_QA: a machine QA plan, not a patient treatment; collected, its links "
                          "not followed",
    PlanClass.NON_PATIENT: "PlanIntent SERVICE: a machine service delivery, not a patient treatment; collected, its "
                           "links not followed",
}
#: Defined terms that are followed (absent intent is followed too).
VALID_INTENTS = frozenset({"CURATIVE", "PALLIATIVE", "PROPHYLACTIC", "RESEARCH"})

#: Classes whose plans are followed (steps 2-10).
FOLLOWED_CLASSES = frozenset({PlanClass.VALID, PlanClass.OUTSIDE_WINDOW})


def _norm_intent(intent: str | None) -> str | None:
    if intent is None:
        return None
    value = intent.strip().upper()
    return value or None


def is_invalid_intent(intent: str | None) -> bool:
    """True for QA / non-patient intents (VERIFICATION, MACHINE_QA, SERVICE), case-insensitively.

    Absent intent and nonstandard values are *not* invalid: the rules follow plans without intent, and a
    vendor-specific term says nothing reliable about the plan being a phantom.
    """
    value = _norm_intent(intent)
    return value is not None and value in INVALID_INTENTS


def is_standard_intent(intent: str | None) -> bool:
    """True when the intent is absent or one of the DICOM defined terms."""
    value = _norm_intent(intent)
    return value is None or value in VALID_INTENTS or value in INVALID_INTENTS


_DATE_RE = re.compile(r"^[0-9]{8}$")


def _check_date(name: str, value: str | None) -> None:
    if value is None:
        return
    if not isinstance(value, str) or not _DATE_RE.match(value):
        raise ValueError(f"{name} must be YYYYMMDD, got {value!r}")
    try:
        date(int(value[:4]), int(value[4:6]), int(value[6:]))
    except ValueError as exc:
        raise ValueError(f"{name} {value!r} is not a calendar date") from exc


@dataclass(frozen=True)
class HarvestWindow:
    """Which treatments seed a harvest: inclusive ``YYYYMMDD`` dates and/or patient IDs.

    Either bound may be open (``None``); at least one constraint (a date or a patient) is required so
    that a typo cannot start a harvest of a whole clinic.
    """

    date_from: str | None = None
    date_to: str | None = None
    patient_ids: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _check_date("From", self.date_from)
        _check_date("To", self.date_to)
        if self.date_from and self.date_to and self.date_from > self.date_to:
            raise ValueError(f"From {self.date_from} is after To {self.date_to}")
        ids = tuple(self.patient_ids)
        if any(not isinstance(p, str) or not p.strip() for p in ids):
            raise ValueError("PatientIDs must be non-empty strings")
        object.__setattr__(self, "patient_ids", ids)
        if self.date_from is None and self.date_to is None and not ids:
            raise ValueError("a window needs From/To dates and/or PatientIDs")

    def has_dates(self) -> bool:
        """True when at least one date bound is set."""
        return self.date_from is not None or self.date_to is not None

    def date_range(self) -> str:
        """The DICOM range matching value (``A-B``, ``A-``, ``-B``), ``""`` (universal) without dates."""
        if not self.has_dates():
            return ""
        return f"{self.date_from or ''}-{self.date_to or ''}"

    def includes_patient(self, patient_id: str | None) -> bool:
        """True when the window has no patient list or lists this patient."""
        return not self.patient_ids or (patient_id is not None and patient_id in self.patient_ids)

    def includes(self, patient_id: str | None, treatment_date: str | None) -> bool:
        """True for a record of this patient treated on this date (harvest rule 1)."""
        return self.includes_patient(patient_id) and record_in_window(treatment_date, self)

    def to_dict(self) -> dict[str, Any]:
        """JSON form with the REST API's names."""
        return {"From": self.date_from, "To": self.date_to, "PatientIDs": list(self.patient_ids)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HarvestWindow:
        """Inverse of :meth:`to_dict` (also accepts the ground truth's ``Windows[i]`` entries)."""
        return cls(data.get("From") or None, data.get("To") or None, tuple(data.get("PatientIDs") or ()))


def record_in_window(treatment_date: str | None, window: HarvestWindow) -> bool:
    """True when ``treatment_date`` (YYYYMMDD) lies within the window's inclusive date bounds.

    A window without dates accepts every record (even undated ones); an undated record is outside any
    dated window — it cannot be shown to belong.
    """
    if not window.has_dates():
        return True
    if treatment_date is None or not _DATE_RE.match(treatment_date):
        return False
    if window.date_from is not None and treatment_date < window.date_from:
        return False
    return not (window.date_to is not None and treatment_date > window.date_to)


def classify_plan(
    plan: PlanRefs | None,
    window: HarvestWindow | None = None,
    treatment_dates: Iterable[str | None] = (),
) -> PlanClass:
    """Classify a treated plan.

    ``plan`` is ``None`` when the plan was not found (``MISSING``). QA intents win over everything.
    With a ``window`` and the dates of the plan's treatments, a valid plan none of whose treatments
    falls in the window is ``OUTSIDE_WINDOW`` (the paper's "plan from years before the window").
    """
    if plan is None:
        return PlanClass.MISSING
    intent = _norm_intent(plan.intent)
    if intent in INVALID_INTENTS:
        return INVALID_INTENTS[intent]
    dates = list(treatment_dates)
    if window is not None and dates and window.has_dates() and not any(
        record_in_window(d, window) for d in dates
    ):
        return PlanClass.OUTSIDE_WINDOW
    return PlanClass.VALID


def is_followed(plan_class: PlanClass) -> bool:
    """True when the planner follows plans of this class beyond the plan itself."""
    return plan_class in FOLLOWED_CLASSES


_MODALITY_ALIASES = {"PET": "PT", "CBCT": "CT"}


def registration_type(fixed_modality: str | None, moving_modality: str | None) -> str:
    """``"<fixed>-<moving>"`` (e.g. ``CT-MR``); unknown sides are ``?``.

    The fixed side is the planning series' modality (the FoR the REG involves), the moving side the
    explicitly referenced registered series' modality (harvest rules, "REG type").
    """

    def norm(m: str | None) -> str:
        value = (m or "").strip().upper()
        return _MODALITY_ALIASES.get(value, value) or "?"

    return f"{norm(fixed_modality)}-{norm(moving_modality)}"
