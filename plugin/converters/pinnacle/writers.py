"""DICOM objects from the Pinnacle model: CT, RT Structure Set, RT Plan, RT Dose (PS3.3 A.3, A.19, A.20, A.18).

Pure functions: each takes the model, the coordinate :class:`~.coords.Frame` and UIDs, and returns
datasets; nothing here touches the network. Choices made where Pinnacle and DICOM do not say the same:

- **CT from ImageSet_N.img** (only when the original slices of ``ImageSet_N.DICOM`` are absent): the
  voxels are Pinnacle CT numbers (water 1000, air 0), so RescaleIntercept is **−1000** (not the −1024
  many scanners use; an original slice kept in the archive keeps its own intercept). ``byte_order`` 0
  is little-endian, anything else big-endian (Pinnacle on Solaris). The rebuilt series keeps the
  original StudyInstanceUID and FrameOfReferenceUID from ImageInfo (same exam, same patient frame) but
  gets derived Series and SOP Instance UIDs: it is a rebuilt copy, not the scanner's objects.
- **Dose**: the binaries hold dose per MU ×100 (cGy/MU); Gy = value × MU / 100, with MU per fraction from
  the beam's MonitorUnitInfo (see :attr:`.models.MonitorUnitInfo.mu`). BEAM doses are per fraction;
  the PLAN dose is the sum over beams of each beam's dose × its prescription's number of fractions.
  Stored as 16-bit unsigned with DoseGridScaling = max / 65535 (dciodvfy rejects 32-bit OW).
- **Dose frames** are ordered so GridFrameOffsetVector ascends from 0 in steps of the Z voxel size along
  the slice normal (row × column cosines), with ImagePositionPatient at the first frame.
- **Jaws and MLC**: Pinnacle writes left/bottom jaw and left-bank leaf positions as distances towards −X/−Y;
  DICOM X1 = −10·left, X2 = 10·right, Y1 = −10·bottom, Y2 = 10·top. Leaf pairs follow the machine file's
  LeafPairList and are reordered from −Y to +Y, with LeafPositionBoundaries from the same file. The
  beam's machine is the entry named in its MachineNameAndVersion (or the file's only entry); a beam with
  leaf positions whose leaf geometry does not resolve makes the plan an error, never a jaws-only field.
- **Control points**: a static or step-and-shoot segment becomes two DICOM control points (same
  apertures, meterset weight before and after the segment's Weight); a dynamic beam has one DICOM control
  point per Pinnacle control point at the cumulative weight of the segments before it.
"""

from __future__ import annotations

import datetime
import re
import struct
from array import array
from collections.abc import Sequence
from dataclasses import dataclass

from pydicom.dataset import Dataset
from pydicom.uid import UID

from rtharvest.core.dicombuild import STUDY_COMPONENT_SOP_CLASS, ds_text, frame_of_reference, make_item, seq
from rtharvest.core.sopclass import SopClass

from ..sink import with_file_meta
from .coords import Frame, slice_z
from .errors import PinnacleFormatError
from .models import Beam, ImageSet, Machine, Patient, Plan, Poi, Roi, Trial

MANUFACTURER = "Philips"
CONVERTER_NAME = "rtharvest pinnacle converter"
#: RTROIInterpretedType defined terms (PS3.3 C.8.8.8); other Pinnacle types become ORGAN.
ROI_TYPES = frozenset(
    {
        "EXTERNAL",
        "PTV",
        "CTV",
        "GTV",
        "TREATED_VOLUME",
        "IRRAD_VOLUME",
        "BOLUS",
        "AVOIDANCE",
        "ORGAN",
        "MARKER",
        "REGISTRATION",
        "ISOCENTER",
        "CONTRAST_AGENT",
        "CAVITY",
        "BRACHY_CHANNEL",
        "BRACHY_ACCESSORY",
        "BRACHY_SRC_APP",
        "BRACHY_CHNL_SHLD",
        "SUPPORT",
        "FIXATION",
        "DOSE_REGION",
        "CONTROL",
    }
)
COLOURS = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "purple": (160, 32, 240),
    "orange": (255, 165, 0),
    "skyblue": (135, 206, 235),
    "lightblue": (173, 216, 230),
    "forest": (34, 139, 34),
    "lavender": (230, 230, 250),
    "magenta": (255, 0, 255),
    "cyan": (0, 255, 255),
    "white": (255, 255, 255),
    "brown": (165, 42, 42),
    "teal": (0, 128, 128),
    "steelblue": (70, 130, 180),
}


