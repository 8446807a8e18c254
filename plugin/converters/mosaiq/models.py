"""Typed rows of a MOSAIQ database, as the reader hands them to the mapping (no SQL here)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import Enum, IntEnum


class FieldType(IntEnum):
    """``TxField.Type_Enum``: what kind of field this is.

    The values and their names are those of pymedphys' MOSAIQ constants (``_mosaiq/constants.py``,
    ``FIELD_TYPES``): the only public list we know of. 10 and 19 are absent there and stay unknown: a
    field with such a type is reported (``unknown-enum``, by value) and its record is not written.
    """

    UNSPECIFIED = 0
    STATIC = 1
    STEP_AND_SHOOT = 2  # "StepNShoot"
    SETUP = 3
    KV_SETUP = 4  # "kV Setup"
    CT = 5
    PORT = 6
    FIXED = 7
    DYNAMIC = 8
    MV_CT = 9  # "MV CT"
    ARC = 11
    SKIP_ARCS = 12  # "Skip Arcs"
    VMAT = 13
    DYNAMIC_MLC = 14  # "DMLC"
    HELICAL = 15
    FIXED_ANGLE = 16  # "Fixed Angle"
    PATH = 17
    SHOT = 18
    USER_DEFINED = 20  # "User Defined"
    PDR = 21

    @property
    def is_setup(self) -> bool:
        """A setup field (3 setup, 4 kV setup): it positions the patient, it treats nothing."""
        return self in (FieldType.SETUP, FieldType.KV_SETUP)

    @property
    def is_imaging(self) -> bool:
        """An imaging field (5 CT, 6 Port, 9 MV CT): it images the patient (a portal image, a cone-beam or
        MV CT), it treats nothing, even when it was imported with a plan UID and a beam number."""
        return self in (FieldType.CT, FieldType.PORT, FieldType.MV_CT)

    @property
    def beam_type(self) -> str | None:
        """DICOM BeamType (300A,00C4) when the field type says it, else None (decided from the control points).

        STATIC when the beam's shape stays fixed while it is on (static, step-and-shoot); DYNAMIC for the
        types whose names say the machine moves while the beam is on (dynamic, arcs, skip arcs, VMAT,
        dynamic MLC, helical). The other names (unspecified, fixed, fixed angle, path, shot, user defined,
        PDR) say nothing certain about it.
        """
        if self in (FieldType.STATIC, FieldType.STEP_AND_SHOOT):
            return "STATIC"
        if self in (FieldType.DYNAMIC, FieldType.ARC, FieldType.SKIP_ARCS, FieldType.VMAT, FieldType.DYNAMIC_MLC,
                    FieldType.HELICAL):
            return "DYNAMIC"
        return None


class TerminationStatus(IntEnum):
    """``Dose_Hst.Termination_Status_Enum`` -> TreatmentTerminationStatus (3008,002A)."""

    UNKNOWN = 0
    NORMAL = 1
    OPERATOR = 2
    MACHINE = 3

    @property
    def dicom(self) -> str:
        """The enumerated value of PS3.3 C.8.8.21 (NORMAL, OPERATOR, MACHINE, UNKNOWN)."""
        return self.name


class VerifyStatus(IntEnum):
    """``Dose_Hst.Termination_Verify_Status_Enum`` -> TreatmentVerificationStatus (3008,002C).

    The standard's terms are VERIFIED, VERIFIED_OVR and NOT_VERIFIED. dicom3tools' dciodvfy (2022 and
    earlier) spells two of them VERIFED and NOT_VERIFED in its enumeration table and therefore flags the
    correct VERIFIED and NOT_VERIFIED; we emit the standard's spelling and tolerate exactly that message.
    """

    UNSPECIFIED = 0
    VERIFIED = 1
    VERIFIED_OVR = 2
    NOT_VERIFIED = 3

    @property
    def dicom(self) -> str:
        """The enumerated value, or empty (Type 2) when MOSAIQ does not say."""
        return "" if self is VerifyStatus.UNSPECIFIED else self.name


class DeliveryType(Enum):
    """TreatmentDeliveryType (300A,00CE) values the converter produces."""

    TREATMENT = "TREATMENT"
    CONTINUATION = "CONTINUATION"


@dataclass(frozen=True)
class Problem:
    """Bad input in one row: which table and row, and what is wrong with it."""

    table: str
    key: str
    reason: str
    detail: str

    def __str__(self) -> str:
        return f"{self.table} {self.key}: {self.detail}"


@dataclass(frozen=True)
class PatientInfo:
    """``Ident`` (current version) and ``Patient``: IDA is the medical record number = DICOM PatientID."""

    pat_id1: int
    patient_id: str
    name: str  # DICOM PN: Last^First^Middle
    birth_date: str  # YYYYMMDD or ""


@dataclass(frozen=True)
class SiteInfo:
    """One version of a prescription site (``Site``)."""

    sit_id: int
    sit_set_id: int
    name: str
    fractions: int | None


@dataclass(frozen=True)
class FieldVersion:
    """One ``TxField`` row: a version of a field, possibly a history version (Version != 0)."""

    fld_id: int
    fld_set_id: int
    version: int
    sit_set_id: int
    label: str
    name: str
    meterset: float | None
    field_type: FieldType
    plan_uid: str  # OriginalPlanUID with its char(64) padding stripped; "" when not imported from DICOM
    beam_name: str
    beam_number: int  # OriginalBeamNumber; 0 when not imported from DICOM


@dataclass(frozen=True)
class ControlPoint:
    """One control point (``TxFieldPoint`` or, as delivered, ``TxFieldPoint_Hst``)."""

    point: int
    index: float | None  # cumulative meterset fraction
    gantry: float | None
    collimator: float | None
    energy: float | None
    leaves_mm: tuple[float, ...] | None  # bank A then bank B (IEC 1xx then 2xx), mm


@dataclass(frozen=True)
class Delivery:
    """One ``Dose_Hst`` row (one delivered field) with everything joined to it.

    ``problems`` lists bad input found in this row or its joined rows; such a delivery never becomes
    part of a record.
    """

    dhs_id: int
    pat_id1: int
    sit_id: int | None
    when: datetime
    field: FieldVersion | None
    machine: str | None  # name of the machine actually used (Dose_Hst.Machine_ID_Staff_ID -> Staff)
    meterset: float | None  # delivered meterset
    termination: TerminationStatus
    verification: VerifyStatus
    partially_treated: bool
    qa_mode: bool
    fraction_in_effect: int | None
    control_points: tuple[ControlPoint, ...] = ()
    problems: tuple[Problem, ...] = ()

    @property
    def key(self) -> str:
        """How reports name this row."""
        return f"Dose_Hst DHS_ID={self.dhs_id}"


@dataclass(frozen=True)
class PlanLocation:
    """Where the DCM tables say the plan lives (its study and series)."""

    study_uid: str
    series_uid: str
    sop_class_uid: str
