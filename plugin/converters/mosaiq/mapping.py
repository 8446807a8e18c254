"""From MOSAIQ deliveries to treatment records: the rules, each stated where it is applied.

Pure functions over :mod:`.models`; no SQL, no DICOM encoding. :func:`plan_records` takes every
delivery of one patient (all dates, so that sessions crossing midnight and fraction ordinals come out
the same whatever window is asked for) and returns the records of the sessions inside the window,
plus what it skipped or could not convert, each naming the MOSAIQ row.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta

from .models import Delivery, DeliveryType, PatientInfo, Problem, SiteInfo, TerminationStatus

#: A delivery on a later calendar day still belongs to the open session of its site when it follows the
#: previous delivery by less than this: a session that runs past midnight stays one session (and one
#: record per plan), dated by its first delivery. Two sessions of one site on one calendar day are not
#: told apart (MOSAIQ counts one fraction per site and day); they form one session.
SESSION_GAP = timedelta(hours=2)


@dataclass(frozen=True)
class Session:
    """The treatment deliveries of one site in one sitting; ``number`` is its 1-based ordinal in the site."""

    sit_set_id: int
    number: int
    day: date
    deliveries: tuple[Delivery, ...]


@dataclass(frozen=True)
class BeamItem:
    """One TreatmentSessionBeamSequence item: one delivered field."""

    delivery: Delivery
    beam_number: int
    beam_name: str
    fraction: int
    delivery_type: DeliveryType
    specified_meterset: float | None
    delivered_meterset: float


@dataclass(frozen=True)
class RecordSpec:
    """One RT Beams Treatment Record: the deliveries of one plan in one session on one machine."""

    patient: PatientInfo
    site: SiteInfo | None
    session: Session
    plan_uid: str
    machine: str
    beams: tuple[BeamItem, ...]

    @property
    def started(self) -> datetime:
        """When the first beam of the record was delivered (TreatmentDate/Time)."""
        return self.beams[0].delivery.when

    @property
    def key(self) -> str:
        """The MOSAIQ rows behind this record, for reports."""
        return "Dose_Hst DHS_ID=" + ",".join(str(b.delivery.dhs_id) for b in self.beams)


@dataclass
class Outcome:
    """What :func:`plan_records` made of one patient's deliveries."""

    records: list[RecordSpec] = field(default_factory=list)
    sessions: int = 0
    skipped: list[Problem] = field(default_factory=list)
    errors: list[Problem] = field(default_factory=list)


def _sessions(deliveries: Sequence[Delivery]) -> list[Session]:
    """Rule: a session is the deliveries of one site (``TxField.SIT_Set_ID`` of the delivered field
    version) on one treatment day, the day of its first delivery; see :data:`SESSION_GAP` for midnight."""
    by_site: dict[int, list[Delivery]] = {}
    for d in sorted(deliveries, key=lambda d: (d.when, d.dhs_id)):
        assert d.field is not None
        by_site.setdefault(d.field.sit_set_id, []).append(d)
    out: list[Session] = []
    for site, items in sorted(by_site.items()):
        groups: list[list[Delivery]] = []
        for d in items:
            if groups:
                current = groups[-1]
                same_day = d.when.date() == current[0].when.date()
                if same_day or d.when - current[-1].when < SESSION_GAP:
                    current.append(d)
                    continue
            groups.append([d])
        out += [Session(site, n, g[0].when.date(), tuple(g)) for n, g in enumerate(groups, start=1)]
    return out


def _interrupted(d: Delivery) -> bool:
    """A delivery that did not complete its field: PartiallyTreated, or a termination other than NORMAL."""
    return d.partially_treated or d.termination is not TerminationStatus.NORMAL


def _full(d: Delivery) -> bool:
    """A delivery that alone gave its field's whole meterset (so it is no remainder of an interrupted one)."""
    assert d.field is not None
    planned, given = d.field.meterset, d.meterset
    return planned is not None and given is not None and planned > 0 and given >= planned * 0.999


@dataclass
class _Fraction:
    """The state of a plan's latest fraction while sessions are walked in time order."""

    number: int
    completed: set[int] = field(default_factory=set)  # fields (FLD_SET_ID) delivered to the end
    interrupted: set[int] = field(default_factory=set)  # fields whose latest delivery was interrupted
    in_effect: set[int] = field(default_factory=set)  # MOSAIQ's Fx_Number_InEffect values seen


