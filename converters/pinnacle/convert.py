"""Convert one Pinnacle patient folder: CT, then per plan an RTSTRUCT, per trial an RTPLAN and its RTDOSEs.

UIDs of everything the converter makes are :func:`~rtharvest.converters.uids.derived_uid` of the site salt
and the patient's keys (MRN and Pinnacle's internal PatientID) plus the plan number, trial name and beam
number, so a second run writes the same objects. Original CT slices keep their own UIDs.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import dcmread
from pydicom.errors import InvalidDicomError

from ..report import ConversionReport
from ..sink import Sink
from ..uids import derived_uid
from .coords import Frame, slice_z
from .errors import PinnacleFormatError
from .models import ImageSet, Orientation, Patient, Plan, Trial
from .reader import read_patient
from .writers import (
    Context,
    ImageRefs,
    SliceRef,
    ct_from_img,
    fraction_groups,
    read_dose_binary,
    rt_dose,
    rt_plan,
    structure_set,
    study_date,
)

log = logging.getLogger(__name__)

CT_CLASS = "1.2.840.10008.5.1.4.1.1.2"


@dataclass
class Options:
    """What to convert: the site salt of derived UIDs and, optionally, only these trials or plans."""

    salt: str = "rtharvest-pinnacle"
    trials: Collection[str] = field(default_factory=tuple)  # "Trial name" or "Plan name/Trial name"
    plans: Collection[str] = field(default_factory=tuple)

    def wants(self, plan: Plan, trial: Trial) -> bool:
        """Whether ``trial`` of ``plan`` is selected (everything when no selection is given)."""
        if self.plans and plan.name not in self.plans:
            return False
        if self.trials and trial.name not in self.trials and f"{plan.name}/{trial.name}" not in self.trials:
            return False
        return True


def _orientation(image_set: ImageSet, plan: Plan | None) -> Orientation:
    if image_set.header.patient_position is not None:
        return image_set.header.patient_position
    if plan is not None and plan.setup_position is not None:
        return plan.setup_position
    return Orientation.HFS


def _original_slices(image_set: ImageSet) -> list[tuple[Path, SliceRef, str, str, str]]:
    """Every Part-10 file in ``ImageSet_N.DICOM``: (path, slice, study, series, FoR)."""
    assert image_set.dicom_dir is not None
    found = []
    for path in sorted(image_set.dicom_dir.iterdir()):
        if not path.is_file():
            continue
        try:
            ds = dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError, ValueError) as exc:
            raise PinnacleFormatError(f"{path}: not a DICOM file ({exc})") from exc
        z = float(ds.ImagePositionPatient[2]) if "ImagePositionPatient" in ds else 0.0
        found.append(
            (
                path,
                SliceRef(str(ds.SOPClassUID), str(ds.SOPInstanceUID), z),
                str(ds.StudyInstanceUID),
                str(ds.SeriesInstanceUID),
                str(ds.get("FrameOfReferenceUID", "")),
            )
        )
    return found


class PatientConverter:
    """Converts one patient; every object goes to ``sink`` and is counted in ``report``."""

    def __init__(self, patient: Patient, sink: Sink, report: ConversionReport, options: Options, key: str) -> None:
        self.patient = patient
        self.sink = sink
        self.report = report
        self.options = options
        self.key = key

    def uid(self, kind: str, *keys: object) -> str:
        """A derived UID of this patient."""
        return str(derived_uid(self.options.salt, kind, self.patient.mrn, self.patient.internal_id, *keys))

    def _image_refs(self, image_set: ImageSet, frame: Frame, date: str) -> ImageRefs:
        thickness = 10.0 * image_set.header.z_pixdim
        if image_set.dicom_dir is not None:
            originals = _original_slices(image_set)
            if originals:
                wanted = {s.instance_uid for s in image_set.slices if s.instance_uid}
                kept = {ref.sop_uid for _, ref, *_ in originals}
                if wanted and not wanted <= kept:
                    self.report.warn(
                        f"{self.key}: {image_set.name}.DICOM lacks {len(wanted - kept)} slice(s) named in ImageInfo"
                    )
                for path, *_ in originals:
                    self.sink.write_file(path)  # unchanged: the scanner's own objects
                self.report.wrote("CT", len(originals))
                _, _, study, series, for_uid = originals[0]
                return ImageRefs(study, series, for_uid, tuple(ref for _, ref, *_ in originals), thickness)
        study = image_set.uid("study_uid") or self.uid("study", image_set.number)
        for_uid = image_set.uid("frame_uid") or self.uid("frame-of-reference", image_set.number)
        if image_set.img_path is not None:
            n = image_set.header.z_dim
            series = self.uid("ct-series", image_set.number)
            sops = [self.uid("ct-image", image_set.number, k) for k in range(n)]
            refs = ImageRefs(study, series, for_uid, (), thickness)
            datasets = ct_from_img(Context(self.patient, date, refs), image_set, frame, series, sops)
            slices = tuple(
                SliceRef(CT_CLASS, str(ds.SOPInstanceUID), float(ds.ImagePositionPatient[2])) for ds in datasets
            )
            for ds in datasets:
                self.sink.write(ds)
            self.report.wrote("CT", len(datasets))
            return ImageRefs(study, series, for_uid, slices, thickness)
        # Neither: reference the original CT (held elsewhere, e.g. the clinic's PACS) by ImageInfo's UIDs.
        if not image_set.slices or not all(s.instance_uid for s in image_set.slices):
            raise PinnacleFormatError(
                f"{self.patient.folder / image_set.name}: no ImageSet DICOM or .img and "
                "ImageInfo lacks the original instance UIDs"
            )
        self.report.skip(
            "image-set",
            f"{self.key}/{image_set.name}",
            "ct-not-in-archive",
            "no ImageSet_N.DICOM or .img: objects reference the original CT by its UIDs",
        )
        series = image_set.uid("series_uid") or self.uid("ct-series", image_set.number)
        slices = tuple(
            SliceRef(s.class_uid or CT_CLASS, s.instance_uid, slice_z(s.table_position)) for s in image_set.slices
        )
        return ImageRefs(study, series, for_uid, slices, thickness)

    def run(self) -> None:
        """Convert every selected trial of every plan."""
        patient = self.patient
        refs_by_set: dict[int, ImageRefs] = {}
        for plan in patient.plans:
            selected = [t for t in plan.trials if self.options.wants(plan, t)]
            if not selected:
                self.report.skip("plan", f"{self.key}/Plan_{plan.number}", "not-selected")
                continue
            image_set = patient.image_sets.get(plan.primary_image_set)
            if image_set is None:
                raise PinnacleFormatError(
                    f"{plan.folder}: primary image set {plan.primary_image_set} is not in the Patient file"
                )
            frame = Frame.for_plan(_orientation(image_set, plan), plan.version, image_set.header)
            if not plan.version.known:
                self.report.warn(f"{self.key}/Plan_{plan.number}: no Pinnacle version found; assumed 9.0 or later")
            date = study_date(image_set)
            if image_set.number not in refs_by_set:
                refs_by_set[image_set.number] = self._image_refs(image_set, frame, date)
            ctx = Context(patient, date, refs_by_set[image_set.number])
            self._plan(ctx, plan, selected, frame)

    def _plan(self, ctx: Context, plan: Plan, trials: list[Trial], frame: Frame) -> None:
        iso_names = {b.isocenter_name for t in plan.trials for b in t.beams}
        structures_uid = self.uid("rtstruct", plan.number)
        result = structure_set(ctx, plan, frame, structures_uid, self.uid("rtstruct-series", plan.number), iso_names)
        for message in result.unplaced:
            self.report.warn(f"{self.key}/Plan_{plan.number}: {message}")
        self.sink.write(result.dataset)
        self.report.wrote("RTSTRUCT")
        for trial in trials:
            self._trial(ctx, plan, trial, frame, structures_uid)

    def _trial(self, ctx: Context, plan: Plan, trial: Trial, frame: Frame, structures_uid: str) -> None:
        keys = (plan.number, trial.name)
        plan_uid = self.uid("rtplan", *keys)
        refs = [self.uid("dose-reference", *keys, n) for n in range(1, len(trial.prescriptions) + 1)]
        self.sink.write(
            rt_plan(ctx, plan, trial, frame, plan_uid, self.uid("rtplan-series", *keys), structures_uid, refs)
        )
        self.report.wrote("RTPLAN")
        self.report.counts["trials"] += 1
        groups, group_of = fraction_groups(trial)
        fractions = {g.number: g.fractions for g in groups}
        dose_series = self.uid("rtdose-series", *keys)
        total: list[float] | None = None
        complete = True
        for i, beam in enumerate(trial.beams):
            try:
                values = read_dose_binary(plan, trial, beam)
            except PinnacleFormatError as exc:
                complete = False
                self.report.error(
                    "dose", f"{self.key}/Plan_{plan.number}/{trial.name}/{beam.name}", "missing-dose", str(exc)
                )
                continue
            mu = beam.mu_info.mu
            gy = [v * mu / 100.0 for v in values]
            self.sink.write(
                rt_dose(
                    ctx,
                    trial,
                    frame,
                    gy,
                    self.uid("rtdose", *keys, beam.number),
                    dose_series,
                    plan_uid,
                    "BEAM",
                    i + 2,
                    beam_number=beam.number,
                    fraction_group=group_of[i],
                )
            )
            self.report.wrote("RTDOSE")
            n = fractions[group_of[i]]
            total = [v * n for v in gy] if total is None else [a + v * n for a, v in zip(total, gy, strict=True)]
        if total is not None and complete:
            self.sink.write(
                rt_dose(ctx, trial, frame, total, self.uid("rtdose", *keys, "plan"), dose_series, plan_uid, "PLAN", 1)
            )
            self.report.wrote("RTDOSE")


def convert_patient(folder: Path, sink: Sink, report: ConversionReport, options: Options, key: str) -> None:
    """Read and convert one ``Patient_N`` folder; raises :class:`~.errors.PinnacleError` on bad data."""
    patient = read_patient(folder)
    PatientConverter(patient, sink, report, options, key).run()
    report.counts["patients"] += 1
