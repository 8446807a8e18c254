"""The rule book: which object names which, declared once (``docs/harvest-rules.md``, rules 1-12).

Each :class:`Link` says from which object (by the role it plays) to which (and the role the target then
plays), at which :class:`Hop`, forward (the source names the target by UID: a stored reference) or reverse
(the target names the source, or shares its frame of reference: found by a search), how the target is
searched, and what a missing target is called. The small pure functions below say *which UIDs* an object
names for a link (:func:`names`), which candidates a reverse search accepts (:func:`reverse_keys`), what a
registration leads to (:func:`registered`) and what an object promises (:func:`promised_images`,
:func:`promised_doses`).

Two readers, one book: the planner (:mod:`rtharvest.core.planner`) plans its operations from these entries and
functions, hop by hop, as objects arrive; the manifest (:mod:`rtharvest.core.manifest`) walks the stored
objects with the same functions to check that every link a plan's references promise is present. A rule
changed here changes both.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum

from .references import ObjectKind, ObjectRefs, PlanRefs, RegistrationRefs, SeriesRef, StructureSetRefs

__all__ = [
    "BOOK",
    "CriterionKind",
    "Direction",
    "Hop",
    "Link",
    "LinkName",
    "Registered",
    "Role",
    "Search",
    "link",
    "link_of",
    "names",
    "promised_doses",
    "promised_images",
    "registered",
    "reverse_keys",
    "rules",
    "search_what",
    "structure_set_from_dose",
]


class Role(StrEnum):
    """Why an object is wanted (the harvest rule that reaches it)."""

    RECORD = "RECORD"  # rule 1: seed treatment record in the window
    PLAN = "PLAN"  # rule 2: plan referenced by a seed record
    PLAN_RECORD = "PLAN_RECORD"  # rule 3 (step 4): every record of a followed plan
    STRUCTURE_SET = "STRUCTURE_SET"  # rule 4 (step 2, or TomoTherapy dose → structure set)
    DOSE = "DOSE"  # rule 5 (step 3)
    PLANNING_IMAGE = "PLANNING_IMAGE"  # rule 6 (step 5): image of the first contour
    PLANNING_SERIES = "PLANNING_SERIES"  # rule 6 (step 6)
    PLANNING_FOR_SERIES = "PLANNING_FOR_SERIES"  # rule 7 (step 8): series sharing a planning FoR
    REGISTRATION = "REGISTRATION"  # rule 8 (step 7)
    REGISTERED_IMAGE = "REGISTERED_IMAGE"  # rule 9: image named by a REG item without its series
    REGISTERED_SERIES = "REGISTERED_SERIES"  # rule 9 (step 9)
    REGISTERED_FOR_SERIES = "REGISTERED_FOR_SERIES"  # rule 9 (FoR-only item) and rule 10 (step 10)


class CriterionKind(StrEnum):
    """What a reverse search looks for in the candidates' references (:func:`reverse_keys`)."""

    PLAN = "PLAN"  # ReferencedRTPlanSequence names one of the UIDs (doses, records)
    FRAME_OF_REFERENCE = "FRAME_OF_REFERENCE"  # a REG involves one of the FoRs (an image: carries it)
    STRUCTURE_SET = "STRUCTURE_SET"  # ReferencedStructureSetSequence names one of the UIDs


