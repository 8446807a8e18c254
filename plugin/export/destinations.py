"""Where de-identified objects go, and how they are read back for verification (network and files).

* :class:`DicomNode`: C-STORE with pynetdicom (one association per batch); read back with C-GET at series
  level (the SCP must allow C-GET from our AET: Orthanc's ``AllowGet``, dcmqrscp's default).
* :class:`DicomWebServer`: STOW-RS (``POST {url}/studies``, multipart/related) and WADO-RS
  (``GET {url}/studies/{study}/series/{series}``). A small client on :mod:`http.client`: the plugin runs
  inside Orthanc's embedded Python, and the two requests need nothing a heavier client (numpy, Pillow)
  would add.
* :class:`Folder`: ``<root>/<export>/<pseudonym>/<study>/<series>/<sop>.dcm`` written atomically
  (temporary file, then rename), with the de-identified manifest beside them as ``manifest.json``.

A destination raises :class:`DestinationError` when it cannot be reached at all (the job is retried with
backoff) and reports per-instance rejections in the mapping :meth:`send` returns.

Every name a destination writes is a de-identified UID or a pseudonym, so resending after a crash
overwrites the same object instead of adding a copy.
"""

from __future__ import annotations

import base64
import email.parser
import email.policy
import http.client
import io
import ipaddress
import json
import os
import secrets
import urllib.parse
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from ..store.eventlog import exception_summary

__all__ = ["Destination", "DestinationError", "DicomNode", "DicomWebServer", "Folder", "PlainHttpCredentials", "encode",
           "plain_http_problem"]


class DestinationError(Exception):
    """The destination could not be reached or refused the whole batch (retryable)."""


def encode(ds: Dataset) -> bytes:
    """A Part 10 file of ``ds`` (file meta kept or made)."""
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


class Destination(Protocol):
    """What an export sends to."""

    name: str
    kind: str

    def send(self, datasets: Sequence[Dataset]) -> dict[str, str]:
        """Store the datasets; returns SOPInstanceUID → error for those refused (empty: all stored)."""
        ...

    def fetch(self, series: Iterable[tuple[str, str]]) -> Iterator[bytes]:
        """Every object the destination holds in the given (StudyInstanceUID, SeriesInstanceUID)."""
        ...

    def write_manifest(self, document: Mapping[str, Any]) -> None:
        """Leave the de-identified manifest with the data, where the destination can hold files."""
        ...


# ---------------------------------------------------------------------------------------------------
# DICOM node