@dataclass
class Fractions:
    """Per (session, plan): the fallback fraction number and whether that part continues an earlier part;
    per delivery: its TreatmentDeliveryType."""

    number: dict[tuple[int, int, str], int] = field(default_factory=dict)
    continues: set[tuple[int, int, str]] = field(default_factory=set)
    delivery_type: dict[int, DeliveryType] = field(default_factory=dict)


def fractions_of(sessions: Sequence[Session]) -> Fractions:
    """What fraction each session of each plan delivers; the rules, in the order they are applied:

    * A session of a plan is one fraction of it: the fallback number is the ordinal of the plan's
      fractions (all dates; QA-mode, setup and imaging deliveries are not sessions), so a re-plan starts
      at 1 (CurrentFractionNumber counts the fractions of the referenced plan, PS3.3 C.8.8.21).
    * **MOSAIQ split a fraction**: the plan's previous fraction left a field interrupted (its last
      delivery there PartiallyTreated or not terminated NORMAL), this session delivers that field again
      but less than its whole meterset (a remainder), and it delivers no field that fraction already
      completed. Then this session is the *continuation*
      of that fraction: same number (the ordinal does not advance), every beam item CONTINUATION. Where
      both parts carry MOSAIQ's own ``Fx_Number_InEffect``, it decides instead: equal numbers are one
      fraction, different numbers two.
    * Within one fraction (one session, or a session and its continuation, on any machine), a field
      delivered again after an interrupted delivery is CONTINUATION; every other delivery TREATMENT.
    """
    out = Fractions()
    latest: dict[str, _Fraction] = {}
    counted: dict[str, int] = {}
    for session in sorted(sessions, key=lambda s: (s.deliveries[0].when, s.sit_set_id, s.number)):
        by_plan: dict[str, list[Delivery]] = {}
        for d in session.deliveries:
            if d.field is not None and d.field.plan_uid:
                by_plan.setdefault(d.field.plan_uid, []).append(d)
        for plan_uid, items in by_plan.items():
            fields = {d.field.fld_set_id for d in items if d.field is not None}
            in_effect = {d.fraction_in_effect for d in items if d.fraction_in_effect}
            previous = latest.get(plan_uid)
            continuation = False
            if previous is not None:
                if in_effect and previous.in_effect:
                    continuation = bool(in_effect & previous.in_effect)  # MOSAIQ's own count decides
                else:
                    resumed = [d for d in items if d.field is not None and d.field.fld_set_id in previous.interrupted]
                    continuation = (bool(resumed) and not fields & previous.completed
                                    and not any(_full(d) for d in resumed))
            key = (session.sit_set_id, session.number, plan_uid)
            if continuation:
                assert previous is not None
                current = previous
                out.continues.add(key)
            else:
                counted[plan_uid] = counted.get(plan_uid, 0) + 1
                current = _Fraction(counted[plan_uid])
                latest[plan_uid] = current
            out.number[key] = current.number
            current.in_effect |= in_effect
            for d in sorted(items, key=lambda d: (d.when, d.dhs_id)):
                assert d.field is not None
                fld = d.field.fld_set_id
                again = continuation or fld in current.interrupted
                out.delivery_type[d.dhs_id] = DeliveryType.CONTINUATION if again else DeliveryType.TREATMENT
                if _interrupted(d):
                    current.interrupted.add(fld)
                else:
                    current.interrupted.discard(fld)
                    current.completed.add(fld)
    return out


def _beams(deliveries: Sequence[Delivery], plan_fraction: int, fractions: Fractions) -> tuple[BeamItem, ...]:
    """The beam items of one plan's deliveries in one session (on one machine).

    Rule (CurrentFractionNumber): MOSAIQ's own fraction number, ``Dose_Hst.Fx_Number_InEffect``, when the
    row holds one (not NULL, not 0); otherwise ``plan_fraction`` from :func:`fractions_of`. The specified
    meterset stays the field's whole meterset also for a continuation (PS3.3 C.8.8.21.2.1: the delivered
    metersets of the interrupted and resumed deliveries add up to it).
    """
    items: list[BeamItem] = []
    for d in deliveries:
        f = d.field
        assert f is not None
        assert d.meterset is not None  # checked by plan_records
        items.append(BeamItem(
            delivery=d,
            beam_number=f.beam_number,
            beam_name=f.beam_name or f.label or f.name,
            fraction=d.fraction_in_effect if d.fraction_in_effect else plan_fraction,
            delivery_type=fractions.delivery_type.get(d.dhs_id, DeliveryType.TREATMENT),
            specified_meterset=f.meterset,
            delivered_meterset=d.meterset,
        ))
    return tuple(items)


