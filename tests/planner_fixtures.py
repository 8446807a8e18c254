"""Small hand-built RT datasets for the reference, planner and simulation tests (no files, no servers)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence as Seq

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from rtharvest.core.sopclass import SopClass

_IMAGE_CLASS = {"CT": SopClass.CT_IMAGE, "MR": SopClass.MR_IMAGE, "PT": SopClass.PET_IMAGE}


def uid(*parts: object) -> str:
    """Deterministic UID from names (2.25 + decimal of a hash)."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).hexdigest()
    return "2.25." + str(int(digest[:30], 16))


def _base(sop_class: str, modality: str, patient: str, study: str, series: str, sop: str) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop
    ds.Modality = modality
    ds.PatientID = patient
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    return ds


def _item(**values: object) -> Dataset:
    item = Dataset()
    for k, v in values.items():
        setattr(item, k, v)
    return item


def _refs(uids: Seq[str], sop_class: str = "") -> Sequence:
    return Sequence([_item(ReferencedSOPClassUID=sop_class, ReferencedSOPInstanceUID=u) if sop_class
                     else _item(ReferencedSOPInstanceUID=u) for u in uids])


def image_series(name: str, patient: str, study: str, for_uid: str | None, modality: str = "CT",
                 count: int = 3) -> list[Dataset]:
    """``count`` images of one series."""
    series = uid(name, "series")
    out = []
    for i in range(count):
        ds = _base(_IMAGE_CLASS[modality].value, modality, patient, study, series, uid(name, "image", i))
        if for_uid is not None:
            ds.FrameOfReferenceUID = for_uid
        ds.InstanceNumber = i + 1
        out.append(ds)
    return out


def record(name: str, patient: str, plan_uid: str | None, date: str, study: str | None = None,
           ion: bool = False) -> Dataset:
    """A treatment record delivered on ``date`` (own study and series, as R&V systems do)."""
    cls = SopClass.RT_ION_BEAMS_TREATMENT_RECORD if ion else SopClass.RT_BEAMS_TREATMENT_RECORD
    ds = _base(cls.value, "RTRECORD", patient, study or uid(name, "study"), uid(name, "series"), uid(name))
    ds.StudyDate = date  # type 2; R&V systems date the record's study (the StudyDate pre-filter needs it)
    ds.TreatmentDate = date
    ds.TreatmentTime = "101500"
    ds.ReferencedRTPlanSequence = _refs([plan_uid] if plan_uid else [], SopClass.RT_PLAN.value)
    return ds


def plan(name: str, patient: str, study: str, ss_uid: str | None, intent: str | None = "CURATIVE",
         ion: bool = False, related: Seq[tuple[str, str]] = ()) -> Dataset:
    """An RT (Ion) Plan; ``ss_uid=None`` gives a TomoTherapy-style plan without structure reference."""
    cls = SopClass.RT_ION_PLAN if ion else SopClass.RT_PLAN
    ds = _base(cls.value, "RTPLAN", patient, study, uid(name, "series"), uid(name))
    ds.RTPlanLabel = name[:16]
    ds.RTPlanGeometry = "PATIENT" if ss_uid else "TREATMENT_DEVICE"
    if intent is not None:
        ds.PlanIntent = intent
    if ss_uid:
        ds.ReferencedStructureSetSequence = _refs([ss_uid], SopClass.RT_STRUCTURE_SET.value)
    if related:
        ds.ReferencedRTPlanSequence = Sequence([
            _item(ReferencedSOPClassUID=SopClass.RT_PLAN.value, ReferencedSOPInstanceUID=u, RTPlanRelationship=r)
            for u, r in related])
    return ds