class Hop(StrEnum):
    """The edge of the harvest rules an operation follows (``docs/harvest-rules.md``): from what, to what.
    The value is what users see (``HarvestHop`` metadata, the log, job payloads); code compares members.
    Each hop has its :class:`Link` (or two, by the role of the object it starts from) in :data:`BOOK`."""

    WINDOW_RECORD = "WINDOW->RTRECORD"
    RECORD_PLAN = "RTRECORD->RTPLAN"
    PLAN_STRUCTURE_SET = "RTPLAN->RTSTRUCT"
    PLAN_DOSE = "RTPLAN->RTDOSE"
    PLAN_RECORD = "RTPLAN->RTRECORD"
    DOSE_STRUCTURE_SET = "RTDOSE->RTSTRUCT"
    STRUCTURE_SET_SERIES = "RTSTRUCT->SERIES"
    STRUCTURE_SET_IMAGE = "RTSTRUCT->IMAGE"
    IMAGE_SERIES = "IMAGE->SERIES"
    SERIES_FOR = "SERIES->FOR"
    FOR_REG = "FOR->REG"
    REG_SERIES = "REG->SERIES"
    REG_IMAGE = "REG->IMAGE"
    REG_FOR = "REG->FOR"
    #: MIM sessions: the Raw Data search standing in for a REG search, and unpacking a session.
    FOR_RAW = "FOR->RAW"
    RAW_UNPACK = "RAW->UNPACK"
    #: The patient's sessions searched for a structure set (or REG) named by UID that no source holds.
    PLAN_RAW = "RTPLAN->RAW"
    DOSE_RAW = "RTDOSE->RAW"

    def as_session_search(self) -> Hop:
        """The hop of the Raw Data (MIM session) search that stands in for this one (the book's
        :attr:`Link.stands_in_for`)."""
        return next((lk.hop for lk in BOOK.values() if lk.stands_in_for is self), self)

    def as_registration_search(self) -> Hop:
        """The REG search a Raw Data search stands in for (the inverse of :meth:`as_session_search` for the
        REG search; a structure set's session search stays itself)."""
        for lk in BOOK.values():
            if lk.hop is self and lk.stands_in_for is not None:
                if any(o.hop is lk.stands_in_for and o.what == "REG" for o in BOOK.values()):
                    return lk.stands_in_for
        return self


class Direction(StrEnum):
    """How a link is found."""

    #: The source object names the target by UID (a stored reference): retrieved by that UID.
    FORWARD = "FORWARD"
    #: The target names the source (or shares its frame of reference): found by a search of candidates.
    REVERSE = "REVERSE"


class Search(StrEnum):
    """How the target of a link is asked of a source (the operation class that carries it)."""

    WINDOW = "WINDOW"  # records by TreatmentDate (and PatientIDs) of the window: FindTreatmentRecords
    BY_UID = "BY_UID"  # one instance by its SOP Instance UID: RetrieveInstance
    SERIES = "SERIES"  # a whole series by its SeriesInstanceUID: RetrieveSeries
    IN_STUDY = "IN_STUDY"  # candidates of a modality in the source's study: FindReferencing with a study
    IN_PATIENT = "IN_PATIENT"  # candidates of a modality in the patient's studies: FindReferencing
    FRAME_OF_REFERENCE = "FRAME_OF_REFERENCE"  # CT/MR/PT series whose images carry the FoR: FindSeriesInFoR
    SESSION = "SESSION"  # unpack a Raw Data object (MIM session): UnpackMimSession, local


class LinkName(StrEnum):
    """The entries of :data:`BOOK` (``docs/harvest-rules.md`` names them)."""

    WINDOW_RECORD = "WINDOW_RECORD"
    RECORD_PLAN = "RECORD_PLAN"
    PLAN_RECORD = "PLAN_RECORD"
    PLAN_STRUCTURE_SET = "PLAN_STRUCTURE_SET"
    DOSE_STRUCTURE_SET = "DOSE_STRUCTURE_SET"
    PLAN_DOSE = "PLAN_DOSE"
    STRUCTURE_SET_SERIES = "STRUCTURE_SET_SERIES"
    STRUCTURE_SET_IMAGE = "STRUCTURE_SET_IMAGE"
    PLANNING_IMAGE_SERIES = "PLANNING_IMAGE_SERIES"
    PLANNING_FOR_SERIES = "PLANNING_FOR_SERIES"
    FOR_REG = "FOR_REG"
    REG_SERIES = "REG_SERIES"
    REG_IMAGE = "REG_IMAGE"
    REGISTERED_IMAGE_SERIES = "REGISTERED_IMAGE_SERIES"
    REG_FOR = "REG_FOR"
    REGISTERED_FOR_SERIES = "REGISTERED_FOR_SERIES"
    FOR_RAW = "FOR_RAW"
    PLAN_RAW = "PLAN_RAW"
    DOSE_RAW = "DOSE_RAW"
    RAW_UNPACK = "RAW_UNPACK"