def text(value: str, limit: int) -> str:
    """Pinnacle text as an SH/LO value: no backslash (the DICOM value separator) or control characters."""
    cleaned = "".join(" " if ch == "\\" or ord(ch) < 32 else ch for ch in value).strip()
    return cleaned[:limit].rstrip()


def _date(text: str) -> str:
    """A DICOM DA from Pinnacle's date (``YYYYMMDD``, ``YYYY-MM-DD``, US ``MM/DD/YYYY``; a time may follow).

    Anything that is not a real calendar date gives "" (StudyDate is Type 2: empty beats invented).
    """
    head = text.strip().split(" ")[0]
    parts = re.findall(r"\d+", head)
    if len(parts) == 1 and len(parts[0]) == 8:
        year, month, day = parts[0][:4], parts[0][4:6], parts[0][6:]
    elif len(parts) == 3 and len(parts[0]) == 4:
        year, month, day = parts
    elif len(parts) == 3 and len(parts[2]) == 4:
        month, day, year = parts
    else:
        return ""
    try:
        return datetime.date(int(year), int(month), int(day)).strftime("%Y%m%d")
    except ValueError:
        return ""


@dataclass(frozen=True)
class SliceRef:
    """One CT slice other objects reference."""

    sop_class: str
    sop_uid: str
    z: float


@dataclass(frozen=True)
class ImageRefs:
    """The planning CT as the RT objects see it (kept, rebuilt or only named by ImageInfo)."""

    study_uid: str
    series_uid: str
    for_uid: str
    slices: tuple[SliceRef, ...]
    thickness: float

    def nearest(self, z: float) -> SliceRef | None:
        """The slice whose plane holds ``z`` (within half a slice), or ``None``."""
        best = min(self.slices, key=lambda s: abs(s.z - z), default=None)
        if best is None or abs(best.z - z) > max(self.thickness / 2.0, 0.05):
            return None
        return best


@dataclass(frozen=True)
class Context:
    """Patient-level values every object carries."""

    patient: Patient
    study_date: str
    refs: ImageRefs