@dataclass
class DicomNode:
    """A DicomModalities entry, reached with pynetdicom."""

    name: str
    aet: str
    host: str
    port: int
    calling_aet: str
    timeout: float = 60.0
    kind: str = "dicom"

    def _ae(self) -> Any:
        from pynetdicom import AE

        ae = AE(ae_title=self.calling_aet)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout
        return ae

    def send(self, datasets: Sequence[Dataset]) -> dict[str, str]:
        if not datasets:
            return {}
        ae = self._ae()
        contexts: dict[str, list[str]] = {}
        for ds in datasets:
            syntaxes = contexts.setdefault(str(ds.SOPClassUID), [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
            ts = str(ds.file_meta.TransferSyntaxUID)
            if ts not in syntaxes:
                syntaxes.insert(0, ts)
        if len(contexts) > 120:
            raise DestinationError(f"{len(contexts)} SOP classes in one batch (pynetdicom allows 128 contexts)")
        for sop_class, syntaxes in contexts.items():
            ae.add_requested_context(sop_class, syntaxes)
        assoc = ae.associate(self.host, self.port, ae_title=self.aet)
        if not assoc.is_established:
            raise DestinationError(f"{self.name}: association with {self.aet}@{self.host}:{self.port} failed")
        failed: dict[str, str] = {}
        try:
            for ds in datasets:
                uid = str(ds.SOPInstanceUID)
                try:
                    status = assoc.send_c_store(ds)
                except (ValueError, RuntimeError) as exc:  # no accepted context for this class/syntax
                    failed[uid] = f"not sent: {exception_summary(exc)}"
                    continue
                code = getattr(status, "Status", None) if status else None
                if code is None:
                    if not assoc.is_established:
                        raise DestinationError(f"{self.name}: association lost during C-STORE")
                    failed[uid] = "no C-STORE response (timeout)"
                elif code != 0 and not 0xB000 <= code <= 0xBFFF:
                    failed[uid] = f"C-STORE status 0x{code:04X}"
        finally:
            if assoc.is_established:
                assoc.release()
        return failed

    def fetch(self, series: Iterable[tuple[str, str]]) -> Iterator[bytes]:
        from pynetdicom import build_role, evt
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet  # type: ignore[attr-defined]

        from ..core.sopclass import SopClass

        received: list[bytes] = []

        def on_store(event: Any) -> int:
            ds = event.dataset
            ds.file_meta = FileMetaDataset(event.file_meta)
            received.append(encode(ds))
            return 0x0000

        ae = self._ae()
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
        storage = [str(c.value) for c in SopClass][:100]
        roles = []
        for uid in storage:
            ae.add_requested_context(uid, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
            roles.append(build_role(uid, scp_role=True))
        for study_uid, series_uid in series:
            assoc = ae.associate(self.host, self.port, ae_title=self.aet, ext_neg=roles,
                                 evt_handlers=[(evt.EVT_C_STORE, on_store)])
            if not assoc.is_established:
                raise DestinationError(f"{self.name}: association for C-GET failed")
            try:
                query = Dataset()
                query.QueryRetrieveLevel = "SERIES"
                query.StudyInstanceUID, query.SeriesInstanceUID = study_uid, series_uid
                for status, _ in assoc.send_c_get(query, StudyRootQueryRetrieveInformationModelGet):
                    if status is None or not hasattr(status, "Status"):
                        raise DestinationError(f"{self.name}: C-GET of series {series_uid} got no answer")
            finally:
                if assoc.is_established:
                    assoc.release()
            yield from received
            received.clear()

    def write_manifest(self, document: Mapping[str, Any]) -> None:
        return None


# ---------------------------------------------------------------------------------------------------
# DICOMweb


class PlainHttpCredentials(StrEnum):
    """``RtHarvest.Export.AllowCredentialsOverHttp``: where Basic credentials may travel over ``http://``."""

    NEVER = "never"
    LOOPBACK = "loopback"
    ALWAYS = "always"


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def plain_http_problem(name: str, url: str, policy: PlainHttpCredentials, what: str = "credentials") -> str | None:
    """Why credentials for ``url`` may not be sent (``None``: they may): over plain ``http://`` anyone on the
    path reads them, so only ``https://``, or what ``policy`` (``AllowCredentialsOverHttp``) allows."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "https":
        return None
    if policy is PlainHttpCredentials.ALWAYS or (
            policy is PlainHttpCredentials.LOOPBACK and _is_loopback(parts.hostname or "")):
        return None
    return (f"{name} would send its {what} over plain {parts.scheme}://; use an https:// "
            "Url (or set RtHarvest.Export.AllowCredentialsOverHttp, docs/operations.md)")


@dataclass
class DicomWebServer:
    """A DICOMweb service root (``Url``), with optional basic authentication."""

    name: str
    url: str
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    timeout: float = 120.0
    kind: str = "dicomweb"
    plain_http: PlainHttpCredentials = PlainHttpCredentials.NEVER

    def credential_problem(self) -> str | None:
        """Why this server may not be used (``None``: it may): Basic credentials over plain ``http://`` travel
        readable by anyone on the path, so they are refused unless the setting allows it."""
        if self.username is None and self.password is None:
            return None
        return plain_http_problem(self.name, self.url, self.plain_http, "Username and Password")

    def _connection(self) -> tuple[http.client.HTTPConnection, str]:
        parts = urllib.parse.urlsplit(self.url)
        cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        if parts.hostname is None:
            raise DestinationError(f"{self.name}: URL {self.url!r} has no host")
        return cls(parts.hostname, parts.port, timeout=self.timeout), parts.path.rstrip("/")

    def _request(self, method: str, path: str, body: bytes | None, headers: dict[str, str]) -> tuple[int, bytes,
                                                                                                   str]:
        problem = self.credential_problem()
        if problem:
            raise DestinationError(problem)
        if self.username is not None:
            token = base64.b64encode(f"{self.username}:{self.password or ''}".encode()).decode()
            headers["Authorization"] = f"Basic {token}"
        conn, root = self._connection()
        try:
            conn.request(method, root + path, body=body, headers=headers)
            resp = conn.getresponse()
            return resp.status, resp.read(), resp.getheader("Content-Type", "")
        except OSError as exc:
            raise DestinationError(f"{self.name}: {method} {path} failed: {exception_summary(exc)}") from None
        finally:
            conn.close()

    def send(self, datasets: Sequence[Dataset]) -> dict[str, str]:
        if not datasets:
            return {}
        boundary = "rtharvest-" + secrets.token_hex(12)
        parts = []
        for ds in datasets:
            parts.append(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + encode(ds) + b"\r\n")
        body = b"".join(parts) + f"--{boundary}--\r\n".encode()
        status, payload, _ = self._request("POST", "/studies", body, {
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
            "Accept": "application/dicom+json"})
        uids = [str(ds.SOPInstanceUID) for ds in datasets]
        if status in (200, 202, 409):
            failed = _stow_failures(payload)
            if status == 409 and not failed:
                return dict.fromkeys(uids, "STOW-RS 409")
            return {uid: failed[uid] for uid in uids if uid in failed}
        if status >= 500 or status in (401, 403, 404, 408, 429):
            raise DestinationError(f"{self.name}: STOW-RS answered HTTP {status}")
        return dict.fromkeys(uids, f"STOW-RS answered HTTP {status}")

    def fetch(self, series: Iterable[tuple[str, str]]) -> Iterator[bytes]:
        for study_uid, series_uid in series:
            status, payload, ctype = self._request(
                "GET", f"/studies/{study_uid}/series/{series_uid}",
                None, {"Accept": 'multipart/related; type="application/dicom"'})
            if status == 404:
                continue
            if status != 200:
                raise DestinationError(f"{self.name}: WADO-RS of series {series_uid} answered HTTP {status}")
            yield from _multipart_parts(payload, ctype)

    def write_manifest(self, document: Mapping[str, Any]) -> None:
        return None


def _stow_failures(payload: bytes) -> dict[str, str]:
    """SOPInstanceUID → reason from a STOW-RS response's FailedSOPSequence (0008,1198)."""
    try:
        doc = json.loads(payload) if payload else {}
    except ValueError:
        return {}
    failed: dict[str, str] = {}
    for item in (doc.get("00081198") or {}).get("Value", []) if isinstance(doc, dict) else []:
        uid = ((item.get("00081155") or {}).get("Value") or [""])[0]
        reason = ((item.get("00081197") or {}).get("Value") or ["?"])[0]
        if uid:
            failed[str(uid)] = f"STOW-RS failure reason {reason}"
    return failed


def _multipart_parts(payload: bytes, content_type: str) -> Iterator[bytes]:
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + payload)
    for part in message.iter_parts() if message.is_multipart() else ():
        data = part.get_payload(decode=True)
        if data:
            yield bytes(data)


# ---------------------------------------------------------------------------------------------------
# Folder


@dataclass
class Folder:
    """A directory the export writes into (one subfolder per export)."""

    name: str
    root: Path
    kind: str = "folder"

    def _path(self, ds: Dataset) -> Path:
        return (self.root / _safe(str(ds.PatientID)) / _safe(str(ds.StudyInstanceUID))
                / _safe(str(ds.SeriesInstanceUID)) / f"{_safe(str(ds.SOPInstanceUID))}.dcm")

    def send(self, datasets: Sequence[Dataset]) -> dict[str, str]:
        failed: dict[str, str] = {}
        for ds in datasets:
            path = self._path(ds)
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                _atomic_write(path, encode(ds))
            except OSError as exc:
                failed[str(ds.SOPInstanceUID)] = f"write failed: {exception_summary(exc)}"
        return failed

    def fetch(self, series: Iterable[tuple[str, str]]) -> Iterator[bytes]:
        wanted = {s for _, s in series}
        for path in sorted(self.root.rglob("*.dcm")):
            if path.parent.name in wanted:
                yield path.read_bytes()

    def write_manifest(self, document: Mapping[str, Any]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        _atomic_write(self.root / "manifest.json", json.dumps(document, indent=1).encode())


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in ".-_" else "_" for c in text)[:128] or "_"


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
