"""A site's side of a delivery: the document its export posts to the archive once sent and verified.

The document is de-identified by construction: the site's plan rows as the copy must show them
(:func:`rtharvest.export.verify.expected_rows`: pseudonyms, mapped UIDs, shifted dates, no missing-link
reasons), the Table-1 counts of the selection, the SOP Instance UIDs sent and the modality of each series
sent. Nothing in it is an original value: the pseudonym mapping and the site key stay at the site.
"""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ..export.destinations import DestinationError
from .settings import TOKEN_HEADER, CentralEndpoint

__all__ = ["DELIVERIES_PATH", "announce", "delivery_document"]

DELIVERIES_PATH = "/rtharvest/central/deliveries"


def delivery_document(site: str, export_id: str, profile: Mapping[str, Any], rows: Sequence[Mapping[str, Any]],
                      summary: Mapping[str, Any], instances: Iterable[str], series_modalities: Mapping[str, str],
                      verification: Mapping[str, Any]) -> dict[str, Any]:
    """The body of ``POST /rtharvest/central/deliveries``."""
    return {"Site": site, "Export": export_id, "Profile": dict(profile), "Plans": [dict(r) for r in rows],
            "Summary": dict(summary), "Instances": sorted(set(instances)),
            "SeriesModalities": dict(sorted(series_modalities.items())),
            "SiteVerification": {"Passed": bool(verification.get("Passed")),
                                 "InstancesFound": verification.get("InstancesFound"),
                                 "ManifestDifferences": len(verification.get("ManifestDifferences") or [])}}


def announce(endpoint: CentralEndpoint | None, document: Mapping[str, Any]) -> dict[str, Any] | None:
    """Post the delivery to the archive (``None`` when the destination has no archive endpoint).

    Returns the archive's short answer ``{"Delivery", "State", "Differences", "Quarantined"}``;
    :class:`DestinationError` when the archive cannot be reached or refuses (the verification job is
    retried: a delivery is idempotent at the archive).
    """
    if endpoint is None:
        return None
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    if endpoint.username is not None:
        basic = base64.b64encode(f"{endpoint.username}:{endpoint.password or ''}".encode()).decode()
        headers["Authorization"] = f"Basic {basic}"
    if endpoint.token is not None:
        headers[TOKEN_HEADER] = endpoint.token
    request = urllib.request.Request(endpoint.url + DELIVERIES_PATH, data=json.dumps(document).encode(),
                                     headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=endpoint.timeout) as response:  # noqa: S310 (configured URL)
            answer = json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as exc:
        try:
            message = json.loads(exc.read() or b"{}").get("Error", "")
        except ValueError:
            message = ""
        raise DestinationError(f"central archive refused the delivery: HTTP {exc.code} {message}".strip()) from None
    except (OSError, ValueError) as exc:
        raise DestinationError(f"central archive unreachable: {type(exc).__name__}: {exc}") from None
    return {"Delivery": answer.get("ID"), "State": answer.get("State"),
            "Differences": answer.get("PlansWithDifferences"), "Quarantined": answer.get("InstancesQuarantined")}