def base(
    ctx: Context,
    sop_class: str,
    sop_uid: str,
    modality: str,
    series_uid: str,
    series_number: int,
    description: str,
    instance_number: int = 1,
) -> Dataset:
    """Patient, General Study, General/RT Series, General Equipment and SOP Common modules."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"  # Pinnacle text is Latin-1
    ds.SOPClassUID = UID(sop_class)
    ds.SOPInstanceUID = UID(sop_uid)
    ds.StudyDate = ctx.study_date
    ds.StudyTime = ""
    ds.AccessionNumber = ""
    ds.Modality = modality
    ds.Manufacturer = MANUFACTURER
    ds.ReferringPhysicianName = ""
    ds.SeriesDescription = text(description, 64)
    ds.OperatorsName = ""  # Type 2 in the RT Series module
    ds.ManufacturerModelName = "Pinnacle3"
    ds.SoftwareVersions = [str(ctx.patient.version), CONVERTER_NAME]
    ds.PatientName = ctx.patient.dicom_name
    ds.PatientID = ctx.patient.mrn
    ds.PatientBirthDate = ctx.patient.birth_date
    ds.PatientSex = ctx.patient.sex
    ds.StudyInstanceUID = UID(ctx.refs.study_uid)
    ds.SeriesInstanceUID = UID(series_uid)
    ds.StudyID = ""
    ds.SeriesNumber = series_number
    ds.InstanceNumber = instance_number
    return ds


# -- CT ---------------------------------------------------------------------------------------------


def ct_from_img(
    ctx: Context, image_set: ImageSet, frame: Frame, series_uid: str, sop_uids: Sequence[str]
) -> list[Dataset]:
    """Build the CT series from ``ImageSet_N.img`` (see the module notes for intercept and byte order)."""
    h = image_set.header
    assert image_set.img_path is not None
    data = image_set.img_path.read_bytes()
    per_slice = h.x_dim * h.y_dim * 2
    if h.bytes_pix != 2 or len(data) < per_slice * h.z_dim:
        raise PinnacleFormatError(
            f"{image_set.img_path}: expected {h.z_dim} slices of {h.x_dim}x{h.y_dim} int16 "
            f"({per_slice * h.z_dim} bytes), found {len(data)} bytes"
        )
    big = h.byte_order != 0
    out = []
    for k in range(h.z_dim):
        voxels = array("h")
        voxels.frombytes(data[k * per_slice : (k + 1) * per_slice])
        if big != (struct.pack("=h", 1) == b"\x00\x01"):
            voxels.byteswap()
        if struct.pack("=h", 1) == b"\x00\x01":  # DICOM pixel data is little-endian here
            voxels.byteswap()
        z_pinn = h.z_start + k * h.z_pixdim
        first = frame.first_voxel(h, z_pinn)
        z = slice_z(image_set.slices[k].table_position) if len(image_set.slices) == h.z_dim else first[2]
        ds = base(
            ctx,
            SopClass.CT_IMAGE.value,
            sop_uids[k],
            "CT",
            series_uid,
            1,
            image_set.description or "Pinnacle CT",
            instance_number=k + 1,
        )
        ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
        ds.ContentDate = ctx.study_date
        ds.ContentTime = ""
        ds.AcquisitionNumber = ""
        ds.PatientPosition = frame.orientation.value
        ds.Laterality = ""  # Type 2C; dciodvfy wants it present (and only warns that it is empty)
        frame_of_reference(ds, ctx.refs.for_uid)
        ds.ImageOrientationPatient = [ds_text(v) for v in frame.orientation_cosines()]
        ds.ImagePositionPatient = [ds_text(first[0]), ds_text(first[1]), ds_text(z)]
        ds.SliceLocation = ds_text(z)
        ds.PixelSpacing = [ds_text(10 * h.y_pixdim), ds_text(10 * h.x_pixdim)]  # row spacing, column spacing
        ds.SliceThickness = ds_text(10 * h.z_pixdim)
        ds.Rows, ds.Columns = h.y_dim, h.x_dim
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.KVP = ""
        ds.RescaleIntercept = "-1000"
        ds.RescaleSlope = "1"
        ds.RescaleType = "HU"
        ds.PixelData = voxels.tobytes()
        ds["PixelData"].VR = "OW"
        out.append(with_file_meta(ds))
    return out


# -- RT Structure Set -------------------------------------------------------------------------------


def _contour_image(ref: SliceRef) -> Dataset:
    return make_item(ReferencedSOPClassUID=ref.sop_class, ReferencedSOPInstanceUID=ref.sop_uid)


def _colour(name: str) -> list[int]:
    return list(COLOURS.get(name.strip().lower(), (255, 0, 0)))


@dataclass
class StructureResult:
    """The RT Structure Set and what could not be placed on a slice."""

    dataset: Dataset
    unplaced: list[str]


def structure_set(
    ctx: Context, plan: Plan, frame: Frame, sop_uid: str, series_uid: str, isocentre_names: set[str]
) -> StructureResult:
    """RT Structure Set of a plan: every ROI of ``plan.roi`` and every POI of ``plan.Points``."""
    ds = base(ctx, SopClass.RT_STRUCTURE_SET.value, sop_uid, "RTSTRUCT", series_uid, 2, f"{plan.name} structures")
    frame_of_reference(ds, ctx.refs.for_uid)
    ds.StructureSetLabel = text(plan.name or "Pinnacle", 16)
    ds.StructureSetName = text(plan.name, 64)
    ds.StructureSetDate = ctx.study_date
    ds.StructureSetTime = ""
    refs = ctx.refs
    ds.ReferencedFrameOfReferenceSequence = seq(

            make_item(
                FrameOfReferenceUID=UID(refs.for_uid),
                RTReferencedStudySequence=seq(

                        make_item(
                            ReferencedSOPClassUID=STUDY_COMPONENT_SOP_CLASS,
                            ReferencedSOPInstanceUID=UID(refs.study_uid),
                            RTReferencedSeriesSequence=seq(

                                    make_item(
                                        SeriesInstanceUID=UID(refs.series_uid),
                                        ContourImageSequence=seq(*(_contour_image(s) for s in refs.slices)),
                                    )

                            ),
                        )

                ),
            )

    )
    roi_items, contour_items, observations = [], [], []
    unplaced: list[str] = []
    number = 0

    def add(name: str, kind: str, colour: list[int], contours: list[Dataset]) -> None:
        nonlocal number
        number += 1
        roi_items.append(
            make_item(
                ROINumber=number,
                ReferencedFrameOfReferenceUID=UID(refs.for_uid),
                ROIName=text(name, 64),
                ROIGenerationAlgorithm="MANUAL",
            )
        )
        item = make_item(ROIDisplayColor=colour, ReferencedROINumber=number)
        if contours:
            item.ContourSequence = seq(*contours)
        contour_items.append(item)
        observations.append(
            make_item(
                ObservationNumber=number, ReferencedROINumber=number, RTROIInterpretedType=kind, ROIInterpreter=""
            )
        )

    for roi in plan.rois:
        add(roi.name, _roi_type(roi), _colour(roi.color), _roi_contours(roi, frame, refs, unplaced))
    for poi in plan.pois:
        add(
            poi.name,
            "ISOCENTER" if poi.name in isocentre_names else "MARKER",
            [255, 255, 0],
            [_poi_contour(poi, frame, refs, unplaced)],
        )
    ds.StructureSetROISequence = seq(*roi_items)
    ds.ROIContourSequence = seq(*contour_items)
    ds.RTROIObservationsSequence = seq(*observations)
    return StructureResult(with_file_meta(ds), unplaced)


def _roi_type(roi: Roi) -> str:
    kind = roi.interpreted_type.strip().upper()
    return kind if kind in ROI_TYPES else "ORGAN"


def _roi_contours(roi: Roi, frame: Frame, refs: ImageRefs, unplaced: list[str]) -> list[Dataset]:
    out: list[Dataset] = []
    for curve in roi.curves:
        points = [frame.point(p) for p in curve.points]
        # Pinnacle may repeat the first point at the end; a DICOM CLOSED_PLANAR contour closes itself.
        if len(points) > 1 and all(abs(a - b) < 1e-6 for a, b in zip(points[0], points[-1], strict=True)):
            points.pop()
        if not points:
            continue
        item = make_item(
            ContourGeometricType="CLOSED_PLANAR" if len(points) > 2 else "OPEN_PLANAR",
            NumberOfContourPoints=len(points),
            ContourNumber=len(out) + 1,
            ContourData=[ds_text(v) for p in points for v in p],
        )
        ref = refs.nearest(points[0][2])
        if ref is not None:
            # Matched in DICOM z after the orientation mapping (feet-first flips the sign of z).
            item.ContourImageSequence = seq(_contour_image(ref))
        else:
            unplaced.append(f"{roi.name} contour at z={points[0][2]:.1f} mm lies on no CT slice")
        out.append(item)
    return out


def _poi_contour(poi: Poi, frame: Frame, refs: ImageRefs, unplaced: list[str]) -> Dataset:
    point = frame.point(poi.point)
    item = make_item(
        ContourGeometricType="POINT", NumberOfContourPoints=1, ContourNumber=1, ContourData=[ds_text(v) for v in point]
    )
    ref = refs.nearest(point[2])
    if ref is not None:
        item.ContourImageSequence = seq(_contour_image(ref))
    return item


# -- RT Plan ----------------------------------------------------------------------------------------


def _angle(value: float) -> str:
    return ds_text(value % 360.0)


def _machine(plan: Plan, beam: Beam) -> Machine | None:
    """The beam's machine in ``plan.Pinnacle.Machines``: by the name in MachineNameAndVersion, or the only one.

    The file holds the machines of this plan, so a single entry is the beam's whatever its name; with
    several, only the exact name decides (``None`` otherwise: guessing could give the wrong leaf widths).
    """
    if beam.machine_name in plan.machines:
        return plan.machines[beam.machine_name]
    if len(plan.machines) == 1:
        return next(iter(plan.machines.values()))
    return None


def _beam_source(plan: Plan, beam: Beam) -> str:
    """``…/plan.Trial:line`` of the beam's block (the file alone when the line is unknown)."""
    path = plan.folder / "plan.Trial"
    return f"{path}:{beam.line}" if beam.line else str(path)