Names = Callable[[ObjectRefs], tuple[str, ...]]


@dataclass(frozen=True)
class Link:
    """One reference link of the harvest rules."""

    name: LinkName
    hop: Hop
    #: The numbered rule of ``docs/harvest-rules.md``.
    rule: int
    #: The role of the object the link starts from (``None``: the harvest window).
    source: Role | None
    #: The role the object found plays (``None``: the role of the search a session stands in for).
    target: Role | None
    direction: Direction
    search: Search
    #: What the target is: the modality searched or retrieved, and ``Missing[].What`` when it is absent.
    what: str
    #: Reverse links: what a candidate must name (:func:`reverse_keys`).
    criterion: CriterionKind | None = None
    #: Forward links: the UIDs the source names (targets); reverse links: the UIDs a candidate names (the
    #: source's UID it must match). ``None`` where the rule needs context (:func:`registered`).
    names: Names | None = None
    #: MIM sessions: the hop of the search this one stands in for.
    stands_in_for: Hop | None = None

    @property
    def modality(self) -> str | None:
        """The modality asked of the source (``None`` for images and series: any image modality)."""
        return None if self.what in ("SERIES", "IMAGE") else self.what


# -- what an object names (the ``names`` of the links) ------------------------------------------------


def _record_plans(refs: ObjectRefs) -> tuple[str, ...]:
    return refs.record.plan_uids if refs.record is not None else ()


def _plan_structure_sets(refs: ObjectRefs) -> tuple[str, ...]:
    return refs.plan.structure_set_uids if refs.plan is not None else ()


def _dose_structure_sets(refs: ObjectRefs) -> tuple[str, ...]:
    return refs.dose.structure_set_uids if refs.dose is not None else ()


def _dose_plans(refs: ObjectRefs) -> tuple[str, ...]:
    return refs.dose.plan_uids if refs.dose is not None else ()


def _structure_set_series(refs: ObjectRefs) -> tuple[str, ...]:
    ss = refs.structure_set
    return tuple(s.series_uid for s in ss.referenced_series) if ss is not None else ()


def _first_contour_image(refs: ObjectRefs) -> tuple[str, ...]:
    ss = refs.structure_set
    return (ss.first_contour_image_uid,) if ss is not None and ss.first_contour_image_uid else ()


def _own_series(refs: ObjectRefs) -> tuple[str, ...]:
    return (refs.series_uid,) if refs.kind is ObjectKind.IMAGE and refs.series_uid else ()


def _own_for(refs: ObjectRefs) -> tuple[str, ...]:
    return (refs.frame_of_reference_uid,) if refs.frame_of_reference_uid else ()


def _involved_fors(refs: ObjectRefs) -> tuple[str, ...]:
    # Own FoR, a RegistrationSequence item's FoR or a DeformableRegistrationSequence item's
    # SourceFrameOfReferenceUID (rule 8).
    if refs.registration is not None:
        return tuple(sorted(refs.registration.involved_fors()))
    return _own_for(refs)


_F, _R = Direction.FORWARD, Direction.REVERSE