def structure_set(name: str, patient: str, study: str, series: Seq[list[Dataset]],
                  empty_first_roi: bool = False, contour_series: list[Dataset] | None = None) -> Dataset:
    """An RTSTRUCT listing ``series`` and contouring ``contour_series`` (default: the first series)."""
    ds = _base(SopClass.RT_STRUCTURE_SET.value, "RTSTRUCT", patient, study, uid(name, "series"), uid(name))
    frames: dict[str, Dataset] = {}
    for images in series:
        first = images[0]
        fr = frames.get(first.FrameOfReferenceUID)
        if fr is None:
            fr = frames[first.FrameOfReferenceUID] = _item(
                FrameOfReferenceUID=first.FrameOfReferenceUID, RTReferencedStudySequence=Sequence())
        fr.RTReferencedStudySequence.append(_item(
            ReferencedSOPClassUID="1.2.840.10008.3.1.2.3.1", ReferencedSOPInstanceUID=first.StudyInstanceUID,
            RTReferencedSeriesSequence=Sequence([_item(
                SeriesInstanceUID=first.SeriesInstanceUID,
                ContourImageSequence=_refs([i.SOPInstanceUID for i in images], first.SOPClassUID))])))
    ds.ReferencedFrameOfReferenceSequence = Sequence(list(frames.values()))
    contoured = contour_series if contour_series is not None else list(series[0])
    rois = [(1, "BODY_EMPTY")] if empty_first_roi else []
    rois += [(len(rois) + 1, "PTV")]
    ds.StructureSetROISequence = Sequence([_item(ROINumber=n, ROIName=label,
                                                 ReferencedFrameOfReferenceUID=contoured[0].FrameOfReferenceUID)
                                           for n, label in rois])
    roi_contours = []
    for n, _label in rois:
        item = _item(ReferencedROINumber=n)
        if not (empty_first_roi and n == 1):
            item.ContourSequence = Sequence([
                _item(ContourImageSequence=_refs([img.SOPInstanceUID], img.SOPClassUID),
                      ContourGeometricType="CLOSED_PLANAR", NumberOfContourPoints=1, ContourData=[0, 0, 0])
                for img in contoured[1:] + contoured[:1]])  # first contour on the 2nd image: order matters
        else:
            item.ContourSequence = Sequence()
        roi_contours.append(item)
    ds.ROIContourSequence = Sequence(roi_contours)
    return ds


def dose(name: str, patient: str, study: str, plan_uid: str | None, ss_uid: str | None = None,
         summation: str = "PLAN") -> Dataset:
    """An RT Dose naming its plan (and, TomoTherapy-style, a structure set)."""
    ds = _base(SopClass.RT_DOSE.value, "RTDOSE", patient, study, uid(name, "series"), uid(name))
    ds.DoseSummationType = summation
    if plan_uid:
        ds.ReferencedRTPlanSequence = _refs([plan_uid], SopClass.RT_PLAN.value)
    if ss_uid:
        ds.ReferencedStructureSetSequence = _refs([ss_uid], SopClass.RT_STRUCTURE_SET.value)
    return ds


