"""Where provenance is written (series or instance) and how it is read back: pure rules, no I/O.

Provenance is five metadata values (:data:`NAMES`). Each value Orthanc stores is an index transaction and
an ``UpdatedMetadata`` change handed to the plugin, so they are written where they are uniform:

* on the **series** when every instance of the series came by the same harvest, source, job and hop (the
  common case: a series moved whole by one C-MOVE);
* on the **instance** where instances of one series came by different jobs or hops (an instance's own
  values win over its series').

Reading an instance's provenance resolves instance → series (:func:`resolve`). The first provenance stays:
a series already stamped is not rewritten, an instance a later harvest found already stored keeps what
its series says, and an instance moved into a stamped series by another job or hop gets its own values.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

#: The provenance metadata, in writing order: ``HarvestId`` last, because a resource carrying it counts as
#: stamped (a crash between two writes must leave it absent, so the next attempt writes all five again).
NAMES = ("HarvestSource", "HarvestJob", "HarvestHop", "HarvestedAt", "HarvestId")

#: (harvest id, source, job, hop): instances with equal keys came the same way.
Key = tuple[str, str, str, str]


@dataclass(frozen=True)
class StoredSeries:
    """A stored series: its Orthanc ID and the Orthanc IDs of the instances it holds now."""

    orthanc_id: str
    instances: frozenset[str]


class Item(Protocol):
    """One kept instance whose provenance is to be written (``tracking.ProvenanceItem``)."""

    @property
    def orthanc_id(self) -> str: ...

    @property
    def moved(self) -> bool: ...

    @property
    def harvested_at(self) -> str: ...

    def key(self) -> Key: ...

    def metadata(self) -> dict[str, str]: ...


def key_of(values: Mapping[str, str]) -> Key | None:
    """The key of stored provenance values, or None when they carry no ``HarvestId``."""
    if not values.get("HarvestId"):
        return None
    return (values["HarvestId"], values.get("HarvestSource", ""), values.get("HarvestJob", ""),
            values.get("HarvestHop", ""))


def resolve(instance: Mapping[str, str], series: Mapping[str, str]) -> dict[str, str]:
    """An instance's provenance: its own values when it carries them, else its series' (empty if neither)."""
    source = instance if instance.get("HarvestId") else series if series.get("HarvestId") else {}
    return {name: str(source[name]) for name in NAMES if name in source}


@dataclass(frozen=True)
class SeriesPlan:
    """What to write for the pending items of one series.

    ``series``: the values to write on the series (None: leave it). ``instances``: items that get their own
    values, unless the instance already carries provenance (the writer reads it first: the first stays).
    ``covered``: items the series' provenance already describes (nothing to write).
    """

    series: dict[str, str] | None
    instances: tuple[Item, ...]
    covered: tuple[Item, ...]


def plan_series(items: Sequence[Item], series_values: Mapping[str, str],
                series_instances: Collection[str] | None) -> SeriesPlan:
    """Where the provenance of ``items`` (the pending items of one series) goes.

    ``series_values``: the series' stored metadata. ``series_instances``: the Orthanc IDs of every instance
    the series holds now (None when unknown: then nothing is written on the series).

    A stamped series keeps its values: items that came the same way are covered, and so are items their
    harvest found already stored (not moved: a re-harvest keeps the first provenance); an item moved in by
    another harvest, job or hop gets its own values. An unstamped series is stamped with the largest group
    of items that came the same way, if every instance it holds is one of ``items`` (otherwise some came
    another way, or by no harvest at all: every item gets its own values); the other items get their own.
    """
    stamp = key_of(series_values)
    if stamp is not None:
        covered = tuple(i for i in items if i.key() == stamp or not i.moved)
        return SeriesPlan(None, tuple(i for i in items if i.key() != stamp and i.moved), covered)
    if series_instances is None or not set(series_instances) <= {i.orthanc_id for i in items}:
        return SeriesPlan(None, tuple(items), ())
    groups: dict[Key, list[Item]] = {}
    for item in items:
        groups.setdefault(item.key(), []).append(item)
    best = max(groups.values(), key=len)  # ties: the first key seen (items come oldest first)
    values = dict(best[0].metadata())
    values["HarvestedAt"] = min(i.harvested_at for i in best)
    return SeriesPlan({name: values[name] for name in NAMES}, tuple(i for i in items if i.key() != best[0].key()),
                      tuple(best))