def _require_leaf_geometry(plan: Plan, trial: Trial, beam: Beam, machine: Machine | None) -> None:
    """Raise when the beam has MLC positions but no leaf geometry resolves (never drop the MLC silently)."""
    if not any(cp.leaves for cp in beam.control_points) or (machine is not None and machine.leaf_pairs):
        return
    where = f"{_beam_source(plan, beam)}: beam {beam.name!r} of trial {trial.name!r} has MLC leaf positions but"
    machines_file = plan.folder / "plan.Pinnacle.Machines"
    if machine is not None:
        raise PinnacleFormatError(f"{where} machine {machine.name!r} of {machines_file} has no LeafPairList")
    if not plan.machines:
        raise PinnacleFormatError(f"{where} {machines_file} is missing or holds no machine")
    names = ", ".join(repr(name) for name in sorted(plan.machines))
    raise PinnacleFormatError(
        f"{where} its machine {beam.machine_name!r} is not in {machines_file} (which holds {names})"
    )


def _positions(beam: Beam, index: int, machine: Machine | None, source: str) -> list[Dataset]:
    cp = beam.control_points[index]
    out = [
        make_item(
            RTBeamLimitingDeviceType="ASYMX", LeafJawPositions=[ds_text(-10 * cp.left_jaw), ds_text(10 * cp.right_jaw)]
        ),
        make_item(
            RTBeamLimitingDeviceType="ASYMY", LeafJawPositions=[ds_text(-10 * cp.bottom_jaw), ds_text(10 * cp.top_jaw)]
        ),
    ]
    if machine is not None and machine.leaf_pairs and cp.leaves:
        order = machine.pair_order()
        if len(cp.leaves) != len(order):
            raise PinnacleFormatError(
                f"{source}: beam {beam.name!r} control point {index} has {len(cp.leaves)} MLC leaf pairs, "
                f"machine {machine.name!r} has {len(order)}"
            )
        bank_a = [ds_text(-10 * cp.leaves[i][0]) for i in order]
        bank_b = [ds_text(10 * cp.leaves[i][1]) for i in order]
        out.append(make_item(RTBeamLimitingDeviceType="MLCX", LeafJawPositions=bank_a + bank_b))
    return out


