"""SOP Class UIDs and modalities of the objects the harvester walks (DICOM PS3.4 Annex B / PS3.6)."""

from __future__ import annotations

from enum import StrEnum


class SopClass(StrEnum):
    """Storage SOP classes that take part in a radiotherapy chain."""

    CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
    ENHANCED_CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2.1"
    MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
    ENHANCED_MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4.1"
    PET_IMAGE = "1.2.840.10008.5.1.4.1.1.128"
    ENHANCED_PET_IMAGE = "1.2.840.10008.5.1.4.1.1.130"
    RT_IMAGE = "1.2.840.10008.5.1.4.1.1.481.1"
    RT_DOSE = "1.2.840.10008.5.1.4.1.1.481.2"
    RT_STRUCTURE_SET = "1.2.840.10008.5.1.4.1.1.481.3"
    RT_BEAMS_TREATMENT_RECORD = "1.2.840.10008.5.1.4.1.1.481.4"
    RT_PLAN = "1.2.840.10008.5.1.4.1.1.481.5"
    RT_BRACHY_TREATMENT_RECORD = "1.2.840.10008.5.1.4.1.1.481.6"
    RT_TREATMENT_SUMMARY_RECORD = "1.2.840.10008.5.1.4.1.1.481.7"
    RT_ION_PLAN = "1.2.840.10008.5.1.4.1.1.481.8"
    RT_ION_BEAMS_TREATMENT_RECORD = "1.2.840.10008.5.1.4.1.1.481.9"
    RAW_DATA = "1.2.840.10008.5.1.4.1.1.66"
    SPATIAL_REGISTRATION = "1.2.840.10008.5.1.4.1.1.66.1"
    DEFORMABLE_SPATIAL_REGISTRATION = "1.2.840.10008.5.1.4.1.1.66.3"


class Modality(StrEnum):
    """Values of Modality (0008,0060) the harvester distinguishes."""

    RTRECORD = "RTRECORD"
    RTPLAN = "RTPLAN"
    RTSTRUCT = "RTSTRUCT"
    RTDOSE = "RTDOSE"
    RTIMAGE = "RTIMAGE"
    REG = "REG"
    CT = "CT"
    MR = "MR"
    PT = "PT"
    RAW = "RAW"


TREATMENT_RECORD_CLASSES = frozenset(
    {
        SopClass.RT_BEAMS_TREATMENT_RECORD,
        SopClass.RT_BRACHY_TREATMENT_RECORD,
        SopClass.RT_TREATMENT_SUMMARY_RECORD,
        SopClass.RT_ION_BEAMS_TREATMENT_RECORD,
    }
)
PLAN_CLASSES = frozenset({SopClass.RT_PLAN, SopClass.RT_ION_PLAN})
REGISTRATION_CLASSES = frozenset({SopClass.SPATIAL_REGISTRATION, SopClass.DEFORMABLE_SPATIAL_REGISTRATION})
IMAGE_CLASSES = frozenset(
    {
        SopClass.CT_IMAGE,
        SopClass.ENHANCED_CT_IMAGE,
        SopClass.MR_IMAGE,
        SopClass.ENHANCED_MR_IMAGE,
        SopClass.PET_IMAGE,
        SopClass.ENHANCED_PET_IMAGE,
    }
)

#: Modalities of volumetric image series that can be planning or registered images.
IMAGE_MODALITIES = frozenset({"CT", "MR", "PT"})

_MODALITY_BY_CLASS: dict[SopClass, Modality] = {
    SopClass.CT_IMAGE: Modality.CT,
    SopClass.ENHANCED_CT_IMAGE: Modality.CT,
    SopClass.MR_IMAGE: Modality.MR,
    SopClass.ENHANCED_MR_IMAGE: Modality.MR,
    SopClass.PET_IMAGE: Modality.PT,
    SopClass.ENHANCED_PET_IMAGE: Modality.PT,
    SopClass.RT_IMAGE: Modality.RTIMAGE,
    SopClass.RT_DOSE: Modality.RTDOSE,
    SopClass.RT_STRUCTURE_SET: Modality.RTSTRUCT,
    SopClass.RT_BEAMS_TREATMENT_RECORD: Modality.RTRECORD,
    SopClass.RT_BRACHY_TREATMENT_RECORD: Modality.RTRECORD,
    SopClass.RT_TREATMENT_SUMMARY_RECORD: Modality.RTRECORD,
    SopClass.RT_ION_BEAMS_TREATMENT_RECORD: Modality.RTRECORD,
    SopClass.RT_PLAN: Modality.RTPLAN,
    SopClass.RT_ION_PLAN: Modality.RTPLAN,
    SopClass.RAW_DATA: Modality.RAW,
    SopClass.SPATIAL_REGISTRATION: Modality.REG,
    SopClass.DEFORMABLE_SPATIAL_REGISTRATION: Modality.REG,
}


def modality_of(sop_class_uid: str) -> Modality | None:
    """Return the Modality a SOP class normally carries, or ``None`` for classes outside RT chains."""
    try:
        sop = SopClass(sop_class_uid)
    except ValueError:
        return None
    return _MODALITY_BY_CLASS.get(sop)
