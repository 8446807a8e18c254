"""Unit tests of the copy verification's pure parts (``rtharvest.export.verify``): the row comparison, the
statuses relaxed for what only the site's job history knows, and the Table-1 counts of a selection.

Rows are built by hand with :class:`rtharvest.core.manifest.PlanRow` (the site's manifest form), so each test
states exactly what differs.
"""

from __future__ import annotations

import copy
from typing import Any

from rtharvest.core.manifest import MissingCause, MissingLink, PlanRow
from rtharvest.export.deid import Profile, SiteKey
from rtharvest.export.verify import compare, compare_summaries, expected_rows, knowable, summary_of_rows

KEY = SiteKey("SITEA", b"k" * 32)


def _site_row(status: str = "Complete", missing: list[MissingLink] | None = None) -> dict[str, Any]:
    """A treated plan with two delivery records of two fractions (of 30 planned) and a summary record, a
    structure set on a CT, a dose and a rigid MR registration."""
    return PlanRow(
        patient_id="SYN001", plan_uid="1.2.3.1", plan_label="PROSTATE", plan_intent="CURATIVE", status=status,
        record_uids=["1.2.3.10", "1.2.3.11"], treatment_dates=["20210301", "20210302"],
        summary_record_uids=["1.2.3.12"], fractions=2, fractions_planned=30,
        structure_set_uid="1.2.3.2", dose_uids=["1.2.3.3"], planning_series_uids=["1.2.3.20"],
        registration_uids=["1.2.3.4"], registration_types={"1.2.3.4": "CT-MR"},
        registered_series_uids=["1.2.3.21"], missing=missing or []).to_json(causes=True)


def _copy_of(expected: dict[str, Any]) -> dict[str, Any]:
    """The copy's row for an expected row (what a faithful copy's manifest shows)."""
    row = copy.deepcopy(expected)
    row["Missing"] = [{**m, "Reason": "not found at source"} for m in row["Missing"]]
    return row


def _expected(*rows: dict[str, Any]) -> list[dict[str, Any]]:
    return expected_rows(list(rows), KEY, Profile(), KEY.pseudonym)


def test_compare_finds_a_changed_registration_type_or_status() -> None:
    expected = _expected(_site_row())
    plan = KEY.uid("1.2.3.1")
    assert expected[0]["PlanUID"] == plan and expected[0]["RegistrationTypes"] == {KEY.uid("1.2.3.4"): "CT-MR"}
    faithful = _copy_of(expected[0])
    assert compare(expected, [faithful]) == []
    swapped = {**faithful, "RegistrationTypes": {KEY.uid("1.2.3.4"): "MR-CT"}}
    differences = compare(expected, [swapped])
    assert len(differences) == 1 and differences[0].startswith(f"plan {plan}: RegistrationTypes is ")
    assert "'MR-CT'" in differences[0] and "'CT-MR'" in differences[0]
    incomplete = {**faithful, "Status": "Incomplete"}
    assert compare(expected, [incomplete]) == [f"plan {plan}: Status is 'Incomplete', expected 'Complete'"]
    # A plan the copy lacks altogether; a plan of the copy nobody expected is not a difference.
    other = {**faithful, "PlanUID": KEY.uid("9.9.9")}
    assert compare(expected, [other]) == [f"plan {plan}: absent from the copy"]
    assert compare(expected, [faithful, other]) == []


def test_a_plan_incomplete_only_for_a_failed_search_is_expected_complete() -> None:
    """The copy cannot see that a search failed at the site (nor that a series was only partly stored):
    with nothing else missing, the plan must be Complete in the copy, and no missing link is expected."""
    search = MissingLink("RTDOSE", "1.2.3.1", "search failed after 3 attempts: association aborted",
                         MissingCause.SEARCH_FAILED)
    partial = MissingLink("SERIES", "1.2.3.20", "partially stored: failed after 3 attempts: timeout",
                          MissingCause.PARTIALLY_STORED)
    assert not knowable(search.to_json(cause=True)) and not knowable(partial.to_json(cause=True))
    for links in ([search], [partial], [search, partial]):
        expected = _expected(_site_row("Incomplete", links))
        assert expected[0]["Status"] == "Complete" and expected[0]["Missing"] == []
        assert compare(expected, [_copy_of(expected[0])]) == []
        # A copy showing the plan Incomplete (for a link the site could not know) differs.
        assert compare(expected, [{**_copy_of(expected[0]), "Status": "Incomplete"}]) != []


