"""A synthetic MOSAIQ clinic: the synthetic clinic's patients and plans, deliveries in a MOSAIQ database.

:func:`generate_mosaiq` writes the DICOM clinic of :mod:`rtharvest.synth.generator` (plans, images,
structure sets, doses, registrations: what an auxiliary PACS holds), then turns every photon treatment
record into MOSAIQ rows (``Dose_Hst`` per delivered field, ``TxField`` versions, ``TxFieldPoint``,
``FLD_HST``, ``TrackTreatment``, ``Staff``, ``Site``, ``Ident``, ``Patient``, DCM tables) in
``mosaiq.sqlite`` and deletes the record file. Ion records stay DICOM files: the converter writes RT
Beams Treatment Records, and an ion course is recorded by the proton system, not by this MOSAIQ.

The ground truth (``mosaiq_ground_truth.json``) lists the records a correct converter produces (patient,
plan, date, machine and, per beam, number, fraction, delivered meterset, delivery type, termination and
verification) and, per harvest window, the DICOM objects a harvest from the auxiliary PACS collects. It
is computed from what this module wrote, following docs/harvest-rules.md through
:func:`rtharvest.synth.truth.evaluate`; it shares no code with the converter's mapping.

Traps (``Traps`` in the ground truth, each with the MOSAIQ rows it concerns):

``history_version``      a field edited after two fractions: those deliveries point at the old TxField
                         row (Version 32000, another meterset, and another OriginalPlanUID: the field
                         was first imported from a preliminary plan export that never reached the PACS);
                         the current row is a new FLD_ID with the plan's UID. The first two sessions
                         therefore make two records each: one of the preliminary plan, one of the plan.
``qa_mode``              a dry run in QA mode the day before the first fraction (TrackTreatment.WasQAMode).
``setup_field``          a kV setup field delivered before every session's first beam.
``imaging_field``        a Port field (Type_Enum 6), imported with the plan's UID and a beam number,
                         delivered once before a session's first beam: an image, not a treatment.
``partial_treatment``    a beam interrupted by the operator and completed (CONTINUATION); another
                         stopped by the machine and never completed.
``machine_change``       from mid-course on, the fractions are delivered on the other linac.
``resumed_elsewhere``    a beam stopped by a machine fault and its remainder delivered 40 minutes later on
                         the other linac: the same fraction, split by MOSAIQ into two records (the second
                         CONTINUATION, same fraction number).
``two_plans_one_site``   a re-plan whose first fraction is delivered in the same session as the last
                         fraction of the first plan (two records, one session). Fx_Number_InEffect is
                         NULL for that patient: the converter's fallback numbers each plan's fractions.
``padded_plan_uid``      every OriginalPlanUID is space padded to char(64).
``padded_leaf_blob``     every leaf blob is a fixed-width record of 80 values of which the first
                         TxFieldPoint.MLC_Leaves (10) are leaves, the rest zero padding.
``not_imported_field``   a manually created field (no OriginalPlanUID, OriginalBeamNumber 0).
``midnight_session``     a session starting at 23:52 whose last beam is delivered after midnight.
``no_dcm_rows``          plans of one patient absent from the DCM tables (records go to a per-site study).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from pydicom import dcmread
from sqlalchemy import create_engine, insert

from rtharvest.converters.mosaiq import schema
from rtharvest.core.sopclass import SopClass
from rtharvest.synth import iods
from rtharvest.synth.generator import PHANTOM_ID, SynthOptions, generate_with_knowledge
from rtharvest.synth.groundtruth import GroundTruth, Trap
from rtharvest.synth.truth import Knowledge, KRecord, evaluate

DATABASE = "mosaiq.sqlite"
TRUTH = "mosaiq_ground_truth.json"
_VERIFY = {0: "", 1: "VERIFIED", 2: "VERIFIED_OVR", 3: "NOT_VERIFIED"}
_TERMINATION = {1: "NORMAL", 2: "OPERATOR", 3: "MACHINE"}
_OTHER_LINAC = {"LINAC1": "LINAC2", "LINAC2": "LINAC1"}


@dataclass(frozen=True)
class ExpectedBeam:
    """One TreatmentSessionBeamSequence item a correct converter writes."""

    beam_number: int
    fraction: int
    delivered_meterset: float
    delivery_type: str
    termination: str
    verification: str

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {"BeamNumber": self.beam_number, "Fraction": self.fraction, "DeliveredMeterset": self.delivered_meterset,
                "DeliveryType": self.delivery_type, "Termination": self.termination,
                "Verification": self.verification}


@dataclass
class ExpectedRecord:
    """One RT Beams Treatment Record a correct converter writes."""

    patient_id: str
    plan_uid: str
    treatment_date: str
    machine: str
    plan_study_uid: str | None  # the plan's study when the DCM tables know the plan
    beams: list[ExpectedBeam] = field(default_factory=list)
    dhs_ids: list[int] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {"PatientID": self.patient_id, "PlanUID": self.plan_uid, "TreatmentDate": self.treatment_date,
                "Machine": self.machine, "PlanStudyUID": self.plan_study_uid,
                "Beams": [b.to_dict() for b in self.beams], "DHS_IDs": self.dhs_ids}


@dataclass
class MosaiqWindow:
    """A harvest window over the auxiliary PACS after conversion."""

    name: str
    date_from: str | None
    date_to: str | None
    patient_ids: list[str] | None
    expected: list[str]  # SOP UIDs of DICOM objects loaded into the PACS that the harvest collects
    forbidden: list[str]
    expected_records: list[int]  # indices into MosaiqTruth.records of converted records it collects

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {"Name": self.name, "From": self.date_from, "To": self.date_to, "PatientIDs": self.patient_ids,
                "Expected": self.expected, "Forbidden": self.forbidden, "ExpectedRecords": self.expected_records}


@dataclass
class MosaiqTruth:
    """What the synthetic MOSAIQ clinic holds and what converting and harvesting it must give."""

    database: Path
    dicom_truth: GroundTruth
    records: list[ExpectedRecord]
    skipped: dict[str, list[int]]  # reason -> DHS_IDs a correct converter leaves out and reports
    windows: list[MosaiqWindow]
    traps: list[Trap]
    first_day: str
    last_day: str

    def window(self, name: str) -> MosaiqWindow:
        """The window called ``name``."""
        return next(w for w in self.windows if w.name == name)

    def to_json(self) -> str:
        """Deterministic JSON text."""
        return json.dumps({
            "Database": self.database.name, "FirstDay": self.first_day, "LastDay": self.last_day,
            "Records": [r.to_dict() for r in self.records], "Skipped": self.skipped,
            "Windows": [w.to_dict() for w in self.windows], "Traps": [t.to_dict() for t in self.traps],
        }, indent=1) + "\n"


@dataclass
class _Beam:
    number: int
    name: str
    meterset: float
    gantry: float
    dynamic: bool


@dataclass
class _Session:
    """One original record, to become one session of MOSAIQ deliveries."""

    uid: str
    patient_id: str
    plan_uid: str
    plan_class: str
    when: datetime
    machine: str
    fraction: int
    beams: list[_Beam]
    used_machine: str = ""
    #: "", "operator" (completed by a continuation), "machine" (never completed), "resumed" (completed on the
    #: other linac).
    partial: str = ""
    old_version_beam: int = 0  # beam number delivered from the history version of its field
    #: Further records of the same fraction (a machine writing one record per beam): one MOSAIQ session.
    other_uids: list[str] = field(default_factory=list)


def _read_sessions(root: Path, truth: GroundTruth) -> list[_Session]:
    """The photon records the DICOM clinic wrote (ion records stay DICOM)."""
    sessions: list[_Session] = []
    by_fraction: dict[tuple[str, str, int], _Session] = {}
    for uid, info in sorted(truth.objects.items(), key=lambda item: item[1].path):
        if info.sop_class_uid != SopClass.RT_BEAMS_TREATMENT_RECORD.value:
            continue
        ds = dcmread(root / info.path)
        beams = [_Beam(int(b.ReferencedBeamNumber), str(b.BeamName), float(b.SpecifiedPrimaryMeterset),
                       float(b.ControlPointDeliverySequence[0].GantryAngle), b.BeamType == "DYNAMIC")
                 for b in ds.TreatmentSessionBeamSequence]
        ref = ds.ReferencedRTPlanSequence[0]
        when = datetime.strptime(f"{ds.TreatmentDate}{ds.TreatmentTime}", "%Y%m%d%H%M%S")
        session = _Session(uid, str(ds.PatientID), str(ref.ReferencedSOPInstanceUID),
                           str(ref.ReferencedSOPClassUID), when,
                           str(ds.TreatmentMachineSequence[0].TreatmentMachineName),
                           int(ds.TreatmentSessionBeamSequence[0].CurrentFractionNumber), beams)
        same = by_fraction.setdefault((session.patient_id, session.plan_uid, session.fraction), session)
        if same is not session:  # one record per beam: the fraction is one session of MOSAIQ deliveries
            same.other_uids.append(uid)
            same.beams = sorted([*same.beams, *beams], key=lambda b: b.number)
            same.when = min(same.when, when)
            continue
        sessions.append(session)
    sessions.sort(key=lambda s: (s.patient_id, s.when, s.plan_uid))
    return sessions


def _verify_enum(dhs_id: int) -> int:
    """Termination_Verify_Status_Enum of a delivery: mostly verified, some with override, a few not or unset."""
    return 3 if dhs_id % 7 == 0 else 2 if dhs_id % 5 == 0 else 0 if dhs_id % 11 == 0 else 1


def _expect(record: ExpectedRecord, beam: ExpectedBeam, dhs_id: int) -> None:
    record.beams.append(beam)
    record.dhs_ids.append(dhs_id)


#: Leaf values per blob: MOSAIQ stores leaf sets as fixed-width records, padded beyond MLC_Leaves.
_BLOB_VALUES = 80
_LEAVES = 10


def _leaf_blob(leaves: int, opening_mm: float, sign: int) -> bytes:
    values = [int(round(sign * opening_mm * 10)) for _ in range(leaves)]
    return struct.pack(f"<{_BLOB_VALUES}h", *values, *([0] * (_BLOB_VALUES - leaves)))


class _Writer:
    """Accumulates MOSAIQ rows with deterministic ids."""

    def __init__(self) -> None:
        self.rows: dict[str, list[dict[str, Any]]] = {name: [] for name in schema.metadata.tables}
        self.next_id: dict[str, int] = {}

    def new_id(self, table: str, start: int = 1) -> int:
        value = self.next_id.get(table, start)
        self.next_id[table] = value + 1
        return value

    def add(self, table: str, **row: Any) -> None:
        self.rows[table].append(row)

    def save(self, path: Path) -> None:
        if path.exists():
            path.unlink()
        engine = create_engine(f"sqlite:///{path}")
        schema.metadata.create_all(engine)
        with engine.begin() as conn:
            for name, rows in self.rows.items():
                if rows:
                    conn.execute(insert(schema.metadata.tables[name]), rows)
        engine.dispose()


def _site_key(k: Knowledge, session: _Session) -> str:
    plan = k.plans.get(session.plan_uid)
    if plan is None:
        return session.plan_uid
    label = plan.label
    # A re-plan (label X_2) continues the prescription site of the first plan (X_1).
    if len(label) > 2 and label[-2] == "_" and label[-1].isdigit():
        return label[:-2]
    return label


def _pick(courses: list[list[_Session]], used: set[int], minimum: int, beams: int = 1) -> list[_Session]:
    for index, course in enumerate(courses):
        if index not in used and len(course) >= minimum and len(course[0].beams) >= beams:
            used.add(index)
            return course
    return next(c for c in courses if len(c) >= minimum and len(c[0].beams) >= beams)


def generate_mosaiq(out_dir: Path, options: SynthOptions | None = None, *, overwrite: bool = False) -> MosaiqTruth:
    """Write the synthetic MOSAIQ clinic under ``out_dir`` and return its ground truth.

    ``out_dir/dicom`` holds what the auxiliary PACS must hold (everything but the converted records),
    ``out_dir/mosaiq.sqlite`` the MOSAIQ database, ``out_dir/mosaiq_ground_truth.json`` the truth.
    """
    options = options or SynthOptions()
    root = Path(out_dir)
    dicom_truth, k = generate_with_knowledge(root, options, overwrite=overwrite)
    sessions = _read_sessions(root, dicom_truth)
    traps: list[Trap] = []

    # --- trap placement (deterministic: by course order) ----------------------------------------------
    by_course: dict[tuple[str, str], list[_Session]] = {}
    for s in sessions:
        by_course.setdefault((s.patient_id, s.plan_uid), []).append(s)
    courses = [c for key, c in sorted(by_course.items()) if key[0] != PHANTOM_ID]
    photon = [c for c in courses if not c[0].beams[0].dynamic]
    used: set[int] = set()
    history = _pick(photon, used, 3, beams=2)
    partial = _pick(photon, used, 3)
    change = _pick([c for c in photon if c[0].machine in _OTHER_LINAC], used, 4)
    midnight = _pick(photon, used, 2, beams=3)
    for s in sessions:
        s.used_machine = s.machine
    for s in change[len(change) // 2:]:
        s.used_machine = _OTHER_LINAC[s.machine]
    partial[1].partial = "operator"
    partial[2].partial = "machine"
    if partial[0].used_machine in _OTHER_LINAC:
        partial[0].partial = "resumed"
    for s in history[:2]:
        s.old_version_beam = s.beams[0].number
    midnight[1].when = datetime.combine(midnight[1].when.date(), datetime.min.time()) + timedelta(hours=23,
                                                                                                   minutes=52)
    # Re-plan: its first fraction moves into the session of the first plan's last fraction.
    two_plans: tuple[_Session, _Session] | None = None
    for (pid, plan_uid), course in sorted(by_course.items()):
        plan = k.plans.get(plan_uid)
        if plan is None or not plan.label.endswith("_2"):
            continue
        first_label = plan.label[:-2] + "_1"
        first_course = next((c for (p2, u2), c in sorted(by_course.items())
                             if p2 == pid and u2 in k.plans and k.plans[u2].label == first_label), None)
        if first_course is not None:
            course[0].when = first_course[-1].when + timedelta(minutes=30)
            two_plans = (first_course[-1], course[0])
            break
    no_dcm_patient = sorted({s.patient_id for s in sessions if s.patient_id != PHANTOM_ID})[0]

    # --- MOSAIQ rows ---------------------------------------------------------------------------------
    w = _Writer()
    machines: dict[str, int] = {}
    resumed_on = {_OTHER_LINAC[s.used_machine] for s in sessions if s.partial == "resumed"}
    for name in sorted({s.machine for s in sessions} | {s.used_machine for s in sessions} | resumed_on):
        machines[name] = w.new_id("Staff", 900)
        w.add("Staff", Staff_ID=machines[name], Type="Location", Last_Name=name.ljust(30), Machine_Type=1)
    patients: dict[str, int] = {}
    for pid in sorted({s.patient_id for s in sessions}):
        pat = w.new_id("Patient", 1000)
        patients[pid] = pat
        info = next(i for i in dicom_truth.objects.values() if i.patient_id == pid)
        ds = dcmread(root / info.path, stop_before_pixels=True)
        last, _, given = str(ds.PatientName).partition("^")
        born = str(ds.get("PatientBirthDate", "") or "")
        w.add("Ident", Pat_Id1=pat, IDA=pid, Version=0)
        w.add("Patient", Pat_ID1=pat, Last_Name=last, First_Name=given, MIddle_Name="",
              Birth_DtTm=datetime.strptime(born, "%Y%m%d") if born else None)
    sites: dict[tuple[str, str], tuple[int, int]] = {}
    fields: dict[tuple[str, int], int] = {}  # (plan, beam) -> FLD_ID of the current version
    old_fields: dict[tuple[str, int], int] = {}
    field_sets: dict[int, int] = {}
    setup_fields: dict[tuple[str, str], int] = {}
    manual_field: int | None = None
    dcm_plans: dict[str, str] = {}
    points_of: dict[int, list[dict[str, Any]]] = {}
    records: list[ExpectedRecord] = []
    skipped: dict[str, list[int]] = {"qa-mode": [], "setup-field": [], "imaging-field": [], "no-plan-uid": []}
    # The preliminary plan export the history version of the edited field was imported from (not in the PACS).
    preliminary_plan = iods.make_uid("rtharvest-synth-mosaiq", options.seed, "preliminary", history[0].plan_uid)
    port_session = partial[0]
    # The fallback fraction number (see below): the ordinal of a session among the sessions of its plan.
    plan_ordinal: dict[tuple[int, str], int] = {}
    plan_count: dict[tuple[str, str], int] = {}
    for s in sorted(sessions, key=lambda s: s.when):
        for plan_uid in dict.fromkeys(preliminary_plan if b.number == s.old_version_beam else s.plan_uid
                                      for b in s.beams):
            plan_count[(s.patient_id, plan_uid)] = plan_count.get((s.patient_id, plan_uid), 0) + 1
            plan_ordinal[(id(s), plan_uid)] = plan_count[(s.patient_id, plan_uid)]
    new_records: dict[str, KRecord] = {}

    def add_field(pid: str, plan_uid: str, site_set: int, beam: _Beam, machine: str, *, version: int = 0,
                  meterset: float | None = None, fld_set: int | None = None, type_enum: int | None = None,
                  imported: bool = True, imported_from: str | None = None) -> int:
        fld = w.new_id("TxField", 5000)
        field_sets[fld] = fld_set or fld
        w.add("TxField", FLD_ID=fld, FLD_SET_ID=fld_set or fld, Version=version, Pat_ID1=patients[pid],
              SIT_Set_ID=site_set, Field_Label=beam.name[:6], Field_Name=beam.name,
              Machine_ID_Staff_ID=machines[machine], Meterset=beam.meterset if meterset is None else meterset,
              MetersetUnit_Enum=1, Type_Enum=type_enum or (14 if beam.dynamic else 1), Modality_Enum=1,
              # char(64): MOSAIQ pads with spaces
              OriginalPlanUID=(imported_from or plan_uid).ljust(64) if imported else None,
              OriginalBeamName=beam.name if imported else None, OriginalBeamNumber=beam.number if imported else 0)
        for point, index in ((0, 0.0), (1, 1.0)):
            row = dict(Point=point, Index=index, A_Leaf_Set=_leaf_blob(_LEAVES, 50.0 + beam.number, -1),
                       B_Leaf_Set=_leaf_blob(_LEAVES, 50.0 + beam.number, 1), Gantry_Ang=beam.gantry, Coll_Ang=0.0)
            points_of.setdefault(fld, []).append(row)
            w.add("TxFieldPoint", FLD_ID=fld, Energy=6.0, MLC_Leaves=_LEAVES, **row)
        return fld

    def deliver(s: _Session, fld: int, when: datetime, meterset: float, *, fraction: int | None,
                termination: int = 1, partially: bool = False, qa: bool = False, machine: str = "") -> int:
        dhs = w.new_id("Dose_Hst", 70000)
        verify = _verify_enum(dhs)
        w.add("Dose_Hst", DHS_ID=dhs, Pat_ID1=patients[s.patient_id], SIT_ID=sites[(s.patient_id, site)][0],
              FLD_ID=fld, Tx_DtTm=when, Fractions_Tx=1, Fx_Number_InEffect=fraction, Dose_Tx_Act=0.0,
              Machine_ID_Staff_ID=machines[machine or s.used_machine], Meterset=meterset,
              Termination_Status_Enum=termination, Termination_Verify_Status_Enum=verify,
              PartiallyTreated=int(partially), Type_Enum=1)
        fhs = w.new_id("FLD_HST", 80000)
        w.add("FLD_HST", FHS_ID=fhs, DHS_ID=dhs, Meterset=meterset, Control_Points=2)
        for row in points_of[fld]:  # delivered as planned
            w.add("TxFieldPoint_Hst", FHS_ID=fhs, **row)
        w.add("TrackTreatment", DHS_ID=dhs, WasQAMode=int(qa),
              WasBeamComplete=int(not partially))
        return dhs

    for s in sessions:
        site = _site_key(k, s)
        if (s.patient_id, site) not in sites:
            sit_id = w.new_id("Site", 300)
            sites[(s.patient_id, site)] = (sit_id, sit_id)
            plan = k.plans.get(s.plan_uid)
            w.add("Site", SIT_ID=sit_id, SIT_SET_ID=sit_id, Version=0, Pat_ID1=patients[s.patient_id],
                  Site_Name=site[:20], Dose_Tx=200.0, Dose_Ttl=0.0, Fractions=None if plan is None else 30,
                  Status_Enum=1)
        site_set = sites[(s.patient_id, site)][1]
        if (s.patient_id, site) not in setup_fields and s.patient_id != PHANTOM_ID:
            setup_fields[(s.patient_id, site)] = add_field(
                s.patient_id, s.plan_uid, site_set, _Beam(90, "kV SETUP", 0.0, 0.0, False), s.machine, type_enum=4)
        for beam in s.beams:
            if (s.plan_uid, beam.number) not in fields:
                if s in history[:1] and beam.number == s.old_version_beam:
                    # The field as first planned, later edited: the delivered version becomes history.
                    old = add_field(s.patient_id, s.plan_uid, site_set, beam, s.machine, version=32000,
                                    meterset=beam.meterset + 5.0, imported_from=preliminary_plan)
                    old_fields[(s.plan_uid, beam.number)] = old
                    fields[(s.plan_uid, beam.number)] = add_field(s.patient_id, s.plan_uid, site_set, beam,
                                                                  s.machine, fld_set=old)
                else:
                    fields[(s.plan_uid, beam.number)] = add_field(s.patient_id, s.plan_uid, site_set, beam, s.machine)
        if s.plan_uid in k.plans and s.patient_id != no_dcm_patient and s.plan_uid not in dcm_plans:
            plan = k.plans[s.plan_uid]
            study_id = w.new_id("DCMStudy")
            series_id = w.new_id("DCMSeries")
            series_uid = dicom_truth.objects[s.plan_uid].series_uid
            w.add("DCMStudy", DCMStudy_ID=study_id, Pat_ID1=patients[s.patient_id], StudyInstanceUID=plan.study_uid)
            w.add("DCMSeries", DCMSeries_ID=series_id, DCMStudy_ID=study_id, SeriesInstanceUID=series_uid,
                  Modality="RTPLAN")
            w.add("DCMInstance", DCMInstance_ID=w.new_id("DCMInstance"), DCMSeries_ID=series_id,
                  SOPInstanceUID=s.plan_uid.ljust(64), SOPClassUID=s.plan_class)
            dcm_plans[s.plan_uid] = plan.study_uid

        pat_index = sorted(patients).index(s.patient_id)
        # MOSAIQ's own fraction number (the DICOM record's CurrentFractionNumber) is recorded for every other
        # patient; for the rest, and the patient of the two-plans trap, Fx_Number_InEffect is NULL and the
        # expected number is the converter's documented fallback: the ordinal of the session among the
        # sessions of the beam's plan in this database (a course whose first records the DICOM clinic lacks
        # therefore starts at 1 here; a re-plan starts at 1 in the session it shares with the first plan).
        merged = two_plans is not None and s.patient_id == two_plans[0].patient_id
        write_fraction = pat_index % 2 == 0 and not merged
        fraction = s.fraction if write_fraction else None
        if s is history[0]:
            # Dry run in QA mode the day before: not a treatment.
            for i, beam in enumerate(s.beams):
                skipped["qa-mode"].append(deliver(
                    s, old_fields.get((s.plan_uid, beam.number), fields[(s.plan_uid, beam.number)]),
                    s.when - timedelta(days=1) + timedelta(minutes=3 * i), beam.meterset, fraction=None, qa=True))
        when = s.when
        if (s.patient_id, site) in setup_fields:
            skipped["setup-field"].append(deliver(s, setup_fields[(s.patient_id, site)], when - timedelta(minutes=2),
                                                  0.0, fraction=fraction))
        if s is port_session:
            # A portal image before the first beam: imported with the plan (UID and beam number), yet no treatment.
            port = add_field(s.patient_id, s.plan_uid, site_set, _Beam(91, "PORT", 2.0, s.beams[0].gantry, False),
                             s.machine, type_enum=6)
            skipped["imaging-field"].append(deliver(s, port, when - timedelta(minutes=1), 2.0, fraction=fraction))
        # One record per plan and machine in the session: the history version of the edited field is of the
        # preliminary plan; a beam resumed on the other linac is recorded there.
        session_records: dict[tuple[str, str], tuple[ExpectedRecord, datetime]] = {}

        def record_for(plan_uid: str, machine: str, at: datetime, *, session: _Session = s,
                       found: dict[tuple[str, str], tuple[ExpectedRecord, datetime]] = session_records
                       ) -> ExpectedRecord:
            if (plan_uid, machine) not in found:
                found[(plan_uid, machine)] = (ExpectedRecord(
                    session.patient_id, plan_uid, session.when.strftime("%Y%m%d"), machine,
                    dcm_plans.get(plan_uid)), at)
            return found[(plan_uid, machine)][0]

        for i, beam in enumerate(s.beams):
            at = when + timedelta(minutes=5 * i)
            old = s.old_version_beam == beam.number and (s.plan_uid, beam.number) in old_fields
            fld = old_fields[(s.plan_uid, beam.number)] if old else fields[(s.plan_uid, beam.number)]
            planned = beam.meterset + 5.0 if old else beam.meterset
            plan_of_beam = preliminary_plan if old else s.plan_uid
            fx = s.fraction if write_fraction else plan_ordinal[(id(s), plan_of_beam)]
            expected = record_for(plan_of_beam, s.used_machine, at)

            def item(mu: float, kind: str, term: int, dhs: int) -> None:
                _expect(expected, ExpectedBeam(beam.number, fx, mu, kind, _TERMINATION[term],  # noqa: B023
                                               _VERIFY[_verify_enum(dhs)]), dhs)

            if s.partial == "operator" and i == 0:
                first_mu = round(planned * 0.4, 1)
                item(first_mu, "TREATMENT", 2, deliver(s, fld, at, first_mu, fraction=fraction, termination=2,
                                                       partially=True))
                rest = round(planned - first_mu, 1)
                item(rest, "CONTINUATION", 1, deliver(s, fld, at + timedelta(minutes=2), rest, fraction=fraction))
            elif s.partial == "resumed" and i == len(s.beams) - 1:
                # Stopped by the machine; the remainder 40 minutes later on the other linac: one fraction in two
                # records, the second CONTINUATION with the same fraction number.
                first_mu = round(planned * 0.4, 1)
                item(first_mu, "TREATMENT", 3, deliver(s, fld, at, first_mu, fraction=fraction, termination=3,
                                                       partially=True))
                other, later = _OTHER_LINAC[s.used_machine], at + timedelta(minutes=40)
                rest = round(planned - first_mu, 1)
                dhs = deliver(s, fld, later, rest, fraction=fraction, machine=other)
                _expect(record_for(plan_of_beam, other, later),
                        ExpectedBeam(beam.number, fx, rest, "CONTINUATION", "NORMAL", _VERIFY[_verify_enum(dhs)]), dhs)
            elif s.partial == "machine" and i == len(s.beams) - 1:
                half = round(planned * 0.5, 1)
                item(half, "TREATMENT", 3, deliver(s, fld, at, half, fraction=fraction, termination=3,
                                                   partially=True))
            else:
                item(planned, "TREATMENT", 1, deliver(s, fld, at, planned, fraction=fraction))
        if s is history[-1] and manual_field is None:
            manual_field = add_field(s.patient_id, s.plan_uid, site_set, _Beam(7, "E_BOOST", 120.0, 0.0, False),
                                     s.machine, imported=False)
            skipped["no-plan-uid"].append(deliver(s, manual_field, when + timedelta(minutes=5 * len(s.beams)), 120.0,
                                                  fraction=fraction))
        for (plan_uid, _machine), (expected, started) in sorted(session_records.items(), key=lambda e: e[1][1]):
            records.append(expected)
            placeholder = f"mosaiq-record:{len(records) - 1}"
            new_records[placeholder] = KRecord(placeholder, s.patient_id, plan_uid, expected.treatment_date,
                                               started.strftime("%H%M%S"))
        for uid in (s.uid, *s.other_uids):
            (root / dicom_truth.objects[uid].path).unlink()

    w.save(root / DATABASE)

    # --- traps and ground truth ------------------------------------------------------------------------
    def trap(kind: str, course: Sequence[_Session], text: str) -> None:
        traps.append(Trap(kind, course[0].patient_id, tuple(sorted({c.plan_uid for c in course})), text))

    traps.append(Trap("history_version", history[0].patient_id, (preliminary_plan, history[0].plan_uid),
                      "first two fractions of one field delivered from its history version, whose "
                      "OriginalPlanUID (the first UID) and meterset differ from the current version's"))
    trap("qa_mode", history[:1], "QA-mode dry run the day before the first fraction")
    trap("setup_field", sessions[:1], "kV setup field delivered before each session")
    trap("imaging_field", [port_session], "a Port field (Type_Enum 6) with the plan's UID delivered before a session")
    trap("padded_leaf_blob", sessions[:1], f"leaf blobs of {_BLOB_VALUES} values, MLC_Leaves {_LEAVES}")
    trap("partial_treatment", partial, "operator interruption completed by a continuation; machine stop not completed")
    trap("machine_change", change, "second half of the course delivered on the other linac")
    resumed = [s for s in partial[:1] if s.partial == "resumed"]
    if resumed:
        trap("resumed_elsewhere", resumed, "a beam stopped by the machine, its remainder given on the other linac")
    trap("midnight_session", midnight[1:2], "a session from 23:52 past midnight: one record, dated by its start")
    trap("not_imported_field", history[-1:], "a manual field without OriginalPlanUID delivered once")
    trap("padded_plan_uid", sessions[:1], "every OriginalPlanUID is space padded to 64 characters")
    if two_plans is not None:
        trap("two_plans_one_site", list(two_plans), "first fraction of a re-plan in the last session of the first plan")
    trap("no_dcm_rows", [s for s in sessions if s.patient_id == no_dcm_patient], "plans unknown to the DCM tables")

    # The harvest over the auxiliary PACS: same rules, with the converted records in place of the old ones.
    converted = {uid for s in sessions for uid in (s.uid, *s.other_uids)}
    knowledge = replace(k, present=(k.present - converted) | set(new_records),
                        records={**{u: r for u, r in k.records.items() if u not in converted}, **new_records})
    windows: list[MosaiqWindow] = []
    dates = sorted(r.date for r in knowledge.records.values())
    every = set(knowledge.present)
    for original in dicom_truth.windows:
        lo, hi = original.date_from, original.date_to
        if original.name == "all":
            lo, hi = dates[0], dates[-1]
        result = evaluate(knowledge, lo, hi, original.patient_ids)
        expected_set = result.expected & every
        windows.append(MosaiqWindow(
            name=original.name, date_from=lo, date_to=hi, patient_ids=original.patient_ids,
            expected=sorted(u for u in expected_set if u not in new_records),
            forbidden=sorted(u for u in every - expected_set if u not in new_records),
            expected_records=sorted(int(u.split(":")[1]) for u in expected_set if u in new_records),
        ))
    first_day = min(s.when for s in sessions).date() - timedelta(days=1)
    last_day = max(s.when for s in sessions).date() + timedelta(days=1)
    truth = MosaiqTruth(root / DATABASE, dicom_truth, records, skipped, windows, traps,
                        first_day.strftime("%Y%m%d"), last_day.strftime("%Y%m%d"))
    (root / TRUTH).write_text(truth.to_json(), encoding="utf-8")
    return truth
