"""Build RT Beams Treatment Records (PS3.3 A.29) from :class:`~.mapping.RecordSpec`.

Modules: Patient, General Study, RT Series, General Equipment, RT General Treatment Record, RT Treatment
Machine Record, RT Beams Session Record, SOP Common. Nothing reads the clock: every date and UID comes
from MOSAIQ's rows and the site salt, so converting twice gives byte-identical files.

Choices forced by the standard or by known non-conformances of other generators:

* the delivered meterset (FLD_HST / Dose_Hst), never the planned one, is DeliveredPrimaryMeterset and
  the end point's DeliveredMeterset; the planned one is only SpecifiedPrimaryMeterset;
* control points go in ControlPointDeliverySequence (3008,0040), never ControlPointSequence: at least the
  start point and the end point of each delivered field;
* the record's series is its own (one per patient and plan), never the plan's series;
* termination and verification statuses are the enumerated values of C.8.8.21 (see :mod:`.models`).
"""

from __future__ import annotations

from pydicom.dataset import Dataset
from pydicom.uid import UID

from rtharvest.core.dicombuild import ds_text, make_item, seq

from ..sink import with_file_meta
from ..uids import derived_uid
from .mapping import BeamItem, RecordSpec
from .models import ControlPoint, PlanLocation

RT_BEAMS_TREATMENT_RECORD = "1.2.840.10008.5.1.4.1.1.481.4"
RT_PLAN = "1.2.840.10008.5.1.4.1.1.481.5"
MANUFACTURER = "rtharvest MOSAIQ converter"
#: Series number of converted record series (a high, fixed number keeps them apart from the plan's).
SERIES_NUMBER = 900


def study_uid(salt: str, spec: RecordSpec, location: PlanLocation | None) -> str:
    """Rule: the plan's study when the DCM tables know it, else one deterministic study per patient and site."""
    if location is not None:
        return location.study_uid
    return derived_uid(salt, "mosaiq-site-study", spec.patient.pat_id1, spec.session.sit_set_id)


def record_uids(salt: str, spec: RecordSpec) -> tuple[UID, UID]:
    """(series, instance): the series is per patient and plan; the instance is the record of one session,
    plan and machine, named by the session's first delivery (its DHS_ID), so a session converted again
    after more deliveries keeps its UID (the auxiliary PACS must then overwrite, see docs/operations.md)."""
    series = derived_uid(salt, "mosaiq-record-series", spec.patient.pat_id1, spec.plan_uid)
    instance = derived_uid(salt, "mosaiq-record", spec.patient.pat_id1, spec.plan_uid, spec.machine,
                           spec.session.deliveries[0].dhs_id)
    return series, instance


def _control_point(index: int, cp: ControlPoint | None, beam: BeamItem, end: bool) -> Dataset:
    when = beam.delivery.when
    item = make_item(
        ReferencedControlPointIndex=index,
        TreatmentControlPointDate=when.strftime("%Y%m%d"),
        TreatmentControlPointTime=when.strftime("%H%M%S"),
    )
    specified = beam.specified_meterset
    item.SpecifiedMeterset = ds_text(specified) if end and specified is not None else ("0" if not end else "")
    item.DeliveredMeterset = ds_text(beam.delivered_meterset if end else 0.0)
    # Type 2: MOSAIQ's tables read here do not hold dose rates.
    item.DoseRateSet = ""
    item.DoseRateDelivered = ""
    if cp is not None:
        if not end and cp.energy is not None:
            item.NominalBeamEnergy = ds_text(cp.energy)
            item.NominalBeamEnergyUnit = "MV"  # photons: MOSAIQ's Energy of an X-ray field is in MV
        if cp.gantry is not None:
            item.GantryAngle = ds_text(cp.gantry)
        if cp.collimator is not None:
            item.BeamLimitingDeviceAngle = ds_text(cp.collimator)
        if cp.leaves_mm is not None:
            item.BeamLimitingDevicePositionSequence = seq(
                make_item(RTBeamLimitingDeviceType="MLCX", LeafJawPositions=[ds_text(v) for v in cp.leaves_mm]))
    return item


def _beam_type(beam: BeamItem) -> str:
    """BeamType: from the field type when it says (see :attr:`~.models.FieldType.beam_type`), else DYNAMIC
    exactly when the delivered control points differ in gantry angle, collimator angle or leaf positions
    (PS3.3 C.8.8.14 and C.8.8.21: STATIC means all beam parameters stay unchanged during delivery)."""
    d = beam.delivery
    assert d.field is not None
    known = d.field.field_type.beam_type
    if known is not None:
        return known
    shapes = {(cp.gantry, cp.collimator, cp.leaves_mm) for cp in d.control_points}
    return "DYNAMIC" if len(shapes) > 1 else "STATIC"