def registration(name: str, patient: str, study: str, fixed: list[Dataset], moving: list[Dataset] | None,
                 deformable: bool = False, for_only: str | None = None, series_level: bool = True) -> Dataset:
    """A REG from ``moving`` to ``fixed`` (or to a FoR named without images: ``for_only``)."""
    cls = SopClass.DEFORMABLE_SPATIAL_REGISTRATION if deformable else SopClass.SPATIAL_REGISTRATION
    ds = _base(cls.value, "REG", patient, study, uid(name, "series"), uid(name))
    ds.FrameOfReferenceUID = fixed[0].FrameOfReferenceUID

    def matrix(kind: str) -> Sequence:
        return Sequence([_item(MatrixSequence=Sequence([_item(
            FrameOfReferenceTransformationMatrix=[1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1],
            FrameOfReferenceTransformationMatrixType=kind)]))])

    items = []
    if not deformable:
        items.append(_item(FrameOfReferenceUID=fixed[0].FrameOfReferenceUID,
                           ReferencedImageSequence=_refs([i.SOPInstanceUID for i in fixed], fixed[0].SOPClassUID),
                           MatrixRegistrationSequence=matrix("RIGID")))
    if moving is not None:
        refs = _refs([i.SOPInstanceUID for i in moving], moving[0].SOPClassUID)
        if deformable:
            items.append(_item(SourceFrameOfReferenceUID=moving[0].FrameOfReferenceUID, ReferencedImageSequence=refs,
                               PreDeformationMatrixRegistrationSequence=matrix("RIGID")))
        else:
            items.append(_item(FrameOfReferenceUID=moving[0].FrameOfReferenceUID, ReferencedImageSequence=refs,
                               MatrixRegistrationSequence=matrix("RIGID")))
    if for_only is not None:
        key = "SourceFrameOfReferenceUID" if deformable else "FrameOfReferenceUID"
        items.append(_item(**{key: for_only}))
    setattr(ds, "DeformableRegistrationSequence" if deformable else "RegistrationSequence", Sequence(items))
    if series_level:
        own: list[Dataset] = []
        other: dict[str, list[Dataset]] = {}
        for images in (fixed, moving or []):
            if not images:
                continue
            entry = _item(SeriesInstanceUID=images[0].SeriesInstanceUID,
                          ReferencedInstanceSequence=_refs([i.SOPInstanceUID for i in images], images[0].SOPClassUID))
            if images[0].StudyInstanceUID == study:
                own.append(entry)
            else:
                other.setdefault(images[0].StudyInstanceUID, []).append(entry)
        if own:
            ds.ReferencedSeriesSequence = Sequence(own)
        if other:
            ds.StudiesContainingOtherReferencedInstancesSequence = Sequence([
                _item(StudyInstanceUID=st, ReferencedSeriesSequence=Sequence(entries))
                for st, entries in other.items()])
    return ds