#: The rule book: every link of the harvest rules, by name.
BOOK: dict[LinkName, Link] = {lk.name: lk for lk in (
    Link(LinkName.WINDOW_RECORD, Hop.WINDOW_RECORD, 1, None, Role.RECORD, _R, Search.WINDOW, "RTRECORD"),
    Link(LinkName.RECORD_PLAN, Hop.RECORD_PLAN, 2, Role.RECORD, Role.PLAN, _F, Search.BY_UID, "RTPLAN",
         names=_record_plans),
    Link(LinkName.PLAN_RECORD, Hop.PLAN_RECORD, 3, Role.PLAN, Role.PLAN_RECORD, _R, Search.IN_PATIENT,
         "RTRECORD", CriterionKind.PLAN, _record_plans),
    Link(LinkName.PLAN_STRUCTURE_SET, Hop.PLAN_STRUCTURE_SET, 4, Role.PLAN, Role.STRUCTURE_SET, _F,
         Search.BY_UID, "RTSTRUCT", names=_plan_structure_sets),
    # Only when the plan names no structure set (TomoTherapy): :func:`structure_set_from_dose`.
    Link(LinkName.DOSE_STRUCTURE_SET, Hop.DOSE_STRUCTURE_SET, 4, Role.DOSE, Role.STRUCTURE_SET, _F,
         Search.BY_UID, "RTSTRUCT", names=_dose_structure_sets),
    # Doses point at plans, never the reverse (ReferencedDoseSequence is rarely filled and never
    # authoritative): the plan's study is searched for doses naming it.
    Link(LinkName.PLAN_DOSE, Hop.PLAN_DOSE, 5, Role.PLAN, Role.DOSE, _R, Search.IN_STUDY, "RTDOSE",
         CriterionKind.PLAN, _dose_plans),
    Link(LinkName.STRUCTURE_SET_SERIES, Hop.STRUCTURE_SET_SERIES, 6, Role.STRUCTURE_SET, Role.PLANNING_SERIES,
         _F, Search.SERIES, "SERIES", names=_structure_set_series),
    Link(LinkName.STRUCTURE_SET_IMAGE, Hop.STRUCTURE_SET_IMAGE, 6, Role.STRUCTURE_SET, Role.PLANNING_IMAGE, _F,
         Search.BY_UID, "IMAGE", names=_first_contour_image),
    Link(LinkName.PLANNING_IMAGE_SERIES, Hop.IMAGE_SERIES, 6, Role.PLANNING_IMAGE, Role.PLANNING_SERIES, _F,
         Search.SERIES, "SERIES", names=_own_series),
    Link(LinkName.PLANNING_FOR_SERIES, Hop.SERIES_FOR, 7, Role.PLANNING_SERIES, Role.PLANNING_FOR_SERIES, _R,
         Search.FRAME_OF_REFERENCE, "SERIES", CriterionKind.FRAME_OF_REFERENCE, _own_for),
    Link(LinkName.FOR_REG, Hop.FOR_REG, 8, Role.PLANNING_SERIES, Role.REGISTRATION, _R, Search.IN_PATIENT, "REG",
         CriterionKind.FRAME_OF_REFERENCE, _involved_fors),
    # Rule 9's three links depend on the planning FoRs (the fixed side): :func:`registered`.
    Link(LinkName.REG_SERIES, Hop.REG_SERIES, 9, Role.REGISTRATION, Role.REGISTERED_SERIES, _F, Search.SERIES,
         "SERIES"),
    Link(LinkName.REG_IMAGE, Hop.REG_IMAGE, 9, Role.REGISTRATION, Role.REGISTERED_IMAGE, _F, Search.BY_UID,
         "IMAGE"),
    Link(LinkName.REGISTERED_IMAGE_SERIES, Hop.IMAGE_SERIES, 9, Role.REGISTERED_IMAGE, Role.REGISTERED_SERIES,
         _F, Search.SERIES, "SERIES", names=_own_series),
    Link(LinkName.REG_FOR, Hop.REG_FOR, 9, Role.REGISTRATION, Role.REGISTERED_FOR_SERIES, _R,
         Search.FRAME_OF_REFERENCE, "SERIES", CriterionKind.FRAME_OF_REFERENCE, _own_for),
    Link(LinkName.REGISTERED_FOR_SERIES, Hop.SERIES_FOR, 10, Role.REGISTERED_SERIES, Role.REGISTERED_FOR_SERIES,
         _R, Search.FRAME_OF_REFERENCE, "SERIES", CriterionKind.FRAME_OF_REFERENCE, _own_for),
    # Rule 12, MIM sessions: the patient's Raw Data objects searched in place of a REG search, or of a
    # structure set named by UID that no source holds; a session reached is unpacked.
    Link(LinkName.FOR_RAW, Hop.FOR_RAW, 12, Role.PLANNING_SERIES, Role.REGISTRATION, _R, Search.IN_PATIENT, "RAW",
         CriterionKind.FRAME_OF_REFERENCE, stands_in_for=Hop.FOR_REG),
    Link(LinkName.PLAN_RAW, Hop.PLAN_RAW, 12, Role.PLAN, Role.STRUCTURE_SET, _R, Search.IN_PATIENT, "RAW",
         CriterionKind.FRAME_OF_REFERENCE, stands_in_for=Hop.PLAN_STRUCTURE_SET),
    Link(LinkName.DOSE_RAW, Hop.DOSE_RAW, 12, Role.DOSE, Role.STRUCTURE_SET, _R, Search.IN_PATIENT, "RAW",
         CriterionKind.FRAME_OF_REFERENCE, stands_in_for=Hop.DOSE_STRUCTURE_SET),
    Link(LinkName.RAW_UNPACK, Hop.RAW_UNPACK, 12, None, None, _F, Search.SESSION, "RAW"),
)}


