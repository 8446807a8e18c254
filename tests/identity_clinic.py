"""A small clinic of identity traps, written with the synthetic clinic's IOD builders (``rtharvest.synth.iods``).

Every chain is linked by UIDs the way DICOM links it; only the PatientIDs lie:

* patient ``IDT-A`` (Trap^Alpha): its plan's structure set, one of its doses and one of its treatment records
  carry ``IDT-A-RE`` (a vendor export re-identified after planning), in the plan's study;
* ``IDT-S`` is one PatientID used by two differently named patients (Trap^Beta, Trap^Gamma), each with its own
  study, CT, structure set, plan, dose and record;
* a dose of Trap^Gamma's plan has no PatientID at all.

All treatment dates lie in March 1999, a month the synthetic clinic never uses. Images are 16×16, three slices.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pydicom.dataset import Dataset

from rtharvest.core.sopclass import SopClass
from rtharvest.synth import iods
from rtharvest.synth.iods import Beam, DoseSpec, ImageGeometry, ImageRef, Patient, PlanSpec, Roi, Series, Study

WINDOW_FROM, WINDOW_TO = "19990301", "19990331"


@dataclass
class IdentityClinic:
    """The files written and what a harvest of the window must collect and report."""

    files: list[Path] = field(default_factory=list)
    #: Every SOP Instance UID of the clinic (all of it belongs to some treated plan).
    expected: set[str] = field(default_factory=set)
    #: Plan UID -> UIDs of the row's objects whose PatientID is not the plan's.
    mismatched: dict[str, set[str]] = field(default_factory=dict)


def _uid(*parts: object) -> str:
    return iods.make_uid("identity-clinic", *parts)


class _Writer:
    def __init__(self, out: Path, clinic: IdentityClinic) -> None:
        self.out = out
        self.clinic = clinic

    def write(self, ds: Dataset, patient_id: str | None = None) -> str:
        if patient_id is not None:  # the lie: a PatientID other than the patient module's, or none
            ds.PatientID = patient_id
        path = self.out / f"{ds.SOPInstanceUID}.dcm"
        path.write_bytes(iods.encode(ds))
        self.clinic.files.append(path)
        self.clinic.expected.add(str(ds.SOPInstanceUID))
        return str(ds.SOPInstanceUID)


def _chain(w: _Writer, key: str, patient: Patient, day: str, *, ss_pid: str | None = None,
           dose_pids: tuple[str | None, ...] = (None,), record_pids: tuple[str | None, ...] = (None,)) -> str:
    """CT (3 slices), structure set, plan, doses and records of one patient in one study; ``*_pid`` override
    the PatientID of that object (``""``: none). Returns the plan UID and notes its mismatched objects."""
    study = Study(_uid(key, "study"), day, "090000", "RT planning", key, key)
    ct_series = Series(_uid(key, "ct"), 1, "CT", "planning CT", day, "090000")
    for_uid = _uid(key, "for")
    geometry = ImageGeometry(rows=16, spacing=2.0, slices=3, thickness=3.0, z0=0.0)
    images: list[ImageRef] = []
    for i in range(geometry.slices):
        ds = iods.image("CT", _uid(key, "ct", i), patient, study, ct_series, for_uid, geometry, i,
                        acquisition_time="090000")
        w.write(ds)
        images.append(ImageRef(SopClass.CT_IMAGE.value, str(ds.SOPInstanceUID), ct_series.uid, study.uid, for_uid,
                               i * 3.0))
    mismatched: set[str] = set()
    ss = iods.structure_set(_uid(key, "ss"), patient, study, Series(_uid(key, "ss-s"), 2, "RTSTRUCT", "ss", day,
                                                                    "100000"),
                            label="SS", date=day, time="100000", images=images, centre=geometry.centre,
                            rois=[Roi(1, "BODY", "EXTERNAL", 10.0, (0, 1, 2), (255, 0, 0))])
    ss_uid = w.write(ss, ss_pid)
    if ss_pid is not None:
        mismatched.add(ss_uid)
    spec = PlanSpec(label="PLAN", intent="CURATIVE", fractions=2, beams=(Beam(1, "B1", 0.0, 100.0),),
                    machine="LINAC1", structure_set_uid=ss_uid)
    plan_uid = w.write(iods.plan(_uid(key, "plan"), patient, study, Series(_uid(key, "plan-s"), 3, "RTPLAN", "plan",
                                                                           day, "110000"),
                                 spec=spec, date=day, time="110000"))
    for n, pid in enumerate(dose_pids):
        dose = iods.dose(_uid(key, "dose", n), patient, study, Series(_uid(key, "dose-s", n), 4 + n, "RTDOSE", "dose",
                                                                      day, "120000"),
                         spec=DoseSpec(plan_uid, SopClass.RT_PLAN.value, "PLAN"), for_uid=for_uid,
                         origin=(0.0, 0.0, 0.0), instance_number=1, date=day, time="120000")
        uid = w.write(dose, pid)
        if pid is not None:
            mismatched.add(uid)
    for n, pid in enumerate(record_pids):
        treated = f"{day[:6]}{15 + n:02d}"
        record = iods.treatment_record(_uid(key, "record", n), patient, study,
                                       Series(_uid(key, "record-s", n), 10 + n, "RTRECORD", "record", treated,
                                              "130000"),
                                       plan_uid=plan_uid, plan_class=SopClass.RT_PLAN.value, spec=spec,
                                       fraction=n + 1, date=treated, time="130000")
        uid = w.write(record, pid)
        if pid is not None:
            mismatched.add(uid)
    w.clinic.mismatched[plan_uid] = mismatched
    return plan_uid


def build(out: Path) -> IdentityClinic:
    """Write the clinic's files into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    clinic = IdentityClinic()
    w = _Writer(out, clinic)
    alpha = Patient("IDT-A", "Trap^Alpha", "19500101", "F")
    _chain(w, "alpha", alpha, "19990310", ss_pid="IDT-A-RE", dose_pids=(None, "IDT-A-RE"),
           record_pids=(None, "IDT-A-RE"))
    beta = Patient("IDT-S", "Trap^Beta", "19600202", "M")
    gamma = Patient("IDT-S", "Trap^Gamma", "19700303", "O")
    _chain(w, "beta", beta, "19990305")
    _chain(w, "gamma", gamma, "19990306", dose_pids=(None, ""))
    return clinic
