"""Generate a synthetic radiotherapy clinic (DICOM Part-10 files) together with its ground truth.

``generate(out_dir, SynthOptions(...))`` writes every object under ``out_dir/dicom/<PatientID>/
<SeriesInstanceUID>/<SOPInstanceUID>.dcm`` and ``out_dir/ground_truth.json``. The output depends on the
options only: every UID is a name-based UUID derived from the seed, every date comes from the seeded
random generator, nothing reads the clock, so the same options give byte-identical files.

Per RT patient (``SYNnnn``), varied by the seed:

* a planning study with the planning CT (or, for MR-sim patients, a planning MR), an RTSTRUCT
  referencing every slice (ReferencedFrameOfReferenceSequence → RTReferencedStudy/Series →
  ContourImageSequence, and per-contour ContourImageSequence), the treated RT Plan / RT Ion Plan, its
  PLAN-sum RTDOSE and per-BEAM RTDOSEs, and the REGs (rigid Spatial Registration: identity item for the
  planning FoR + matrix item for the moving FoR; Deformable Spatial Registration for some);
* diagnostic studies: an MR registered to the planning CT (CT-MR), or for MR-sim patients a diagnostic
  CT registered to the planning MR (MR-CT); for some a PET/CT whose CT is registered (CT-CT) and whose
  PET shares the CT's FoR without a REG of its own; for some a PET/CT whose PET is registered (CT-PT);
  for some a PET sharing the planning CT's FoR (PET/CT simulation, harvest step 8);
* one RT Beams (or Ion Beams) Treatment Record per delivered fraction, each in its own study and
  series, on consecutive weekdays of a course placed between 2012 and 2022 (except where a trap below
  writes a fraction as several records).

With traps, one HDR brachytherapy course is added to the patient whose course the window ``year`` cuts
(see the ``hdr_brachy_course`` trap).

Traps (each listed in ground truth ``Traps`` with its ``Kind``; features are dealt round-robin over the
patients, so a clinic of fewer than ~5 patients stacks several on one patient and may lose the
ion/TomoTherapy distinction):

``trial_plan``
    A plan that was never treated (no record), with its own PLAN dose, in the treated plan's study.
    Neither the plan nor its dose may be collected.
``foreign_dose_in_study``
    That trial dose: an RTDOSE in the treated plan's study that references another plan.
``qa_verification_plan``
    Patient ``QA_PHANTOM``: a VERIFICATION plan on a phantom CT/RTSTRUCT, pointing at the patient plan
    it verifies (RTPlanRelationship VERIFIED_PLAN), delivered once (a record exists). Collected with its
    in-window record, status Invalid, and nothing else (no phantom images, no other records).
``qa_machine_plan``
    A MACHINE_QA plan of ``QA_PHANTOM`` without structure set, delivered about yearly 2012–2022.
``records_outside_window``
    In the one-year window, records before/after the window whose plan an in-window record references:
    collected through step 4. Records of plans no in-window record references are Forbidden.
``missing_plan``
    Records of an earlier/later course referencing an RT Plan that does not exist at the source: the
    records are collected, the plan row has status Missing. The plan UID is a dangling reference.
``replan``
    Mid-course re-plan: a second treated plan on a new CT (new study, new FoR) with a new RTSTRUCT,
    registered rigidly to the first planning images (CT-CT / CT-MR).
``tomotherapy``
    TomoTherapy-style plan: no ReferencedStructureSetSequence in the plan (RTPlanGeometry
    TREATMENT_DEVICE to stay conformant); its RTDOSE names the RTSTRUCT (RT DVH module).
``unrelated_scan``
    A CT and an MR of the RT patient in their own FoRs, registered to nothing: never collected.
``unrelated_patient``
    Patient ``SYN_NORT`` with diagnostic CT and MR only, sharing nothing with anyone: never collected.
``empty_first_roi``
    An RTSTRUCT whose first ROI has no contours (the planning series is that of the first contour of the
    first ROI that has contours).
``dangling_structure_set``
    A treated boost plan whose ReferencedStructureSetSequence names an RTSTRUCT absent from the source:
    status Incomplete, ``Missing`` names the RTSTRUCT; plan, dose and records are still collected.
``record_per_beam``
    That boost's machine writes one treatment record per beam: several records per fraction, each one
    fraction (``Records`` > ``Fractions``).
``fraction_in_two_parts``
    The ion course's second fraction is interrupted: a TREATMENT record (TreatmentTerminationStatus
    MACHINE) with the first beam(s), then a CONTINUATION record with the others; one fraction.
``hdr_brachy_course``
    An HDR course (RT Plan with brachy application setups, 4 fractions planned): three RT Brachy
    Treatment Records, the last one after the window ``year`` (collected through step 4), and an RT
    Treatment Summary Record. Fractions 3 of 4; the plan references the patient's planning RTSTRUCT.
``summary_record``
    That course's RT Treatment Summary Record: collected and listed (``SummaryRecordUIDs``), never a
    fraction and never counted in ``TreatmentRecords``.

Roles (``Objects[uid]["Role"]``) say what the object was built as; whether a window collects it is
given by that window's ``Expected``/``Forbidden`` (computed by :mod:`rtharvest.synth.truth` from the
generator's own facts, following docs/harvest-rules.md).
"""

from __future__ import annotations

import json
import math
import random
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import date, timedelta
from pathlib import Path

from pydicom import Dataset

from rtharvest.core.sopclass import SopClass
from rtharvest.synth import iods
from rtharvest.synth.groundtruth import DanglingReference, GroundTruth, ObjectInfo, Trap, Window
from rtharvest.synth.iods import Beam, DoseSpec, ImageGeometry, ImageRef, Patient, PlanSpec, Roi, Series, Study
from rtharvest.synth.truth import (
    KDose,
    Knowledge,
    KPlan,
    KRecord,
    KRegistration,
    KSeries,
    KStructureSet,
    evaluate,
)

GENERATOR_VERSION = "1.0"

#: Patient features in the order they are dealt round-robin; ``True`` marks a trap.
FEATURES: tuple[tuple[str, bool], ...] = (
    ("trial_plan", True),
    ("replan", True),
    ("tomotherapy", True),
    ("mr_sim", False),
    ("ion", False),
    ("missing_plan", True),
    ("deformable", False),
    ("pet_planning_for", False),
    ("petct_registered", False),
    ("reg_to_pet", False),
    ("unrelated_scan", True),
    ("dangling_structure_set", True),
    ("empty_first_roi", True),
)

