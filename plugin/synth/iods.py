"""Builders for the DICOM objects of the synthetic clinic (one function per IOD).

Every builder returns a :class:`pydicom.Dataset` with its file meta filled in, ready for
:func:`encode`. Nothing here reads the clock or a random source: all values come from the arguments,
so the caller controls determinism. The attribute sets are the ones ``dciodvfy`` (dicom3tools) needs to
report no errors for each IOD; comments mark the places where a DICOM rule forced a choice.
"""

from __future__ import annotations

import math
import struct
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from io import BytesIO

from pydicom import Dataset
from pydicom.sequence import Sequence as DicomSequence

from rtharvest.core.dicombuild import (
    STUDY_COMPONENT_SOP_CLASS,
    code,
    ds_text,
    file_meta,
    frame_of_reference,
    make_item,
    seq,
)
from rtharvest.core.sopclass import SopClass

#: Fixed implementation identity so the file meta does not change with the pydicom version.
IMPLEMENTATION_CLASS_UID = "2.25.262183358312400936211335718066318335590"
IMPLEMENTATION_VERSION_NAME = "RTHARVEST_SYNTH1"
#: Namespace of the name-based (version 5) UUIDs behind every generated UID.
_UID_NAMESPACE = uuid.UUID("5f1d8a0e-2a77-4f44-9a57-6c3e8e6b1c42")

MANUFACTURER = "rtharvest synthetic clinic"
INSTITUTION = "Synthetic Radiotherapy Clinic"


def make_uid(*parts: object) -> str:
    """Return a deterministic ``2.25.<uuid>`` UID derived from ``parts``.

    ``pydicom.uid.generate_uid(prefix=None)`` ignores its entropy sources and returns a random UUID,
    so the name-based UUID (version 5) is built here instead; joining with ``|`` keeps
    ``("1", "23")`` and ``("12", "3")`` apart.
    """
    return f"2.25.{uuid.uuid5(_UID_NAMESPACE, '|'.join(str(p) for p in parts)).int}"


@dataclass(frozen=True)
class Patient:
    """Patient module values."""

    patient_id: str
    name: str
    birth_date: str
    sex: str


@dataclass(frozen=True)
class Study:
    """General Study module values."""

    uid: str
    date: str
    time: str
    description: str
    study_id: str
    accession: str


@dataclass(frozen=True)
class Series:
    """General/RT Series module values."""

    uid: str
    number: int
    modality: str
    description: str
    date: str
    time: str


@dataclass(frozen=True)
class ImageRef:
    """What other objects need to know about one stored image."""

    sop_class: str
    sop_uid: str
    series_uid: str
    study_uid: str
    for_uid: str
    z: float


@dataclass
class ImageGeometry:
    """Geometry of an axial image series (patient coordinates in mm)."""

    rows: int
    spacing: float
    slices: int
    thickness: float
    z0: float
    origin_xy: tuple[float, float] = field(default=(0.0, 0.0))

    def position(self, index: int) -> list[float]:
        """ImagePositionPatient of slice ``index`` (centre of the first voxel)."""
        return [self.origin_xy[0], self.origin_xy[1], self.z0 + index * self.thickness]

    @property
    def centre(self) -> tuple[float, float]:
        """Patient x/y of the image centre."""
        half = (self.rows - 1) * self.spacing / 2.0
        return (self.origin_xy[0] + half, self.origin_xy[1] + half)


# --------------------------------------------------------------------------------------------------
# common modules


def base_dataset(
    sop_class: str,
    sop_uid: str,
    patient: Patient,
    study: Study,
    series: Series,
    *,
    instance_number: int,
    content_date: str,
    content_time: str,
    station: str = "SYNTH",
) -> Dataset:
    """Patient, General Study, (RT/General) Series, General Equipment and SOP Common modules."""
    ds = Dataset()
    ds.file_meta = file_meta(sop_class, sop_uid, IMPLEMENTATION_CLASS_UID, version_name=IMPLEMENTATION_VERSION_NAME)
    # SOP Common; the creation date is the content date, never the wall clock (byte-identical output).
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.InstanceCreationDate = content_date
    ds.InstanceCreationTime = content_time
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = study.date
    ds.SeriesDate = series.date
    ds.ContentDate = content_date
    ds.StudyTime = study.time
    ds.SeriesTime = series.time
    ds.ContentTime = content_time
    ds.AccessionNumber = study.accession
    ds.Modality = series.modality
    ds.Manufacturer = MANUFACTURER
    ds.InstitutionName = INSTITUTION
    ds.ReferringPhysicianName = "SYNTH^REFERRER"
    ds.StationName = station
    ds.StudyDescription = study.description
    ds.SeriesDescription = series.description
    ds.OperatorsName = "SYNTH^OPERATOR"
    ds.ManufacturerModelName = "rtharvest-synth"
    ds.PatientName = patient.name
    ds.PatientID = patient.patient_id
    ds.PatientBirthDate = patient.birth_date
    ds.PatientSex = patient.sex
    ds.DeviceSerialNumber = "0001"
    ds.SoftwareVersions = "1"
    ds.StudyInstanceUID = study.uid
    ds.SeriesInstanceUID = series.uid
    ds.StudyID = study.study_id
    ds.SeriesNumber = series.number
    ds.InstanceNumber = instance_number
    return ds


def encode(ds: Dataset) -> bytes:
    """Serialise ``ds`` as a DICOM Part-10 file (128-byte preamble, DICM, file meta)."""
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


# --------------------------------------------------------------------------------------------------
# pixel data


@lru_cache(maxsize=64)
def _phantom_slice(rows: int, radius_x: int, radius_y: int, inner: int, body: int, core: int) -> bytes:
    """One slice of an elliptic phantom as little-endian uint16, built row by row from runs.

    Runs of repeated bytes keep a 512×512 slice at a fraction of a millisecond without numpy.
    """
    zero = struct.pack("<H", 0)
    body_px = struct.pack("<H", body)
    core_px = struct.pack("<H", core)
    centre = rows // 2
    out = bytearray()
    for y in range(rows):
        dy = (y - centre) / max(radius_y, 1)
        if abs(dy) >= 1.0:
            out += zero * rows
            continue
        half = int(radius_x * math.sqrt(1.0 - dy * dy))
        left = max(centre - half, 0)
        right = min(centre + half, rows)
        inner_dy = (y - centre) / max(inner, 1)
        if abs(inner_dy) < 1.0:
            inner_half = min(int(inner * math.sqrt(1.0 - inner_dy * inner_dy)), half)
            il, ir = centre - inner_half, centre + inner_half
            out += zero * left + body_px * (il - left) + core_px * (ir - il) + body_px * (right - ir)
        else:
            out += zero * left + body_px * (right - left)
        out += zero * (rows - right)
    return bytes(out)


