"""The README's demo: a harvester Orthanc on this machine, ready to look at in a browser.

``./run.sh demo`` runs this. It starts the harvester from ``docker/orthanc.json`` through the same
launcher users and tests use, prints where to look, and keeps running until Ctrl-C (``--exit`` stops
right after, for scripted checks).
"""

from __future__ import annotations

import argparse
import signal
import time
from pathlib import Path

from .launcher import DEFAULT_CONFIG, LaunchError, OrthancProcess


def main(argv: list[str] | None = None) -> int:
    """Start the demo harvester and print its URL."""
    parser = argparse.ArgumentParser(prog="rtharvest demo", description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", type=Path, default=Path("var/demo"), help="where the demo keeps its data")
    parser.add_argument("--http-port", type=int, default=8042)
    parser.add_argument("--dicom-port", type=int, default=4242)
    parser.add_argument("--exit", action="store_true", help="stop after printing the summary")
    args = parser.parse_args(argv)

    harvester = OrthancProcess(args.run_dir / "harvester", DEFAULT_CONFIG,
                               http_port=args.http_port, dicom_port=args.dicom_port)
    try:
        harvester.start()
    except LaunchError as exc:
        print(f"demo: {exc}")
        return 1
    creds = harvester.credentials
    print(f"Harvester Orthanc: {harvester.url}/app/explorer.html")
    if creds:
        print(f"  user {creds[0]!r}, password {creds[1]!r} (the first-run credential of docker/orthanc.json)")
    print(f"  status: {harvester.url}/rtharvest/status")
    try:
        if not args.exit:
            print("Ctrl-C to stop.", flush=True)
            signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
            while harvester.process is not None and harvester.process.poll() is None:
                time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        harvester.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
