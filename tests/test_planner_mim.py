"""MIM sessions in the planner (``RtHarvest.UnpackMimSessions``): REG searches also look at Raw Data objects,
and a session that arrives is unpacked rather than judged (pure: no servers)."""

from __future__ import annotations

import json

import pytest
from pydicom.dataset import Dataset

from rtharvest.core.classify import HarvestWindow
from rtharvest.core.operations import (
    CriterionKind,
    FindReferencing,
    Hop,
    ReferenceCriterion,
    RetrieveInstance,
    RetrieveSeries,
    Role,
    UnpackMimSession,
    operation_from_dict,
)
from rtharvest.core.planner import Arrival, HarvestContext, plan_arrival
from rtharvest.core.references import extract
from rtharvest.core.sopclass import SopClass
from rtharvest.core.strategies import (
    AnswerFilter,
    QueryLevel,
    SourceCapability,
    StepAction,
    filter_answers,
    search_steps,
)
from rtharvest.edge.config import ConfigError, load_config
from rtharvest.harvest.mimsessions import session_search

from .planner_fixtures import image_series, uid

WINDOW = HarvestWindow("20200101", "20201231")
OFF = HarvestContext(WINDOW)
ON = HarvestContext(WINDOW, unpack_mim_sessions=True)
P, STUDY, FOR = "P1", uid("study"), uid("for")
REG_SEARCH = FindReferencing("REG", P, None, ReferenceCriterion(CriterionKind.FRAME_OF_REFERENCE, (FOR,)),
                             Role.REGISTRATION, Hop.FOR_REG, exclude_series=("1.2.3",), fixed_modality="CT")


def _session() -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = SopClass.RAW_DATA.value
    ds.SOPInstanceUID = uid("raw")
    ds.Modality = "RAW"
    ds.PatientID = P
    ds.StudyInstanceUID = STUDY
    ds.SeriesInstanceUID = uid("raw-series")
    return ds


def test_reg_searches_also_search_sessions_only_when_enabled() -> None:
    ct = image_series("ct", P, STUDY, FOR)
    op = RetrieveSeries(P, STUDY, ct[0].SeriesInstanceUID, Role.PLANNING_SERIES, Hop.STRUCTURE_SET_SERIES)
    off = plan_arrival(Arrival(extract(ct[0]), op), OFF).operations
    on = plan_arrival(Arrival(extract(ct[0]), op), ON).operations
    assert [o for o in on if o not in off] == [
        FindReferencing("RAW", P, None, ReferenceCriterion(CriterionKind.FRAME_OF_REFERENCE, (FOR,)),
                        Role.REGISTRATION, Hop.FOR_RAW, exclude_series=(ct[0].SeriesInstanceUID,),
                        fixed_modality="CT")]
    assert all(o in on for o in off)


def test_a_session_is_unpacked_and_its_objects_judged_as_the_reg_search_it_stands_for() -> None:
    raw_search = FindReferencing("RAW", P, None, REG_SEARCH.criterion, Role.REGISTRATION, Hop.FOR_RAW,
                                 REG_SEARCH.plan_has_structure_set, REG_SEARCH.exclude_series, "CT")
    decision = plan_arrival(Arrival(extract(_session()), raw_search, candidate=True), ON)
    assert not decision.keep, "the container is not kept: its content is"
    (unpack,) = decision.operations
    assert isinstance(unpack, UnpackMimSession)
    assert unpack.sop_uid == uid("raw") and unpack.role is Role.REGISTRATION
    assert unpack.arrived_under == raw_search.dedupe_key()
    assert unpack.inner() == REG_SEARCH
    # The job survives the queue's JSON round trip.
    assert operation_from_dict(json.loads(json.dumps(unpack.to_dict()))) == unpack


def test_without_the_setting_a_session_is_an_ordinary_rejected_candidate() -> None:
    decision = plan_arrival(Arrival(extract(_session()), REG_SEARCH, candidate=True), OFF)
    assert not decision.keep and decision.operations == ()


def test_session_searches_never_filter_on_return_keys() -> None:
    raw_search = FindReferencing("RAW", P, None, REG_SEARCH.criterion, Role.REGISTRATION, Hop.FOR_RAW)
    for capability in (SourceCapability(True, True), SourceCapability(False, True)):
        steps = search_steps(raw_search, capability)
        assert not any(AnswerFilter.CRITERION in s.filters for s in steps)
        assert steps[-1].action is StepAction.RETRIEVE and steps[-1].candidate
        # Raw Data series are selected (by the source, or from the study's shared series listing here).
        series = next(s for s in steps if s.level is QueryLevel.SERIES)
        answers = [{"SeriesInstanceUID": "a", "Modality": "RAW"}, {"SeriesInstanceUID": "b", "Modality": "REG"}]
        assert [a["SeriesInstanceUID"] for a in filter_answers(series, raw_search, answers)] == ["a"]
    unpack = UnpackMimSession(uid("raw"), P, "{}", "k", Role.REGISTRATION)
    assert search_steps(unpack, SourceCapability(True, True)) == (), "unpacking asks no source"


def test_config_unpack_mim_sessions() -> None:
    assert load_config({}).unpack_mim_sessions is False
    assert load_config({"RtHarvest": {"UnpackMimSessions": True}}).unpack_mim_sessions is True
    with pytest.raises(ConfigError, match="RtHarvest.UnpackMimSessions"):
        load_config({"RtHarvest": {"UnpackMimSessions": "yes"}})


def test_a_structure_set_or_registration_no_source_holds_is_looked_for_in_the_patients_sessions() -> None:
    wanted = RetrieveInstance(uid("ss"), P, None, None, "RTSTRUCT", Role.STRUCTURE_SET, Hop.PLAN_STRUCTURE_SET)
    search = session_search(wanted, True)
    assert search == FindReferencing("RAW", P, None, ReferenceCriterion(CriterionKind.FRAME_OF_REFERENCE, ()),
                                     Role.STRUCTURE_SET, Hop.PLAN_RAW)
    assert session_search(wanted, False) is None, "only with UnpackMimSessions"
    plan = RetrieveInstance(uid("plan"), P, None, None, "RTPLAN", Role.PLAN, Hop.RECORD_PLAN)
    assert session_search(plan, True) is None, "sessions carry structure sets and registrations only"
    anonymous = RetrieveInstance(uid("ss"), None, None, None, "RTSTRUCT", Role.STRUCTURE_SET, Hop.PLAN_STRUCTURE_SET)
    assert session_search(anonymous, True) is None, "a patient's sessions need the patient"