class MiniClinic:
    """One RT patient with every feature the rules name, plus traps, as a list of datasets.

    Attributes hold the UIDs the tests check; ``expected`` is the hand-derived closure of a window
    containing the first course (2020) and ``forbidden`` what must never be collected.
    """

    def __init__(self) -> None:
        p = "MINI1"
        self.patient = p
        plan_study = uid("plan-study")
        self.plan_study = plan_study
        f_sim = uid("for-sim")
        # Planning CT + PET of a PET/CT simulation sharing its FoR (step 8).
        self.ct_sim = image_series("ct-sim", p, plan_study, f_sim, "CT", 4)
        self.pet_sim = image_series("pet-sim", p, plan_study, f_sim, "PT", 2)
        # Diagnostic MR registered rigidly (CT-MR) and a PET/CT whose CT is registered (step 9) and
        # whose PET shares that CT's FoR (step 10).
        mr_study, petct_study = uid("mr-study"), uid("petct-study")
        self.mr = image_series("mr", p, mr_study, uid("for-mr"), "MR", 3)
        f_petct = uid("for-petct")
        self.petct_ct = image_series("petct-ct", p, petct_study, f_petct, "CT", 3)
        self.petct_pt = image_series("petct-pt", p, petct_study, f_petct, "PT", 2)
        # A deformable REG to a CBCT-like CT in its own FoR.
        self.def_ct = image_series("def-ct", p, uid("def-study"), uid("for-def"), "CT", 2)
        # Traps: an unrelated CT in its own FoR, another patient's CT, a trial plan and its dose.
        self.unrelated = image_series("unrelated", p, uid("unrel-study"), uid("for-unrel"), "CT", 2)
        self.other_patient = image_series("other", "OTHER", uid("other-study"), f_sim, "CT", 2)

        self.ss = structure_set("ss", p, plan_study, [self.ct_sim], empty_first_roi=True)
        self.plan = plan("plan", p, plan_study, self.ss.SOPInstanceUID)
        self.dose = dose("dose", p, plan_study, self.plan.SOPInstanceUID)
        self.beam_dose = dose("beam-dose", p, plan_study, self.plan.SOPInstanceUID, summation="BEAM")
        self.trial = plan("trial", p, plan_study, self.ss.SOPInstanceUID)
        self.trial_dose = dose("trial-dose", p, plan_study, self.trial.SOPInstanceUID)
        self.reg_mr = registration("reg-mr", p, plan_study, self.ct_sim, self.mr)
        self.reg_petct = registration("reg-petct", p, plan_study, self.ct_sim, self.petct_ct)
        self.reg_def = registration("reg-def", p, plan_study, self.ct_sim, self.def_ct, deformable=True)
        self.reg_unrelated = registration("reg-unrel", p, uid("unrel-study"), self.unrelated,
                                          image_series("unrel2", p, uid("unrel-study"), uid("for-u2"), "MR", 1))
        # Records: 3 fractions in 2020, one in 2021 (outside a 2020 window, collected by step 4).
        self.records = [record(f"rec{i}", p, self.plan.SOPInstanceUID, d)
                        for i, d in enumerate(["20200302", "20200303", "20200304", "20210105"])]

        # A second course in 2023 (outside the window): TomoTherapy plan on a planning MR.
        tomo_study = uid("tomo-study")
        self.mr_sim = image_series("mr-sim", p, tomo_study, uid("for-mrsim"), "MR", 3)
        self.tomo_ss = structure_set("tomo-ss", p, tomo_study, [self.mr_sim])
        self.tomo_plan = plan("tomo-plan", p, tomo_study, None, intent="PALLIATIVE")
        self.tomo_dose = dose("tomo-dose", p, tomo_study, self.tomo_plan.SOPInstanceUID,
                              ss_uid=self.tomo_ss.SOPInstanceUID)
        self.tomo_records = [record("tomo-rec", p, self.tomo_plan.SOPInstanceUID, "20230510")]

        # QA: a verification plan treated in 2020 on a phantom.
        qa_study = uid("qa-study")
        self.phantom = image_series("phantom", "QA_PHANTOM", qa_study, uid("for-phantom"), "CT", 2)
        self.qa_ss = structure_set("qa-ss", "QA_PHANTOM", qa_study, [self.phantom])
        self.qa_plan = plan("qa-plan", "QA_PHANTOM", qa_study, self.qa_ss.SOPInstanceUID, intent="VERIFICATION",
                            related=[(self.plan.SOPInstanceUID, "VERIFIED_PLAN")])
        self.qa_dose = dose("qa-dose", "QA_PHANTOM", qa_study, self.qa_plan.SOPInstanceUID)
        self.qa_record = record("qa-rec", "QA_PHANTOM", self.qa_plan.SOPInstanceUID, "20200301")
        # A record of a plan absent from the source.
        self.missing_plan_uid = uid("missing-plan")
        self.orphan_record = record("orphan-rec", p, self.missing_plan_uid, "20200601")

    def datasets(self) -> list[Dataset]:
        """Every object at the source."""
        out: list[Dataset] = []
        for s in (self.ct_sim, self.pet_sim, self.mr, self.petct_ct, self.petct_pt, self.def_ct, self.unrelated,
                  self.other_patient, self.mr_sim, self.phantom):
            out.extend(s)
        out += [self.ss, self.plan, self.dose, self.beam_dose, self.trial, self.trial_dose, self.reg_mr,
                self.reg_petct, self.reg_def, self.reg_unrelated, *self.records, self.tomo_ss, self.tomo_plan,
                self.tomo_dose, *self.tomo_records, self.qa_ss, self.qa_plan, self.qa_dose, self.qa_record,
                self.orphan_record]
        return out

    def expected_2020(self) -> set[str]:
        """The closure of window 2020-01-01..2020-12-31."""
        objs: list[Dataset] = [*self.ct_sim, *self.pet_sim, *self.mr, *self.petct_ct, *self.petct_pt,
                               *self.def_ct, self.ss, self.plan, self.dose, self.beam_dose, self.reg_mr,
                               self.reg_petct, self.reg_def, *self.records, self.qa_plan, self.qa_record,
                               self.orphan_record]
        return {d.SOPInstanceUID for d in objs}

    def expected_2023(self) -> set[str]:
        """The closure of window 2023 (TomoTherapy course on a planning MR)."""
        objs = [*self.mr_sim, self.tomo_ss, self.tomo_plan, self.tomo_dose, *self.tomo_records]
        return {d.SOPInstanceUID for d in objs}
