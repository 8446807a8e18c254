"""The harvest rules (docs/harvest-rules.md) applied to what the generator *built*, not to DICOM files.

The generator records each object's links as plain Python facts while it creates them
(:class:`Knowledge`); :func:`evaluate` then derives, for one window, exactly what a perfect harvest
collects. No DICOM file is read here, so the planner under test and this oracle share no code.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from rtharvest.synth.groundtruth import MissingItem, PlanTruth, Summary

#: Plan intents that mark QA / non-patient plans (collected as Invalid, never followed).
QA_INTENTS = frozenset({"VERIFICATION", "MACHINE_QA", "SERVICE"})
IMAGE_MODALITIES = ("CT", "MR", "PT")
NOT_FOUND = "not found at source"


@dataclass
class KSeries:
    """An image series (CT/MR/PT)."""

    uid: str
    patient_id: str
    modality: str
    for_uid: str
    study_uid: str
    instance_uids: list[str] = field(default_factory=list)


@dataclass
class KStructureSet:
    """An RTSTRUCT: the series in RTReferencedSeriesSequence and the first contour's series."""

    uid: str
    patient_id: str
    referenced_series: tuple[str, ...]
    first_contour_series: str | None


@dataclass
class KPlan:
    """An RTPLAN present at the source; ``structure_set_ref`` may dangle or be None (TomoTherapy)."""

    uid: str
    patient_id: str
    label: str
    intent: str | None
    study_uid: str
    structure_set_ref: str | None
    #: NumberOfFractionsPlanned of its (only) fraction group, as the generator wrote it.
    fractions_planned: int | None = None


@dataclass
class KDose:
    """An RTDOSE and its references."""

    uid: str
    patient_id: str
    plan_uid: str
    study_uid: str
    structure_set_ref: str | None


@dataclass
class KRecord:
    """A treatment record; ``plan_uid`` may name a plan absent from the source.

    ``fraction``: which fraction of its plan the generator delivered with it (several records share one
    when a session is written per beam or in two parts); ``None``: a fraction of its own. ``summary``: an
    RT Treatment Summary Record, which delivers nothing.
    """

    uid: str
    patient_id: str
    plan_uid: str
    date: str
    time: str
    fraction: int | None = None
    summary: bool = False


@dataclass
class KRegistration:
    """A REG: its own FoR, the FoRs of its items, the image series it references."""

    uid: str
    patient_id: str
    own_for: str
    item_fors: tuple[str, ...]
    referenced_series: tuple[str, ...]
    for_only_items: tuple[str, ...] = ()


@dataclass
class Knowledge:
    """Facts about every object written, filled in by the generator as it goes."""

    present: set[str] = field(default_factory=set)
    series: dict[str, KSeries] = field(default_factory=dict)
    structure_sets: dict[str, KStructureSet] = field(default_factory=dict)
    plans: dict[str, KPlan] = field(default_factory=dict)
    doses: dict[str, KDose] = field(default_factory=dict)
    records: dict[str, KRecord] = field(default_factory=dict)
    registrations: dict[str, KRegistration] = field(default_factory=dict)
    plan_traps: dict[str, list[str]] = field(default_factory=dict)

    def series_of_patient(self, patient_id: str) -> list[KSeries]:
        """Image series of one patient, in creation order."""
        return [s for s in self.series.values() if s.patient_id == patient_id]


@dataclass
class WindowResult:
    """Outcome of :func:`evaluate`."""

    expected: set[str]
    plans: list[PlanTruth]
    summary: Summary


def _in_window(record: KRecord, date_from: str | None, date_to: str | None, patients: set[str] | None) -> bool:
    if patients is not None and record.patient_id not in patients:
        return False
    if date_from is not None and record.date < date_from:
        return False
    return not (date_to is not None and record.date > date_to)


def _series_instances(k: Knowledge, series_uids: list[str]) -> set[str]:
    out: set[str] = set()
    for uid in series_uids:
        out.update(k.series[uid].instance_uids)
    return out


