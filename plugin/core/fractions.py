"""Fractions delivered per plan, counted from the treatment records' own content (pure, no I/O).

A plan's records are not its fractions: a session may be written as several records (one per beam, or a
``CONTINUATION`` record after an interruption), a record may be re-sent with a new SOPInstanceUID, and an
RT Treatment Summary Record describes a course without being a session. The rule, stated in
``docs/harvest-rules.md`` ("Fractions"):

* a *summary record* (RT Treatment Summary Record SOP class) is counted apart and never as a fraction;
* every other record is a *delivery record* (RT Beams, RT Ion Beams, RT Brachy Treatment Record);
* a *fraction* is a distinct (fraction group, CurrentFractionNumber) among the delivery records' session
  items (beams, ion beams or application setups), whatever their TreatmentDeliveryType: a continuation, a
  second record of the same fraction or a re-sent copy names a fraction already counted;
* a delivery record whose items carry no CurrentFractionNumber (Type 2: may be empty) is *ambiguous*. If
  all its items are ``CONTINUATION`` it adds nothing (it continues a fraction another record began).
  Otherwise it is one fraction per treatment date: nothing if a numbered record of the same fraction
  group has that date, one fraction for all numberless records of that group and date, and one fraction
  per record when the record has no date at all (nothing else tells it apart).

The fraction group of a record is its ReferencedFractionGroupNumber (the ReferencedRTPlanSequence item's,
else the session record module's, else the item's own); when none is written and the plan has exactly
one fraction group, that group.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .references import DeliveryFacts

__all__ = ["FractionCount", "RecordFacts", "count_fractions", "fractions_planned"]


@dataclass(frozen=True)
class RecordFacts:
    """One record of a plan as the count needs it: identity, date and what it delivered.

    ``delivery`` is ``None`` when the stored record could not be read: it is then a delivery record with
    no fraction number (ambiguous, counted by ``treatment_date``).
    """

    sop_uid: str
    summary: bool
    treatment_date: str | None
    delivery: DeliveryFacts | None = None


@dataclass(frozen=True)
class FractionCount:
    """A plan's counts: distinct fractions, delivery records and summary records, and the fraction
    groups the delivery records name (for the planned number of fractions)."""

    fractions: int
    records: int
    summary_records: int
    groups: frozenset[int]


def _group(facts: DeliveryFacts | None, item_group: int | None, default_group: int | None) -> int | None:
    if facts is not None and facts.fraction_group is not None:
        return facts.fraction_group
    if item_group is not None:
        return item_group
    return default_group


def count_fractions(records: Iterable[RecordFacts], default_group: int | None = None) -> FractionCount:
    """Count a plan's fractions from its records (the module docstring's rule).

    ``default_group``: the plan's fraction group when it has exactly one (used for records that name
    none), else ``None``.
    """
    numbered: set[tuple[int | None, int]] = set()
    numbered_dates: set[tuple[int | None, str]] = set()
    ambiguous: list[tuple[int | None, RecordFacts]] = []
    groups: set[int] = set()
    deliveries = summaries = 0
    for record in records:
        if record.summary:
            summaries += 1
            continue
        deliveries += 1
        facts = record.delivery
        items = facts.sessions if facts is not None else ()
        has_number = False
        for item in items:
            group = _group(facts, item.fraction_group, default_group)
            if group is not None:
                groups.add(group)
            if item.fraction_number is not None:
                has_number = True
                numbered.add((group, item.fraction_number))
                if record.treatment_date:
                    numbered_dates.add((group, record.treatment_date))
        if has_number:
            continue
        if items and all(item.delivery_type == "CONTINUATION" for item in items):
            continue  # continues a fraction another record began
        group = _group(facts, items[0].fraction_group if items else None, default_group)
        if group is not None:
            groups.add(group)
        ambiguous.append((group, record))
    by_date: set[tuple[int | None, str]] = set()
    undated = 0
    for group, record in ambiguous:
        if record.treatment_date is None:
            undated += 1
        elif (group, record.treatment_date) not in numbered_dates:
            by_date.add((group, record.treatment_date))
    return FractionCount(len(numbered) + len(by_date) + undated, deliveries, summaries, frozenset(groups))


def fractions_planned(plan_groups: Sequence[tuple[int, int | None]], delivered_groups: Iterable[int]) -> int | None:
    """NumberOfFractionsPlanned of the fraction groups the delivery records name, summed; of every group
    of the plan when the records name none. ``None`` when the plan states no number for one of them (or
    has no fraction scheme)."""
    wanted = set(delivered_groups)
    chosen = [planned for number, planned in plan_groups if not wanted or number in wanted]
    if not chosen or any(p is None for p in chosen):
        return None
    return sum(p for p in chosen if p is not None)
