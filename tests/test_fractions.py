"""Fractions counted from hand-built treatment records of every kind (``rtharvest.core.fractions``).

Each record is a real DICOM object written to bytes and read back by the extractor
(:func:`rtharvest.core.references.extract_from_bytes`), so the test covers the attribute paths of each IOD
(PS3.3 RT Beams / RT Ion Beams / RT Brachy Treatment Record, RT Treatment Summary Record) as well as the
counting rule.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import UID, ExplicitVRLittleEndian

from rtharvest.core.fractions import RecordFacts, count_fractions, fractions_planned
from rtharvest.core.manifest import build_manifest
from rtharvest.core.references import ObjectKind, ObjectRefs, PlanRefs, ProblemCode, extract_from_bytes
from rtharvest.core.sopclass import SopClass
from rtharvest.store.tracking import Decision, ObjectRecord

PLAN = "1.2.826.0.1.3680043.10.543.1"
_SESSION_SEQUENCE = {
    SopClass.RT_BEAMS_TREATMENT_RECORD: "TreatmentSessionBeamSequence",
    SopClass.RT_ION_BEAMS_TREATMENT_RECORD: "TreatmentSessionIonBeamSequence",
    SopClass.RT_BRACHY_TREATMENT_RECORD: "TreatmentSessionApplicationSetupSequence",
}
_counter = iter(range(1, 10_000))


def _item(**values: object) -> Dataset:
    ds = Dataset()
    for k, v in values.items():
        setattr(ds, k, v)
    return ds


def record_refs(sop_class: SopClass, date: str | None, items: Sequence[tuple[int | None, str]],
                group: int | None = 1, group_in_plan_ref: bool = False) -> ObjectRefs:
    """A record of ``sop_class`` for :data:`PLAN`, one session item per ``(CurrentFractionNumber or None,
    TreatmentDeliveryType)``, written and read back by the extractor."""
    uid = f"1.2.826.0.1.3680043.10.543.2.{next(_counter)}"
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = UID(sop_class.value)
    ds.file_meta.MediaStorageSOPInstanceUID = UID(uid)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality, ds.PatientID = sop_class.value, uid, "RTRECORD", "P1"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = uid + ".1", uid + ".2"
    ds.TreatmentDate, ds.TreatmentTime = date or "", "100000"
    ref = _item(ReferencedSOPClassUID=SopClass.RT_PLAN.value, ReferencedSOPInstanceUID=PLAN)
    if group is not None and group_in_plan_ref:
        ref.ReferencedFractionGroupNumber = group
    ds.ReferencedRTPlanSequence = DicomSequence([ref])
    if sop_class is SopClass.RT_TREATMENT_SUMMARY_RECORD:
        ds.CurrentTreatmentStatus = "PARTIAL"
        ds.FirstTreatmentDate = ds.MostRecentTreatmentDate = date or ""
        ds.FractionGroupSummarySequence = DicomSequence([_item(
            ReferencedFractionGroupNumber=1, FractionGroupType="BRACHY", NumberOfFractionsPlanned=3,
            NumberOfFractionsDelivered=2)])
    else:
        if group is not None and not group_in_plan_ref:
            ds.ReferencedFractionGroupNumber = group  # the session record module's own attribute
        ds.NumberOfFractionsPlanned = 30
        sessions = [_item(CurrentFractionNumber="" if number is None else number, TreatmentDeliveryType=kind,
                          TreatmentTerminationStatus="NORMAL") for number, kind in items]
        setattr(ds, _SESSION_SEQUENCE[sop_class], DicomSequence(sessions))
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    refs = extract_from_bytes(buffer.getvalue())
    assert refs.record is not None and refs.record.plan_uids == (PLAN,)
    return refs


def record(sop_class: SopClass, date: str | None, items: Sequence[tuple[int | None, str]],
           group: int | None = 1, group_in_plan_ref: bool = False) -> RecordFacts:
    """:func:`record_refs` as the count sees it."""
    refs = record_refs(sop_class, date, items, group, group_in_plan_ref)
    assert refs.record is not None
    summary = refs.sop_class_uid == SopClass.RT_TREATMENT_SUMMARY_RECORD.value
    return RecordFacts(refs.sop_uid, summary, refs.record.treatment_date, refs.record.delivery)


BEAMS, ION, BRACHY = (SopClass.RT_BEAMS_TREATMENT_RECORD, SopClass.RT_ION_BEAMS_TREATMENT_RECORD,
                      SopClass.RT_BRACHY_TREATMENT_RECORD)
T, C = "TREATMENT", "CONTINUATION"


def test_each_record_kind_gives_its_session_items() -> None:
    for kind in (BEAMS, ION, BRACHY):
        facts = record(kind, "20240102", [(4, T), (4, T)])
        assert facts.delivery is not None and not facts.delivery.summary, kind
        assert facts.delivery.fraction_group == 1
        assert [(s.fraction_number, s.delivery_type) for s in facts.delivery.sessions] == [(4, T), (4, T)], kind
    summary = record(SopClass.RT_TREATMENT_SUMMARY_RECORD, "20240110", [])
    assert summary.summary and summary.delivery is not None and summary.delivery.summary


def test_one_record_per_fraction_counts_each() -> None:
    records = [record(BEAMS, f"2024010{d}", [(d, T), (d, T)]) for d in (2, 3, 4)]
    assert count_fractions(records) == count_fractions(records, 1)
    got = count_fractions(records)
    assert (got.fractions, got.records, got.summary_records, got.groups) == (3, 3, 0, frozenset({1}))


def test_one_record_per_beam_is_one_fraction() -> None:
    """A system that writes one record per beam: three records, one fraction each day."""
    day1 = [record(ION, "20240102", [(1, T)]) for _ in range(3)]
    day2 = [record(ION, "20240103", [(2, T)]) for _ in range(3)]
    got = count_fractions(day1 + day2)
    assert (got.fractions, got.records) == (2, 6)


def test_continuation_and_resent_copy_add_no_fraction() -> None:
    first = record(BEAMS, "20240102", [(1, T), (1, T)])
    interrupted = record(BEAMS, "20240103", [(2, T)])
    continued = record(BEAMS, "20240103", [(2, C)])
    resent = record(BEAMS, "20240102", [(1, T), (1, T)])  # same fraction, new SOPInstanceUID
    got = count_fractions([first, interrupted, continued, resent])
    assert (got.fractions, got.records) == (2, 4)


def test_brachy_course_with_summary_record() -> None:
    """Three HDR fractions and the course's summary record: three fractions, three delivery records, one
    summary record (never a fraction)."""
    records = [record(BRACHY, day, [(n, T)]) for n, day in enumerate(("20240102", "20240109", "20240116"), 1)]
    summary = record(SopClass.RT_TREATMENT_SUMMARY_RECORD, "20240116", [])
    got = count_fractions([*records, summary])
    assert (got.fractions, got.records, got.summary_records) == (3, 3, 1)
    assert count_fractions([summary]).fractions == 0


def test_fraction_groups_are_counted_apart_and_planned_per_group() -> None:
    a = record(BEAMS, "20240102", [(1, T)], group=1, group_in_plan_ref=True)
    b = record(BEAMS, "20240102", [(1, T)], group=2)
    got = count_fractions([a, b])
    assert (got.fractions, got.groups) == (2, frozenset({1, 2}))
    plan_groups = [(1, 25), (2, 5), (3, 10)]
    assert fractions_planned(plan_groups, got.groups) == 30
    assert fractions_planned(plan_groups, {2}) == 5
    assert fractions_planned(plan_groups, set()) == 40  # records naming no group: the whole plan
    assert fractions_planned([(1, None)], {1}) is None
    assert fractions_planned([], {1}) is None


def test_record_without_group_takes_the_plans_only_group() -> None:
    named = record(BEAMS, "20240102", [(1, T)], group=1)
    unnamed = record(BEAMS, "20240102", [(1, T)], group=None)
    assert unnamed.delivery is not None and unnamed.delivery.fraction_group is None
    assert count_fractions([named, unnamed], default_group=1).fractions == 1
    # Without knowing the plan has one group, the two cannot be told to be the same fraction.
    assert count_fractions([named, unnamed]).fractions == 2


def test_records_without_fraction_number_count_by_date() -> None:
    """Ambiguous records (CurrentFractionNumber empty): one fraction per treatment date; none for a date a
    numbered record of the group already covers; none for a continuation; one per undated record."""
    same_day = [record(BRACHY, "20240102", [(None, T)]) for _ in range(2)]
    other_day = record(BRACHY, "20240109", [(None, T)])
    assert count_fractions([*same_day, other_day]).fractions == 2
    numbered = record(BRACHY, "20240109", [(2, T)])
    assert count_fractions([*same_day, other_day, numbered]).fractions == 2
    continuation = record(BRACHY, "20240116", [(None, C)])
    assert count_fractions([*same_day, continuation]).fractions == 1
    undated = [record(BEAMS, None, [(None, T)]) for _ in range(2)]
    assert all(u.treatment_date is None for u in undated)
    got = count_fractions([*same_day, *undated])
    assert (got.fractions, got.records) == (3, 4)
    # A record whose stored copy could not be read is a delivery record without number.
    unread = RecordFacts("1.2.3", False, "20240123", None)
    assert count_fractions([*same_day, unread]).fractions == 2


def test_nonstandard_delivery_type_is_reported() -> None:
    facts = record(BEAMS, "20240102", [(1, "VERIFICATION")])
    assert facts.delivery is not None
    assert count_fractions([facts]).fractions == 1
    uid = f"1.2.826.0.1.3680043.10.543.3.{next(_counter)}"
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = UID(BEAMS.value)
    ds.file_meta.MediaStorageSOPInstanceUID = UID(uid)
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = BEAMS.value, uid, "RTRECORD"
    ds.TreatmentDate = "20240102"
    ds.ReferencedRTPlanSequence = DicomSequence([_item(ReferencedSOPClassUID=SopClass.RT_PLAN.value,
                                                       ReferencedSOPInstanceUID=PLAN)])
    ds.TreatmentSessionBeamSequence = DicomSequence([_item(CurrentFractionNumber=1,
                                                           TreatmentDeliveryType="VERIFICATION")])
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    refs = extract_from_bytes(buffer.getvalue())
    assert any(p.code is ProblemCode.NONSTANDARD_VALUE and "TreatmentDeliveryType" in p.attribute
               for p in refs.problems), refs.problems


def _row_of(refs: ObjectRefs) -> ObjectRecord:
    assert refs.record is not None
    return ObjectRecord(harvest_id="h", sop_uid=refs.sop_uid, orthanc_id=refs.sop_uid, decision=Decision.KEPT,
                        reason="", role="RECORD", hop="RECORD", source="SRC", job_id=None, moved=True,
                        patient_id="P1", study_uid=refs.study_uid, series_uid=refs.series_uid, modality="RTRECORD",
                        sop_class_uid=refs.sop_class_uid, plan_uids=refs.record.plan_uids,
                        treatment_date=refs.record.treatment_date)


def test_manifest_of_a_brachy_course_with_a_summary_record() -> None:
    """The issue's case, by hand: three HDR fractions (one in two parts) and the course's summary record,
    dated a month before the first fraction (a system that writes it at the course's start). The plan shows
    3 fractions of 4, 4 delivery records, 1 summary record; Table 1 and the charts ignore the summary."""
    plan = ObjectRefs(PLAN, SopClass.RT_PLAN.value, "RTPLAN", "P1", "1.2.9.1", "1.2.9.2", None, ObjectKind.PLAN,
                      plan=PlanRefs((), (), (), "CURATIVE", "HDR", "TREATMENT_DEVICE", False,
                                    fraction_groups=((1, 4),)))
    records = [record_refs(BRACHY, "20240205", [(1, T)]), record_refs(BRACHY, "20240212", [(2, T)]),
               record_refs(BRACHY, "20240212", [(2, C)]), record_refs(BRACHY, "20240219", [(3, T)]),
               record_refs(SopClass.RT_TREATMENT_SUMMARY_RECORD, "20240110", [])]
    by_uid = {r.sop_uid: r for r in [plan, *records]}
    plan_row = ObjectRecord(harvest_id="h", sop_uid=PLAN, orthanc_id=PLAN, decision=Decision.KEPT, reason="",
                            role="PLAN", hop="RTRECORD->RTPLAN", source="SRC", job_id=None, moved=True,
                            patient_id="P1", modality="RTPLAN", sop_class_uid=SopClass.RT_PLAN.value)
    manifest = build_manifest("h", [plan_row, *(_row_of(r) for r in records)], lambda o: by_uid.get(o.sop_uid))
    doc = manifest.to_json()
    (row,) = doc["Plans"]
    assert (row["Treatments"], row["Fractions"], row["FractionsPlanned"], row["Records"], row["SummaryRecords"]) \
        == (3, 3, 4, 4, 1)
    assert row["SummaryRecordUIDs"] == [records[-1].sop_uid] and records[-1].sop_uid not in row["RecordUIDs"]
    assert (row["FirstTreatment"], row["LastTreatment"]) == ("20240205", "20240219")
    summary = doc["Summary"]
    assert (summary["TreatmentRecords"], summary["SummaryRecords"], summary["Fractions"]) == (4, 1, 3)
    assert [c["Period"] for c in doc["Charts"]["Monthly"]] == ["2024-02"]
    assert doc["Orphans"] == []
    header, line = manifest.to_csv().splitlines()
    cells = dict(zip(header.split(","), line.split(","), strict=True))
    assert (cells["Treatments"], cells["Fractions"], cells["FractionsPlanned"], cells["Records"],
            cells["SummaryRecords"]) == ("3", "3", "4", "4", "1")