PHANTOM_ID = "QA_PHANTOM"
NON_RT_ID = "SYN_NORT"
_FIRST_DAY = date(2012, 1, 9)
# Courses start by this date so that re-plans, boosts and the odd extra course stay within 2022.
_LAST_START = date(2022, 6, 30)
_SITES = (
    ("PROSTATE", "Prostate"),
    ("HN", "Head and neck"),
    ("LUNG_R", "Right lung"),
    ("BRAIN", "Brain"),
    ("BREAST_L", "Left breast"),
    ("RECTUM", "Rectum"),
    ("PANCREAS", "Pancreas"),
    ("CERVIX", "Cervix"),
)
_SURNAMES = ("ALPHA", "BRAVO", "CHARLIE", "DELTA", "ECHO", "FOXTROT", "GOLF", "HOTEL", "INDIA", "JULIET")


@dataclass(frozen=True)
class SynthOptions:
    """What to generate: number of RT patients, seed, and image size (rows = columns = ``matrix``)."""

    patients: int = 6
    seed: int = 7
    ct_slices: int = 8
    matrix: int = 32
    include_traps: bool = True
    #: Records of a course share one study dated at its simulation, 7-19 days before the first fraction
    #: (ARIA-like), instead of one study per fraction dated on the fraction's day (deliveries spread over
    #: more than half a year, such as machine QA, keep one study each). Adds the window
    #: ``course_cut`` (see :meth:`_Clinic.windows`).
    course_record_study: bool = False
    #: Metadata-light history patients (``HISnnnn``) added to the RT patients: one course each (an RT Plan
    #: without structure set or dose and 3-5 treatment records), spread evenly over 2012-2022. For
    #: discovery benchmarks: a clinic with years of records whose window cost must not grow with them.
    history_patients: int = 0
    #: Further windows ``(name, From, To)`` whose ground truth is computed along with the built-in ones.
    windows: tuple[tuple[str, str, str], ...] = ()


def _d(day: date) -> str:
    return day.strftime("%Y%m%d")


def _weekday(day: date) -> date:
    while day.weekday() >= 5:
        day += timedelta(days=1)
    return day


def _weekdays(start: date, count: int) -> list[date]:
    out: list[date] = []
    day = _weekday(start)
    while len(out) < count:
        out.append(day)
        day = _weekday(day + timedelta(days=1))
    return out


def _time(minutes: int, seconds: int = 0) -> str:
    minutes = max(0, min(minutes, 23 * 60 + 59))
    return f"{minutes // 60:02d}{minutes % 60:02d}{seconds:02d}"


@dataclass
class _PatientCtx:
    index: int
    patient: Patient
    rng: random.Random
    features: frozenset[str]
    site: tuple[str, str]
    series_number: int = 0
    study_number: int = 0

    @property
    def pid(self) -> str:
        return self.patient.patient_id


@dataclass
class _Pending:
    ds_info: ObjectInfo
    traps: list[str] = field(default_factory=list)


@dataclass
class _Course:
    """A treated plan as built: what records need, and what the window choice looks at."""

    plan_uid: str
    plan_class: str
    spec: PlanSpec
    patient: _PatientCtx
    record_dates: list[str] = field(default_factory=list)
    #: StudyDate of the course's record study (``course_record_study``), else None.
    record_study_date: str | None = None