def _follow_plan(k: Knowledge, plan: KPlan, seed: list[KRecord], row: PlanTruth) -> set[str]:
    """Steps 2–10 for one followed plan; fills ``row`` and returns the collected SOP UIDs."""
    collected: set[str] = {plan.uid}
    # Step 4: every record of the patient naming the plan, whatever its date.
    records = sorted(
        (r for r in k.records.values() if r.patient_id == plan.patient_id and r.plan_uid == plan.uid),
        key=lambda r: (r.date, r.time, r.uid),
    )
    row.record_uids = [r.uid for r in records if not r.summary]
    row.summary_record_uids = [r.uid for r in records if r.summary]
    collected.update(r.uid for r in records)
    # Step 3: doses naming the plan, searched in the plan's study.
    doses = sorted(
        (d for d in k.doses.values() if d.plan_uid == plan.uid and d.study_uid == plan.study_uid),
        key=lambda d: d.uid,
    )
    row.dose_uids = [d.uid for d in doses]
    collected.update(row.dose_uids)
    # Step 2: the plan's structure set, or (TomoTherapy) the one its dose names.
    ss_ref = plan.structure_set_ref
    if ss_ref is None:
        ss_ref = next((d.structure_set_ref for d in doses if d.structure_set_ref), None)
    structure_set = k.structure_sets.get(ss_ref) if ss_ref else None
    if ss_ref is not None and structure_set is None:
        row.missing.append(MissingItem("RTSTRUCT", ss_ref, NOT_FOUND))
    row.structure_set_uid = ss_ref
    if structure_set is None:
        return collected
    collected.add(structure_set.uid)
    # Steps 5–6: planning series.
    planning: list[str] = []
    for uid in (*structure_set.referenced_series, structure_set.first_contour_series):
        if uid is None or uid in planning:
            continue
        if uid not in k.series:
            row.missing.append(MissingItem("SERIES", uid, NOT_FOUND))
            continue
        planning.append(uid)
    row.planning_series_uids = sorted(planning)
    planning_fors = {k.series[uid].for_uid for uid in planning}
    patient_series = k.series_of_patient(plan.patient_id)
    # Step 8: series sharing a planning FoR.
    same_for = sorted(s.uid for s in patient_series if s.for_uid in planning_fors and s.uid not in planning)
    row.planning_for_series_uids = same_for
    # Step 7: REGs involving a planning FoR.
    regs = sorted(
        (
            r
            for r in k.registrations.values()
            if r.patient_id == plan.patient_id
            and (r.own_for in planning_fors or planning_fors.intersection(r.item_fors))
        ),
        key=lambda r: r.uid,
    )
    row.registration_uids = [r.uid for r in regs]
    # Step 9: registered series (explicit, or by FoR for FoR-only items).
    registered: list[str] = []
    for reg in regs:
        explicit = [uid for uid in reg.referenced_series if uid not in planning and uid in k.series]
        # A FoR-only item registers every series of that FoR; for the REG type the anatomical one
        # counts (CT before MR before PT), as in a PET/CT whose CT is the registration target.
        by_for = [
            s.uid
            for s in sorted(patient_series, key=lambda s: (IMAGE_MODALITIES.index(s.modality), s.uid))
            if s.for_uid in reg.for_only_items and s.uid not in planning
        ]
        moving = explicit + by_for
        for uid in moving:
            if uid not in registered:
                registered.append(uid)
        fixed_series = next(
            (k.series[uid] for uid in planning if k.series[uid].for_uid in (reg.own_for, *reg.item_fors)),
            None,
        )
        fixed_mod = fixed_series.modality if fixed_series else "?"
        moving_mod = k.series[moving[0]].modality if moving else "?"
        row.registration_types[reg.uid] = f"{fixed_mod}-{moving_mod}"
    row.registered_series_uids = sorted(registered)
    # Step 10: series sharing a FoR with a registered series.
    registered_fors = {k.series[uid].for_uid for uid in registered}
    taken = set(planning) | set(same_for) | set(registered)
    row.registered_for_series_uids = sorted(
        s.uid for s in patient_series if s.for_uid in registered_fors and s.uid not in taken
    )
    collected.update(row.registration_uids)
    collected |= _series_instances(k, planning + same_for + registered + row.registered_for_series_uids)
    return collected