def test_a_plan_with_a_knowable_missing_link_stays_incomplete() -> None:
    """An object absent at the source is absent from the copy too: the plan stays Incomplete there, with
    the link under its new UID; links only the site can know are still left out."""
    absent = MissingLink("RTSTRUCT", "1.2.3.2", "not found at source", MissingCause.NOT_FOUND)
    search = MissingLink("RTDOSE", "1.2.3.1", "search failed after 3 attempts: association aborted",
                         MissingCause.SEARCH_FAILED)
    assert knowable(absent.to_json(cause=True))
    expected = _expected(_site_row("Incomplete", [absent, search]))
    assert expected[0]["Status"] == "Incomplete"
    assert expected[0]["Missing"] == [{"What": "RTSTRUCT", "UID": KEY.uid("1.2.3.2")}]
    faithful = _copy_of(expected[0])
    assert compare(expected, [faithful]) == []
    # The copy that shows no missing structure set (or calls the plan Complete) is wrong.
    assert any(": Missing is " in d for d in compare(expected, [{**faithful, "Missing": []}]))
    assert any(": Status is " in d for d in compare(expected, [{**faithful, "Status": "Complete"}]))


def test_summary_of_rows_counts_the_selection() -> None:
    rows = _expected(_site_row(), _site_row("Missing"))
    rows[1]["PlanUID"], rows[1]["PlanIntent"] = KEY.uid("1.2.3.9"), None
    modalities = {KEY.uid("1.2.3.20"): "CT", KEY.uid("1.2.3.21"): "MR"}
    summary = summary_of_rows(rows, modalities)
    assert summary == {
        "Patients": 1, "PlansReferenced": 2, "PlansCollected": 1, "SuccessRate": 0.5,
        "PlansByIntent": {"CURATIVE": 1}, "PlansByStatus": {"Complete": 1, "Missing": 1}, "InvalidPlans": 0,
        "ImageSeries": {"CT": 1, "MR": 1}, "PlanningSeries": 1, "Registrations": {"CT-MR": 1},
        # Records are counted once by UID; fractions are each plan's own (two plans of two fractions).
        "TreatmentRecords": 2, "Fractions": 4, "SummaryRecords": 1,
    }
    assert compare_summaries(summary, summary_of_rows(rows, modalities)) == []
    relabelled = summary_of_rows(rows, {**modalities, KEY.uid("1.2.3.20"): "MR"})
    assert compare_summaries(summary, relabelled) == [
        "Summary.ImageSeries is {'MR': 2}, expected {'CT': 1, 'MR': 1}"]


def test_plan_row_json_round_trip() -> None:
    missing = [MissingLink("RTDOSE", "1.2.3.3", "not found at source")]
    row = _site_row("Incomplete", missing)
    assert PlanRow.from_json(row).to_json() == row
    assert PlanRow.from_json(row).missing == missing


def test_compare_finds_changed_fraction_counts() -> None:
    """Fractions, records and summary records travel with the row: a copy that lost a record, or counts
    the summary record as a fraction, differs from the site."""
    expected = _expected(_site_row())
    plan = KEY.uid("1.2.3.1")
    assert (expected[0]["Fractions"], expected[0]["FractionsPlanned"], expected[0]["Records"],
            expected[0]["SummaryRecords"], expected[0]["Treatments"]) == (2, 30, 2, 1, 2)
    assert expected[0]["SummaryRecordUIDs"] == [KEY.uid("1.2.3.12")]
    faithful = _copy_of(expected[0])
    assert compare(expected, [faithful]) == []
    miscounted = {**faithful, "Fractions": 3, "Treatments": 3}
    assert sorted(compare(expected, [miscounted])) == [f"plan {plan}: Fractions is 3, expected 2",
                                                       f"plan {plan}: Treatments is 3, expected 2"]
    no_summary = {**faithful, "SummaryRecords": 0, "SummaryRecordUIDs": []}
    assert len(compare(expected, [no_summary])) == 2


def test_a_single_patients_name_components_all_count() -> None:
    """A prefix most patients share identifies nobody and is not looked for; but in an export of one
    patient, every component of the name is."""
    from pydicom.dataset import Dataset

    from rtharvest.export.deid import Profile
    from rtharvest.export.verify import phi_values

    def patient(pid: str, name: str) -> Dataset:
        ds = Dataset()
        ds.PatientID, ds.PatientName = pid, name
        return ds

    one = phi_values([patient("P1", "SYNTH^ALPHA")], Profile())
    assert one.get("SYNTH") == one.get("ALPHA") == "PatientName:component"
    three = phi_values([patient("P1", "SYNTH^ALPHA"), patient("P2", "SYNTH^BRAVO"), patient("P3", "SYNTH^ECHO")],
                       Profile())
    assert "SYNTH" not in three and three.get("BRAVO") == "PatientName:component"