def applicator_type(name: str) -> str:
    """DICOM ApplicatorType of an electron applicator named as Pinnacle names it (``10x10``, ``6 x 10``, ``Circle 5``).

    The machine file does not say the shape; the name does in every clinic's naming seen: equal sides are
    ELECTRON_SQUARE, unequal ELECTRON_RECT, a circle ELECTRON_CIRC; anything else ELECTRON_SQUARE (the
    common shape), which only the applicator's ID then qualifies.
    """
    lowered = name.lower()
    if "circ" in lowered or "round" in lowered:
        return "ELECTRON_CIRC"
    match = re.search(r"(\d+(?:\.\d+)?)\s*[x*]\s*(\d+(?:\.\d+)?)", lowered)
    if match and float(match.group(1)) != float(match.group(2)):
        return "ELECTRON_RECT"
    return "ELECTRON_SQUARE"


def _beam_item(
    plan: Plan, trial: Trial, beam: Beam, frame: Frame, isocentre: tuple[float, float, float] | None, number: int
) -> Dataset:
    machine = _machine(plan, beam)
    electron = beam.modality == "ELECTRON"
    if not electron:
        # An electron beam is shaped by its applicator (and cut-out), never by the MLC: leaf values that a
        # file may still carry for it are not delivered and need no leaf geometry.
        _require_leaf_geometry(plan, trial, beam, machine)
    item = make_item(
        BeamNumber=number,
        BeamName=text(beam.name, 64),
        BeamType=beam.beam_type,
        RadiationType=beam.modality,
        PrimaryDosimeterUnit="MU",
        TreatmentMachineName=text(beam.machine_name or "UNKNOWN", 16),
        SourceAxisDistance=ds_text(10 * (machine.sad if machine else 100.0)),
        ReferencedPatientSetupNumber=1,
        TreatmentDeliveryType="TREATMENT",
        NumberOfWedges=0,
        NumberOfCompensators=0,
        NumberOfBoli=0,
        NumberOfBlocks=0,
        FinalCumulativeMetersetWeight="1",
    )
    devices = [
        make_item(RTBeamLimitingDeviceType="ASYMX", NumberOfLeafJawPairs=1),
        make_item(RTBeamLimitingDeviceType="ASYMY", NumberOfLeafJawPairs=1),
    ]
    with_mlc = (
        not electron
        and machine is not None
        and bool(machine.leaf_pairs)
        and any(cp.leaves for cp in beam.control_points)
    )
    if with_mlc:
        assert machine is not None
        devices.append(
            make_item(
                RTBeamLimitingDeviceType="MLCX",
                NumberOfLeafJawPairs=len(machine.leaf_pairs),
                LeafPositionBoundaries=[ds_text(v) for v in machine.boundaries_mm()],
            )
        )
    item.BeamLimitingDeviceSequence = seq(*devices)
    if electron and beam.applicator:
        item.ApplicatorSequence = seq(
            make_item(ApplicatorID=text(beam.applicator, 16), ApplicatorType=applicator_type(beam.applicator))
        )
    weights = [max(cp.weight, 0.0) for cp in beam.control_points]
    total = sum(weights) or 1.0
    # (Pinnacle control point index, cumulative weight) per DICOM control point.
    steps: list[tuple[int, float]] = []
    done = 0.0
    if beam.beam_type == "DYNAMIC":
        for i, w in enumerate(weights):
            steps.append((i, done / total))
            done += w
    else:
        for i, w in enumerate(weights):
            steps.append((i, done / total))
            done += w
            steps.append((i, done / total))
        if len(beam.control_points) == 1:
            steps = [(0, 0.0), (0, 1.0)]
    steps[-1] = (steps[-1][0], 1.0)
    cps = []
    for n, (i, cumulative) in enumerate(steps):
        cp = beam.control_points[i]
        point = make_item(ControlPointIndex=n, CumulativeMetersetWeight=ds_text(cumulative))
        if n == 0:
            point.NominalBeamEnergy = ds_text(beam.energy)
        positions = _positions(beam, i, machine if with_mlc else None, _beam_source(plan, beam))
        point.BeamLimitingDevicePositionSequence = seq(*positions)
        point.GantryAngle = _angle(cp.gantry)
        # The direction applies to the segment that follows the control point: none after the last one.
        rotating = beam.beam_type == "DYNAMIC" and n < len(steps) - 1
        point.GantryRotationDirection = ("CC" if beam.gantry_ccw else "CW") if rotating else "NONE"
        point.BeamLimitingDeviceAngle = _angle(cp.collimator)
        point.BeamLimitingDeviceRotationDirection = "NONE"
        if n == 0:
            point.PatientSupportAngle = _angle(cp.couch)
            point.PatientSupportRotationDirection = "NONE"
            point.TableTopEccentricAngle = "0"
            point.TableTopEccentricRotationDirection = "NONE"
            point.TableTopVerticalPosition = ""
            point.TableTopLongitudinalPosition = ""
            point.TableTopLateralPosition = ""
            if isocentre is not None:
                point.IsocenterPosition = [ds_text(v) for v in isocentre]
            if beam.ssd is not None:
                point.SourceToSurfaceDistance = ds_text(10 * beam.ssd)
        cps.append(point)
    item.NumberOfControlPoints = len(cps)
    item.ControlPointSequence = seq(*cps)
    return item