def link(name: LinkName) -> Link:
    """The book's entry ``name`` (``KeyError`` when the book has no such rule)."""
    return BOOK[name]


def link_of(hop: Hop, target: Role) -> Link:
    """The entry of ``hop`` whose target plays ``target`` (a session's unpacking takes any role)."""
    for lk in BOOK.values():
        if lk.hop is hop and lk.target in (target, None):
            return lk
    raise KeyError(f"no rule for hop {hop.value} to {target.value}")


def names(name: LinkName, refs: ObjectRefs) -> tuple[str, ...]:
    """The UIDs ``refs`` names for the link ``name``: a forward link's targets, a reverse link's keys (the
    source UIDs a candidate must match), in the object's order."""
    fn = BOOK[name].names
    if fn is None:
        raise ValueError(f"{name.value} needs context: see rulebook.registered")
    return fn(refs)


def reverse_keys(criterion: CriterionKind, refs: ObjectRefs) -> frozenset[str]:
    """The UIDs a reverse-search candidate offers to ``criterion``: a record's or dose's plans (rules 3 and
    5), a dose's or plan's structure sets, a REG's involved FoRs (rule 8) or an image's FoR (rules 7, 10)."""
    if criterion is CriterionKind.PLAN:
        if refs.record is not None:
            return frozenset(names(LinkName.PLAN_RECORD, refs))
        return frozenset(names(LinkName.PLAN_DOSE, refs))
    if criterion is CriterionKind.STRUCTURE_SET:
        if refs.dose is not None:
            return frozenset(names(LinkName.DOSE_STRUCTURE_SET, refs))
        return frozenset(names(LinkName.PLAN_STRUCTURE_SET, refs))
    return frozenset(names(LinkName.FOR_REG, refs))


def structure_set_from_dose(plan: ObjectRefs) -> bool:
    """Rule 4's fallback: the structure set is the one the plan's dose names (:data:`DOSE_STRUCTURE_SET`)
    only when the plan names none itself (TomoTherapy-style plans)."""
    return not names(LinkName.PLAN_STRUCTURE_SET, plan)


def search_what(role: str | None) -> str:
    """What a failed search for ``role`` leaves unknown (``Missing[].What``): the target of the book's
    search for that role (the searches a session stands in for, not the Raw Data ones)."""
    for lk in BOOK.values():
        if lk.direction is Direction.REVERSE and lk.stands_in_for is None and lk.target is not None \
                and lk.target.value == role:
            return lk.what
    return "SEARCH"