def plan_records(patient: PatientInfo, deliveries: Sequence[Delivery], sites: dict[int, SiteInfo],
                 date_from: date, date_to: date) -> Outcome:
    """Records of the sessions dated ``date_from``..``date_to`` (inclusive) from all of a patient's deliveries."""
    out = Outcome()

    def in_window(day: date) -> bool:
        return date_from <= day <= date_to

    treatments: list[Delivery] = []
    for d in deliveries:
        if in_window(d.when.date()) or any(p.reason == "bad-date" for p in d.problems):
            out.errors += d.problems
        if d.field is None:
            continue  # no TxField row: reported above as a problem of the Dose_Hst row
        if d.qa_mode:
            # Rule: a delivery made in QA mode (TrackTreatment.WasQAMode) is not a treatment.
            if in_window(d.when.date()):
                out.skipped.append(Problem("Dose_Hst", f"DHS_ID={d.dhs_id}", "qa-mode", "delivered in QA mode"))
            continue
        if d.field.field_type.is_setup:
            # Rule: setup fields (Type_Enum 3 setup, 4 kV setup) position the patient; they treat nothing.
            if in_window(d.when.date()):
                out.skipped.append(Problem("Dose_Hst", f"DHS_ID={d.dhs_id}", "setup-field",
                                           f"TxField FLD_ID={d.field.fld_id} is a setup field"))
            continue
        if d.field.field_type.is_imaging:
            # Rule: imaging fields (Type_Enum 5 CT, 6 Port, 9 MV CT) image the patient; like setup fields they
            # treat nothing, even when imported from DICOM with a plan UID and a beam number: no beam item.
            if in_window(d.when.date()):
                out.skipped.append(Problem("Dose_Hst", f"DHS_ID={d.dhs_id}", "imaging-field",
                                           f"TxField FLD_ID={d.field.fld_id} is an imaging field "
                                           f"(Type_Enum {int(d.field.field_type)} {d.field.field_type.name})"))
            continue
        treatments.append(d)

    # The fallback fraction number of each (session, plan), continuations and delivery types: fractions_of.
    sessions = _sessions(treatments)
    fractions = fractions_of(sessions)

    for session in sessions:
        if not in_window(session.day):
            continue
        out.sessions += 1
        groups: dict[tuple[str, str], list[Delivery]] = {}
        for d in session.deliveries:
            f = d.field
            assert f is not None
            if not f.plan_uid or (f.beam_number <= 0 and not d.problems):
                # Rule: a field not imported from DICOM (no OriginalPlanUID, OriginalBeamNumber 0) has no plan
                # to reference: the delivery is reported, never attached to a guessed plan.
                out.skipped.append(Problem("Dose_Hst", f"DHS_ID={d.dhs_id}", "no-plan-uid",
                                           f"TxField FLD_ID={f.fld_id} was not imported from DICOM"))
                continue
            # Rule: one record per plan in a session (ReferencedRTPlanSequence holds one plan), and per
            # machine (TreatmentMachineSequence holds one machine: the one actually used).
            groups.setdefault((f.plan_uid, d.machine or ""), []).append(d)
        for (plan_uid, machine), items in groups.items():
            bad = [p for d in items for p in d.problems]
            for d in items:
                if d.meterset is None and not d.problems:
                    # The delivered meterset is what a record is for: never written as a guess.
                    missing = Problem("Dose_Hst", f"DHS_ID={d.dhs_id}", "no-meterset",
                                      "Meterset is NULL and no FLD_HST row gives the delivered meterset")
                    out.errors.append(missing)
                    bad.append(missing)
            if bad:
                out.errors += bad  # also those of a delivery past midnight, outside the window's days
                out.errors.append(Problem("Dose_Hst", "DHS_ID=" + ",".join(str(d.dhs_id) for d in items),
                                          "record-not-written",
                                          f"record of plan {plan_uid} not written: {len(bad)} bad value(s) in "
                                          "its deliveries (see the errors naming those rows)"))
                continue
            site = sites.get(items[0].sit_id) if items[0].sit_id is not None else None
            fraction = fractions.number[(session.sit_set_id, session.number, plan_uid)]
            out.records.append(RecordSpec(patient, site, session, plan_uid, machine,
                                          _beams(items, fraction, fractions)))
    out.records.sort(key=lambda r: (r.started, r.plan_uid, r.machine))
    # A bad row shared by many deliveries (a field's control point) is reported once.
    out.errors = list(dict.fromkeys(out.errors))
    return out