def _beam(beam: BeamItem) -> Dataset:
    d = beam.delivery
    assert d.field is not None
    points = d.control_points
    first = points[0] if points else None
    last = points[-1] if points else None
    item = make_item(
        ReferencedBeamNumber=beam.beam_number,
        BeamName=beam.beam_name[:64],
        BeamType=_beam_type(beam),
        RadiationType="PHOTON",
        CurrentFractionNumber=beam.fraction,
        TreatmentDeliveryType=beam.delivery_type.value,
        TreatmentTerminationStatus=d.termination.dicom,
        TreatmentVerificationStatus=d.verification.dicom,
        DeliveredPrimaryMeterset=ds_text(beam.delivered_meterset),
        NumberOfWedges=0,
        NumberOfCompensators=0,
        NumberOfBoli=0,
        NumberOfBlocks=0,
    )
    if beam.specified_meterset is not None:
        item.SpecifiedPrimaryMeterset = ds_text(beam.specified_meterset)
    pairs = [make_item(RTBeamLimitingDeviceType="ASYMX", NumberOfLeafJawPairs=1),
             make_item(RTBeamLimitingDeviceType="ASYMY", NumberOfLeafJawPairs=1)]
    if first is not None and first.leaves_mm is not None:
        pairs.append(make_item(RTBeamLimitingDeviceType="MLCX", NumberOfLeafJawPairs=len(first.leaves_mm) // 2))
    item.BeamLimitingDeviceLeafPairsSequence = seq(*pairs)
    end_index = max(len(points) - 1, 1)
    item.NumberOfControlPoints = 2
    item.ControlPointDeliverySequence = seq(
        _control_point(0, first, beam, end=False),
        _control_point(end_index, last, beam, end=True),
    )
    return item


def build_record(spec: RecordSpec, salt: str, location: PlanLocation | None) -> Dataset:
    """The RT Beams Treatment Record of ``spec`` (with file meta), placed as :func:`study_uid` says."""
    series_uid, sop_uid = record_uids(salt, spec)
    started = spec.started
    day, clock = started.strftime("%Y%m%d"), started.strftime("%H%M%S")
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.InstanceCreationDate = day
    ds.InstanceCreationTime = clock
    ds.SOPClassUID = RT_BEAMS_TREATMENT_RECORD
    ds.SOPInstanceUID = sop_uid
    # Patient
    ds.PatientName = spec.patient.name
    ds.PatientID = spec.patient.patient_id
    ds.PatientBirthDate = spec.patient.birth_date
    ds.PatientSex = ""
    # General Study (Type 2 attributes empty: the study may be the plan's, whose values we do not know)
    ds.StudyInstanceUID = study_uid(salt, spec, location)
    ds.StudyDate = ""
    ds.StudyTime = ""
    ds.ReferringPhysicianName = ""
    ds.StudyID = ""
    ds.AccessionNumber = ""
    # RT Series
    ds.Modality = "RTRECORD"
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = SERIES_NUMBER
    ds.SeriesDescription = "MOSAIQ treatment records"
    ds.OperatorsName = ""
    # General Equipment
    ds.Manufacturer = MANUFACTURER
    # RT General Treatment Record
    ds.InstanceNumber = spec.beams[0].fraction
    ds.TreatmentDate = day
    ds.TreatmentTime = clock
    ds.ReferencedRTPlanSequence = seq(make_item(
        ReferencedSOPClassUID=location.sop_class_uid if location and location.sop_class_uid else RT_PLAN,
        ReferencedSOPInstanceUID=spec.plan_uid,
    ))
    # RT Treatment Machine Record: the machine the deliveries were made on
    ds.TreatmentMachineSequence = seq(make_item(
        TreatmentMachineName=spec.machine,
        Manufacturer="",
        InstitutionName="",
        ManufacturerModelName="",
        DeviceSerialNumber="",
    ))
    # RT Beams Session Record
    ds.NumberOfFractionsPlanned = spec.site.fractions if spec.site and spec.site.fractions else ""
    ds.PrimaryDosimeterUnit = "MU"
    ds.TreatmentSessionBeamSequence = seq(*(_beam(b) for b in spec.beams))
    return with_file_meta(ds)
