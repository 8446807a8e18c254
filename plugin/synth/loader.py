"""Load a generated clinic into a DICOM source: C-STORE to an SCP, or files + ``dcmqridx`` for dcmqrscp."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterable, Sequence
from pathlib import Path

from pydicom.filereader import read_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE

from ..dimse.tcp import no_delay

#: dcmqridx is called with this many files at a time (keeps the command line well under ARG_MAX).
_DCMQRIDX_BATCH = 400


class LoadError(RuntimeError):
    """A clinic could not be loaded into the source."""


def dicom_files(out_dir: Path | str) -> list[Path]:
    """Every ``*.dcm`` under ``out_dir/dicom`` (or under ``out_dir`` itself), sorted."""
    root = Path(out_dir)
    base = root / "dicom" if (root / "dicom").is_dir() else root
    return sorted(base.rglob("*.dcm"))


def store_to_scp(files: Iterable[Path | str], host: str, port: int, called_aet: str, calling_aet: str = "SYNTH") -> int:
    """C-STORE ``files`` over one association and return how many were stored.

    One presentation context is proposed per SOP class present (explicit and implicit little endian,
    which the generator's files and every SCP support). Raises :class:`LoadError` if the association
    is refused or a C-STORE does not answer success (0x0000) or a warning (0xB000, 0xB007, 0xB006).
    """
    paths = [Path(f) for f in files]
    if not paths:
        return 0
    classes: dict[Path, str] = {}
    for path in paths:
        meta = read_file_meta_info(path)
        classes[path] = str(meta.MediaStorageSOPClassUID)
    distinct = sorted(set(classes.values()))
    if len(distinct) > 128:
        raise LoadError(f"{len(distinct)} SOP classes exceed the 128 presentation contexts of one association")
    ae = AE(ae_title=calling_aet)
    # A loaded machine (CI, shared hosts) can keep an SCP from answering within pynetdicom's 30 s default.
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 180
    for sop_class in distinct:
        ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    stored = 0
    aborted = 0
    # A loaded SCP sometimes drops a long association mid-way; a C-STORE is idempotent (same UID), so the
    # load goes on from the file that got no answer on a new association, a few times at most.
    while stored < len(paths):
        assoc = ae.associate(host, port, ae_title=called_aet)
        if not assoc.is_established:
            raise LoadError(f"association with {called_aet}@{host}:{port} was not established (rejected or no answer)")
        no_delay(assoc)
        try:
            for path in paths[stored:]:
                status = assoc.send_c_store(path)
                if not status or "Status" not in status:
                    aborted += 1
                    if aborted > 3:
                        raise LoadError(f"C-STORE of {path}: no response from {called_aet} (association aborted?)")
                    break
                code = int(status.Status)
                # 0xB000/0xB006/0xB007 are warnings (coercion, elements discarded, data set mismatch): stored.
                if code not in (0x0000, 0xB000, 0xB006, 0xB007):
                    raise LoadError(f"C-STORE of {path} failed with status 0x{code:04X}")
                stored += 1
        finally:
            if assoc.is_established:
                assoc.release()
    return stored


def index_for_dcmqrscp(files: Iterable[Path | str], storage_dir: Path | str) -> int:
    """Copy ``files`` into a dcmqrscp storage area and register them with ``dcmqridx``.

    Files are copied flat as ``<SOPInstanceUID>.dcm`` (the generator's file names) so that the index
    references files inside the storage area. Returns the number of files indexed.
    """
    exe = shutil.which("dcmqridx")
    if exe is None:
        raise LoadError("dcmqridx (dcmtk) not found on PATH")
    storage = Path(storage_dir)
    storage.mkdir(parents=True, exist_ok=True)
    copied: list[Path] = []
    for src in (Path(f) for f in files):
        dest = storage / src.name
        shutil.copyfile(src, dest)
        copied.append(dest)
    for batch in _batches(copied, _DCMQRIDX_BATCH):
        result = subprocess.run(
            [exe, str(storage), *(str(p) for p in batch)],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            raise LoadError(f"dcmqridx failed ({result.returncode}): {result.stderr.strip() or result.stdout.strip()}")
    return len(copied)


def _batches(items: Sequence[Path], size: int) -> Iterable[Sequence[Path]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
