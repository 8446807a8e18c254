"""``rtharvest-synth``: generate a synthetic clinic, or load one into a DICOM source.

Examples::

    rtharvest-synth generate --patients 20 --seed 7 --out /tmp/clinic
    rtharvest-synth load /tmp/clinic --scp 127.0.0.1:4242 --aet ORTHANC
    rtharvest-synth load /tmp/clinic --dcmqrscp-dir /var/lib/dcmqrscp/SOURCE
    rtharvest-synth mosaiq --out /tmp/mosaiq-clinic      # deliveries in mosaiq.sqlite instead of RTRECORDs
    rtharvest-synth pinnacle --out /tmp/pinnacle --tar /tmp/pinnacle.tar.gz

Exit codes: 0 success, 1 load/generation failure, 2 usage error.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from rtharvest.synth.generator import SynthOptions, generate
from rtharvest.synth.loader import LoadError, dicom_files, index_for_dcmqrscp, store_to_scp
from rtharvest.synth.mosaiq import TRUTH, generate_mosaiq


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host, int(port)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for documentation and tests)."""
    parser = argparse.ArgumentParser(prog="rtharvest-synth", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="write a synthetic clinic and its ground_truth.json")
    gen.add_argument("--out", type=Path, required=True, help="output directory")
    gen.add_argument("--patients", type=_positive, default=SynthOptions.patients, help="RT patients")
    gen.add_argument("--seed", type=int, default=SynthOptions.seed)
    gen.add_argument("--slices", type=_positive, default=SynthOptions.ct_slices, help="slices per image series")
    gen.add_argument("--matrix", type=_positive, default=SynthOptions.matrix, help="CT rows=columns (e.g. 512)")
    gen.add_argument("--no-traps", action="store_true", help="leave out every trap")
    gen.add_argument("--history-patients", type=int, default=0,
                     help="metadata-light patients (plan and a few records each) spread over 2012-2022")
    gen.add_argument("--course-record-study", action="store_true",
                     help="records of a course in one study dated before its first fraction (adds window course_cut)")
    gen.add_argument("--force", action="store_true", help="replace an existing DIR/dicom")
    mosaiq = sub.add_parser("mosaiq", help="the same clinic with photon deliveries in a MOSAIQ SQLite database")
    mosaiq.add_argument("--out", type=Path, required=True, help="output directory")
    mosaiq.add_argument("--patients", type=_positive, default=SynthOptions.patients, help="RT patients")
    mosaiq.add_argument("--seed", type=int, default=SynthOptions.seed)
    mosaiq.add_argument("--force", action="store_true", help="replace an existing DIR/dicom")
    load = sub.add_parser("load", help="load a generated clinic into a DICOM source")
    load.add_argument("dir", type=Path, help="directory written by 'generate'")
    target = load.add_mutually_exclusive_group(required=True)
    target.add_argument("--scp", type=_host_port, metavar="HOST:PORT", help="C-STORE to this SCP")
    target.add_argument("--dcmqrscp-dir", type=Path, metavar="STORAGE", help="copy + dcmqridx into STORAGE")
    load.add_argument("--aet", help="called AE title of the SCP (with --scp)")
    load.add_argument("--calling-aet", default="SYNTH")
    pin = sub.add_parser("pinnacle", help="write synthetic Pinnacle patients (every orientation and version)")
    pin.add_argument("--out", type=Path, required=True, help="output directory (Institution_1/Mount_0/Patient_N)")
    pin.add_argument("--tar", type=Path, help="also pack every patient into this .tar/.tar.gz")
    return parser


def _pinnacle(args: argparse.Namespace) -> int:
    import json

    from rtharvest.synth.pinnacle import all_cases, write_institution, write_tar

    truths = write_institution(args.out, all_cases())
    (args.out / "pinnacle_truth.json").write_text(json.dumps([t.to_dict() for t in truths], indent=1) + "\n")
    if args.tar is not None:
        members = [f"Institution_1/Mount_0/{t.folder}" for t in truths]
        write_tar(args.tar, args.out, members)
    print(f"wrote {len(truths)} Pinnacle patients and pinnacle_truth.json to {args.out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "pinnacle":
        return _pinnacle(args)
    if args.command == "generate":
        options = SynthOptions(
            patients=args.patients,
            seed=args.seed,
            ct_slices=args.slices,
            matrix=args.matrix,
            include_traps=not args.no_traps,
            course_record_study=args.course_record_study,
            history_patients=max(0, args.history_patients),
        )
        started = time.monotonic()
        try:
            truth = generate(args.out, options, overwrite=args.force)
        except (ValueError, FileExistsError, OSError) as exc:
            print(f"rtharvest-synth: {exc}", file=sys.stderr)
            return 1
        size = sum(o.size for o in truth.objects.values())
        print(
            f"wrote {len(truth.objects)} objects ({size / 1e6:.1f} MB), {len(truth.traps)} traps, "
            f"{len(truth.windows)} windows to {args.out} in {time.monotonic() - started:.1f} s"
        )
        return 0
    if args.command == "mosaiq":
        try:
            mtruth = generate_mosaiq(args.out, SynthOptions(patients=args.patients, seed=args.seed),
                                     overwrite=args.force)
        except (ValueError, FileExistsError, OSError) as exc:
            print(f"rtharvest-synth: {exc}", file=sys.stderr)
            return 1
        skipped = ", ".join(f"{len(v)} {k}" for k, v in sorted(mtruth.skipped.items()))
        print(f"wrote {mtruth.database} ({len(mtruth.records)} expected records; skipped: {skipped}), "
              f"{len(dicom_files(args.out))} DICOM objects for the auxiliary PACS and {TRUTH} to {args.out}; "
              f"convert with: rtharvest-convert mosaiq --db sqlite:///{mtruth.database} "
              f"--from {mtruth.first_day} --to {mtruth.last_day} --out DIR")
        return 0
    files = dicom_files(args.dir)
    if not files:
        print(f"rtharvest-synth: no .dcm files under {args.dir}", file=sys.stderr)
        return 1
    try:
        if args.scp is not None:
            if not args.aet:
                parser.error("--scp needs --aet")
            host, port = args.scp
            count = store_to_scp(files, host, port, args.aet, args.calling_aet)
            print(f"stored {count} objects on {args.aet}@{host}:{port}")
        else:
            count = index_for_dcmqrscp(files, args.dcmqrscp_dir)
            print(f"indexed {count} objects in {args.dcmqrscp_dir}")
    except (LoadError, OSError) as exc:
        print(f"rtharvest-synth: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
