"""Where converted objects go: a folder of Part-10 files, or C-STORE to a DICOM node (the auxiliary PACS).

Converters hand every object to a :class:`Sink`; they never know which one. A sink raises
:class:`DestinationRefused` when the destination will not take an object; the CLI turns that into a
non-zero exit code, because nothing after it can be trusted to arrive either.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filereader import read_file_meta_info
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.association import Association

from rtharvest.core.dicombuild import file_meta

from ..dimse.tcp import no_delay

#: C-STORE statuses that mean "stored": success and the three warnings (coercion, elements discarded,
#: data set does not match SOP class) of PS3.4 B.2.3.
STORED_STATUSES = frozenset({0x0000, 0xB000, 0xB006, 0xB007})


class DestinationRefused(RuntimeError):
    """The destination did not accept an object (association refused, failure status, no answer)."""


@dataclass(frozen=True)
class Peer:
    """A DICOM node given as ``AET@HOST:PORT`` on the command line."""

    aet: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> Peer:
        """Parse ``AET@HOST:PORT``; raises :class:`ValueError` naming what is wrong."""
        aet, sep, rest = text.partition("@")
        host, colon, port = rest.rpartition(":")
        if not sep or not colon or not aet or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"expected AET@HOST:PORT, got {text!r}")
        if len(aet) > 16:
            raise ValueError(f"AE title {aet!r} is longer than 16 characters")
        return cls(aet, host, int(port))

    def __str__(self) -> str:
        return f"{self.aet}@{self.host}:{self.port}"


def with_file_meta(ds: Dataset, transfer_syntax: UID = ExplicitVRLittleEndian) -> Dataset:
    """Give ``ds`` a Part-10 file meta group for its SOP class and instance (replacing any old one)."""
    ds.file_meta = file_meta(ds.SOPClassUID, ds.SOPInstanceUID, PYDICOM_IMPLEMENTATION_UID,
                             transfer_syntax=transfer_syntax)
    return ds


class Sink(Protocol):
    """Receives converted objects."""

    def write(self, ds: Dataset) -> None:
        """Take one dataset (with file meta)."""

    def write_file(self, path: Path) -> None:
        """Take one existing Part-10 file unchanged (e.g. an original CT slice kept in an archive)."""

    def close(self) -> None:
        """Flush and release resources."""

    @property
    def count(self) -> int:
        """Objects taken so far."""


class FolderSink:
    """Writes ``OUT/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm`` (no patient data in paths).

    Writing the same object twice overwrites it with identical bytes: deterministic converters make a
    re-run idempotent.
    """

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        self._count = 0

    @property
    def count(self) -> int:
        return self._count

    def _path(self, study: str, series: str, sop: str) -> Path:
        folder = self.out_dir / study / series
        folder.mkdir(parents=True, exist_ok=True)
        return folder / f"{sop}.dcm"

    def write(self, ds: Dataset) -> None:
        path = self._path(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID))
        ds.save_as(path, enforce_file_format=True)
        self._count += 1

    def write_file(self, path: Path) -> None:
        header = dcmread(path, stop_before_pixels=True, specific_tags=["StudyInstanceUID", "SeriesInstanceUID"])
        sop = str(read_file_meta_info(path).MediaStorageSOPInstanceUID)
        shutil.copyfile(path, self._path(str(header.StudyInstanceUID), str(header.SeriesInstanceUID), sop))
        self._count += 1

    def close(self) -> None:
        return None


#: Offered for every object besides its own syntax: every Storage SCP must accept Implicit VR Little Endian
#: (PS3.5 10.1), and some accept nothing else for RT objects (MIM's conformance statement lists no Explicit
#: VR for RT Structure Set, Dose or Plan).
UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)


def proposed_syntaxes(own: str) -> list[str]:
    """The transfer syntaxes offered for an object encoded in ``own``: its own first, then both uncompressed."""
    return [own, *(str(ts) for ts in UNCOMPRESSED if ts != own)]


class StoreSink:
    """C-STORE to one node over as few associations as possible, in a transfer syntax the node accepted.

    Every SOP class is proposed in the object's own transfer syntax and in Explicit and Implicit VR Little
    Endian (one presentation context each, so the receiver can accept any subset); pynetdicom sends in the
    object's own syntax when that was accepted, else re-encodes it in an accepted uncompressed one
    (Explicit and Implicit VR Little Endian convert into each other). A compressed object (an original CT
    slice kept in an archive) whose syntax was refused cannot be re-encoded: that is a
    :class:`DestinationRefused` naming the syntaxes.

    Presentation contexts must be proposed when the association opens, and converters learn their SOP
    classes and transfer syntaxes as they go; when an object needs a context the open association lacks,
    the association is released and a new one proposes every context seen so far plus the new ones.
    """

    def __init__(self, peer: Peer, calling_aet: str = "RTHCONVERT", timeout_s: float = 60.0) -> None:
        self.peer = peer
        self.calling_aet = calling_aet
        self.timeout_s = timeout_s
        self._contexts: set[tuple[str, str]] = set()
        self._assoc: Association | None = None
        self._count = 0

    @property
    def count(self) -> int:
        return self._count

    def _association(self, sop_class: str, syntax: str) -> Association:
        wanted = {(sop_class, ts) for ts in proposed_syntaxes(syntax)}
        if self._assoc is not None and self._assoc.is_established and wanted <= self._contexts:
            return self._assoc
        self.close()
        self._contexts |= wanted
        if len(self._contexts) > 128:
            raise DestinationRefused("more than 128 SOP class/transfer syntax pairs for one association")
        ae = AE(ae_title=self.calling_aet)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout_s
        for klass, ts in sorted(self._contexts):
            ae.add_requested_context(klass, [ts])
        assoc = ae.associate(self.peer.host, self.peer.port, ae_title=self.peer.aet)
        if not assoc.is_established:
            raise DestinationRefused(f"association with {self.peer} was not established (refused or no answer)")
        no_delay(assoc)
        self._assoc = assoc
        return assoc

    def _send(self, payload: Dataset | Path, sop_class: str, sop_instance: str, syntax: str) -> None:
        assoc = self._association(sop_class, syntax)
        try:
            status = assoc.send_c_store(payload)
        except ValueError as exc:  # no accepted context the object is in or can be re-encoded into
            accepted = sorted({UID(cx.transfer_syntax[0]).name for cx in assoc.accepted_contexts
                               if cx.abstract_syntax == sop_class})
            raise DestinationRefused(
                f"C-STORE of {sop_instance}: {self.peer} accepted {', '.join(accepted) or 'no transfer syntax'} "
                f"for SOP class {sop_class}; the object in {UID(syntax).name} cannot be sent in it ({exc})"
            ) from None
        if not status or "Status" not in status:
            self.close()
            raise DestinationRefused(f"C-STORE of {sop_instance}: no answer from {self.peer}")
        code = int(status.Status)
        if code not in STORED_STATUSES:
            raise DestinationRefused(f"C-STORE of {sop_instance} refused by {self.peer} with status 0x{code:04X}")
        self._count += 1

    def write(self, ds: Dataset) -> None:
        syntax = str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", ImplicitVRLittleEndian))
        self._send(ds, str(ds.SOPClassUID), str(ds.SOPInstanceUID), syntax)

    def write_file(self, path: Path) -> None:
        meta = read_file_meta_info(path)
        self._send(path, str(meta.MediaStorageSOPClassUID), str(meta.MediaStorageSOPInstanceUID),
                   str(meta.TransferSyntaxUID))

    def close(self) -> None:
        if self._assoc is not None and self._assoc.is_established:
            self._assoc.release()
        self._assoc = None
