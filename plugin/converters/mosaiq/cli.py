"""``rtharvest-convert mosaiq``: delivered fractions in a MOSAIQ database -> RT Beams Treatment Records.

Example (a real MOSAIQ on SQL Server, read-only account; ``pip install 'rtharvest[mosaiq]'`` for pymssql)::

    rtharvest-convert mosaiq --db 'mssql+pymssql://reader:secret@mosaiq-sql/MOSAIQ' \
        --from 20240101 --to 20240131 --salt my-hospital --send AUXPACS@pacs:104 --report mosaiq.json

Any SQLAlchemy URL works (``sqlite:///mosaiq.sqlite`` for a copy or the synthetic clinic). Bad rows
are reported with their table and key and the other records and patients still convert.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable
from datetime import date, datetime
from typing import Any

from sqlalchemy import create_engine
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError, SQLAlchemyError

from ..report import ConversionReport, Progress
from ..sink import Sink
from .mapping import plan_records
from .models import Problem
from .reader import MissingTable, MosaiqReader
from .record import build_record

HELP = "MOSAIQ deliveries (SQL database) -> RT Beams Treatment Records"
DEFAULT_SALT = "rtharvest-mosaiq"


def _day(text: str) -> date:
    try:
        return datetime.strptime(text, "%Y%m%d").date()
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected YYYYMMDD, got {text!r}") from None


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the MOSAIQ options."""
    parser.add_argument("--db", required=True, metavar="URL",
                        help="SQLAlchemy URL of the MOSAIQ database, e.g. mssql+pymssql://user:pw@host/MOSAIQ")
    parser.add_argument("--from", dest="date_from", type=_day, required=True, metavar="YYYYMMDD",
                        help="first treatment day (inclusive)")
    parser.add_argument("--to", dest="date_to", type=_day, required=True, metavar="YYYYMMDD",
                        help="last treatment day (inclusive)")
    parser.add_argument("--patient", action="append", default=[], metavar="ID",
                        help="only this medical record number (Ident.IDA); repeatable")
    parser.add_argument("--salt", default=DEFAULT_SALT,
                        help="site salt of every derived UID: set one stable value per site (default %(default)s)")


def _safe_url(url: str) -> str:
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<unparsable URL>"


def _report_problems(report: ConversionReport, problems: Iterable[Problem], skipped: bool) -> None:
    for p in problems:
        (report.skip if skipped else report.error)(p.table, p.key, p.reason, p.detail)


def run(args: argparse.Namespace, sink: Sink, report: ConversionReport) -> None:
    """Convert every session of the window; hand each record to ``sink``."""
    if args.salt == DEFAULT_SALT:
        report.warn(f"--salt not given: UIDs use the default salt {DEFAULT_SALT!r}; give each site its own, "
                    "and keep it, so that two sites never share a UID and re-runs stay identical")
    if args.date_from > args.date_to:
        report.error("arguments", "--from/--to", "bad-window", "--from is after --to")
        return
    url = _safe_url(args.db)
    try:
        engine = create_engine(args.db)
    except NoSuchModuleError as exc:
        _fatal(report, url, "bad-url", f"unknown kind of database in the URL ({exc})")
        return
    except ImportError as exc:
        _fatal(report, url, "no-driver", f"the database driver is not installed ({exc}); for SQL Server: "
               "pip install 'rtharvest[mosaiq]' (pymssql)")
        return
    except ArgumentError as exc:
        _fatal(report, url, "bad-url", f"cannot use the database URL: {exc}")
        return
    reader = MosaiqReader(engine)
    try:
        for warning in reader.check():
            report.warn(warning)
        patients = reader.patients(args.date_from, args.date_to, args.patient)
    except MissingTable as exc:
        _fatal(report, url, "missing-table", str(exc))
        return
    except SQLAlchemyError as exc:
        _fatal(report, url, "unreachable", f"cannot read the MOSAIQ database at {url}: {_reason(exc)}")
        return
    for absent in sorted({p.strip() for p in args.patient} - {p.patient_id for p in patients}):
        report.skip("patient", f"IDA={absent}", "no-deliveries", "no delivery in the window for this patient ID")
    records: list[dict[str, Any]] = []
    report.extra["Records"] = records
    progress = Progress(len(patients), "mosaiq patients")
    try:
        for patient in patients:
            key = f"Pat_ID1={patient.pat_id1}"
            try:
                deliveries = reader.deliveries(patient)
                sites = reader.sites(patient.pat_id1)
                outcome = plan_records(patient, deliveries, sites, args.date_from, args.date_to)
                locations = reader.plan_locations(r.plan_uid for r in outcome.records)
            except SQLAlchemyError as exc:
                report.error("patient", key, "database-error", _reason(exc))
                progress.step()
                continue
            report.counts["patients"] += 1
            report.counts["sessions"] += outcome.sessions
            _report_problems(report, outcome.skipped, skipped=True)
            _report_problems(report, outcome.errors, skipped=False)
            for spec in outcome.records:
                ds = build_record(spec, args.salt, locations.get(spec.plan_uid))
                sink.write(ds)
                report.wrote("RTRECORD")
                report.counts["records"] += 1
                records.append({"SOPInstanceUID": str(ds.SOPInstanceUID), "PatientID": patient.patient_id,
                                "PlanUID": spec.plan_uid, "StudyInstanceUID": str(ds.StudyInstanceUID),
                                "TreatmentDate": str(ds.TreatmentDate), "Source": spec.key})
            progress.step()
    finally:
        progress.close()


def _fatal(report: ConversionReport, url: str, reason: str, detail: str) -> None:
    """An error that stops the run: in the report and on stderr (the URL is shown without its password)."""
    report.error("database", url, reason, detail)
    print(f"rtharvest-convert mosaiq: {detail}", file=sys.stderr)


def _reason(exc: SQLAlchemyError) -> str:
    """The driver's message without SQLAlchemy's statement dump (which can be long)."""
    orig = getattr(exc, "orig", None)
    return str(orig if orig is not None else exc).splitlines()[0]
