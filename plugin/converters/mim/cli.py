"""``rtharvest-convert mim PATH... (--out DIR | --send AET@HOST:PORT)``: unpack MIM sessions from files and folders.

Every file under the given paths is read; Raw Data objects with a MIM private block are unpacked and their
RTSTRUCT/REG objects handed to the sink. Other DICOM files are skipped (reason ``not-a-mim-session``),
unreadable files and damaged sessions are reported per file and the batch goes on. An object carried by
several sessions (MIM repeats a structure set in every session that shows it) is written once.
With ``--check-references`` the references of every unpacked object are checked against the objects of
the input (and the other unpacked objects); the unresolved ones are reported as warnings.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset

from ..report import ConversionReport, Progress
from ..sink import Sink
from .session import MimSessionError, is_mim_session, unpack, unresolved_references

HELP = "unpack the RTSTRUCT and REG objects of MIM session (Raw Data) files"


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the MIM converter's arguments."""
    parser.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="MIM session files or folders")
    parser.add_argument("--check-references", action="store_true",
                        help="report references of unpacked objects that name nothing in the input")


def input_files(paths: list[Path]) -> Iterator[Path]:
    """Files named, and every file under folders named (sorted; MIM exports often lack a .dcm suffix)."""
    for path in paths:
        if path.is_dir():
            yield from sorted(p for p in path.rglob("*") if p.is_file())
        else:
            yield path


def run(args: argparse.Namespace, sink: Sink, report: ConversionReport) -> None:
    """Unpack every session found under ``args.paths`` into ``sink``."""
    files = list(input_files(args.paths))
    progress = Progress(len(files), "mim")
    written: set[str] = set()
    known: set[str] = set()
    unpacked: dict[str, Dataset] = {}
    for path in files:
        progress.step()
        report.counts["files"] += 1
        if not path.exists():
            report.error("file", str(path), "not-found", "no such file")
            continue
        try:
            ds = pydicom.dcmread(path, force=True)
            sop_class = str(ds.SOPClassUID)
        except Exception as exc:
            report.error("file", str(path), "unreadable", f"not a readable DICOM file: {type(exc).__name__}")
            continue
        if args.check_references:
            for keyword in ("SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID"):
                if keyword in ds:
                    known.add(str(ds.get(keyword)))
        if not is_mim_session(ds):
            report.skip("file", str(path), "not-a-mim-session", f"SOP class {sop_class}")
            continue
        report.counts["sessions"] += 1
        try:
            result = unpack(ds)
        except MimSessionError as exc:
            report.error("file", str(path), "bad-session", str(exc))
            continue
        for item in result.skipped:
            report.skip("item", f"{path}#{item.index}", item.reason, item.detail)
        for item in result.errors:
            report.error("item", f"{path}#{item.index}", item.reason, item.detail)
        for message in result.warnings:
            report.warn(f"{path}: {message}")
        for obj in result.objects:
            report.counts["embedded objects"] += 1
            if obj.sop_uid in written:
                continue  # the same object in several sessions: once is enough
            sink.write(obj.dataset)
            written.add(obj.sop_uid)
            report.wrote(obj.modality)
            if args.check_references:
                unpacked[obj.sop_uid] = obj.dataset
                known.update((obj.sop_uid, str(obj.dataset.SeriesInstanceUID), str(obj.dataset.StudyInstanceUID)))
    progress.close()
    if args.check_references:
        for sop_uid, obj_ds in unpacked.items():
            dangling = unresolved_references(obj_ds, known)
            if dangling:
                report.warn(f"{sop_uid}: {len(dangling)} reference(s) name nothing in the input, e.g. {dangling[0]}")
        report.extra["UnresolvedReferenceObjects"] = sum(
            1 for obj_ds in unpacked.values() if unresolved_references(obj_ds, known))
