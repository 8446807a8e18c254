"""Convert one Pinnacle patient folder: CT, then per plan an RTSTRUCT, per trial an RTPLAN and its RTDOSEs.

UIDs of everything the converter makes are :func:`~rtharvest.converters.uids.derived_uid` of the site salt
and the patient's keys (MRN and Pinnacle's internal PatientID) plus the plan number, trial name and beam
number, so a second run writes the same objects. Original CT slices keep their own UIDs.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import dcmread
from pydicom.errors import InvalidDicomError

from ..report import ConversionReport
from ..sink import Sink
from ..uids import derived_uid
from .coords import Frame, frame_mismatch, slice_z
from .errors import PinnacleError, PinnacleFormatError
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


@dataclass(frozen=True)
class Original:
    """One original CT slice kept in ``ImageSet_N.DICOM``."""

    path: Path
    ref: SliceRef
    study: str
    series: str
    for_uid: str
    position: tuple[float, float, float] | None


#: What an original slice must carry for the RT objects to reference it.
_ORIGINAL_KEYS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")


def _original_slices(image_set: ImageSet) -> tuple[list[Original], list[str]]:
    """Every Part-10 file in ``ImageSet_N.DICOM``, and why each other file there was left out.

    A stray file (an index, a thumbnail, a truncated copy) is no reason to lose the plan: it is skipped and
    the caller warns; the slices that ImageInfo names but the folder lacks are counted separately.
    """
    assert image_set.dicom_dir is not None
    found, skipped = [], []
    for path in sorted(image_set.dicom_dir.iterdir()):
        if not path.is_file():
            continue
        where = f"{image_set.dicom_dir.name}/{path.name}"
        try:
            ds = dcmread(path, stop_before_pixels=True)
            ipp = ds.get("ImagePositionPatient")
            position = (float(ipp[0]), float(ipp[1]), float(ipp[2])) if ipp is not None and len(ipp) == 3 else None
        except (InvalidDicomError, OSError, ValueError, TypeError, EOFError) as exc:
            skipped.append(f"{where} is not a DICOM file ({type(exc).__name__}): skipped")
            continue
        missing = [key for key in _ORIGINAL_KEYS if not ds.get(key)]
        if missing:
            skipped.append(f"{where} lacks {', '.join(missing)}: skipped")
            continue
        ref = SliceRef(str(ds.SOPClassUID), str(ds.SOPInstanceUID), position[2] if position else 0.0)
        found.append(
            Original(
                path,
                ref,
                str(ds.StudyInstanceUID),
                str(ds.SeriesInstanceUID),
                str(ds.get("FrameOfReferenceUID", "")),
                position,
            )
        )
    return found, skipped


class PatientConverter:
    """Converts one patient; every object goes to ``sink`` and is counted in ``report``."""

    def __init__(self, patient: Patient, sink: Sink, report: ConversionReport, options: Options, key: str) -> None:
        self.patient = patient
        self.sink = sink
        self.report = report
        self.options = options
        self.key = key

    def _relative(self, message: str) -> str:
        """``message`` with the patient folder's parents left out (paths inside the archive remain)."""
        return message.replace(str(self.patient.folder.parent) + "/", "")

    def uid(self, kind: str, *keys: object) -> str:
        """A derived UID of this patient."""
        return str(derived_uid(self.options.salt, kind, self.patient.mrn, self.patient.internal_id, *keys))

    def _image_refs(self, image_set: ImageSet, frame: Frame, date: str) -> ImageRefs:
        thickness = 10.0 * image_set.header.z_pixdim
        if image_set.dicom_dir is not None:
            originals, skipped = _original_slices(image_set)
            for message in skipped:
                self.report.warn(f"{self.key}: {message}")
            if originals:
                wanted = {s.instance_uid for s in image_set.slices if s.instance_uid}
                kept = {o.ref.sop_uid for o in originals}
                if wanted and not wanted <= kept:
                    self.report.warn(
                        f"{self.key}: {image_set.name}.DICOM lacks {len(wanted - kept)} slice(s) named in ImageInfo"
                    )
                self._check_frame(image_set, frame, originals[0])
                for original in originals:
                    self.sink.write_file(original.path)  # unchanged: the scanner's own objects
                self.report.wrote("CT", len(originals))
                first = originals[0]
                return ImageRefs(first.study, first.series, first.for_uid, tuple(o.ref for o in originals), thickness)
        study = image_set.uid("study_uid") or self.uid("study", image_set.number)
        for_uid = image_set.uid("frame_uid") or self.uid("frame-of-reference", image_set.number)
        if image_set.img_path is not None:
            n = image_set.header.z_dim
            self._check_table_positions(image_set, frame)
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

    def _check_table_positions(self, image_set: ImageSet, frame: Frame) -> None:
        """Warn when ImageInfo's TablePosition and the header's z_start put the first slice apart."""
        header = image_set.header
        if len(image_set.slices) != header.z_dim or not image_set.slices:
            return
        from_header = frame.point((0.0, 0.0, header.z_start))[2]
        from_table = slice_z(image_set.slices[0].table_position)
        if abs(from_header - from_table) > 5.0 * header.z_pixdim:
            self.report.warn(
                f"{self.key}: {image_set.name} TablePosition and header z_start differ by "
                f"{abs(from_header - from_table):.1f} mm; slices follow TablePosition"
            )

    def _check_frame(self, image_set: ImageSet, frame: Frame, original: Original) -> None:
        """Warn when the orientation mapping (and pre-9.0 offset) does not put the image on the original CT."""
        if original.position is None:
            return
        distance = frame_mismatch(frame, image_set.header, original.position)
        tolerance = max(5.0 * image_set.header.x_pixdim, 0.5)  # half a pixel in mm
        if distance > tolerance:
            self.report.warn(
                f"{self.key}: {image_set.name} maps {distance:.1f} mm away from its original CT "
                f"({frame.orientation.value}, offset {frame.y_offset:.2f} cm): check the Pinnacle version"
            )

    def run(self) -> None:
        """Convert every image set and every selected trial of every plan, each apart from the others.

        A plan that fails (unreadable trial, unknown machine, a beam the writer refuses) is reported with the
        file and line at fault; the patient's CT, the plan's own structure set and points, and every other
        plan are still written. ``report.extra["Patients"]`` lists per patient what was written, why each
        failed plan failed (``FailedPlans``) and any other error (``OtherErrors``: an unreadable image set).
        """
        patient = self.patient
        before = self.report.written.copy()
        failed: list[dict[str, str]] = []
        other: list[dict[str, str]] = []
        for problem in patient.problems:
            detail = self._relative(str(problem))
            self.report.error("plan", self.key, problem.reason, detail)
            # A plan that could not even be read (its folder, ROIs or points) names its folder in the message.
            folder = re.search(r"\b(Plan_\d+)\b", detail)
            entry = {"Reason": problem.reason, "Detail": detail}
            if folder:
                failed.append({"Plan": folder.group(1), **entry})
            else:
                other.append(entry)
        refs_by_set: dict[int, ImageRefs] = {}
        for plan in patient.plans:
            selected = [t for t in plan.trials if self.options.wants(plan, t)]
            wanted = not self.options.plans or plan.name in self.options.plans
            if not selected and not (plan.trial_error is not None and wanted and not self.options.trials):
                self.report.skip("plan", f"{self.key}/Plan_{plan.number}", "not-selected")
                continue
            # A plan that cannot be converted is reported; the patient's other plans still are.
            try:
                self._convert_plan(plan, selected, refs_by_set)
            except PinnacleError as exc:
                detail = self._relative(str(exc))
                self.report.error("plan", f"{self.key}/Plan_{plan.number}", exc.reason, detail)
                failed.append({"Plan": f"Plan_{plan.number}", "Reason": exc.reason, "Detail": detail})
        # Image sets no convertible plan was planned on are still the patient's CT: written in the frame their
        # own header gives (orientation, and the patient's version for the pre-9.0 offset).
        for image_set in patient.image_sets.values():
            if image_set.number in refs_by_set:
                continue
            try:
                frame = Frame.for_plan(_orientation(image_set, None), patient.version, image_set.header)
                refs_by_set[image_set.number] = self._image_refs(image_set, frame, study_date(image_set))
            except PinnacleError as exc:
                detail = self._relative(str(exc))
                self.report.error("image-set", f"{self.key}/{image_set.name}", exc.reason, detail)
                other.append({"Reason": exc.reason, "Detail": detail})
        written = self.report.written - before
        self.report.extra.setdefault("Patients", []).append(
            {"Key": self.key, "Written": dict(sorted(written.items())), "FailedPlans": failed, "OtherErrors": other}
        )

    def _convert_plan(self, plan: Plan, selected: list[Trial], refs_by_set: dict[int, ImageRefs]) -> None:
        image_set = self.patient.image_sets.get(plan.primary_image_set)
        if image_set is None:
            raise PinnacleFormatError(
                f"{plan.folder}: primary image set {plan.primary_image_set} is missing or unreadable"
            )
        frame = Frame.for_plan(_orientation(image_set, plan), plan.version, image_set.header)
        if not plan.version.known:
            self.report.warn(f"{self.key}/Plan_{plan.number}: no Pinnacle version found; assumed 9.0 or later")
        date = study_date(image_set)
        if image_set.number not in refs_by_set:
            refs_by_set[image_set.number] = self._image_refs(image_set, frame, date)
        self._plan(Context(self.patient, date, refs_by_set[image_set.number]), plan, selected, frame)

    def _plan(self, ctx: Context, plan: Plan, trials: list[Trial], frame: Frame) -> None:
        iso_names = {b.isocenter_name for t in plan.trials for b in t.beams}
        structures_uid = self.uid("rtstruct", plan.number)
        result = structure_set(ctx, plan, frame, structures_uid, self.uid("rtstruct-series", plan.number), iso_names)
        for message in result.unplaced:
            self.report.warn(f"{self.key}/Plan_{plan.number}: {message}")
        self.sink.write(result.dataset)
        self.report.wrote("RTSTRUCT")
        if plan.trial_error is not None:
            raise plan.trial_error  # the structure set and points are written; the trials are not
        names = [t.name for t in plan.trials]
        for trial in trials:
            # Pinnacle keeps trial names unique within a plan; should a file repeat one, its position tells
            # the trials apart (names alone keep UIDs stable when another trial is deleted).
            index = next(i for i, t in enumerate(plan.trials) if t is trial)
            key = trial.name if names.count(trial.name) == 1 else f"{trial.name}#{index}"
            self._trial(ctx, plan, trial, frame, structures_uid, key)

    def _trial(self, ctx: Context, plan: Plan, trial: Trial, frame: Frame, structures_uid: str, key: str) -> None:
        keys = (plan.number, key)
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