def evaluate(k: Knowledge, date_from: str | None, date_to: str | None, patient_ids: list[str] | None) -> WindowResult:
    """Apply the harvest rules to one window."""
    patients = set(patient_ids) if patient_ids is not None else None
    seeds = sorted(
        (r for r in k.records.values() if _in_window(r, date_from, date_to, patients)),
        key=lambda r: (r.patient_id, r.date, r.time, r.uid),
    )
    expected: set[str] = {r.uid for r in seeds}
    by_plan: dict[str, list[KRecord]] = {}
    for record in seeds:
        by_plan.setdefault(record.plan_uid, []).append(record)
    rows: list[PlanTruth] = []
    for plan_uid, plan_seeds in by_plan.items():
        plan = k.plans.get(plan_uid)
        row = PlanTruth(
            patient_id=plan_seeds[0].patient_id,
            plan_uid=plan_uid,
            plan_label=plan.label if plan else None,
            plan_intent=plan.intent if plan else None,
            status="Complete",
            treatments=0,
            first_treatment=None,
            last_treatment=None,
            record_uids=[r.uid for r in plan_seeds if not r.summary],
            summary_record_uids=[r.uid for r in plan_seeds if r.summary],
            structure_set_uid=None,
            dose_uids=[],
            planning_series_uids=[],
            planning_for_series_uids=[],
            registration_uids=[],
            registration_types={},
            registered_series_uids=[],
            registered_for_series_uids=[],
            traps=list(k.plan_traps.get(plan_uid, [])),
        )
        if plan is None:
            row.status = "Missing"
            row.missing.append(MissingItem("RTPLAN", plan_uid, NOT_FOUND))
        elif plan.intent in QA_INTENTS:
            # Invalid: the plan and the seed records only, no hop from a phantom plan.
            row.status = "Invalid"
            expected.add(plan.uid)
        else:
            expected |= _follow_plan(k, plan, plan_seeds, row)
            if row.missing:
                row.status = "Incomplete"
        _fractions(k, plan, row)
        outside = [uid for uid in (*row.record_uids, *row.summary_record_uids)
                   if not _in_window(k.records[uid], date_from, date_to, None)]
        if outside and "records_outside_window" not in row.traps:
            row.traps.append("records_outside_window")
        rows.append(row)
    rows.sort(key=lambda r: (r.patient_id, r.first_treatment or "", r.plan_uid))
    return WindowResult(expected=expected, plans=rows, summary=_summary(k, seeds, rows, expected))


def _fractions(k: Knowledge, plan: KPlan | None, row: PlanTruth) -> None:
    """Fractions, records and dates of a row from what the generator delivered (not from DICOM)."""
    delivered = [k.records[uid] for uid in row.record_uids]
    row.fractions = len({("fraction", r.fraction) if r.fraction is not None else ("record", r.uid)
                         for r in delivered})
    row.treatments = row.fractions
    row.records = len(delivered)
    row.summary_records = len(row.summary_record_uids)
    row.fractions_planned = plan.fractions_planned if plan is not None else None
    dates = sorted(r.date for r in delivered)
    row.first_treatment = dates[0] if dates else None
    row.last_treatment = dates[-1] if dates else None


def _summary(k: Knowledge, seeds: list[KRecord], rows: list[PlanTruth], expected: set[str]) -> Summary:
    status = Counter(r.status for r in rows)
    intents = Counter((r.plan_intent or "NONE") for r in rows if r.status != "Missing")
    image_series = Counter(s.modality for s in k.series.values() if any(uid in expected for uid in s.instance_uids))
    planning = {uid for r in rows for uid in r.planning_series_uids}
    reg_types: dict[str, str] = {}
    for row in rows:
        for uid, kind in row.registration_types.items():
            reg_types.setdefault(uid, kind)
    denominator = len(rows) - status["Invalid"]
    return Summary(
        patients=len({r.patient_id for r in seeds}),
        plans_referenced=len(rows),
        plans_collected=len(rows) - status["Missing"],
        success_rate=round(status["Complete"] / denominator, 4) if denominator else 0.0,
        plans_by_intent=dict(sorted(intents.items())),
        invalid_plans=status["Invalid"],
        image_series={m: image_series[m] for m in IMAGE_MODALITIES if image_series[m]},
        planning_series=len(planning),
        registrations=dict(sorted(Counter(reg_types.values()).items())),
        treatment_records=sum(1 for uid in expected if uid in k.records and not k.records[uid].summary),
        fractions=sum(r.fractions for r in rows),
        summary_records=sum(1 for uid in expected if uid in k.records and k.records[uid].summary),
        plans_by_status={s: status[s] for s in ("Complete", "Incomplete", "Missing", "Invalid") if status[s]},
    )