@dataclass(frozen=True)
class FractionGroup:
    """A prescription of the trial as a DICOM fraction group."""

    number: int
    fractions: int
    beams: tuple[int, ...]  # indexes into trial.beams


def fraction_groups(trial: Trial) -> tuple[list[FractionGroup], dict[int, int]]:
    """Fraction groups (one per prescription that beams use) and beam index → group number."""
    names = [rx.name for rx in trial.prescriptions]
    groups: dict[int, list[int]] = {}
    for i, beam in enumerate(trial.beams):
        index = names.index(beam.prescription_name) if beam.prescription_name in names else 0
        groups.setdefault(index, []).append(i)
    out, of_beam = [], {}
    for n, (rx_index, beams) in enumerate(sorted(groups.items()), start=1):
        fractions = trial.prescriptions[rx_index].fractions if trial.prescriptions else 1
        out.append(FractionGroup(n, fractions, tuple(beams)))
        for b in beams:
            of_beam[b] = n
    return out, of_beam


def rt_plan(
    ctx: Context,
    plan: Plan,
    trial: Trial,
    frame: Frame,
    sop_uid: str,
    series_uid: str,
    structure_uid: str,
    dose_reference_uids: Sequence[str],
) -> Dataset:
    """RT Plan of one trial: prescription, fraction groups, beams and control points."""
    ds = base(ctx, SopClass.RT_PLAN.value, sop_uid, "RTPLAN", series_uid, 3, f"{plan.name} / {trial.name}")
    frame_of_reference(ds, ctx.refs.for_uid)
    ds.RTPlanLabel = text(trial.name, 16) or "Trial"
    ds.RTPlanName = text(f"{plan.name}: {trial.name}", 64)
    ds.RTPlanDate = ctx.study_date
    ds.RTPlanTime = ""
    ds.RTPlanGeometry = "PATIENT"
    ds.ReferencedStructureSetSequence = seq(
        make_item(ReferencedSOPClassUID=SopClass.RT_STRUCTURE_SET.value, ReferencedSOPInstanceUID=UID(structure_uid))
    )
    if trial.prescriptions:
        ds.DoseReferenceSequence = seq(*(
            make_item(
                DoseReferenceNumber=n,
                DoseReferenceUID=UID(dose_reference_uids[n - 1]),
                DoseReferenceStructureType="SITE",
                DoseReferenceDescription=text(rx.name, 64),
                DoseReferenceType="TARGET",
                TargetPrescriptionDose=ds_text(rx.dose_per_fraction * rx.fractions / 100.0),
            )
            for n, rx in enumerate(trial.prescriptions, start=1)
        ))
    ds.PatientSetupSequence = seq(make_item(PatientPosition=frame.orientation.value, PatientSetupNumber=1))
    groups, _ = fraction_groups(trial)
    ds.FractionGroupSequence = seq(*(
        make_item(
            FractionGroupNumber=g.number,
            NumberOfFractionsPlanned=g.fractions,
            NumberOfBeams=len(g.beams),
            NumberOfBrachyApplicationSetups=0,
            ReferencedBeamSequence=seq(*(
                make_item(BeamMeterset=ds_text(trial.beams[b].mu_info.mu), ReferencedBeamNumber=trial.beams[b].number)
                for b in g.beams
            )),
        )
        for g in groups
    ))
    pois = {p.name: p.point for p in plan.pois}
    beams = []
    for beam in trial.beams:
        # The isocentre is the POI the beam names in IsocenterName, never a POI that merely looks like one.
        iso = pois.get(beam.isocenter_name)
        if iso is None:
            raise PinnacleFormatError(
                f"{_beam_source(plan, beam)}: beam {beam.name!r} names isocentre {beam.isocenter_name!r}, "
                "which plan.Points does not hold"
            )
        beams.append(_beam_item(plan, trial, beam, frame, frame.point(iso), beam.number))
    ds.BeamSequence = seq(*beams)
    return with_file_meta(ds)


