"""Deterministic UIDs for converted objects.

A converter run twice over the same source must produce byte-identical objects, so that resending is
harmless and the harvester deduplicates by UID. Every UID is therefore derived from the source system's
own keys and a per-site salt (so two sites converting the "same" MOSAIQ row never collide).

A ``2.25.`` UID (PS3.5 B.2, ITU-T X.667) is the decimal form of a UUID; a name-based UUID (RFC 4122
version 5) of the sources is deterministic and at most 44 characters long as a UID. (pydicom's
``generate_uid(prefix=None, entropy_srcs=...)`` ignores the sources and returns a random UUID.)
"""

from __future__ import annotations

import json
import uuid

from pydicom.uid import UID

#: Namespace of every rtharvest converter UUID (a fixed, random UUID: only its constancy matters).
_NAMESPACE = uuid.UUID("6f1c2a47-3b1e-4f0e-9a52-8d1e5c3b7a90")


def derived_uid(salt: str, kind: str, *keys: object) -> UID:
    """A ``2.25.`` UID that depends only on ``salt``, ``kind`` and ``keys``.

    ``kind`` names what the UID identifies (``"record-series"``, ``"plan-study"``...) so that one set of
    source keys can yield several distinct UIDs. Keys are converted with :func:`str`; ``None`` and ``""``
    are distinct from each other.
    """
    if not salt:
        raise ValueError("the site salt must not be empty: UIDs of two sites would collide")
    sources = [salt, kind, *(("\x00None" if key is None else str(key)) for key in keys)]
    return UID(f"2.25.{uuid.uuid5(_NAMESPACE, json.dumps(sources)).int}")
