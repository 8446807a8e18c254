"""``rtharvest-convert pinnacle PATH...``: Pinnacle archives to CT, RTSTRUCT, RTPLAN and RTDOSE.

Examples::

    rtharvest-convert pinnacle /archive/pinnacle/*.tar.gz --out /data/pinnacle-dicom --report run.json
    rtharvest-convert pinnacle /archive/pinnacle --send AUXPACS@pacs:104 --trial "Plan 1/Trial 2"

Every patient of every archive is converted; a patient that fails is reported (file, line and column for
syntax errors) and the batch goes on. Tars are extracted into a temporary folder (``--work-dir``), one at a
time, and removed after conversion.
"""

from __future__ import annotations

import argparse
import logging
import tarfile
import tempfile
from pathlib import Path

from ..report import ConversionReport, Progress
from ..sink import DestinationRefused, Sink
from .archive import Source, find_patients, safe_extract, sources
from .convert import Options, convert_patient
from .errors import PinnacleError

HELP = "Pinnacle archives (tars, folders of tars, institution or patient folders) to CT, RTSTRUCT, RTPLAN, RTDOSE"

log = logging.getLogger(__name__)


def configure(parser: argparse.ArgumentParser) -> None:
    """Pinnacle's own arguments."""
    parser.add_argument(
        "paths",
        nargs="+",
        type=Path,
        metavar="PATH",
        help="a tar (.tar/.tar.gz/.tgz), a folder of tars, an institution or a patient folder",
    )
    parser.add_argument(
        "--trial",
        action="append",
        default=[],
        metavar="[PLAN/]TRIAL",
        help="convert only this trial (repeatable; default: every trial of every plan)",
    )
    parser.add_argument("--plan", action="append", default=[], metavar="PLAN", help="convert only this plan")
    parser.add_argument(
        "--salt",
        default=Options.salt,
        help="site salt of the derived UIDs (keep it constant so that re-runs are idempotent)",
    )
    parser.add_argument("--work-dir", type=Path, help="where tars are extracted (default: the system temp folder)")


def _convert_folder(
    root: Path, label: str, sink: Sink, report: ConversionReport, options: Options, bar: Progress
) -> None:
    """Convert every patient under ``root``; the bar, which counted this source as one item, moves per patient."""
    patients = find_patients(root)
    if not patients:
        report.skip("folder", label, "no-patients", "no Patient file found")
        bar.step()
        return
    bar.grow(len(patients) - 1)
    for folder in patients:
        relative = folder.relative_to(root) if folder != root else Path(folder.name)
        key = f"{label}:{relative}"
        try:
            convert_patient(folder, sink, report, options, key)
        except DestinationRefused:
            raise
        except PinnacleError as exc:
            report.error("patient", key, exc.reason, str(exc).replace(str(root) + "/", ""))
        except Exception as exc:  # noqa: BLE001 - one patient's unforeseen fault must not stop the batch
            log.debug("conversion of %s failed", key, exc_info=True)
            report.error("patient", key, "conversion-failed", f"{type(exc).__name__}: {exc}")
        bar.step()


def _convert_source(
    source: Source, sink: Sink, report: ConversionReport, options: Options, work_dir: Path | None, bar: Progress
) -> None:
    if not source.is_tar:
        _convert_folder(source.path, str(source.path), sink, report, options, bar)
        return
    report.counts["archives"] += 1
    with tempfile.TemporaryDirectory(prefix="rtharvest-pinnacle-", dir=work_dir) as tmp:
        try:
            refused = safe_extract(source.path, Path(tmp))
        except (tarfile.TarError, EOFError, OSError) as exc:
            report.error("archive", source.path.name, "bad-archive", f"{source.path.name}: {exc}")
            bar.step()
            return
        for message in refused:
            report.error("archive", source.path.name, "unsafe-archive-member", message)
        _convert_folder(Path(tmp), source.path.name, sink, report, options, bar)


def run(args: argparse.Namespace, sink: Sink, report: ConversionReport) -> None:
    """Convert every patient under every PATH."""
    options = Options(salt=args.salt, trials=tuple(args.trial), plans=tuple(args.plan))
    todo: list[Source] = []
    for path in args.paths:
        try:
            todo += sources([path])
        except FileNotFoundError as exc:
            report.error("path", str(path), "not-found", str(exc))
    # One item per source until it is opened, then one per patient found in it: the bar moves per patient
    # even inside a tar of many patients.
    bar = Progress(len(todo), "pinnacle patients")
    try:
        for source in todo:
            _convert_source(source, sink, report, options, args.work_dir, bar)
    finally:
        bar.close()