# -- RT Dose ----------------------------------------------------------------------------------------


def read_dose_binary(plan: Plan, trial: Trial, beam: Beam) -> list[float]:
    """The beam's dose values (cGy/MU, file order) through its DoseVolume ``\\XDR:n\\`` reference."""
    if beam.dose_volume is None:
        raise PinnacleFormatError(
            f"{_beam_source(plan, beam)}: beam {beam.name!r} of trial {trial.name!r} has no DoseVolume"
        )
    path = plan.binary(beam.dose_volume)
    nx, ny, nz = trial.dose_grid.dims
    if not path.is_file():
        raise PinnacleFormatError(f"{path}: dose binary of beam {beam.name!r} is missing")
    data = path.read_bytes()
    if len(data) != 4 * nx * ny * nz:
        raise PinnacleFormatError(f"{path}: {len(data)} bytes, the {nx}x{ny}x{nz} dose grid needs {4 * nx * ny * nz}")
    return list(struct.unpack(f">{nx * ny * nz}f", data))


def rt_dose(
    ctx: Context,
    trial: Trial,
    frame: Frame,
    gy: Sequence[float],
    sop_uid: str,
    series_uid: str,
    plan_uid: str,
    summation: str,
    instance_number: int,
    beam_number: int | None = None,
    fraction_group: int | None = None,
) -> Dataset:
    """RT Dose of one grid in Gy (values in Pinnacle file order: X fastest, row 0 at maximum y)."""
    grid = trial.dose_grid
    nx, ny, nz = grid.dims
    dx, dy, dz = grid.voxel
    ox, oy, oz = grid.origin
    # Order slabs so that their position along the slice normal ascends (offsets 0, dz, 2dz... in mm).
    along = [frame.normal_z() * frame.point((ox, oy, oz + k * dz))[2] for k in range(nz)]
    order = sorted(range(nz), key=lambda k: along[k])
    first = frame.point((ox, oy + (ny - 1) * dy, oz + order[0] * dz))
    peak = max(gy) if gy else 0.0
    scaling = peak / 65535.0 if peak > 0 else 1.0
    plane = nx * ny
    pixels = array("H")
    for k in order:
        pixels.extend(min(65535, max(0, round(v / scaling))) for v in gy[k * plane : (k + 1) * plane])
    if struct.pack("=H", 1) == b"\x00\x01":
        pixels.byteswap()
    ds = base(
        ctx,
        SopClass.RT_DOSE.value,
        sop_uid,
        "RTDOSE",
        series_uid,
        4,
        f"{trial.name} dose",
        instance_number=instance_number,
    )
    frame_of_reference(ds, ctx.refs.for_uid)
    ds.ContentDate = ctx.study_date
    ds.ContentTime = ""
    ds.ImageOrientationPatient = [ds_text(v) for v in frame.orientation_cosines()]
    ds.ImagePositionPatient = [ds_text(v) for v in first]
    ds.PixelSpacing = [ds_text(10 * dy), ds_text(10 * dx)]  # row spacing (between rows), column spacing
    ds.SliceThickness = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.NumberOfFrames = nz
    ds.FrameIncrementPointer = 0x3004000C
    ds.Rows, ds.Columns = ny, nx
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.DoseUnits = "GY"
    ds.DoseType = "PHYSICAL"
    ds.DoseSummationType = summation
    ds.GridFrameOffsetVector = [ds_text(10 * dz * i) for i in range(nz)]
    ds.DoseGridScaling = f"{scaling:.10g}"[:16]
    ds.TissueHeterogeneityCorrection = "IMAGE"
    plan_ref = make_item(ReferencedSOPClassUID=SopClass.RT_PLAN.value, ReferencedSOPInstanceUID=UID(plan_uid))
    if summation == "BEAM" and beam_number is not None and fraction_group is not None:
        plan_ref.ReferencedFractionGroupSequence = seq(

                make_item(
                    ReferencedFractionGroupNumber=fraction_group,
                    ReferencedBeamSequence=seq(make_item(ReferencedBeamNumber=beam_number)),
                )

        )
    ds.ReferencedRTPlanSequence = seq(plan_ref)
    ds.PixelData = pixels.tobytes()
    ds["PixelData"].VR = "OW"
    return with_file_meta(ds)


def study_date(image_set: ImageSet) -> str:
    """StudyDate from ImageSet ScanTimeFromScanner, else the header's ``date``.

    Pinnacle often keeps the date only, so every object's StudyTime (and Content/Structure Set/RT Plan
    time) stays empty rather than invented.
    """
    return _date(image_set.scan_date) or _date(image_set.header.scan_date)