class _Clinic:
    def __init__(self, root: Path, options: SynthOptions) -> None:
        self.root = root
        self.opt = options
        self.k = Knowledge()
        self.pending: dict[str, _Pending] = {}
        self.traps: list[Trap] = []
        self.dangling: list[DanglingReference] = []
        self.courses: list[_Course] = []

    # ---------------------------------------------------------------------------------------------
    # plumbing

    def uid(self, *parts: object) -> str:
        return iods.make_uid("rtharvest-synth", self.opt.seed, *parts)

    def write(self, ds: Dataset, role: str, traps: Iterable[str] = ()) -> str:
        data = iods.encode(ds)
        uid = str(ds.SOPInstanceUID)
        rel = f"dicom/{ds.PatientID}/{ds.SeriesInstanceUID}/{uid}.dcm"
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        for_uid = ds.get("FrameOfReferenceUID")
        info = ObjectInfo(
            patient_id=str(ds.PatientID),
            study_uid=str(ds.StudyInstanceUID),
            series_uid=str(ds.SeriesInstanceUID),
            sop_class_uid=str(ds.SOPClassUID),
            modality=str(ds.Modality),
            for_uid=str(for_uid) if for_uid else None,
            path=rel,
            size=len(data),
            role=role,
        )
        self.pending[uid] = _Pending(info, list(traps))
        self.k.present.add(uid)
        return uid

    def flag(self, kind: str, patient_id: str, uids: Sequence[str], description: str) -> None:
        self.traps.append(Trap(kind, patient_id, tuple(uids), description))
        for uid in uids:
            pending = self.pending.get(uid)
            if pending is not None and kind not in pending.traps:
                pending.traps.append(kind)

    def study(self, ctx: _PatientCtx, day: date, minutes: int, description: str) -> Study:
        ctx.study_number += 1
        n = ctx.study_number
        return Study(
            uid=self.uid(ctx.pid, "study", n),
            date=_d(day),
            time=_time(minutes),
            description=description,
            study_id=str(n),
            accession=f"{ctx.pid[-3:]}{n:04d}",
        )

    def series(self, ctx: _PatientCtx, study: Study, modality: str, description: str) -> Series:
        ctx.series_number += 1
        n = ctx.series_number
        return Series(self.uid(ctx.pid, "series", n), n, modality, description, study.date, study.time)

    # ---------------------------------------------------------------------------------------------
    # builders

    def geometry(self, modality: str) -> ImageGeometry:
        m = self.opt.matrix
        rows, fov, thickness = {
            "CT": (m, 500.0, 3.0),
            "MR": (max(16, m // 2), 400.0, 4.0),
            "PT": (max(16, m // 4), 600.0, 4.0),
        }[modality]
        spacing = fov / rows
        slices = self.opt.ct_slices
        half = (rows - 1) * spacing / 2.0
        return ImageGeometry(
            rows=rows,
            spacing=spacing,
            slices=slices,
            thickness=thickness,
            z0=-(slices - 1) * thickness / 2.0,
            origin_xy=(-half, -half),
        )

    def images(
        self,
        ctx: _PatientCtx,
        study: Study,
        modality: str,
        for_uid: str,
        description: str,
        role: str,
        traps: Iterable[str] = (),
    ) -> list[ImageRef]:
        series = self.series(ctx, study, modality, description)
        geometry = self.geometry(modality)
        refs: list[ImageRef] = []
        kseries = KSeries(series.uid, ctx.pid, modality, for_uid, study.uid)
        trap_list = list(traps)
        for index in range(geometry.slices):
            sop_uid = self.uid(series.uid, "image", index)
            ds = iods.image(
                modality,
                sop_uid,
                ctx.patient,
                study,
                series,
                for_uid,
                geometry,
                index,
                acquisition_time=study.time,
            )
            self.write(ds, role, trap_list)
            refs.append(
                ImageRef(str(ds.SOPClassUID), sop_uid, series.uid, study.uid, for_uid, geometry.position(index)[2])
            )
            kseries.instance_uids.append(sop_uid)
        self.k.series[series.uid] = kseries
        return refs

    def structure_set(
        self, ctx: _PatientCtx, study: Study, images: Sequence[ImageRef], label: str, empty_first: bool
    ) -> str:
        rng = ctx.rng
        n = len(images)
        mid = n // 2
        target = tuple(range(max(0, mid - 2), min(n, mid + 2)))
        everywhere = tuple(range(n))
        specs: list[tuple[str, str, float, tuple[int, ...]]] = []
        if empty_first:
            # A leftover target of an earlier plan: defined, never drawn.
            specs.append(("PTV_old", "PTV", 25.0, ()))
        specs += [
            ("External", "EXTERNAL", 140.0, everywhere),
            ("PTV", "PTV", 30.0, target),
            ("CTV", "CTV", 20.0, target),
            ("SpinalCord", "ORGAN", 8.0, everywhere),
        ]
        if rng.random() < 0.5:
            specs.append(("Bowel", "ORGAN", 40.0, ()))  # an empty ROI that is not the first one
        palette = ((255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255))
        rois = [
            Roi(i + 1, name, kind, radius, slices, palette[i % len(palette)])
            for i, (name, kind, radius, slices) in enumerate(specs)
        ]
        series = self.series(ctx, study, "RTSTRUCT", f"Structures {label}")
        sop_uid = self.uid(series.uid, "rtstruct")
        ds = iods.structure_set(
            sop_uid,
            ctx.patient,
            study,
            series,
            label=label,
            date=study.date,
            time=study.time,
            images=images,
            centre=(0.0, 0.0),
            rois=rois,
        )
        self.write(ds, "structure_set", ["empty_first_roi"] if empty_first else [])
        planning_series = images[0].series_uid
        self.k.structure_sets[sop_uid] = KStructureSet(sop_uid, ctx.pid, (planning_series,), planning_series)
        return sop_uid

    def plan(
        self,
        ctx: _PatientCtx,
        study: Study,
        spec: PlanSpec,
        role: str,
        day: date,
        traps: Iterable[str] = (),
    ) -> tuple[str, str]:
        series = self.series(ctx, study, "RTPLAN", f"Plan {spec.label}")
        sop_uid = self.uid(series.uid, "rtplan")
        ds = iods.plan(sop_uid, ctx.patient, study, series, spec=spec, date=_d(day), time=study.time)
        trap_list = list(traps)
        self.write(ds, role, trap_list)
        self.k.plans[sop_uid] = KPlan(sop_uid, ctx.pid, spec.label, spec.intent, study.uid, spec.structure_set_uid,
                                      spec.fractions)
        self.k.plan_traps[sop_uid] = trap_list
        return sop_uid, str(ds.SOPClassUID)

    def doses(
        self,
        ctx: _PatientCtx,
        study: Study,
        plan_uid: str,
        plan_class: str,
        spec: PlanSpec,
        for_uid: str,
        z0: float,
        day: date,
        role: str,
        per_beam: bool,
        traps: Iterable[str] = (),
    ) -> list[str]:
        series = self.series(ctx, study, "RTDOSE", f"Dose {spec.label}")
        total = spec.dose_per_fraction * spec.fractions
        dose_specs = [
            DoseSpec(
                plan_uid,
                plan_class,
                "PLAN",
                structure_set_uid=spec.structure_set_uid if spec.tomo else None,
                dvh_roi=2,
                max_dose=total * 1.05,
            )
        ]
        if per_beam:
            dose_specs += [
                DoseSpec(plan_uid, plan_class, "BEAM", beam_number=b.number, max_dose=total / len(spec.beams))
                for b in spec.beams
            ]
        uids: list[str] = []
        for number, dspec in enumerate(dose_specs, start=1):
            sop_uid = self.uid(series.uid, "rtdose", number)
            ds = iods.dose(
                sop_uid,
                ctx.patient,
                study,
                series,
                spec=dspec,
                for_uid=for_uid,
                origin=(-14.0, -14.0, z0),
                instance_number=number,
                date=_d(day),
                time=study.time,
            )
            self.write(ds, role, list(traps))
            self.k.doses[sop_uid] = KDose(sop_uid, ctx.pid, plan_uid, study.uid, dspec.structure_set_uid)
            uids.append(sop_uid)
        return uids

    def records(
        self,
        ctx: _PatientCtx,
        plan_uid: str,
        plan_class: str,
        spec: PlanSpec,
        days: Sequence[date],
        first_fraction: int,
        role: str,
        traps: Iterable[str] = (),
        tag: str = "",
        per_beam: bool = False,
        split: int | None = None,
    ) -> list[str]:
        """One record per delivered fraction on ``days`` (numbered from ``first_fraction``); ``per_beam``:
        the machine writes one record per beam instead; ``split``: the fraction at that offset is delivered
        in two parts (TREATMENT with the first beams, interrupted; CONTINUATION with the others 40 minutes
        later). Extra records keep the fraction's series; no extra random draw, so the rest of the clinic
        does not change with these options."""
        rng = ctx.rng
        base_minutes = rng.randint(8 * 60, 17 * 60)
        uids: list[str] = []
        course_study: Study | None = None
        study_day = self.record_study_day(days)
        if study_day is not None:
            course_study = Study(uid=self.uid(ctx.pid, "record-study", plan_uid, tag), date=study_day,
                                 time="080000", description="Treatment records", study_id=f"T{first_fraction}",
                                 accession="")
        for offset, day in enumerate(days):
            fraction = first_fraction + offset
            minutes = base_minutes + rng.randint(-25, 25)
            when = _time(minutes, rng.randint(0, 59))
            study = course_study or Study(
                uid=self.uid(ctx.pid, "record-study", plan_uid, tag, fraction),
                date=_d(day),
                time=when,
                description="Treatment record",
                study_id=f"T{fraction}",
                accession="",
            )
            series = Series(
                self.uid(ctx.pid, "record-series", plan_uid, tag, fraction),
                fraction if course_study else 1,
                "RTRECORD",
                f"Fraction {fraction}",
                _d(day),
                when,
            )
            # (beams, TreatmentDeliveryType, TreatmentTerminationStatus, minutes after the session start)
            parts: list[tuple[tuple[Beam, ...] | None, str, str, int]] = [(None, "TREATMENT", "NORMAL", 0)]
            if per_beam:
                parts = [((beam,), "TREATMENT", "NORMAL", 3 * i) for i, beam in enumerate(spec.beams)]
            elif split == offset and len(spec.beams) > 1:
                half = len(spec.beams) // 2
                parts = [(spec.beams[:half], "TREATMENT", "MACHINE", 0),
                         (spec.beams[half:], "CONTINUATION", "NORMAL", 40)]
            for part, (beams, delivery_type, termination, later) in enumerate(parts):
                sop_uid = self.uid(series.uid, "rtrecord", *([part] if part else []))
                part_when = when if not later else _time(minutes + later, int(when[4:]))
                ds = iods.treatment_record(
                    sop_uid,
                    ctx.patient,
                    study,
                    series,
                    plan_uid=plan_uid,
                    plan_class=plan_class,
                    spec=spec,
                    fraction=fraction,
                    date=_d(day),
                    time=part_when,
                    beams=beams,
                    delivery_type=delivery_type,
                    termination=termination,
                    instance_number=fraction if not part else 100 * fraction + part,
                )
                self.write(ds, role, list(traps))
                self.k.records[sop_uid] = KRecord(sop_uid, ctx.pid, plan_uid, _d(day), part_when, fraction=fraction)
                uids.append(sop_uid)
        return uids

    def history_patient(self, index: int) -> None:
        """One metadata-light patient: a plan in a planning study and a few treatment records."""
        opt = self.opt
        rng = random.Random(f"rtharvest-synth/{opt.seed}/history/{index}")
        pid = f"HIS{index + 1:04d}"
        patient = Patient(pid, f"HISTORY^{_SURNAMES[index % len(_SURNAMES)]}{index}",
                          f"{rng.randint(1935, 1975)}{rng.randint(1, 12):02d}{rng.randint(1, 28):02d}",
                          rng.choice("MF"))
        ctx = _PatientCtx(10_000 + index, patient, rng, frozenset(), _SITES[rng.randrange(len(_SITES))])
        span = (_LAST_START - _FIRST_DAY).days
        start = _weekday(_FIRST_DAY + timedelta(days=int(span * (index + rng.uniform(0.1, 0.9))
                                                          / opt.history_patients)))
        pstudy = self.study(ctx, start - timedelta(days=rng.randint(5, 15)), 600, "RT planning")
        spec = PlanSpec(label=f"{ctx.site[0]}_H", intent="CURATIVE", fractions=rng.randint(3, 5),
                        beams=self.beams(rng, "photon"), machine="LINAC1", ion=False, tomo=False,
                        structure_set_uid=None, geometry="TREATMENT_DEVICE", for_uid=self.uid(pid, "for", "history"),
                        dose_per_fraction=2.0)
        plan_uid, plan_class = self.plan(ctx, pstudy, spec, "plan", start - timedelta(days=2))
        days = _weekdays(start, spec.fractions)
        self.records(ctx, plan_uid, plan_class, spec, days, 1, "record")
        self.courses.append(_Course(plan_uid, plan_class, spec, ctx, [_d(d) for d in days],
                                    self.record_study_day(days)))

    def record_study_day(self, days: Sequence[date]) -> str | None:
        """StudyDate of a course's shared record study (``course_record_study``), else None."""
        if not self.opt.course_record_study or not days or (days[-1] - days[0]).days > 180:
            return None  # deliveries over years (machine QA) keep one study per delivery
        # No random draw: every other object stays identical whatever this option says.
        return _d(days[0] - timedelta(days=7 + (len(days) % 5) * 3))

    def registration(
        self,
        ctx: _PatientCtx,
        study: Study,
        fixed: Sequence[ImageRef],
        moving: Sequence[ImageRef],
        deformable: bool = False,
        traps: Iterable[str] = (),
    ) -> str:
        rng = ctx.rng
        series = self.series(ctx, study, "REG", "Deformable registration" if deformable else "Registration")
        sop_uid = self.uid(series.uid, "reg")
        angle = rng.uniform(-0.05, 0.05)
        c, s = _cos_sin(angle)
        matrix = (
            c, -s, 0.0, rng.uniform(-10, 10),
            s, c, 0.0, rng.uniform(-10, 10),
            0.0, 0.0, 1.0, rng.uniform(-20, 20),
            0.0, 0.0, 0.0, 1.0,
        )  # fmt: skip
        build = iods.deformable_registration if deformable else iods.rigid_registration
        ds = build(
            sop_uid,
            ctx.patient,
            study,
            series,
            fixed=fixed,
            moving=moving,
            matrix=matrix,
            date=study.date,
            time=study.time,
        )
        self.write(ds, "registration", list(traps))
        fixed_for, moving_for = fixed[0].for_uid, moving[0].for_uid
        item_fors = (moving_for,) if deformable else (fixed_for, moving_for)
        self.k.registrations[sop_uid] = KRegistration(
            sop_uid, ctx.pid, fixed_for, item_fors, (fixed[0].series_uid, moving[0].series_uid)
        )
        return sop_uid

    # ---------------------------------------------------------------------------------------------
    # patients

    def beams(self, rng: random.Random, kind: str) -> tuple[Beam, ...]:
        if kind == "tomo":
            return (Beam(1, "Helical", 0.0, round(rng.uniform(250, 400), 1)),)
        count = 2 if kind == "ion" else rng.randint(2, 4)
        start = rng.choice((0.0, 20.0, 45.0))
        return tuple(
            Beam(i + 1, f"B{i + 1}", (start + i * 360.0 / count) % 360.0, round(rng.uniform(60, 200), 1))
            for i in range(count)
        )

    def rt_patient(self, index: int, features: frozenset[str]) -> None:
        opt = self.opt
        rng = random.Random(f"rtharvest-synth/{opt.seed}/patient/{index}")
        pid = f"SYN{index + 1:03d}"
        patient = Patient(
            pid,
            f"SYNTH^{_SURNAMES[index % len(_SURNAMES)]}{index // len(_SURNAMES) or ''}",
            f"{rng.randint(1935, 1975)}{rng.randint(1, 12):02d}{rng.randint(1, 28):02d}",
            rng.choice("MF"),
        )
        ctx = _PatientCtx(index, patient, rng, features, _SITES[rng.randrange(len(_SITES))])
        span = (_LAST_START - _FIRST_DAY).days
        start = _weekday(_FIRST_DAY + timedelta(days=int(span * (index + rng.uniform(0.1, 0.9)) / opt.patients)))
        planning_day = start - timedelta(days=rng.randint(10, 20))
        f = features
        mr_sim = "mr_sim" in f
        kind = "tomo" if "tomotherapy" in f else "ion" if "ion" in f else "photon"

        # --- planning study: images, structure set -------------------------------------------------
        pstudy = self.study(ctx, planning_day, rng.randint(8 * 60, 16 * 60), "RT planning")
        planning_for = self.uid(pid, "for", "planning")
        planning_mod = "MR" if mr_sim else "CT"
        planning = self.images(
            ctx, pstudy, planning_mod, planning_for, "MR simulation" if mr_sim else "Planning CT", "planning_image"
        )
        if "pet_planning_for" in f:
            # PET/CT simulation: the PET shares the planning FoR and needs no REG (harvest step 8).
            self.images(ctx, pstudy, "PT", planning_for, "PET simulation", "planning_for_image")
        ss_uid = self.structure_set(ctx, pstudy, planning, f"{ctx.site[0]}_1", "empty_first_roi" in f)
        if "empty_first_roi" in f:
            self.flag("empty_first_roi", pid, [ss_uid], "first ROI of the structure set has no contours")

        # --- diagnostic studies and registrations ------------------------------------------------
        def diag(modality: str, description: str, role: str, days_before: int) -> tuple[Study, list[ImageRef]]:
            study = self.study(ctx, planning_day - timedelta(days=days_before), rng.randint(480, 960), description)
            refs = self.images(ctx, study, modality, self.uid(pid, "for", description), description, role)
            return study, refs

        if mr_sim:
            _, dct = diag("CT", "Diagnostic CT", "registered_image", rng.randint(5, 40))
            self.registration(ctx, pstudy, planning, dct)
            if "deformable" in f:
                self.registration(ctx, pstudy, planning, dct, deformable=True)
        elif "deformable" in f or rng.random() < 0.75:
            _, dmr = diag("MR", "Diagnostic MR", "registered_image", rng.randint(5, 40))
            self.registration(ctx, pstudy, planning, dmr)
            if "deformable" in f:
                self.registration(ctx, pstudy, planning, dmr, deformable=True)
        if "petct_registered" in f:
            study, pct = diag("CT", "PET-CT CT", "registered_image", rng.randint(20, 60))
            self.images(ctx, study, "PT", pct[0].for_uid, "PET-CT PET", "registered_for_image")
            self.registration(ctx, pstudy, planning, pct)
        if "reg_to_pet" in f:
            study, staging_ct = diag("CT", "Staging PET-CT CT", "registered_for_image", rng.randint(20, 60))
            pet_for = staging_ct[0].for_uid
            pet = self.images(ctx, study, "PT", pet_for, "Staging PET-CT PET", "registered_image")
            self.registration(ctx, pstudy, planning, pet)
        if "unrelated_scan" in f:
            old = self.study(ctx, planning_day - timedelta(days=rng.randint(300, 900)), 600, "Knee CT")
            ct = self.images(ctx, old, "CT", self.uid(pid, "for", "knee"), "Knee CT", "unrelated")
            mr = self.study(ctx, planning_day + timedelta(days=rng.randint(200, 400)), 660, "Follow-up MR")
            fu = self.images(ctx, mr, "MR", self.uid(pid, "for", "follow-up"), "Follow-up MR", "unrelated")
            self.flag(
                "unrelated_scan",
                pid,
                [r.sop_uid for r in ct + fu],
                "scans of the RT patient in their own FoRs, registered to nothing: never collected",
            )

        # --- the treated plan --------------------------------------------------------------------
        fractions = rng.randint(5, 20)
        spec = PlanSpec(
            label=f"{ctx.site[0]}_1",
            # Every fourth patient is palliative so that PlansByIntent always has two kinds.
            intent="PALLIATIVE" if index % 4 == 1 else rng.choice(("CURATIVE", "CURATIVE", "PROPHYLACTIC")),
            fractions=fractions,
            beams=self.beams(rng, kind),
            machine={"tomo": "TOMO_HDA", "ion": "PBS_GANTRY1", "photon": rng.choice(("LINAC1", "LINAC2"))}[kind],
            ion=kind == "ion",
            tomo=kind == "tomo",
            structure_set_uid=ss_uid,
            geometry="TREATMENT_DEVICE" if kind == "tomo" else "PATIENT",
            for_uid=planning_for,
            dose_per_fraction=rng.choice((1.8, 2.0, 2.5, 3.0)),
        )
        plan_spec = replace(spec, structure_set_uid=None) if kind == "tomo" else spec
        plan_traps = ["tomotherapy"] if kind == "tomo" else []
        if "replan" in f:
            plan_traps.append("replan")
        plan_day = start - timedelta(days=rng.randint(2, 6))
        plan_uid, plan_class = self.plan(ctx, pstudy, plan_spec, "plan", plan_day, plan_traps)
        # The dose builder needs the structure set only for TomoTherapy, via the un-stripped spec.
        dose_uids = self.doses(
            ctx, pstudy, plan_uid, plan_class, spec, planning_for, planning[0].z, plan_day, "dose",
            per_beam=kind != "tomo", traps=["tomotherapy"] if kind == "tomo" else [],
        )  # fmt: skip
        if kind == "tomo":
            self.flag(
                "tomotherapy",
                pid,
                [plan_uid, dose_uids[0]],
                "plan without ReferencedStructureSetSequence; its RTDOSE names the RTSTRUCT",
            )
        delivered = fractions if "replan" not in f else max(2, fractions // 2)
        days = _weekdays(start, delivered)
        # The ion gantry interrupts the second fraction: a TREATMENT record, then a CONTINUATION record.
        split = 1 if opt.include_traps and kind == "ion" and len(days) > 1 and len(spec.beams) > 1 else None
        ruids = self.records(ctx, plan_uid, plan_class, spec, days, 1, "record", split=split)
        if split is not None:
            self.flag("fraction_in_two_parts", pid, ruids[1:3],
                      "one fraction written as two records: TREATMENT (interrupted) then CONTINUATION")
        self.courses.append(_Course(plan_uid, plan_class, spec, ctx, [_d(d) for d in days],
                                    self.record_study_day(days)))
        last_day = days[-1]

        if "trial_plan" in f:
            trial = replace(plan_spec, label=f"{ctx.site[0]}_TRIAL", beams=self.beams(rng, kind))
            trial_uid, trial_class = self.plan(ctx, pstudy, trial, "trial", plan_day - timedelta(days=1))
            trial_dose = self.doses(
                ctx, pstudy, trial_uid, trial_class, trial, planning_for, planning[0].z, plan_day, "trial",
                per_beam=False,
            )  # fmt: skip
            self.flag("trial_plan", pid, [trial_uid, *trial_dose], "plan never treated (no record), with its dose")
            self.flag(
                "foreign_dose_in_study",
                pid,
                trial_dose,
                f"RTDOSE in the study of plan {plan_uid} that references the trial plan {trial_uid}",
            )

        if "replan" in f:
            replan_day = last_day + timedelta(days=rng.randint(1, 3))
            rstudy = self.study(ctx, replan_day, rng.randint(480, 960), "RT re-planning")
            rfor = self.uid(pid, "for", "replan")
            rimages = self.images(ctx, rstudy, "CT", rfor, "Re-planning CT", "planning_image")
            rss = self.structure_set(ctx, rstudy, rimages, f"{ctx.site[0]}_2", False)
            rspec = replace(
                spec, label=f"{ctx.site[0]}_2", fractions=fractions - delivered, structure_set_uid=rss, for_uid=rfor
            )
            rplan_spec = replace(rspec, structure_set_uid=None) if kind == "tomo" else rspec
            rtraps = ["replan", "tomotherapy"] if kind == "tomo" else ["replan"]
            rplan_uid, rplan_class = self.plan(ctx, rstudy, rplan_spec, "plan", replan_day, rtraps)
            self.doses(
                ctx, rstudy, rplan_uid, rplan_class, rspec, rfor, rimages[0].z, replan_day, "dose", per_beam=False
            )
            # The new CT is registered to the first planning images (fixed: the new CT).
            reg_uid = self.registration(ctx, rstudy, rimages, planning)
            rdays = _weekdays(replan_day + timedelta(days=rng.randint(2, 4)), fractions - delivered)
            self.records(ctx, rplan_uid, rplan_class, rspec, rdays, delivered + 1, "record")
            self.courses.append(_Course(rplan_uid, rplan_class, rspec, ctx, [_d(d) for d in rdays],
                                        self.record_study_day(rdays)))
            self.flag(
                "replan",
                pid,
                [plan_uid, rplan_uid, rss, reg_uid],
                "mid-course re-plan: second treated plan with a new RTSTRUCT on a new CT (new FoR)",
            )
            last_day = rdays[-1]

        if "dangling_structure_set" in f:
            boost_day = last_day + timedelta(days=rng.randint(3, 10))
            bstudy = self.study(ctx, boost_day, rng.randint(480, 960), "RT boost")
            absent_ss = self.uid(pid, "deleted-structure-set")
            bspec = replace(
                spec,
                label="BOOST",
                fractions=rng.randint(3, 5),
                structure_set_uid=absent_ss,
                tomo=False,
                geometry="PATIENT",
                beams=self.beams(rng, "ion" if kind == "ion" else "photon"),
                machine="PBS_GANTRY1" if kind == "ion" else "LINAC1",
            )
            bplan_uid, bplan_class = self.plan(ctx, bstudy, bspec, "plan", boost_day, ["dangling_structure_set"])
            bdose = self.doses(
                ctx, bstudy, bplan_uid, bplan_class, bspec, planning_for, planning[0].z, boost_day, "dose",
                per_beam=False,
            )  # fmt: skip
            bdays = _weekdays(boost_day + timedelta(days=2), bspec.fractions)
            # The boost machine's record-and-verify system writes one record per beam.
            buids = self.records(ctx, bplan_uid, bplan_class, bspec, bdays, 1, "record", per_beam=True)
            self.flag("record_per_beam", pid, buids, "one treatment record per beam: several records per fraction")
            self.courses.append(_Course(bplan_uid, bplan_class, bspec, ctx, [_d(d) for d in bdays],
                                        self.record_study_day(bdays)))
            self.flag(
                "dangling_structure_set",
                pid,
                [bplan_uid, absent_ss, *bdose],
                "treated plan whose RTSTRUCT is absent from the source: status Incomplete",
            )
            self.dangling.append(DanglingReference(absent_ss, bplan_uid, "dangling_structure_set"))

        if "missing_plan" in f:
            gap = timedelta(days=rng.randint(300, 500))
            other_start = start + gap if start + gap < _LAST_START else start - gap
            absent_plan = self.uid(pid, "deleted-plan")
            mspec = replace(
                spec,
                label="OLD",
                fractions=rng.randint(3, 8),
                ion=False,
                tomo=False,
                beams=self.beams(rng, "photon"),
                machine="LINAC2",
            )
            mdays = _weekdays(other_start, mspec.fractions)
            muids = self.records(
                ctx, absent_plan, SopClass.RT_PLAN.value, mspec, mdays, 1, "record", ["missing_plan"], tag="old"
            )
            self.k.plan_traps[absent_plan] = ["missing_plan"]
            self.flag(
                "missing_plan",
                pid,
                [absent_plan, *muids],
                "treatment records referencing an RT Plan that does not exist at the source",
            )
            self.dangling += [DanglingReference(absent_plan, uid, "missing_plan") for uid in muids]

    def year_cut(self) -> _Course:
        """The course the window ``year`` starts in the middle of (see :meth:`windows`)."""
        return next((c for c in self.courses if len(c.record_dates) >= 4), self.courses[0])

    def brachy_course(self) -> None:
        """An HDR brachytherapy course (4 fractions planned, 3 delivered) for the patient whose course the
        window ``year`` cuts: RT Brachy Treatment Records, two at the end of that window and one after it,
        and an RT Treatment Summary Record after the third fraction (never a fraction)."""
        rng = random.Random(f"rtharvest-synth/{self.opt.seed}/brachy")
        cut = self.year_cut()
        ctx = cut.patient
        pid = ctx.pid
        first = cut.record_dates[len(cut.record_dates) // 2]
        year_to = date(int(first[:4]), int(first[4:6]), int(first[6:])) + timedelta(days=364)
        days = [_weekday(year_to - timedelta(days=15)), _weekday(year_to - timedelta(days=8)),
                _weekday(year_to + timedelta(days=6))]
        base = next((c for c in self.courses if c.patient is ctx and c.spec.structure_set_uid in self.k.structure_sets),
                    None)
        spec = iods.BrachySpec(
            label="HDR_BOOST", fractions=4,
            channels=tuple(round(rng.uniform(60, 240), 1) for _ in range(3)),
            source_date=_d(days[0] - timedelta(days=rng.randint(10, 60))),
            structure_set_uid=base.spec.structure_set_uid if base else None,
            for_uid=base.spec.for_uid if base else None,
        )
        plan_day = days[0] - timedelta(days=3)
        study = self.study(ctx, plan_day, rng.randint(480, 960), "HDR brachytherapy")
        series = self.series(ctx, study, "RTPLAN", "Plan HDR_BOOST")
        plan_uid = self.uid(series.uid, "rtplan")
        self.write(iods.brachy_plan(plan_uid, ctx.patient, study, series, spec=spec, date=_d(plan_day),
                                    time=study.time), "plan", ["hdr_brachy_course"])
        self.k.plans[plan_uid] = KPlan(plan_uid, pid, spec.label, spec.intent, study.uid, spec.structure_set_uid,
                                       spec.fractions)
        self.k.plan_traps[plan_uid] = ["hdr_brachy_course"]
        uids: list[str] = []
        delivered: list[tuple[str, str]] = []
        for fraction, day in enumerate(days, start=1):
            when = _time(rng.randint(8 * 60, 16 * 60), rng.randint(0, 59))
            rstudy = Study(uid=self.uid(pid, "record-study", plan_uid, "hdr", fraction), date=_d(day), time=when,
                           description="Treatment record", study_id=f"B{fraction}", accession="")
            rseries = Series(self.uid(pid, "record-series", plan_uid, "hdr", fraction), 1, "RTRECORD",
                             f"HDR fraction {fraction}", _d(day), when)
            uid = self.uid(rseries.uid, "rtrecord")
            self.write(iods.brachy_record(uid, ctx.patient, rstudy, rseries, plan_uid=plan_uid, spec=spec,
                                          fraction=fraction, date=_d(day), time=when), "record", ["hdr_brachy_course"])
            self.k.records[uid] = KRecord(uid, pid, plan_uid, _d(day), when, fraction=fraction)
            uids.append(uid)
            delivered.append((_d(day), when))
        last_day, last_time = delivered[-1]
        sstudy = Study(uid=self.uid(pid, "record-study", plan_uid, "summary"), date=last_day, time=last_time,
                       description="Treatment summary", study_id="BS", accession="")
        sseries = Series(self.uid(pid, "record-series", plan_uid, "summary"), 1, "RTRECORD", "HDR course summary",
                         last_day, last_time)
        summary_uid = self.uid(sseries.uid, "rtrecord", "summary")
        self.write(iods.treatment_summary_record(summary_uid, ctx.patient, sstudy, sseries, plan_uid=plan_uid,
                                                 plan_class=SopClass.RT_PLAN.value, fractions_planned=spec.fractions,
                                                 delivered=delivered, brachy=True), "record", ["summary_record"])
        self.k.records[summary_uid] = KRecord(summary_uid, pid, plan_uid, last_day, last_time, summary=True)
        self.flag("hdr_brachy_course", pid, [plan_uid, *uids, summary_uid],
                  "HDR brachytherapy course: RT Brachy Treatment Records (3 of 4 fractions) and a summary record")
        self.flag("summary_record", pid, [summary_uid],
                  "RT Treatment Summary Record: collected with its plan's records, never counted as a fraction")

    def phantom(self) -> None:
        """QA phantom: a verification plan (delivered once) and a MACHINE_QA plan (delivered yearly)."""
        rng = random.Random(f"rtharvest-synth/{self.opt.seed}/phantom")
        ctx = _PatientCtx(-1, Patient(PHANTOM_ID, "QA^PHANTOM", "", "O"), rng, frozenset(), ("QA", "QA"))
        verified = next((c for c in self.courses if not c.spec.ion and not c.spec.tomo), None)
        if verified is not None:
            vday = date.fromisoformat(
                f"{verified.record_dates[0][:4]}-{verified.record_dates[0][4:6]}-{verified.record_dates[0][6:]}"
            ) - timedelta(days=1)
            study = self.study(ctx, vday - timedelta(days=1), 600, "Patient QA")
            for_uid = self.uid(PHANTOM_ID, "for", "phantom", verified.plan_uid)
            images = self.images(ctx, study, "CT", for_uid, "Phantom CT", "qa")
            ss = self.structure_set(ctx, study, images, "PHANTOM", False)
            vspec = replace(
                verified.spec,
                label=f"VERIF_{verified.patient.site[0]}"[:16],
                intent="VERIFICATION",
                fractions=1,
                structure_set_uid=ss,
                for_uid=for_uid,
                verified_plan=(verified.plan_class, verified.plan_uid),
            )
            vplan, vclass = self.plan(ctx, study, vspec, "qa", vday, ["qa_verification_plan"])
            vdose = self.doses(ctx, study, vplan, vclass, vspec, for_uid, images[0].z, vday, "qa", per_beam=False)
            vrec = self.records(ctx, vplan, vclass, vspec, [vday], 1, "qa")
            self.flag(
                "qa_verification_plan",
                PHANTOM_ID,
                [vplan, *vrec, ss, *vdose, *(r.sop_uid for r in images)],
                "VERIFICATION plan on a phantom, delivered: Invalid, nothing beyond plan and record collected",
            )
        study = self.study(ctx, _FIRST_DAY - timedelta(days=7), 540, "Machine QA")
        qspec = PlanSpec(
            label="MACHINE_QA",
            intent="MACHINE_QA",
            fractions=1,
            beams=(Beam(1, "QA", 0.0, 100.0),),
            machine="LINAC1",
            geometry="TREATMENT_DEVICE",
        )
        qplan, qclass = self.plan(ctx, study, qspec, "qa", _FIRST_DAY - timedelta(days=7), ["qa_machine_plan"])
        span = (_LAST_START - _FIRST_DAY).days
        qdays = [_weekday(_FIRST_DAY + timedelta(days=span * i // 10 + rng.randint(0, 20))) for i in range(11)]
        qrec = self.records(ctx, qplan, qclass, qspec, qdays, 1, "qa")
        self.flag(
            "qa_machine_plan",
            PHANTOM_ID,
            [qplan, *qrec],
            "MACHINE_QA plan without structure set, delivered about yearly: Invalid",
        )

    def non_rt_patient(self) -> None:
        rng = random.Random(f"rtharvest-synth/{self.opt.seed}/nort")
        ctx = _PatientCtx(-2, Patient(NON_RT_ID, "SYNTH^NORT", "19700101", "F"), rng, frozenset(), ("", ""))
        uids: list[str] = []
        for n, (mod, desc) in enumerate((("CT", "Chest CT"), ("MR", "Brain MR"))):
            day = _FIRST_DAY + timedelta(days=rng.randint(0, (_LAST_START - _FIRST_DAY).days))
            study = self.study(ctx, day, 600 + n, desc)
            uids += [r.sop_uid for r in self.images(ctx, study, mod, self.uid(NON_RT_ID, "for", n), desc, "unrelated")]
        self.flag("unrelated_patient", NON_RT_ID, uids, "a patient without RT sharing nothing: never collected")

    # ---------------------------------------------------------------------------------------------
    # windows

    def windows(self) -> list[Window]:
        all_dates = sorted(r.date for r in self.k.records.values())
        defs: list[tuple[str, str | None, str | None, list[str] | None]] = [("all", all_dates[0], all_dates[-1], None)]
        # One year starting mid-course of the first course with several fractions, so that the
        # window cuts that plan's earlier records off (collected anyway through step 4).
        cut = self.year_cut()
        year_from = cut.record_dates[len(cut.record_dates) // 2]
        start = date(int(year_from[:4]), int(year_from[4:6]), int(year_from[6:]))
        defs.append(("year", year_from, _d(start + timedelta(days=364)), None))
        focus = next((c.patient for c in self.courses if "replan" in c.patient.features), self.courses[0].patient)
        defs.append(("patient", None, None, [focus.pid]))
        if self.opt.course_record_study:
            defs.append(("course_cut", *_course_cut_window(self.courses)))
        defs.extend((name, lo, hi, None) for name, lo, hi in self.opt.windows)
        every = set(self.k.present)
        out: list[Window] = []
        for name, lo, hi, ids in defs:
            result = evaluate(self.k, lo, hi, ids)
            if name == "year":
                dates = {uid: self.k.records[uid].date for row in result.plans for uid in row.record_uids}
                outside = sorted(uid for uid, day in dates.items() if not (lo or "") <= day <= (hi or "9"))
                if outside:
                    self.flag(
                        "records_outside_window",
                        self.k.records[outside[0]].patient_id,
                        outside,
                        f"records outside window 'year' ({lo}-{hi}) of plans that in-window records "
                        "reference: collected through step 4",
                    )
            out.append(
                Window(
                    name=name,
                    date_from=lo,
                    date_to=hi,
                    patient_ids=ids,
                    expected=sorted(result.expected & every),
                    forbidden=sorted(every - result.expected),
                    plans=result.plans,
                    summary=result.summary,
                )
            )
        return out


def _course_cut_window(courses: Sequence[_Course]) -> tuple[str, str, None]:
    """A window that starts mid-course of a course whose record study is dated before it, and ends on the
    record-study date of a later course whose fractions all come after it (both traps of a StudyDate
    pre-filter)."""
    cut = next((c for c in courses if len(c.record_dates) >= 6 and c.record_study_date), courses[0])
    date_from = cut.record_dates[len(cut.record_dates) // 2]
    later = sorted((c.record_study_date, c.record_dates[0]) for c in courses
                   if c.record_study_date and c.record_study_date > date_from)
    if later:
        return date_from, later[0][0], None
    start = date(int(date_from[:4]), int(date_from[4:6]), int(date_from[6:]))
    return date_from, _d(start + timedelta(days=60)), None


def _cos_sin(angle: float) -> tuple[float, float]:
    return math.cos(angle), math.sin(angle)


def _deal_features(options: SynthOptions) -> list[frozenset[str]]:
    chosen = [name for name, trap in FEATURES if options.include_traps or not trap]
    slots: list[set[str]] = [set() for _ in range(options.patients)]
    for i, name in enumerate(chosen):
        slots[i % options.patients].add(name)
    return [frozenset(s) for s in slots]


def generate(out_dir: Path, options: SynthOptions, *, overwrite: bool = False) -> GroundTruth:
    """Write the clinic described by ``options`` under ``out_dir`` and return its ground truth.

    ``out_dir/dicom`` must not hold files already unless ``overwrite`` is set (then it is replaced).
    """
    return generate_with_knowledge(out_dir, options, overwrite=overwrite)[0]


def generate_with_knowledge(out_dir: Path, options: SynthOptions, *,
                            overwrite: bool = False) -> tuple[GroundTruth, Knowledge]:
    """:func:`generate`, also returning the generator's facts (for clinics derived from this one)."""
    if options.patients < 1:
        raise ValueError("patients must be at least 1")
    if options.ct_slices < 2:
        raise ValueError("ct_slices must be at least 2")
    if not 8 <= options.matrix <= 1024:
        raise ValueError("matrix must be between 8 and 1024")
    root = Path(out_dir)
    dicom_dir = root / "dicom"
    if dicom_dir.exists() and any(dicom_dir.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{dicom_dir} is not empty (use overwrite / --force)")
        shutil.rmtree(dicom_dir)
    root.mkdir(parents=True, exist_ok=True)
    clinic = _Clinic(root, options)
    for index, features in enumerate(_deal_features(options)):
        clinic.rt_patient(index, features)
    if options.include_traps:
        clinic.brachy_course()
    if options.include_traps:
        clinic.phantom()
        clinic.non_rt_patient()
    for index in range(options.history_patients):
        clinic.history_patient(index)
    windows = clinic.windows()
    objects = {uid: replace(p.ds_info, traps=tuple(p.traps)) for uid, p in clinic.pending.items()}
    truth = GroundTruth(
        generator={
            "Name": "rtharvest.synth",
            "Version": GENERATOR_VERSION,
            "Seed": options.seed,
            # Through JSON so the in-memory truth equals the one read back (tuples become lists).
            "Options": json.loads(json.dumps(asdict(options))),
        },
        objects=objects,
        traps=clinic.traps,
        windows=windows,
        dangling=clinic.dangling,
    )
    (root / "ground_truth.json").write_text(truth.to_json(), encoding="utf-8")
    return truth, clinic.k
