"""``RtHarvest.Central`` (the archive's side) and ``RtHarvest.Export.Central`` (a site's side).

The archive::

    "RtHarvest": {"Central": {
        "Enabled": true,
        "Sites": {
            "SITEA": {"AET": "SITEA_HARVEST", "Users": ["sitea"]},   // deliveries authenticated as Orthanc user
            "SITEB": {"Token": "a long shared secret"}               // or by the RtHarvest-Site-Token header
        }
    }}

A site name is its export's ``RtHarvest.Export.Site`` (the pseudonym prefix). ``Users`` are Orthanc
``RegisteredUsers`` (Orthanc checks the password; the plugin reads the user name from the Basic
``Authorization`` header, so ``Users`` needs ``AuthenticationEnabled``). ``AET``: instances delivered by
C-STORE must come from this calling AET.

A site::

    "RtHarvest": {"Export": {"Central": {
        "CENTRAL": {"Url": "http://archive:8042", "Username": "sitea", "Password": "...", "Token": "..."}
    }}}

keyed by the export destination whose exports are then announced to that archive.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..edge.config import ConfigError
from ..export.deid import SITE_PATTERN

__all__ = ["CentralEndpoint", "CentralSettings", "SiteEntry", "load_central", "parse_endpoints"]

TOKEN_HEADER = "RtHarvest-Site-Token"


@dataclass(frozen=True)
class SiteEntry:
    """A site the archive accepts deliveries from."""

    name: str
    aet: str | None = None
    users: tuple[str, ...] = ()
    token: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class CentralSettings:
    """What central mode needs from orthanc.json."""

    enabled: bool = False
    sites: Mapping[str, SiteEntry] = field(default_factory=dict)


def _strings(value: Any, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"{where}: expected a list of non-empty strings")
    return tuple(value)


def load_central(orthanc: Mapping[str, Any]) -> CentralSettings:
    """Validate ``RtHarvest.Central``; :class:`ConfigError` names the setting."""
    rt = orthanc.get("RtHarvest", {})
    section = rt.get("Central", {}) if isinstance(rt, Mapping) else {}
    where = "RtHarvest.Central"
    if not isinstance(section, Mapping):
        raise ConfigError(f"{where}: expected an object")
    enabled = section.get("Enabled", False)
    if not isinstance(enabled, bool):
        raise ConfigError(f"{where}.Enabled: true or false")
    raw_sites = section.get("Sites", {})
    if not isinstance(raw_sites, Mapping):
        raise ConfigError(f"{where}.Sites: expected {{\"SITE\": {{\"AET\", \"Users\", \"Token\"}}}}")
    auth_off = orthanc.get("AuthenticationEnabled") is False
    sites: dict[str, SiteEntry] = {}
    for name, value in raw_sites.items():
        at = f"{where}.Sites.{name}"
        if not SITE_PATTERN.match(name):
            raise ConfigError(f"{at}: a site name is 1-16 letters, digits, '-' or '_' (its export's Site)")
        if not isinstance(value, Mapping):
            raise ConfigError(f"{at}: expected an object")
        unknown = sorted(set(value) - {"AET", "Users", "Token"})
        if unknown:
            raise ConfigError(f"{at}.{unknown[0]}: unknown setting; allowed: AET, Users, Token")
        aet = value.get("AET")
        if aet is not None and (not isinstance(aet, str) or not 1 <= len(aet) <= 16):
            raise ConfigError(f"{at}.AET: an application entity title of 1-16 characters")
        users = _strings(value.get("Users", []), f"{at}.Users")
        if users and auth_off:
            raise ConfigError(f"{at}.Users: needs AuthenticationEnabled (Orthanc checks the user's password)")
        token = value.get("Token")
        if token is not None and (not isinstance(token, str) or len(token) < 16):
            raise ConfigError(f"{at}.Token: a string of at least 16 characters")
        if not users and token is None:
            raise ConfigError(f"{at}: name the Users or the Token a delivery of this site authenticates with")
        sites[name] = SiteEntry(name, aet, users, token)
    if enabled and not sites:
        raise ConfigError(f"{where}.Sites: central mode needs at least one site")
    return CentralSettings(enabled, sites)


@dataclass(frozen=True)
class CentralEndpoint:
    """Where a site announces its deliveries (the archive's Orthanc base URL and the site's credentials)."""

    url: str
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)
    timeout: float = 300.0


def parse_endpoints(value: Any, where: str, destinations: Collection[str] | None = None
                    ) -> dict[str, CentralEndpoint]:
    """``RtHarvest.Export.Central``: destination name (one of ``destinations`` when given) →
    :class:`CentralEndpoint`."""
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}: expected {{\"DESTINATION\": {{\"Url\", \"Username\", \"Password\", \"Token\"}}}}")
    out: dict[str, CentralEndpoint] = {}
    for name, entry in value.items():
        at = f"{where}.{name}"
        if destinations is not None and name not in destinations:
            raise ConfigError(f"{at}: not an export destination (known: {', '.join(sorted(destinations)) or 'none'})")
        if not isinstance(entry, Mapping) or not isinstance(entry.get("Url"), str) or \
                not entry["Url"].startswith(("http://", "https://")):
            raise ConfigError(f"{at}.Url: the archive's Orthanc base URL (http:// or https://)")
        texts = {k: entry.get(k) for k in ("Username", "Password", "Token")}
        for k, v in texts.items():
            if v is not None and not isinstance(v, str):
                raise ConfigError(f"{at}.{k}: a string")
        out[name] = CentralEndpoint(entry["Url"].rstrip("/"), texts["Username"], texts["Password"], texts["Token"])
    return out
