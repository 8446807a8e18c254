"""``rtharvest-convert``: bring a system without DICOM Q/R into an auxiliary PACS.

Examples::

    rtharvest-convert mosaiq --db 'mssql+pymssql://user:pw@mosaiq/MOSAIQ' --from 20240101 --to 20240131 \
        --send AUXPACS@pacs.example.org:104 --report mosaiq.json
    rtharvest-convert pinnacle /archive/pinnacle/*.tar.gz --out /data/pinnacle-dicom
    rtharvest-convert mim /exports/mim --send AUXPACS@127.0.0.1:4242

Every converter writes to ``--out DIR`` or C-STOREs to ``--send AET@HOST:PORT`` (calling AE title
``--aet``), prints a summary and, with ``--report FILE``, a JSON report. The exit code is 0 unless nothing
could be converted or the destination refused objects (1); 2 is a usage error.

Each converter subpackage provides a module ``cli`` with ``HELP`` (one line), ``configure(parser)`` that
adds its own arguments, and ``run(args, sink, report)`` that converts and hands every object to the sink.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

from .report import ConversionReport
from .sink import DestinationRefused, FolderSink, Peer, Sink, StoreSink

#: Subcommand -> module implementing it. A converter registers itself here.
CONVERTERS: dict[str, str] = {
    "mim": "rtharvest.converters.mim.cli",
    "mosaiq": "rtharvest.converters.mosaiq.cli",
    "pinnacle": "rtharvest.converters.pinnacle.cli",
}


def _peer(text: str) -> Peer:
    try:
        return Peer.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _load(module: str) -> ModuleType:
    return importlib.import_module(module)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with one subcommand per registered converter."""
    parser = argparse.ArgumentParser(prog="rtharvest-convert", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="converter", required=True)
    for name, module_name in CONVERTERS.items():
        module = _load(module_name)
        child = sub.add_parser(name, help=module.HELP, description=module.HELP)
        target = child.add_mutually_exclusive_group(required=True)
        target.add_argument("--out", type=Path, metavar="DIR", help="write Part-10 files under DIR")
        target.add_argument("--send", type=_peer, metavar="AET@HOST:PORT", help="C-STORE to this DICOM node")
        child.add_argument("--aet", default="RTHCONVERT", help="calling AE title with --send (default RTHCONVERT)")
        child.add_argument("--report", type=Path, metavar="FILE", help="write a JSON report of the run")
        module.configure(child)
    return parser


def make_sink(args: argparse.Namespace) -> Sink:
    """The sink the common options ask for."""
    if args.send is not None:
        return StoreSink(args.send, calling_aet=args.aet)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    return FolderSink(out)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    module = _load(CONVERTERS[args.converter])
    report = ConversionReport(converter=args.converter)
    try:
        sink = make_sink(args)
    except OSError as exc:
        print(f"rtharvest-convert: cannot write to {args.out}: {exc}", file=sys.stderr)
        return 1
    try:
        module.run(args, sink, report)
    except DestinationRefused as exc:
        report.destination_refused = True
        report.error("destination", str(args.send or args.out), "destination-refused", str(exc))
    finally:
        sink.close()
        report.finish()
    if args.send is not None:
        report.sent = sink.count
    for line in report.summary_lines():
        print(line)
    if args.report is not None:
        report.save(args.report)
    return report.exit_code()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
