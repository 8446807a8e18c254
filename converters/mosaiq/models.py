"""Typed rows of a MOSAIQ database, as the reader hands them to the mapping (no SQL here)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import Enum, IntEnum


class FieldType(IntEnum):
    """``TxField.Type_Enum``: how a field is delivered (3 and 4 deliver no treatment)."""

    STATIC = 1
    STEP_AND_SHOOT = 2
    SETUP = 3
    KV_SETUP = 4
    ARC = 11
    VMAT = 13
    DYNAMIC_MLC = 14

    @property
    def is_setup(self) -> bool:
        """A setup (portal imaging) field: it positions the patient, it treats nothing."""
        return self in (FieldType.SETUP, FieldType.KV_SETUP)

    @property
    def beam_type(self) -> str:
        """DICOM BeamType (300A,00C4): STATIC when the beam's shape stays fixed while it is on."""
        return "STATIC" if self in (FieldType.STATIC, FieldType.STEP_AND_SHOOT) else "DYNAMIC"


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
