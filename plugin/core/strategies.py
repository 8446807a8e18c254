"""How a source executes an operation, by capability: the C-FIND / C-MOVE steps, as values (no I/O).

Two facts about real Q/R sources shape every search (docs/platform.md):

* **Relational** SCPs (ARIA, Orthanc) answer a query at any level with any keys, so an instance is
  found by its SOP Instance UID alone. **Strict hierarchical** SCPs (dcmqrscp ``-XF -XM``, many PACS)
  reject any query below STUDY level that lacks the unique keys of the levels above, so references,
  which carry SOP UIDs only, must be resolved by walking PATIENT → STUDY → SERIES → IMAGE.
* Some relational SCPs (Orthanc, ARIA) also **match keys of the levels above** the query level (StudyDate,
  PatientID and Modality in an IMAGE-level query); others (dcmqrscp) ignore them there and answer a
  superset. Where a source is known to match them (``upper_level_keys``), the records of a window and
  the candidates of a reverse search are listed by one IMAGE-level C-FIND instead of one per series.
* Some SCPs return **sequence attributes** asked as empty return keys (an empty
  ReferencedRTPlanSequence on an RTDOSE query returns the plan UID), which tells which dose or record
  references a plan without a retrieve. Without that, candidates are retrieved and
  :func:`rtharvest.core.planner.plan_arrival` inspects (keeps or discards) them.

:func:`search_steps` turns (operation, capability) into a chain of :class:`SearchStep`; :func:`execute`
runs a chain against any ``find``/``retrieve`` pair (the simulation's fake SCP or a DIMSE backend).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from collections.abc import Sequence as Seq
from dataclasses import dataclass, replace
from datetime import date, timedelta
from enum import StrEnum
from typing import Any

from pydicom.dataset import Dataset

from .classify import record_in_window
from .operations import (
    CriterionKind,
    FindReferencing,
    FindSeriesInFrameOfReference,
    FindTreatmentRecords,
    Operation,
    RetrieveInstance,
    RetrieveSeries,
    UnpackMimSession,
)
from .references import extract
from .sopclass import IMAGE_MODALITIES


class RecordDiscovery(StrEnum):
    """How the treatment records of a dated window are found at a source (``RecordDiscovery`` setting)."""

    #: The source matches TreatmentDate (an instance attribute) at IMAGE level: one C-FIND per chunk.
    TREATMENT_DATE = "treatmentdate"
    #: Studies dated in the window (plus a look-back: a course's record study may start weeks before its
    #: first fraction in the window), then their record series. Any source that matches StudyDate.
    STUDY_DATE = "studydate"
    #: No date key at all: every record series of the source is listed (cost grows with its history).
    SCAN = "scan"


#: Default look-back of the StudyDate pre-filter (``StudyDateLookBackDays``).
DEFAULT_LOOK_BACK_DAYS = 90


@dataclass(frozen=True)
class SourceCapability:
    """What a source's Q/R SCP can do.

    ``instance_return_keys``: the SCP returns instance attributes it does not index as return keys
    (FrameOfReferenceUID, TreatmentDate). When it does not, series are probed by retrieving one
    instance and records are filtered on arrival. ``record_discovery`` and ``look_back_days``: how a
    dated window's records are found (:class:`RecordDiscovery`). ``upper_level_keys`` (relational only):
    the SCP matches series- and study-level keys (Modality, StudyDate, PatientID) in an IMAGE-level query.
    """

    relational: bool
    sequence_return_keys: bool
    instance_return_keys: bool = True
    record_discovery: RecordDiscovery = RecordDiscovery.STUDY_DATE
    look_back_days: int = DEFAULT_LOOK_BACK_DAYS
    upper_level_keys: bool = False

    @property
    def image_level_search(self) -> bool:
        """Whether an IMAGE-level C-FIND may select instances by series and study keys at this source."""
        return self.relational and self.upper_level_keys

    def label(self) -> str:
        """Short human label (test ids, logs)."""
        parts = ["relational" if self.relational else "hierarchical",
                 "seqkeys" if self.sequence_return_keys else "noseq"]
        if not self.instance_return_keys:
            parts.append("noinst")
        if self.image_level_search:
            parts.append("upper")
        return "-".join(parts)


class QueryLevel(StrEnum):
    """C-FIND / C-MOVE QueryRetrieveLevel (0008,0052)."""

    PATIENT = "PATIENT"
    STUDY = "STUDY"
    SERIES = "SERIES"
    IMAGE = "IMAGE"


class StepAction(StrEnum):
    """DIMSE service of a step."""

    FIND = "C-FIND"
    RETRIEVE = "C-MOVE"


class AnswerFilter(StrEnum):
    """Client-side checks applied to the answers of a FIND step (SCPs match no sequences, CS lists or
    FoR reliably, so the client filters what the query could not)."""

    WINDOW = "WINDOW"  # TreatmentDate in the window; answers without it pass (checked on arrival)
    DATED_IN_WINDOW = "DATED_IN_WINDOW"  # TreatmentDate returned and in the window (the SCP matched it)
    HAS_RECORDS = "HAS_RECORDS"  # a study whose returned ModalitiesInStudy lacks RTRECORD is skipped
    CRITERION = "CRITERION"  # returned reference sequences satisfy the operation's criterion
    MODALITY = "MODALITY"  # Modality among the operation's modalities
    EXCLUDE_SERIES = "EXCLUDE_SERIES"  # series not excluded by the operation
    FRAME_OF_REFERENCE = "FRAME_OF_REFERENCE"  # FrameOfReferenceUID equals the operation's FoR
    ONE_PER_SERIES = "ONE_PER_SERIES"  # only the first answer of each series goes on
    NAMED_INSTANCE = "NAMED_INSTANCE"  # only the instance the operation names (in a series listing)


@dataclass(frozen=True)
class SearchStep:
    """One DIMSE request, run once per surviving answer of the previous step (once for the first).

    The identifier is ``keys`` (fixed values; ``""`` = universal matching / return key, an empty
    sequence for SQ keywords) plus the ``bind`` keywords copied from the previous answer. A RETRIEVE
    step is last; ``candidate`` marks objects moved only to be inspected on arrival.
    """

    action: StepAction
    level: QueryLevel
    keys: tuple[tuple[str, str], ...] = ()
    bind: tuple[str, ...] = ()
    filters: tuple[AnswerFilter, ...] = ()
    candidate: bool = False
    note: str = ""
    #: Run once for all surviving answers of the previous step, each ``bind`` keyword matching the list of
    #: their values (DICOM list of UID matching, PS3.4 C.2.2.2.2), instead of once per answer.
    gather: bool = False

    def identifier(self, previous: Mapping[str, Any]) -> dict[str, Any]:
        """The request identifier for one previous answer (for a ``gather`` step: the answers' values joined)."""
        ident: dict[str, Any] = dict(self.keys)
        for kw in self.bind:
            ident[kw] = previous.get(kw, "")
        return ident


_STUDY = "StudyInstanceUID"
_SERIES = "SeriesInstanceUID"
_SOP = "SOPInstanceUID"
_IMAGE_IDS = (_STUDY, _SERIES, _SOP)
_SERIES_IDS = (_STUDY, _SERIES)

#: Sequence return keys that carry the reverse link of each criterion.
CRITERION_RETURN_KEYS: dict[CriterionKind, tuple[str, ...]] = {
    CriterionKind.PLAN: ("ReferencedRTPlanSequence",),
    CriterionKind.STRUCTURE_SET: ("ReferencedStructureSetSequence",),
    CriterionKind.FRAME_OF_REFERENCE: ("FrameOfReferenceUID", "RegistrationSequence",
                                       "DeformableRegistrationSequence"),
}


def _find(level: QueryLevel, keys: dict[str, str], bind: tuple[str, ...] = (),
          filters: tuple[AnswerFilter, ...] = (), note: str = "") -> SearchStep:
    return SearchStep(StepAction.FIND, level, tuple(keys.items()), bind, filters, False, note)


def _move(level: QueryLevel, candidate: bool = False, note: str = "") -> SearchStep:
    bind = _IMAGE_IDS if level is QueryLevel.IMAGE else _SERIES_IDS
    return SearchStep(StepAction.RETRIEVE, level, (), bind, (), candidate, note)


def _walk_to_series(patient_id: str | None, study_uid: str | None, series_keys: dict[str, str],
                    filters: tuple[AnswerFilter, ...] = ()) -> list[SearchStep]:
    """Hierarchical: the studies of the patient (unless the study is known), then their series."""
    steps: list[SearchStep] = []
    if study_uid:
        steps.append(_find(QueryLevel.SERIES, {_STUDY: study_uid, _SERIES: "", **series_keys}, (), filters,
                           "series of the known study"))
    else:
        steps.append(_patient_studies(patient_id))
        steps.append(_find(QueryLevel.SERIES, {_SERIES: "", **series_keys}, (_STUDY,), filters,
                           "series of each study"))
    return steps


def _gathered(step: SearchStep) -> SearchStep:
    return replace(step, gather=True)


def _patient_studies(patient_id: str | None) -> SearchStep:
    """The studies holding an object with the patient's PatientID: every SCP matches PatientID at STUDY level
    (the one level where the patient's ID bounds a search; below it, UIDs do)."""
    return _find(QueryLevel.STUDY, {"PatientID": patient_id or "", _STUDY: ""}, (), (), "studies of the patient")


def unbounded_search(op: Operation) -> str | None:
    """Why ``op`` would become a source-wide scan, or None when its search is bounded.

    A reverse search is bounded by the patient (or, for doses, the plan's study) and a frame-of-reference
    search by the patient and the FoR. PatientID is type 2 in the patient module: an object may carry it
    empty, and an empty matching key means "every patient" to an SCP. Such a search is never sent.
    """
    if isinstance(op, FindReferencing) and not op.patient_id and not op.study_uid:
        return (f"{op.hop}: the referenced object has no PatientID and no study to search in; searching "
                f"anyway would list every {op.modality} of the source")
    if isinstance(op, FindSeriesInFrameOfReference):
        if not op.for_uid:
            return f"{op.hop}: no FrameOfReferenceUID to search for"
        if not op.patient_id:
            return (f"{op.hop}: the image has no PatientID; searching its frame of reference anyway would "
                    "list every series of the source")
    return None


def search_steps(op: Operation, capability: SourceCapability) -> tuple[SearchStep, ...]:
    """The C-FIND/C-MOVE chain that executes ``op`` on a source of the given capability."""
    if isinstance(op, FindTreatmentRecords):
        return _records_steps(op, capability)
    if isinstance(op, RetrieveInstance):
        return _instance_steps(op, capability)
    if isinstance(op, RetrieveSeries):
        return _series_steps(op, capability)
    if isinstance(op, FindReferencing):
        return _referencing_steps(op, capability)
    if isinstance(op, UnpackMimSession):
        return ()  # local work: the harvester unpacks a stored session, no source is asked
    return _for_steps(op, capability)


def _records_steps(op: FindTreatmentRecords, cap: SourceCapability) -> tuple[SearchStep, ...]:
    lo, hi = op.search_range()
    dated = bool(lo or hi)
    pid = {"PatientID": op.patient_id} if op.patient_id else {}
    if dated and cap.relational and cap.record_discovery is RecordDiscovery.TREATMENT_DATE:
        # One query per chunk. Only records carry TreatmentDate, so nothing else matches the range; an SCP
        # that ignored the key would answer with every instance, hence the answers must show their date.
        return (_find(QueryLevel.IMAGE, {**pid, "TreatmentDate": f"{lo or ''}-{hi or ''}", "SOPClassUID": "",
                                         _STUDY: "", _SERIES: "", _SOP: ""}, (), (AnswerFilter.DATED_IN_WINDOW,),
                      "records by TreatmentDate (the source matches it)"),
                _move(QueryLevel.IMAGE, note="retrieve the records"))
    # TreatmentDate is an instance attribute: relational SCPs (ARIA) match it; others ignore it, so the
    # answers are filtered here and, when the date is not even returned, on arrival.
    treatment = {"TreatmentDate": op.window.date_range()} if cap.relational else {"TreatmentDate": ""}
    records = _find(QueryLevel.IMAGE, {_SOP: "", **treatment}, _SERIES_IDS, (AnswerFilter.WINDOW,),
                    "records of each series; TreatmentDate matched or returned where the SCP does")
    move = (_move(QueryLevel.IMAGE, note="retrieve the records") if cap.relational
            else _move(QueryLevel.IMAGE, candidate=True, note="retrieve; window checked on arrival"))
    # (TreatmentDate matching is a relational facility: a hierarchical source falls back to StudyDate.)
    by_study_date = dated and cap.record_discovery is not RecordDiscovery.SCAN
    if (by_study_date or op.patient_id) and cap.image_level_search:
        # The source matches StudyDate, PatientID and Modality at IMAGE level: the records themselves, in one
        # C-FIND per chunk (or per patient), instead of studies, then their record series, then their records.
        keys: dict[str, str] = {"PatientID": op.patient_id or "", "Modality": "RTRECORD", _STUDY: "", _SERIES: "",
                                _SOP: "", **treatment}
        if by_study_date:
            keys["StudyDate"] = _study_dates(op, cap)
        return (_find(QueryLevel.IMAGE, keys, (), (AnswerFilter.WINDOW,),
                      "records of the window's studies (or of the patient), selected at IMAGE level"), move)
    if by_study_date or op.patient_id:
        # Studies first: every SCP matches StudyDate and PatientID at STUDY level (dcmqrscp ignores PatientID
        # on SERIES-level queries). A record's study is dated on or before its treatment, so only the first
        # chunk looks back; later chunks list the studies dated within them, and each study once.
        # ModalitiesInStudy as a return key lets a source that fills it (Orthanc) skip studies without records.
        study_keys: dict[str, str] = {"PatientID": op.patient_id or "", _STUDY: "", "ModalitiesInStudy": ""}
        if by_study_date:
            study_keys["StudyDate"] = _study_dates(op, cap)
        return (_find(QueryLevel.STUDY, study_keys, (), (AnswerFilter.HAS_RECORDS,),
                      "studies of the window (or of the patient)"),
                _find(QueryLevel.SERIES, {_SERIES: "", "Modality": "RTRECORD"}, (_STUDY,), (),
                      "record series of each study"),
                records, move)
    if cap.relational:
        # Modality is a series attribute: many SCPs (dcmqrscp) silently ignore it at IMAGE level and would
        # answer with every instance. Select the record series first, then their records.
        return (_find(QueryLevel.SERIES, {"Modality": "RTRECORD", _STUDY: "", _SERIES: ""}, (), (),
                      "every record series of the source (no date key: RecordDiscovery scan)"),
                records, move)
    return (_find(QueryLevel.PATIENT, {"PatientID": ""}, (), (), "every patient of the source"),
            _find(QueryLevel.STUDY, {_STUDY: ""}, ("PatientID",), (), "studies of each patient"),
            _find(QueryLevel.SERIES, {_SERIES: "", "Modality": "RTRECORD"}, (_STUDY,), (),
                  "record series of each study"),
            records, move)


def _study_dates(op: FindTreatmentRecords, cap: SourceCapability) -> str:
    """StudyDate range of a records search: a record's study is dated on or before its treatment, so only the
    window's first chunk looks back; later chunks list the studies dated within them (each study once)."""
    lo, hi = op.search_range()
    first = lo is not None and lo == op.window.date_from
    return f"{look_back(lo, cap.look_back_days) if first else lo or ''}-{hi or ''}"


def look_back(day: str | None, days: int) -> str:
    """``day`` (YYYYMMDD) minus ``days``; ``""`` for an open bound."""
    if not day:
        return ""
    end = date(int(day[:4]), int(day[4:6]), int(day[6:]))
    # Clamped at 0001-01-01: a window starting at the beginning of the calendar has nothing before it.
    start = end - timedelta(days=days) if (end - date.min).days > days else date.min
    return f"{start.year:04d}{start.month:02d}{start.day:02d}"


def record_discovery_bound(cap: SourceCapability, window_dated: bool, patient_list: bool,
                           date_from: str | None) -> str | None:
    """Why finding a window's records at a source of this capability is *not* bounded by the window, or
    None when it is (shown by ``GET /rtharvest/status`` and the harvest document)."""
    if patient_list:
        return None  # one search per listed patient
    if not window_dated:
        return "no dates and no PatientIDs"
    if cap.record_discovery is RecordDiscovery.SCAN:
        return ("RecordDiscovery is 'scan': every record series of the source is listed, whatever the window "
                "(cost grows with the source's history)")
    if cap.record_discovery is RecordDiscovery.TREATMENT_DATE and cap.relational:
        return None
    if not date_from:
        return "the window has no From date: every study dated before To is listed"
    return None


def discovery_description(cap: SourceCapability) -> str:
    """One line saying how a source's records are found."""
    if cap.record_discovery is RecordDiscovery.TREATMENT_DATE and cap.relational:
        return "TreatmentDate matched by the source (one C-FIND per month of the window)"
    if cap.record_discovery is RecordDiscovery.SCAN:
        return "scan: every record series of the source is listed (not bounded by the window)"
    # Without UpperLevelKeys every record study dated in the window or its look-back is walked, whoever's
    # courses it holds: what history near the window costs at such a source (benchmarks/README.md).
    how = ("one IMAGE-level C-FIND per month of the window (UpperLevelKeys)" if cap.image_level_search
           else "studies, then their record series (one C-FIND per record study dated in the window or its "
                "look-back, and one per record series; UpperLevelKeys makes it one per month where the source "
                "matches series and study keys at IMAGE level)")
    return (f"StudyDate pre-filter with a look-back of {cap.look_back_days} day(s), {how}; records in studies "
            "dated earlier, or without StudyDate, are found only through step 4 (every record of a collected plan)")


def _instance_steps(op: RetrieveInstance, cap: SourceCapability) -> tuple[SearchStep, ...]:
    if op.study_uid and op.series_uid:
        # The referencing object names the image's series (a contour's RTReferencedSeriesSequence): list that
        # series. The image is wanted for its series, whose request needs this very listing (one C-FIND for
        # both, see rtharvest.store.findcache). A listing without the image (a wrong hint) falls back to
        # fallback_steps: the image is then found by its UID alone, and its own Series UID decides.
        return (_find(QueryLevel.IMAGE, {_STUDY: op.study_uid, _SERIES: op.series_uid, _SOP: ""}, (),
                      (AnswerFilter.NAMED_INSTANCE,), "the series the reference names, listed"),
                _move(QueryLevel.IMAGE))
    return _instance_by_uid(op, cap)


def _instance_by_uid(op: RetrieveInstance, cap: SourceCapability) -> tuple[SearchStep, ...]:
    if cap.relational:
        return (_find(QueryLevel.IMAGE, {_SOP: op.sop_uid, _STUDY: "", _SERIES: ""}, (), (),
                      "find by SOP Instance UID alone"),
                _move(QueryLevel.IMAGE))
    if op.modality:
        steps = _walk_to_series(op.patient_id, op.study_uid, {"Modality": op.modality})
    else:
        # An image named by a contour or a REG item: only CT/MR/PT series can hold it (skips the many
        # one-record series of a treated patient).
        steps = _walk_to_series(op.patient_id, op.study_uid, {"Modality": ""}, (AnswerFilter.MODALITY,))
    steps.append(_find(QueryLevel.IMAGE, {_SOP: op.sop_uid}, _SERIES_IDS, (), "the instance in each series"))
    steps.append(_move(QueryLevel.IMAGE))
    return tuple(steps)


def fallback_steps(op: Operation, capability: SourceCapability) -> tuple[SearchStep, ...]:
    """The chain to run when :func:`search_steps` found nothing because it trusted a hint: an image whose
    hinted series does not list it is searched by its UID (the hint of a structure set may be wrong)."""
    if isinstance(op, RetrieveInstance) and op.study_uid and op.series_uid:
        return _instance_by_uid(replace(op, study_uid=None, series_uid=None), capability)
    return ()


def _series_steps(op: RetrieveSeries, cap: SourceCapability) -> tuple[SearchStep, ...]:
    if op.study_uid:
        return (SearchStep(StepAction.RETRIEVE, QueryLevel.SERIES,
                           ((_STUDY, op.study_uid), (_SERIES, op.series_uid)), note="retrieve the series"),)
    if cap.relational:
        return (_find(QueryLevel.SERIES, {_SERIES: op.series_uid, _STUDY: ""}, (), (), "the series' study"),
                _move(QueryLevel.SERIES))
    steps = _walk_to_series(op.patient_id, None, {_SERIES: op.series_uid})
    steps.append(_move(QueryLevel.SERIES))
    return tuple(steps)


def _referencing_steps(op: FindReferencing, cap: SourceCapability) -> tuple[SearchStep, ...]:
    # A MIM session (Raw Data) keeps its REGs inside a private sequence: no return key can show what it
    # references, so every session of the patient is a candidate.
    seq = cap.sequence_return_keys and op.modality != "RAW"
    ret = {kw: "" for kw in CRITERION_RETURN_KEYS[op.criterion.kind]} if seq else {}
    filters = (AnswerFilter.CRITERION,) if seq else ()
    note = ("candidates with their reference sequences; keep those that match" if seq
            else "every candidate (the SCP returns no sequences)")
    # Identity (docs/harvest-rules.md, "Identity"): the search is bounded by UIDs, never by the candidates'
    # own PatientID: the plan's study (doses), else the studies holding the patient's objects. A candidate
    # that names the plan (or FoR) is the harvest's whatever PatientID it carries, so no step below matches
    # PatientID except the one listing the patient's studies, which every SCP matches.
    if cap.image_level_search:
        # The source matches Modality at IMAGE level and a list of study UIDs: the candidates of the plan's
        # study, or of all the patient's studies, in one C-FIND.
        image = _find(QueryLevel.IMAGE, {"Modality": op.modality, _STUDY: op.study_uid or "", _SERIES: "", _SOP: "",
                                         **ret}, () if op.study_uid else (_STUDY,), filters,
                      f"{op.modality} instances of the study (or the patient's studies), {note}")
        steps = [image] if op.study_uid else [_patient_studies(op.patient_id), _gathered(image)]
    else:
        # The series listing of a study is the same question for every search of the harvest (Modality selected
        # here, FrameOfReferenceUID returned where the source fills it, as the FoR search asks): asked once.
        listing = {"Modality": "", "FrameOfReferenceUID": ""} if cap.relational and cap.instance_return_keys \
            else {"Modality": ""}
        steps = _walk_to_series(op.patient_id, op.study_uid, listing, (AnswerFilter.MODALITY,))
        steps.append(_find(QueryLevel.IMAGE, {_SOP: "", "SOPClassUID": "", **ret}, _SERIES_IDS, filters, note))
    steps.append(_move(QueryLevel.IMAGE, candidate=not seq,
                       note="retrieve matches" if seq else "retrieve candidates; references checked on arrival"))
    return tuple(steps)


def _for_steps(op: FindSeriesInFrameOfReference, cap: SourceCapability) -> tuple[SearchStep, ...]:
    series_filters = (AnswerFilter.MODALITY, AnswerFilter.EXCLUDE_SERIES)
    # The series of the studies holding the patient's objects, whatever PatientID each series carries (the
    # FoR UID is the link; see _referencing_steps). A source that returns instance attributes may fill
    # FrameOfReferenceUID at SERIES level too (Orthanc reads it from one instance of each series). Every
    # image of a series shares one FoR (PS3.3 C.7.4.1.1.1), so such an answer settles the series without
    # listing its images (the harvester answers the image step from it); a source that leaves it out gets
    # the image step.
    ret = {"FrameOfReferenceUID": ""} if cap.relational and cap.instance_return_keys else {}
    steps = _walk_to_series(op.patient_id, None, {"Modality": "", **ret}, series_filters)
    if cap.image_level_search:
        # A source matching lists of study UIDs: the series of all the patient's studies in one C-FIND.
        steps[-1] = _gathered(steps[-1])
    if cap.instance_return_keys:
        steps.append(_find(QueryLevel.IMAGE, {_SOP: "", "FrameOfReferenceUID": ""}, _SERIES_IDS,
                           (AnswerFilter.FRAME_OF_REFERENCE, AnswerFilter.ONE_PER_SERIES),
                           "FrameOfReferenceUID of each series (an image-level attribute)"))
        steps.append(_move(QueryLevel.SERIES, note="retrieve the series in the FoR"))
    else:
        steps.append(_find(QueryLevel.IMAGE, {_SOP: ""}, _SERIES_IDS, (AnswerFilter.ONE_PER_SERIES,),
                           "one instance per series (the SCP does not return FrameOfReferenceUID)"))
        steps.append(_move(QueryLevel.IMAGE, candidate=True, note="probe: FoR checked on arrival"))
    return tuple(steps)


# ---------------------------------------------------------------------------------------------------
# Execution


def answer_dataset(answer: Mapping[str, Any]) -> Dataset:
    """A C-FIND answer (keyword → value) as a dataset, for reference extraction."""
    ds = Dataset()
    for kw, value in answer.items():
        if value is None or value == "":
            continue
        try:
            setattr(ds, kw, value)
        except Exception:  # an odd keyword or value from a peer: skip it, the filter stays conservative
            continue
    return ds


class DiscardReason(StrEnum):
    """Why a rule discarded a C-FIND answer (counted per harvest: ``Discarded.ByReason``)."""

    OUT_OF_WINDOW = "ANSWER_OUT_OF_WINDOW"  # TreatmentDate returned and outside the window
    NO_RECORDS = "ANSWER_STUDY_WITHOUT_RECORDS"  # a study whose ModalitiesInStudy lacks RTRECORD
    NOT_REFERENCING = "ANSWER_NOT_REFERENCING"  # returned reference sequences name neither plan nor FoR
    OTHER_MODALITY = "ANSWER_OTHER_MODALITY"  # Modality not among those searched (a source ignoring the key)
    EXCLUDED_SERIES = "ANSWER_SERIES_ALREADY_COLLECTED"  # a series another hop of the operation collects
    OTHER_FRAME_OF_REFERENCE = "ANSWER_OTHER_FRAME_OF_REFERENCE"  # FrameOfReferenceUID not the one searched
    OTHER_PATIENT = "ANSWER_OTHER_PATIENT"  # another PatientID at a step bounded by PatientID (no UID link)


#: The discard reason of each answer filter; the filters missing here select (the image a reference names
#: in its series' listing, one image per series), they do not judge, and are not counted.
_DISCARD_OF_FILTER = {
    AnswerFilter.WINDOW: DiscardReason.OUT_OF_WINDOW,
    AnswerFilter.DATED_IN_WINDOW: DiscardReason.OUT_OF_WINDOW,
    AnswerFilter.HAS_RECORDS: DiscardReason.NO_RECORDS,
    AnswerFilter.CRITERION: DiscardReason.NOT_REFERENCING,
    AnswerFilter.MODALITY: DiscardReason.OTHER_MODALITY,
    AnswerFilter.EXCLUDE_SERIES: DiscardReason.EXCLUDED_SERIES,
    AnswerFilter.FRAME_OF_REFERENCE: DiscardReason.OTHER_FRAME_OF_REFERENCE,
}

_SELECTING = frozenset({AnswerFilter.ONE_PER_SERIES, AnswerFilter.NAMED_INSTANCE})


def filter_answers(step: SearchStep, op: Operation, answers: Iterable[Mapping[str, Any]],
                   discarded: Counter[DiscardReason] | None = None) -> list[Mapping[str, Any]]:
    """Apply the step's client-side filters to the answers of its C-FIND; each answer a rule discards is
    counted in ``discarded`` by reason (selection within a listing is not a discard)."""
    out: list[Mapping[str, Any]] = []
    seen_series: set[str] = set()
    wanted_modality = dict(step.keys).get("Modality")
    wanted_patient = dict(step.keys).get("PatientID")

    def drop(reason: DiscardReason) -> None:
        if discarded is not None:
            discarded[reason] += 1

    for a in answers:
        failed = next((f for f in step.filters if f is not AnswerFilter.ONE_PER_SERIES and not _passes(f, op, a)),
                      None)
        if failed is not None:
            if failed not in _SELECTING:
                drop(_DISCARD_OF_FILTER[failed])
            continue
        # An SCP that ignores a matching key answers a superset; drop what it shows to be different.
        if wanted_modality and a.get("Modality") and str(a.get("Modality")) != wanted_modality:
            drop(DiscardReason.OTHER_MODALITY)
            continue
        # PatientID is a matching key only where the patient bounds the search: the studies of a patient, the
        # records of a PatientIDs window. Such an answer carries no UID link to the harvest (steps below a
        # patient's studies never match PatientID: docs/harvest-rules.md, "Identity"). dcmqrscp ignores
        # PatientID below STUDY level. IDs that differ only in case or padding go on: the planner keeps such
        # records out and counts them (a source matching loosely must not make a harvest silently empty).
        if wanted_patient and a.get("PatientID") and _loose_id(str(a.get("PatientID"))) != _loose_id(wanted_patient):
            drop(DiscardReason.OTHER_PATIENT)
            continue
        if AnswerFilter.ONE_PER_SERIES in step.filters:
            series = str(a.get(_SERIES, ""))
            if series in seen_series:
                continue
            seen_series.add(series)
        out.append(a)
    return out


def _loose_id(patient_id: str) -> str:
    return patient_id.strip().casefold()


def _passes(f: AnswerFilter, op: Operation, a: Mapping[str, Any]) -> bool:
    if f is AnswerFilter.WINDOW:
        date = a.get("TreatmentDate")
        if not date or not isinstance(op, FindTreatmentRecords):
            return True  # not returned: decided on arrival
        return record_in_window(str(date), op.window)
    if f is AnswerFilter.HAS_RECORDS:
        modalities = a.get("ModalitiesInStudy")
        if not modalities:
            return True  # not returned: the series step decides
        return "RTRECORD" in ([modalities] if isinstance(modalities, str) else list(modalities))
    if f is AnswerFilter.DATED_IN_WINDOW:
        date_value = a.get("TreatmentDate")
        return bool(date_value) and isinstance(op, FindTreatmentRecords) and record_in_window(str(date_value),
                                                                                              op.window)
    if f is AnswerFilter.CRITERION:
        if not isinstance(op, FindReferencing):
            return True
        if any(kw not in a for kw in CRITERION_RETURN_KEYS[op.criterion.kind]):
            return True  # the SCP did not return a link attribute: undecidable here, inspected on arrival
        ds = answer_dataset(a)
        if "Modality" not in ds:
            # Hierarchical IMAGE-level answers carry no Modality (a series key): the series step matched it.
            ds.Modality = op.modality
        return op.criterion.matches(extract(ds))
    if f is AnswerFilter.MODALITY:
        mods: tuple[str, ...] | frozenset[str] = ()
        if isinstance(op, FindSeriesInFrameOfReference):
            mods = op.modalities
        elif isinstance(op, FindReferencing):
            mods = (op.modality,)
        elif isinstance(op, RetrieveInstance) and not op.modality:
            mods = IMAGE_MODALITIES
        return not mods or str(a.get("Modality", "")) in mods
    if f is AnswerFilter.EXCLUDE_SERIES:
        excl = op.exclude_series if isinstance(op, (FindSeriesInFrameOfReference, FindReferencing)) else ()
        return str(a.get(_SERIES, "")) not in excl
    if f is AnswerFilter.NAMED_INSTANCE:
        return isinstance(op, RetrieveInstance) and str(a.get(_SOP, "")) == op.sop_uid
    if f is AnswerFilter.FRAME_OF_REFERENCE:
        # An answer without FoR is dropped: fetching a series of unknown FoR would risk an unrelated scan.
        return isinstance(op, FindSeriesInFrameOfReference) and str(a.get("FrameOfReferenceUID", "")) == op.for_uid
    return True


#: ``find(level, identifier) -> answers`` and ``retrieve(level, identifier, candidate) -> None``.
FindFn = Callable[[QueryLevel, dict[str, Any]], Seq[Mapping[str, Any]]]
RetrieveFn = Callable[[QueryLevel, dict[str, Any], bool], None]


def execute(op: Operation, capability: SourceCapability, find: FindFn, retrieve: RetrieveFn,
            discarded: Counter[DiscardReason] | None = None) -> int:
    """Run ``search_steps(op, capability)`` with the given DIMSE primitives; returns the number of
    retrieve requests issued (0 means nothing was found).

    Depth first: each answer is followed to its retrieve before the next answer of the same step, so only
    one answer list per step is held at a time (a month of studies, then one study's series), never a
    whole level of the source. Answers a rule discards are counted in ``discarded``.
    """

    def run(steps: tuple[SearchStep, ...], index: int, previous: Mapping[str, Any]) -> int:
        step = steps[index]
        if step.action is StepAction.RETRIEVE:
            retrieve(step.level, step.identifier(previous), step.candidate)
            return 1
        answers = filter_answers(step, op, find(step.level, step.identifier(previous)), discarded)
        following = steps[index + 1]
        if following.gather:
            if not answers:
                return 0
            return run(steps, index + 1, {kw: "\\".join(dict.fromkeys(str(a.get(kw, "")) for a in answers))
                                          for kw in following.bind})
        moves = 0
        for answer in answers:
            moves += run(steps, index + 1, answer)
        return moves

    steps = search_steps(op, capability)
    moves = run(steps, 0, {}) if steps else 0
    if not moves and (fallback := fallback_steps(op, capability)):
        moves = run(fallback, 0, {})
    return moves