@dataclass(frozen=True)
class Registered:
    """What a registration leads to, beside the fixed (planning) side it was found by (rule 9)."""

    #: REG_SERIES: the series of its ReferencedSeriesSequence / StudiesContainingOther... listings (other
    #: than ``exclude``), in order, with the FoR its items give their images (``None``: not said).
    series: tuple[tuple[SeriesRef, str | None], ...]
    #: Per item outside the fixed FoRs, in item order: ``(REG_IMAGE, image)`` for an item naming images no
    #: listing holds (its first such image: one image names its series), ``(REG_FOR, FoR)`` for an item
    #: naming no image (the registered series are that FoR's series).
    by_item: tuple[tuple[LinkName, str], ...]

    @property
    def images(self) -> tuple[str, ...]:
        """The REG_IMAGE targets."""
        return tuple(uid for name, uid in self.by_item if name is LinkName.REG_IMAGE)

    @property
    def fors(self) -> tuple[str, ...]:
        """The REG_FOR frames of reference."""
        return tuple(uid for name, uid in self.by_item if name is LinkName.REG_FOR)


def registered(reg: RegistrationRefs, fixed_fors: frozenset[str] | set[str],
               exclude: frozenset[str] | set[str] = frozenset()) -> Registered:
    """Rule 9 for one registration found through ``fixed_fors`` (the planning FoRs)."""
    listed: set[str] = set()
    series: list[tuple[SeriesRef, str | None]] = []
    for s in reg.referenced_series:
        listed.update(s.instance_uids)
        if s.series_uid in exclude:
            continue
        series.append((s, next((f for f in (reg.for_of_image(i) for i in s.instance_uids) if f), None)))
    by_item: list[tuple[LinkName, str]] = []
    for item in reg.items:
        if item.for_uid is not None and item.for_uid in fixed_fors:
            continue  # the fixed (planning) side: rule 7 covers it
        unlisted = [uid for uid in item.image_uids if uid not in listed]
        if unlisted:
            by_item.append((LinkName.REG_IMAGE, unlisted[0]))
        elif not item.image_uids and item.for_uid:
            by_item.append((LinkName.REG_FOR, item.for_uid))
    return Registered(tuple(series), tuple(by_item))


# -- what an object promises (the manifest names each one absent) -------------------------------------


def promised_images(obj: StructureSetRefs | RegistrationRefs) -> dict[str, str | None]:
    """Every image a structure set or a registration names, mapped to its series UID when the object
    says which series holds it (``None`` otherwise), in reference order.

    The planner fetches the *series* of these images (rules 6 and 9), so a source holding all of them
    delivers all of them; one that holds only part of a series delivers only that part, and these are
    the images a harvest of that plan must hold to be ``Complete`` (``docs/harvest-rules.md``):

    * a structure set: every image of its RTReferencedSeriesSequence listings and every contour's
      ContourImageSequence image;
    * a registration: every image of its ReferencedSeriesSequence / StudiesContainingOther...
      listings and every image its (Deformable)RegistrationSequence items name.
    """
    out: dict[str, str | None] = {}
    listings = obj.referenced_series
    for ref in listings:
        for uid in ref.instance_uids:
            out.setdefault(uid, ref.series_uid)
    named = obj.contour_image_uids if isinstance(obj, StructureSetRefs) else tuple(
        uid for item in obj.items for uid in item.image_uids)
    for uid in named:
        out.setdefault(uid, None)
    return out


def promised_doses(plan: PlanRefs) -> tuple[str, ...]:
    """Doses a plan names itself (ReferencedDoseSequence). The dose search (rule 5) finds every dose that
    names the plan; one the plan names that is not stored makes the plan ``Incomplete``."""
    return plan.dose_uids


def rules() -> Mapping[int, tuple[LinkName, ...]]:
    """The book's entries by numbered rule of ``docs/harvest-rules.md`` (which names them under each rule)."""
    out: dict[int, list[LinkName]] = {}
    for lk in BOOK.values():
        out.setdefault(lk.rule, []).append(lk.name)
    return {k: tuple(v) for k, v in sorted(out.items())}