def _image_pixels(rows: int, index: int, slices: int, body: int, core: int) -> bytes:
    # The body narrows towards the ends of the volume so that slices differ from each other.
    frac = 0.5 - abs(index - (slices - 1) / 2.0) / max(slices, 1) * 0.5
    radius_x = max(int(rows * (0.30 + frac * 0.2)), 2)
    radius_y = max(int(rows * (0.22 + frac * 0.15)), 2)
    return _phantom_slice(rows, radius_x, radius_y, max(rows // 10, 1), body, core)


def _image_plane(ds: Dataset, geometry: ImageGeometry, index: int) -> None:
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.ImagePositionPatient = [ds_text(v, 6) for v in geometry.position(index)]
    ds.SliceLocation = ds_text(geometry.position(index)[2], 6)
    ds.PixelSpacing = [ds_text(geometry.spacing, 6), ds_text(geometry.spacing, 6)]
    ds.SliceThickness = ds_text(geometry.thickness, 6)
    ds.Rows = geometry.rows
    ds.Columns = geometry.rows
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelRepresentation = 0


def _approve(ds: Dataset, date: str, time: str) -> None:
    # Approval module: APPROVED makes the review date, time and reviewer Type 2C-required.
    ds.ApprovalStatus = "APPROVED"
    ds.ReviewDate = date
    ds.ReviewTime = time
    ds.ReviewerName = "SYNTH^PHYSICIST"


def image(
    modality: str,
    sop_uid: str,
    patient: Patient,
    study: Study,
    series: Series,
    for_uid: str,
    geometry: ImageGeometry,
    index: int,
    *,
    acquisition_time: str,
) -> Dataset:
    """One slice of a CT, MR or PET image series (single-frame IODs)."""
    sop_class = {"CT": SopClass.CT_IMAGE, "MR": SopClass.MR_IMAGE, "PT": SopClass.PET_IMAGE}[modality].value
    ds = base_dataset(
        sop_class,
        sop_uid,
        patient,
        study,
        series,
        instance_number=index + 1,
        content_date=series.date,
        content_time=acquisition_time,
    )
    ds.AcquisitionDate = series.date
    ds.AcquisitionTime = acquisition_time
    ds.AcquisitionNumber = 1
    # Laterality is Type 2C in General Series; empty means "not a paired body part".
    ds.Laterality = ""
    if modality != "PT":
        # PET carries PatientOrientationCodeSequence instead; both at once is an error.
        ds.PatientPosition = "HFS"
    frame_of_reference(ds, for_uid)
    _image_plane(ds, geometry, index)
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    if modality == "CT":
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.KVP = "120"
        # Stored values are HU + 1024: air 0, water 1024, bone 2024.
        ds.RescaleIntercept = "-1024"
        ds.RescaleSlope = "1"
        ds.RescaleType = "HU"
        ds.WindowCenter = "40"
        ds.WindowWidth = "400"
        pixels = _image_pixels(geometry.rows, index, geometry.slices, 1024, 2024)
    elif modality == "MR":
        ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
        ds.ScanningSequence = "SE"
        ds.SequenceVariant = "NONE"
        ds.ScanOptions = ""
        ds.MRAcquisitionType = "2D"
        ds.RepetitionTime = "500"
        ds.EchoTime = "15"
        ds.EchoTrainLength = "1"
        ds.MagneticFieldStrength = "1.5"
        ds.ImagedNucleus = "1H"
        ds.SpacingBetweenSlices = ds_text(geometry.thickness, 6)
        pixels = _image_pixels(geometry.rows, index, geometry.slices, 600, 1400)
    else:
        ds.ImageType = ["ORIGINAL", "PRIMARY"]
        # PET Series module: a static, attenuation- and decay-corrected whole-body series.
        ds.Units = "BQML"
        ds.CountsSource = "EMISSION"
        ds.SeriesType = ["STATIC", "IMAGE"]
        ds.NumberOfSlices = geometry.slices
        ds.CorrectedImage = ["ATTN", "DECY"]
        ds.DecayCorrection = "START"
        ds.CollimatorType = "NONE"
        ds.RadiopharmaceuticalInformationSequence = seq(
            make_item(
                RadionuclideCodeSequence=seq(code("C-111A1", "SRT", "^18^Fluorine")),
                RadiopharmaceuticalStartTime=acquisition_time,
                RadionuclideTotalDose="350000000",
                RadionuclideHalfLife="6586.2",
                RadionuclidePositronFraction="0.97",
            )
        )
        ds.PatientOrientationCodeSequence = seq()
        ds.PatientGantryRelationshipCodeSequence = seq()
        # PET Image module: Rescale Intercept must be 0, the slope carries the activity scale.
        ds.RescaleIntercept = "0"
        ds.RescaleSlope = "1"
        ds.FrameReferenceTime = "0"
        ds.ImageIndex = index + 1
        ds.ActualFrameDuration = 180000
        ds.DecayFactor = "1"
        pixels = _image_pixels(geometry.rows, index, geometry.slices, 200, 3000)
    ds.PixelData = pixels
    ds["PixelData"].VR = "OW"
    return ds


# --------------------------------------------------------------------------------------------------
# RT structure set


@dataclass(frozen=True)
class Roi:
    """One ROI: ``contour_slices`` are indexes into the referenced images (empty: no contours)."""

    number: int
    name: str
    interpreted_type: str
    radius: float
    contour_slices: tuple[int, ...]
    colour: tuple[int, int, int]


def structure_set(
    sop_uid: str,
    patient: Patient,
    study: Study,
    series: Series,
    *,
    label: str,
    date: str,
    time: str,
    images: Sequence[ImageRef],
    centre: tuple[float, float],
    rois: Sequence[Roi],
) -> Dataset:
    """RT Structure Set referencing every image of one series, with per-contour image references."""
    ds = base_dataset(
        SopClass.RT_STRUCTURE_SET.value,
        sop_uid,
        patient,
        study,
        series,
        instance_number=1,
        content_date=date,
        content_time=time,
    )
    first = images[0]
    # Newer editions of PS3.3 add the Frame of Reference module to the RT Structure Set IOD.
    frame_of_reference(ds, first.for_uid)
    ds.StructureSetLabel = label
    ds.StructureSetName = label
    ds.StructureSetDate = date
    ds.StructureSetTime = time
    contour_images = [
        make_item(ReferencedSOPClassUID=img.sop_class, ReferencedSOPInstanceUID=img.sop_uid) for img in images
    ]
    ds.ReferencedFrameOfReferenceSequence = seq(
        make_item(
            FrameOfReferenceUID=first.for_uid,
            RTReferencedStudySequence=seq(
                make_item(
                    ReferencedSOPClassUID=STUDY_COMPONENT_SOP_CLASS,
                    ReferencedSOPInstanceUID=first.study_uid,
                    RTReferencedSeriesSequence=seq(
                        make_item(SeriesInstanceUID=first.series_uid, ContourImageSequence=seq(*contour_images))
                    ),
                )
            ),
        )
    )
    ds.StructureSetROISequence = seq(
        *(
            make_item(
                ROINumber=roi.number,
                ReferencedFrameOfReferenceUID=first.for_uid,
                ROIName=roi.name,
                ROIGenerationAlgorithm="MANUAL",
            )
            for roi in rois
        )
    )
    roi_contours = []
    for roi in rois:
        item = make_item(ROIDisplayColor=list(roi.colour), ReferencedROINumber=roi.number)
        contours = []
        for number, slice_index in enumerate(roi.contour_slices, start=1):
            img = images[slice_index]
            points: list[str] = []
            for k in range(8):
                angle = 2.0 * math.pi * k / 8
                points += [
                    ds_text(centre[0] + roi.radius * math.cos(angle), 6),
                    ds_text(centre[1] + roi.radius * math.sin(angle), 6),
                    ds_text(img.z, 6),
                ]
            contours.append(
                make_item(
                    ContourImageSequence=seq(
                        make_item(ReferencedSOPClassUID=img.sop_class, ReferencedSOPInstanceUID=img.sop_uid)
                    ),
                    ContourGeometricType="CLOSED_PLANAR",
                    NumberOfContourPoints=8,
                    ContourNumber=number,
                    ContourData=points,
                )
            )
        # An ROI without contours simply has no ContourSequence (the first ROI of some sets).
        if contours:
            item.ContourSequence = seq(*contours)
        roi_contours.append(item)
    ds.ROIContourSequence = seq(*roi_contours)
    ds.RTROIObservationsSequence = seq(
        *(
            make_item(
                ObservationNumber=roi.number,
                ReferencedROINumber=roi.number,
                RTROIInterpretedType=roi.interpreted_type,
                ROIInterpreter="",
            )
            for roi in rois
        )
    )
    _approve(ds, date, time)
    return ds


# --------------------------------------------------------------------------------------------------
# RT plans


@dataclass(frozen=True)
class Beam:
    """One treatment beam (photon or ion)."""

    number: int
    name: str
    gantry: float
    meterset: float


@dataclass(frozen=True)
class PlanSpec:
    """Everything an RT (Ion) Plan carries that the clinic varies."""

    label: str
    intent: str
    fractions: int
    beams: tuple[Beam, ...]
    machine: str
    ion: bool = False
    tomo: bool = False
    structure_set_uid: str | None = None
    geometry: str = "PATIENT"
    isocenter: tuple[float, float, float] = (0.0, 0.0, 0.0)
    dose_per_fraction: float = 2.0
    verified_plan: tuple[str, str] | None = None  # (SOP class, SOP instance) of the plan it verifies
    for_uid: str | None = None


def _axis_attributes(item: Dataset, gantry: float, isocenter: tuple[float, float, float]) -> None:
    # The first control point must state every axis explicitly (Type 1C "required in first CP").
    item.GantryAngle = ds_text(gantry, 6)
    item.GantryRotationDirection = "NONE"
    item.BeamLimitingDeviceAngle = "0"
    item.BeamLimitingDeviceRotationDirection = "NONE"
    item.PatientSupportAngle = "0"
    item.PatientSupportRotationDirection = "NONE"
    item.TableTopEccentricAngle = "0"
    item.TableTopEccentricRotationDirection = "NONE"
    item.TableTopVerticalPosition = "0"
    item.TableTopLongitudinalPosition = "0"
    item.TableTopLateralPosition = "0"
    item.IsocenterPosition = [ds_text(v, 6) for v in isocenter]
    item.TableTopPitchAngle = 0.0
    item.TableTopPitchRotationDirection = "NONE"
    item.TableTopRollAngle = 0.0
    item.TableTopRollRotationDirection = "NONE"


def _photon_beam(beam: Beam, spec: PlanSpec) -> Dataset:
    item = make_item(
        BeamNumber=beam.number,
        BeamName=beam.name,
        # TomoTherapy delivers helically: the beam is DYNAMIC and its fan moves with the couch.
        BeamType="DYNAMIC" if spec.tomo else "STATIC",
        RadiationType="PHOTON",
        PrimaryDosimeterUnit="MU",
        TreatmentMachineName=spec.machine,
        SourceAxisDistance="850" if spec.tomo else "1000",
        ReferencedPatientSetupNumber=1,
        ReferencedToleranceTableNumber=1,
        TreatmentDeliveryType="TREATMENT",
        NumberOfWedges=0,
        NumberOfCompensators=0,
        NumberOfBoli=0,
        NumberOfBlocks=0,
        FinalCumulativeMetersetWeight="1",
        NumberOfControlPoints=2,
    )
    item.BeamLimitingDeviceSequence = seq(
        make_item(RTBeamLimitingDeviceType="ASYMX", NumberOfLeafJawPairs=1),
        make_item(RTBeamLimitingDeviceType="ASYMY", NumberOfLeafJawPairs=1),
    )
    first = make_item(ControlPointIndex=0, NominalBeamEnergy="6", DoseRateSet="600", CumulativeMetersetWeight="0")
    first.BeamLimitingDevicePositionSequence = seq(
        make_item(RTBeamLimitingDeviceType="ASYMX", LeafJawPositions=["-50", "50"]),
        make_item(RTBeamLimitingDeviceType="ASYMY", LeafJawPositions=["-50", "50"]),
    )
    _axis_attributes(first, beam.gantry, spec.isocenter)
    first.SourceToSurfaceDistance = "920"
    last = make_item(ControlPointIndex=1, CumulativeMetersetWeight="1")
    item.ControlPointSequence = seq(first, last)
    return item


def _ion_beam(beam: Beam, spec: PlanSpec) -> Dataset:
    item = make_item(
        BeamNumber=beam.number,
        BeamName=beam.name,
        BeamType="STATIC",
        RadiationType="PROTON",
        PrimaryDosimeterUnit="MU",
        TreatmentMachineName=spec.machine,
        ScanMode="MODULATED",
        ModulatedScanModeType="STATIONARY",
        VirtualSourceAxisDistances=[2000.0, 2000.0],
        ReferencedPatientSetupNumber=1,
        ReferencedToleranceTableNumber=1,
        TreatmentDeliveryType="TREATMENT",
        NumberOfWedges=0,
        NumberOfCompensators=0,
        NumberOfBoli=0,
        NumberOfBlocks=0,
        NumberOfRangeShifters=0,
        NumberOfLateralSpreadingDevices=0,
        NumberOfRangeModulators=0,
        PatientSupportType="TABLE",
        FinalCumulativeMetersetWeight="1",
        NumberOfControlPoints=2,
    )
    first = make_item(
        ControlPointIndex=0,
        CumulativeMetersetWeight="0",
        NominalBeamEnergy="150",
        NominalBeamEnergyUnit="MEV",
        ScanSpotTuneID="3.0",
        NumberOfScanSpotPositions=2,
        ScanSpotPositionMap=[-5.0, 0.0, 5.0, 0.0],
        ScanSpotMetersetWeights=[0.5, 0.5],
        ScanningSpotSize=[5.0, 5.0],
        NumberOfPaintings=1,
        SnoutPosition=300.0,
        MetersetRate=10.0,
    )
    _axis_attributes(first, beam.gantry, spec.isocenter)
    # Ion control points carry FL pitch/roll angles too, like photon ones.
    last = make_item(
        ControlPointIndex=1,
        CumulativeMetersetWeight="1",
        NominalBeamEnergy="150",
        ScanSpotTuneID="3.0",
        NumberOfScanSpotPositions=2,
        ScanSpotPositionMap=[-5.0, 0.0, 5.0, 0.0],
        ScanSpotMetersetWeights=[0.0, 0.0],
        NumberOfPaintings=1,
    )
    item.IonControlPointSequence = seq(first, last)
    return item


def plan(
    sop_uid: str,
    patient: Patient,
    study: Study,
    series: Series,
    *,
    spec: PlanSpec,
    date: str,
    time: str,
) -> Dataset:
    """RT Plan or RT Ion Plan with fraction scheme, beams, setup and tolerance tables."""
    sop_class = SopClass.RT_ION_PLAN.value if spec.ion else SopClass.RT_PLAN.value
    ds = base_dataset(
        sop_class, sop_uid, patient, study, series, instance_number=1, content_date=date, content_time=time
    )
    if spec.for_uid is not None:
        # Frame of Reference is mandatory in the RT Ion Plan IOD (user option in RT Plan).
        frame_of_reference(ds, spec.for_uid)
    ds.RTPlanLabel = spec.label
    ds.RTPlanName = spec.label
    ds.RTPlanDate = date
    ds.RTPlanTime = time
    ds.PlanIntent = spec.intent
    # RTPlanGeometry PATIENT makes ReferencedStructureSetSequence Type 1 (C.8.8.9) and dciodvfy enforces
    # it; real TomoTherapy exports say PATIENT and omit the sequence anyway, but to stay conformant the
    # plans without a structure set (machine QA, TomoTherapy-style) state TREATMENT_DEVICE here.
    ds.RTPlanGeometry = spec.geometry
    if spec.structure_set_uid is not None:
        ds.ReferencedStructureSetSequence = seq(
            make_item(
                ReferencedSOPClassUID=SopClass.RT_STRUCTURE_SET.value,
                ReferencedSOPInstanceUID=spec.structure_set_uid,
            )
        )
    if spec.verified_plan is not None:
        ds.ReferencedRTPlanSequence = seq(
            make_item(
                ReferencedSOPClassUID=spec.verified_plan[0],
                ReferencedSOPInstanceUID=spec.verified_plan[1],
                RTPlanRelationship="VERIFIED_PLAN",
            )
        )
    ds.DoseReferenceSequence = seq(
        make_item(
            DoseReferenceNumber=1,
            DoseReferenceUID=make_uid("doseref", sop_uid),
            DoseReferenceStructureType="SITE",
            DoseReferenceDescription="PTV",
            DoseReferenceType="TARGET",
            TargetPrescriptionDose=ds_text(spec.dose_per_fraction * spec.fractions, 6),
        )
    )
    tolerance = make_item(
        ToleranceTableNumber=1,
        ToleranceTableLabel="T1",
        GantryAngleTolerance="1",
        PatientSupportAngleTolerance="1",
        TableTopVerticalPositionTolerance="5",
        TableTopLongitudinalPositionTolerance="5",
        TableTopLateralPositionTolerance="5",
    )
    if spec.ion:
        ds.IonToleranceTableSequence = seq(tolerance)
    else:
        ds.ToleranceTableSequence = seq(tolerance)
    ds.PatientSetupSequence = seq(make_item(PatientPosition="HFS", PatientSetupNumber=1, SetupTechnique="ISOCENTRIC"))
    ds.FractionGroupSequence = seq(
        make_item(
            FractionGroupNumber=1,
            NumberOfFractionsPlanned=spec.fractions,
            NumberOfBeams=len(spec.beams),
            NumberOfBrachyApplicationSetups=0,
            ReferencedBeamSequence=seq(
                *(
                    make_item(
                        BeamDose=ds_text(spec.dose_per_fraction / len(spec.beams), 6),
                        BeamMeterset=ds_text(beam.meterset, 6),
                        ReferencedBeamNumber=beam.number,
                    )
                    for beam in spec.beams
                )
            ),
        )
    )
    if spec.ion:
        ds.IonBeamSequence = seq(*(_ion_beam(beam, spec) for beam in spec.beams))
    else:
        ds.BeamSequence = seq(*(_photon_beam(beam, spec) for beam in spec.beams))
    _approve(ds, date, time)
    return ds


# --------------------------------------------------------------------------------------------------
# RT dose


@dataclass(frozen=True)
class DoseSpec:
    """An RT Dose grid: ``beam_number`` set for BEAM doses, ``structure_set_uid`` for TomoTherapy."""

    plan_uid: str
    plan_class: str
    summation: str
    beam_number: int | None = None
    structure_set_uid: str | None = None
    dvh_roi: int | None = None
    max_dose: float = 60.0


def dose(
    sop_uid: str,
    patient: Patient,
    study: Study,
    series: Series,
    *,
    spec: DoseSpec,
    for_uid: str,
    origin: tuple[float, float, float],
    instance_number: int,
    date: str,
    time: str,
) -> Dataset:
    """RT Dose (multi-frame 8×8×4 grid, uint16 scaled by DoseGridScaling) referencing its plan."""
    ds = base_dataset(
        SopClass.RT_DOSE.value,
        sop_uid,
        patient,
        study,
        series,
        instance_number=instance_number,
        content_date=date,
        content_time=time,
    )
    frame_of_reference(ds, for_uid)
    rows, cols, frames, spacing = 8, 8, 4, 4.0
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.ImagePositionPatient = [ds_text(v, 6) for v in origin]
    ds.PixelSpacing = [ds_text(spacing, 6), ds_text(spacing, 6)]
    ds.SliceThickness = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.NumberOfFrames = frames
    # Multi-frame Module: the frames step through GridFrameOffsetVector.
    ds.FrameIncrementPointer = 0x3004000C
    ds.Rows = rows
    ds.Columns = cols
    # 16-bit grid: dciodvfy (2022) aborts on 32-bit OW pixel data, and RT Dose allows 16 or 32.
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.DoseUnits = "GY"
    ds.DoseType = "PHYSICAL"
    ds.DoseSummationType = spec.summation
    ds.GridFrameOffsetVector = [ds_text(i * spacing, 6) for i in range(frames)]
    scaling = spec.max_dose / 60000
    ds.DoseGridScaling = f"{scaling:.8g}"
    ds.TissueHeterogeneityCorrection = "IMAGE"
    fraction_ref = make_item(ReferencedFractionGroupNumber=1)
    if spec.beam_number is not None:
        fraction_ref.ReferencedBeamSequence = seq(make_item(ReferencedBeamNumber=spec.beam_number))
    plan_ref = make_item(ReferencedSOPClassUID=spec.plan_class, ReferencedSOPInstanceUID=spec.plan_uid)
    if spec.summation in ("FRACTION", "BEAM"):
        plan_ref.ReferencedFractionGroupSequence = seq(fraction_ref)
    ds.ReferencedRTPlanSequence = seq(plan_ref)
    if spec.structure_set_uid is not None:
        # TomoTherapy-style: the structure set is named by the dose's RT DVH module, not by the plan.
        # The RT DVH module makes DVHSequence Type 1, so a one-bin cumulative DVH comes with it.
        ds.ReferencedStructureSetSequence = seq(
            make_item(
                ReferencedSOPClassUID=SopClass.RT_STRUCTURE_SET.value,
                ReferencedSOPInstanceUID=spec.structure_set_uid,
            )
        )
        ds.DVHNormalizationDoseValue = ds_text(spec.max_dose, 6)
        ds.DVHSequence = seq(
            make_item(
                DVHReferencedROISequence=seq(
                    make_item(DVHROIContributionType="INCLUDED", ReferencedROINumber=spec.dvh_roi or 1)
                ),
                DVHType="CUMULATIVE",
                DoseUnits="GY",
                DoseType="PHYSICAL",
                DVHDoseScaling="1",
                DVHVolumeUnits="PERCENT",
                DVHNumberOfBins=2,
                DVHData=["1", "100", ds_text(spec.max_dose, 6), "0"],
            )
        )
    values = bytearray()
    cx, cy = (cols - 1) / 2.0, (rows - 1) / 2.0
    for f in range(frames):
        for y in range(rows):
            for x in range(cols):
                r2 = ((x - cx) ** 2 + (y - cy) ** 2) / (cx * cx + cy * cy)
                falloff = 1.0 - 0.15 * abs(f - (frames - 1) / 2.0)
                values += struct.pack("<H", int(60000 * max(0.0, 1.0 - r2) * falloff))
    ds.PixelData = bytes(values)
    ds["PixelData"].VR = "OW"
    return ds


# --------------------------------------------------------------------------------------------------
# treatment records


def treatment_record(
    sop_uid: str,
    patient: Patient,
    study: Study,
    series: Series,
    *,
    plan_uid: str,
    plan_class: str,
    spec: PlanSpec,
    fraction: int,
    date: str,
    time: str,
    beams: Sequence[Beam] | None = None,
    delivery_type: str = "TREATMENT",
    termination: str = "NORMAL",
    instance_number: int | None = None,
) -> Dataset:
    """RT Beams (or Ion Beams) Treatment Record of one delivered fraction of ``spec``.

    ``beams``: the beams this record holds (default: all of the plan's). A system writing one record per
    beam gives one beam; a session interrupted and finished later gives the beams of each part, the
    second with ``delivery_type`` CONTINUATION (PS3.3 RT Beams Session Record, TreatmentDeliveryType)."""
    sop_class = SopClass.RT_ION_BEAMS_TREATMENT_RECORD.value if spec.ion else SopClass.RT_BEAMS_TREATMENT_RECORD.value
    ds = base_dataset(
        sop_class,
        sop_uid,
        patient,
        study,
        series,
        instance_number=fraction if instance_number is None else instance_number,
        content_date=date,
        content_time=time,
        station=spec.machine,
    )
    ds.TreatmentDate = date
    ds.TreatmentTime = time
    ds.ReferencedRTPlanSequence = seq(make_item(ReferencedSOPClassUID=plan_class, ReferencedSOPInstanceUID=plan_uid))
    ds.TreatmentMachineSequence = seq(
        make_item(
            TreatmentMachineName=spec.machine,
            Manufacturer=MANUFACTURER,
            InstitutionName=INSTITUTION,
            ManufacturerModelName="synthetic linac",
            DeviceSerialNumber="0001",
        )
    )
    ds.ReferencedFractionGroupNumber = 1
    ds.NumberOfFractionsPlanned = spec.fractions
    ds.PrimaryDosimeterUnit = "MU"
    sessions = []
    for beam in spec.beams if beams is None else beams:
        item = make_item(
            ReferencedBeamNumber=beam.number,
            BeamName=beam.name,
            BeamType="DYNAMIC" if spec.tomo else "STATIC",
            RadiationType="PROTON" if spec.ion else "PHOTON",
            CurrentFractionNumber=fraction,
            TreatmentDeliveryType=delivery_type,
            TreatmentTerminationStatus=termination,
            # dicom3tools 2022 lacks VERIFIED in its enumeration (it lists "NOT_VERIFED");
            # VERIFIED_OVR is a standard value it accepts.
            TreatmentVerificationStatus="VERIFIED_OVR",
            SpecifiedPrimaryMeterset=ds_text(beam.meterset, 6),
            DeliveredPrimaryMeterset=ds_text(beam.meterset, 6),
            NumberOfWedges=0,
            NumberOfCompensators=0,
            NumberOfBoli=0,
            NumberOfBlocks=0,
            NumberOfControlPoints=2,
        )
        first = make_item(
            ReferencedControlPointIndex=0,
            TreatmentControlPointDate=date,
            TreatmentControlPointTime=time,
            SpecifiedMeterset=ds_text(0, 6),
            DeliveredMeterset=ds_text(0, 6),
        )
        _axis_attributes(first, beam.gantry, spec.isocenter)
        last = make_item(
            ReferencedControlPointIndex=1,
            TreatmentControlPointDate=date,
            TreatmentControlPointTime=time,
            SpecifiedMeterset=ds_text(beam.meterset, 6),
            DeliveredMeterset=ds_text(beam.meterset, 6),
        )
        if spec.ion:
            item.ScanMode = "MODULATED"
            item.ModulatedScanModeType = "STATIONARY"
            item.NumberOfRangeShifters = 0
            item.NumberOfLateralSpreadingDevices = 0
            item.NumberOfRangeModulators = 0
            item.PatientSupportType = "TABLE"
            for cp in (first, last):
                cp.NominalBeamEnergy = "150"
                cp.NumberOfPaintings = 1
                cp.ScanSpotTuneID = "3.0"
                cp.NumberOfScanSpotPositions = 2
                cp.ScanSpotPositionMap = [-5.0, 0.0, 5.0, 0.0]
                cp.ScanSpotMetersetsDelivered = [0.0, 0.0] if cp is first else [0.5, 0.5]
            item.IonControlPointDeliverySequence = seq(first, last)
        else:
            item.BeamLimitingDeviceLeafPairsSequence = seq(
                make_item(RTBeamLimitingDeviceType="ASYMX", NumberOfLeafJawPairs=1),
                make_item(RTBeamLimitingDeviceType="ASYMY", NumberOfLeafJawPairs=1),
            )
            first.NominalBeamEnergy = "6"
            first.NominalBeamEnergyUnit = "MV"
            for cp in (first, last):
                cp.DoseRateSet = "600"
                cp.DoseRateDelivered = "600"
            item.ControlPointDeliverySequence = seq(first, last)
        sessions.append(item)
    if spec.ion:
        ds.TreatmentSessionIonBeamSequence = seq(*sessions)
    else:
        ds.TreatmentSessionBeamSequence = seq(*sessions)
    return ds


# --------------------------------------------------------------------------------------------------
# HDR brachytherapy: plan, session records, treatment summary record


@dataclass(frozen=True)
class BrachySpec:
    """An HDR afterloader plan: one Ir-192 source, one application setup of a few channels."""

    label: str
    fractions: int
    channels: tuple[float, ...]  # total dwell time per channel (s)
    machine: str = "AFTERLOADER1"
    air_kerma_rate: float = 40000.0  # uGy/h at 1 m (source strength on the reference date)
    source_date: str = "20120101"
    intent: str = "CURATIVE"
    structure_set_uid: str | None = None
    for_uid: str | None = None
    setup_type: str = "FLETCHER_SUIT"


def _brachy_common(ds: Dataset, spec: BrachySpec) -> None:
    ds.BrachyTreatmentTechnique = "INTRACAVITARY"
    ds.BrachyTreatmentType = "HDR"


def _source(spec: BrachySpec) -> Dataset:
    return make_item(
        SourceNumber=1,
        SourceType="POINT",
        SourceIsotopeName="Ir-192",
        SourceIsotopeHalfLife=ds_text(73.8, 6),
        SourceStrengthUnits="AIR_KERMA_RATE",
        ReferenceAirKermaRate=ds_text(spec.air_kerma_rate, 6),
        SourceStrengthReferenceDate=spec.source_date,
        SourceStrengthReferenceTime="120000",
    )


def _machine(spec: BrachySpec) -> Dataset:
    return make_item(
        TreatmentMachineName=spec.machine,
        Manufacturer=MANUFACTURER,
        InstitutionName=INSTITUTION,
        ManufacturerModelName="synthetic afterloader",
        DeviceSerialNumber="0002",
    )


def brachy_plan(
    sop_uid: str, patient: Patient, study: Study, series: Series, *, spec: BrachySpec, date: str, time: str
) -> Dataset:
    """RT Plan of an HDR course: RT Brachy Application Setups module, one fraction group."""
    ds = base_dataset(
        SopClass.RT_PLAN.value, sop_uid, patient, study, series, instance_number=1, content_date=date,
        content_time=time,
    )  # fmt: skip
    if spec.for_uid is not None:
        frame_of_reference(ds, spec.for_uid)
    ds.RTPlanLabel = spec.label
    ds.RTPlanName = spec.label
    ds.RTPlanDate = date
    ds.RTPlanTime = time
    ds.PlanIntent = spec.intent
    ds.RTPlanGeometry = "PATIENT" if spec.structure_set_uid else "TREATMENT_DEVICE"
    if spec.structure_set_uid is not None:
        ds.ReferencedStructureSetSequence = seq(
            make_item(ReferencedSOPClassUID=SopClass.RT_STRUCTURE_SET.value,
                  ReferencedSOPInstanceUID=spec.structure_set_uid)
        )
    ds.FractionGroupSequence = seq(
        make_item(
            FractionGroupNumber=1,
            NumberOfFractionsPlanned=spec.fractions,
            NumberOfBeams=0,
            NumberOfBrachyApplicationSetups=1,
            ReferencedBrachyApplicationSetupSequence=seq(make_item(ReferencedBrachyApplicationSetupNumber=1)),
        )
    )
    _brachy_common(ds, spec)
    ds.TreatmentMachineSequence = seq(_machine(spec))
    ds.SourceSequence = seq(_source(spec))
    channels = []
    for number, seconds in enumerate(spec.channels, start=1):
        channels.append(
            make_item(
                ChannelNumber=number,
                ChannelLength=ds_text(1200.0, 6),
                ChannelTotalTime=ds_text(seconds, 6),
                SourceMovementType="STEPWISE",
                SourceApplicatorStepSize=ds_text(5.0, 6),
                TransferTubeNumber=number,
                TransferTubeLength=ds_text(1000.0, 6),
                ReferencedSourceNumber=1,
                NumberOfControlPoints=2,
                FinalCumulativeTimeWeight=ds_text(1.0, 6),
                BrachyControlPointSequence=seq(
                    make_item(
                        ControlPointIndex=0,
                        ControlPointRelativePosition=ds_text(1190.0, 6),
                        CumulativeTimeWeight=ds_text(0, 6),
                    ),
                    make_item(
                        ControlPointIndex=1,
                        ControlPointRelativePosition=ds_text(1190.0, 6),
                        CumulativeTimeWeight=ds_text(1, 6),
                    ),
                ),
            )
        )
    ds.ApplicationSetupSequence = seq(
        make_item(
            ApplicationSetupType=spec.setup_type,
            ApplicationSetupNumber=1,
            TotalReferenceAirKerma=ds_text(round(spec.air_kerma_rate * sum(spec.channels) / 3600.0, 1), 6),
            ChannelSequence=seq(*channels),
        )
    )
    _approve(ds, date, time)
    return ds


def brachy_record(
    sop_uid: str,
    patient: Patient,
    study: Study,
    series: Series,
    *,
    plan_uid: str,
    spec: BrachySpec,
    fraction: int,
    date: str,
    time: str,
) -> Dataset:
    """RT Brachy Treatment Record of one HDR fraction (RT Brachy Session Record module)."""
    ds = base_dataset(
        SopClass.RT_BRACHY_TREATMENT_RECORD.value, sop_uid, patient, study, series, instance_number=fraction,
        content_date=date, content_time=time, station=spec.machine,
    )  # fmt: skip
    ds.TreatmentDate = date
    ds.TreatmentTime = time
    ds.ReferencedRTPlanSequence = seq(
        make_item(ReferencedSOPClassUID=SopClass.RT_PLAN.value, ReferencedSOPInstanceUID=plan_uid)
    )
    ds.TreatmentMachineSequence = seq(_machine(spec))
    ds.ReferencedFractionGroupNumber = 1
    ds.NumberOfFractionsPlanned = spec.fractions
    _brachy_common(ds, spec)
    source = _source(spec)
    source.SourceManufacturer = MANUFACTURER
    source.SourceSerialNumber = "IR0001"
    ds.RecordedSourceSequence = seq(source)
    channels = []
    for number, seconds in enumerate(spec.channels, start=1):
        channels.append(
            make_item(
                ChannelNumber=number,
                ChannelLength=ds_text(1200.0, 6),
                SpecifiedChannelTotalTime=ds_text(seconds, 6),
                DeliveredChannelTotalTime=ds_text(seconds, 6),
                SourceMovementType="STEPWISE",
                TransferTubeNumber=number,
                TransferTubeLength=ds_text(1000.0, 6),
                ReferencedSourceNumber=1,
                NumberOfControlPoints=2,
                BrachyControlPointDeliveredSequence=seq(
                    *(
                        make_item(
                            ReferencedControlPointIndex=index,
                            TreatmentControlPointDate=date,
                            TreatmentControlPointTime=time,
                            ControlPointRelativePosition=ds_text(1190.0, 6),
                        )
                        for index in (0, 1)
                    )
                ),
            )
        )
    ds.TreatmentSessionApplicationSetupSequence = seq(
        make_item(
            ApplicationSetupType=spec.setup_type,
            ReferencedBrachyApplicationSetupNumber=1,
            TotalReferenceAirKerma=ds_text(round(spec.air_kerma_rate * sum(spec.channels) / 3600.0, 1), 6),
            CurrentFractionNumber=fraction,
            TreatmentDeliveryType="TREATMENT",
            TreatmentTerminationStatus="NORMAL",
            TreatmentVerificationStatus="VERIFIED_OVR",
            RecordedChannelSequence=seq(*channels),
        )
    )
    return ds


def treatment_summary_record(
    sop_uid: str,
    patient: Patient,
    study: Study,
    series: Series,
    *,
    plan_uid: str,
    plan_class: str,
    fractions_planned: int,
    delivered: Sequence[tuple[str, str]],
    brachy: bool,
) -> Dataset:
    """RT Treatment Summary Record of a course after the fractions ``delivered`` ((date, time) each): the
    cumulative state (PS3.3 RT Treatment Summary Record module), not a session."""
    last_date, last_time = delivered[-1]
    ds = base_dataset(
        SopClass.RT_TREATMENT_SUMMARY_RECORD.value, sop_uid, patient, study, series, instance_number=1,
        content_date=last_date, content_time=last_time,
    )  # fmt: skip
    ds.TreatmentDate = last_date
    ds.TreatmentTime = last_time
    ds.ReferencedRTPlanSequence = seq(
        make_item(ReferencedSOPClassUID=plan_class, ReferencedSOPInstanceUID=plan_uid)
    )
    ds.CurrentTreatmentStatus = "COMPLETED" if len(delivered) >= fractions_planned else "ON_TREATMENT"
    ds.FirstTreatmentDate = delivered[0][0]
    ds.MostRecentTreatmentDate = last_date
    ds.FractionGroupSummarySequence = seq(
        make_item(
            ReferencedFractionGroupNumber=1,
            FractionGroupType="BRACHY" if brachy else "EXTERNAL_BEAM",
            NumberOfFractionsPlanned=fractions_planned,
            NumberOfFractionsDelivered=len(delivered),
            FractionStatusSummarySequence=seq(
                *(
                    make_item(ReferencedFractionNumber=n, TreatmentDate=day, TreatmentTime=when,
                          TreatmentTerminationStatus="NORMAL")
                    for n, (day, when) in enumerate(delivered, start=1)
                )
            ),
        )
    )
    return ds


# --------------------------------------------------------------------------------------------------
# spatial registration

IDENTITY = (1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0)


def _matrix_registration(matrix: Sequence[float]) -> Dataset:
    return make_item(
        RegistrationTypeCodeSequence=seq(code("125024", "DCM", "Image Content-based Alignment")),
        MatrixSequence=seq(
            make_item(
                FrameOfReferenceTransformationMatrix=[ds_text(v, 6) for v in matrix],
                FrameOfReferenceTransformationMatrixType="RIGID",
            )
        ),
    )


def _image_refs(images: Sequence[ImageRef]) -> DicomSequence:
    return seq(*(make_item(ReferencedSOPClassUID=i.sop_class, ReferencedSOPInstanceUID=i.sop_uid) for i in images))


def _common_instance_reference(ds: Dataset, own_study: str, series_groups: Sequence[Sequence[ImageRef]]) -> None:
    """Common Instance Reference module: same-study series directly, other studies one level down."""
    same: list[Dataset] = []
    other: dict[str, list[Dataset]] = {}
    for images in series_groups:
        entry = make_item(ReferencedInstanceSequence=_image_refs(images), SeriesInstanceUID=images[0].series_uid)
        if images[0].study_uid == own_study:
            same.append(entry)
        else:
            other.setdefault(images[0].study_uid, []).append(entry)
    if same:
        ds.ReferencedSeriesSequence = seq(*same)
    if other:
        ds.StudiesContainingOtherReferencedInstancesSequence = seq(
            *(
                make_item(ReferencedSeriesSequence=seq(*entries), StudyInstanceUID=study_uid)
                for study_uid, entries in other.items()
            )
        )


def rigid_registration(
    sop_uid: str,
    patient: Patient,
    study: Study,
    series: Series,
    *,
    fixed: Sequence[ImageRef],
    moving: Sequence[ImageRef],
    matrix: Sequence[float],
    date: str,
    time: str,
) -> Dataset:
    """Spatial Registration: identity item for the fixed FoR (the REG's own) + matrix for the moving."""
    ds = base_dataset(
        SopClass.SPATIAL_REGISTRATION.value,
        sop_uid,
        patient,
        study,
        series,
        instance_number=1,
        content_date=date,
        content_time=time,
    )
    frame_of_reference(ds, fixed[0].for_uid)
    ds.Laterality = ""
    ds.ContentLabel = "RIGID_REG"
    ds.ContentDescription = "Rigid registration"
    ds.ContentCreatorName = "SYNTH^PHYSICIST"
    ds.RegistrationSequence = seq(
        make_item(
            FrameOfReferenceUID=fixed[0].for_uid,
            ReferencedImageSequence=_image_refs(fixed),
            MatrixRegistrationSequence=seq(_matrix_registration(IDENTITY)),
        ),
        make_item(
            FrameOfReferenceUID=moving[0].for_uid,
            ReferencedImageSequence=_image_refs(moving),
            MatrixRegistrationSequence=seq(_matrix_registration(matrix)),
        ),
    )
    _common_instance_reference(ds, study.uid, [fixed, moving])
    return ds


def deformable_registration(
    sop_uid: str,
    patient: Patient,
    study: Study,
    series: Series,
    *,
    fixed: Sequence[ImageRef],
    moving: Sequence[ImageRef],
    matrix: Sequence[float],
    date: str,
    time: str,
) -> Dataset:
    """Deformable Spatial Registration from the moving FoR into the fixed (own) FoR, 2×2×2 grid."""
    ds = base_dataset(
        SopClass.DEFORMABLE_SPATIAL_REGISTRATION.value,
        sop_uid,
        patient,
        study,
        series,
        instance_number=1,
        content_date=date,
        content_time=time,
    )
    frame_of_reference(ds, fixed[0].for_uid)
    ds.Laterality = ""
    ds.ContentLabel = "DEFORMABLE_REG"
    ds.ContentDescription = "Deformable registration"
    ds.ContentCreatorName = "SYNTH^PHYSICIST"
    grid = make_item(
        ImagePositionPatient=["0", "0", ds_text(fixed[0].z, 6)],
        ImageOrientationPatient=["1", "0", "0", "0", "1", "0"],
        GridDimensions=[2, 2, 2],
        GridResolution=[10.0, 10.0, 10.0],
        # 8 grid points × 3 components of FLOAT32 (OF): small non-zero displacements.
        VectorGridData=struct.pack("<24f", *[0.5 * ((i % 3) - 1) for i in range(24)]),
    )
    ds.DeformableRegistrationSequence = seq(
        make_item(
            SourceFrameOfReferenceUID=moving[0].for_uid,
            ReferencedImageSequence=_image_refs(moving),
            RegistrationTypeCodeSequence=seq(code("125024", "DCM", "Image Content-based Alignment")),
            PreDeformationMatrixRegistrationSequence=seq(
                make_item(
                    FrameOfReferenceTransformationMatrix=[ds_text(v, 6) for v in matrix],
                    FrameOfReferenceTransformationMatrixType="RIGID",
                )
            ),
            PostDeformationMatrixRegistrationSequence=seq(
                make_item(
                    FrameOfReferenceTransformationMatrix=[ds_text(v, 6) for v in IDENTITY],
                    FrameOfReferenceTransformationMatrixType="RIGID",
                )
            ),
            DeformableRegistrationGridSequence=seq(grid),
        )
    )
    _common_instance_reference(ds, study.uid, [fixed, moving])
    return ds
