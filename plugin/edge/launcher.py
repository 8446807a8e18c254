"""Start Debian's Orthanc with the rtharvest plugin for any orthanc.json (``rtharvest-orthanc``).

The one configuration is ``docker/orthanc.json``; it is written for the Docker image's paths. The
launcher runs it on a plain Debian machine by overriding only what differs there: ports, storage
paths, the modalities (for tests and the demo), the plugin library and the entry script's location.
It sets ``TCP_NODELAY=1`` (DCMTK inside Orthanc leaves Nagle on otherwise: series moves go 8x slower)
and puts this interpreter's site-packages on ``PYTHONPATH`` so the embedded Python finds the package.

Tests, the demo and users all start Orthanc through :class:`OrthancProcess`.
"""

from __future__ import annotations

import argparse
import base64
import copy
import json
import os
import random
import signal
import socket
import ssl
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .postgres import PostgresError, PostgresTarget, find_index_plugin, index_enabled, parse_url, plugins_with_index

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = REPO_ROOT / "docker" / "orthanc.json"
ORTHANC_BINARY = "/usr/sbin/Orthanc"
DEBIAN_PYTHON_PLUGIN = "/usr/share/orthanc/plugins/libOrthancPython.so"
ENTRY_SCRIPT_NAME = "rtharvest_entry.py"
#: The first-run credential ``docker/orthanc.json`` ships with (tests/test_launcher.py checks they agree).
FIRST_RUN_USER, FIRST_RUN_PASSWORD = "rtharvest", "change-me-on-first-run"


class LaunchError(RuntimeError):
    """Orthanc could not be started (binary missing, bad config, not ready before the deadline)."""


def free_port() -> int:
    """A TCP port that is free on loopback right now.

    Taken at random below Linux's ephemeral range (32768-60999): ports handed out there are also used
    for every outgoing connection, so a port found free could be taken by a client socket (tests open
    thousands of associations) before the server binds it.
    """
    rng = random.SystemRandom()
    for _ in range(200):
        port = rng.randrange(20000, 32000)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def load_json_config(path: Path) -> dict[str, Any]:
    """Read an orthanc.json (Orthanc tolerates ``//`` comments; so do we, on whole lines)."""
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if not line.lstrip().startswith("//")]
    return dict(json.loads("\n".join(lines)))


def set_dotted(config: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``config["A"]["B"] = value`` for ``dotted == "A.B"``, creating objects on the way."""
    keys = dotted.split(".")
    node = config
    for key in keys[:-1]:
        child = node.get(key)
        if not isinstance(child, dict):
            child = {}
            node[key] = child
        node = child
    node[keys[-1]] = value


def _entry_script(config_dir: Path) -> Path:
    for candidate in (config_dir / ENTRY_SCRIPT_NAME, REPO_ROOT / "docker" / ENTRY_SCRIPT_NAME):
        if candidate.is_file():
            return candidate.resolve()
    raise LaunchError(f"cannot find {ENTRY_SCRIPT_NAME} next to the configuration or in {REPO_ROOT / 'docker'}")


def effective_config(
    base: Mapping[str, Any],
    config_dir: Path,
    *,
    run_dir: Path,
    http_port: int | None = None,
    dicom_port: int | None = None,
    aet: str | None = None,
    modalities: Mapping[str, Any] | None = None,
    overrides: Mapping[str, Any] | None = None,
    plugin: bool = True,
    postgres: PostgresTarget | None = None,
) -> dict[str, Any]:
    """The configuration Orthanc actually gets: ``base`` with local paths, ports and modalities applied.

    ``postgres`` (or an enabled ``PostgreSQL`` section in ``base``) puts Orthanc's index in PostgreSQL: the
    section gets the settings known to work and ``Plugins`` the index library found on this machine.
    """
    config = copy.deepcopy(dict(base))
    storage = run_dir / "storage"
    config["StorageDirectory"] = str(storage)
    config["IndexDirectory"] = str(storage)
    if http_port is not None:
        config["HttpPort"] = http_port
    if dicom_port is not None:
        config["DicomPort"] = dicom_port
    if aet is not None:
        config["DicomAet"] = aet
    if modalities is not None:
        config["DicomModalities"] = dict(modalities)
        # Per-source settings only make sense for sources that still exist.
        rt = config.get("RtHarvest")
        if isinstance(rt, dict) and isinstance(rt.get("Sources"), dict):
            rt["Sources"] = {k: v for k, v in rt["Sources"].items() if k in modalities}
    if plugin:
        plugins = [p for p in config.get("Plugins", []) if Path(p).exists()]
        if not any("OrthancPython" in p or Path(p).is_dir() for p in plugins):
            plugins.append(DEBIAN_PYTHON_PLUGIN)
        config["Plugins"] = plugins
        script = Path(str(config.get("PythonScript", ENTRY_SCRIPT_NAME)))
        config["PythonScript"] = str(script if script.is_file() else _entry_script(config_dir))
        rt = config.setdefault("RtHarvest", {})
        rt["DatabasePath"] = str(run_dir / "rtharvest.sqlite")
    else:
        config["Plugins"] = []
        config.pop("PythonScript", None)
        config.pop("RtHarvest", None)
    if postgres is not None:
        section = config.get("PostgreSQL")
        config["PostgreSQL"] = postgres.section(section if isinstance(section, Mapping) else None)
    for dotted, value in (overrides or {}).items():
        set_dotted(config, dotted, value)
    if index_enabled(config):
        library = find_index_plugin()
        if library is None:
            raise LaunchError("the configuration enables the PostgreSQL index but its plugin is not installed: "
                              "apt-get install orthanc-postgresql")
        config["Plugins"] = plugins_with_index([str(p) for p in config.get("Plugins", [])], library)
    return config


def plugin_environment(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for Orthanc: ``TCP_NODELAY=1`` and this interpreter's site-packages on PYTHONPATH."""
    env = dict(os.environ)
    env["TCP_NODELAY"] = "1"
    site = sysconfig.get_paths()["purelib"]
    paths = [site] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != site]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    if extra:
        env.update(extra)
    return env


def first_run_credential_warning(orthanc: Mapping[str, Any]) -> str | None:
    """A warning while ``RegisteredUsers`` still holds the shipped first-run password (any user), else None.
    Names the user, never the password."""
    users = orthanc.get("RegisteredUsers")
    if not isinstance(users, Mapping):
        return None
    unchanged = sorted(str(name) for name, password in users.items() if password == FIRST_RUN_PASSWORD)
    if not unchanged:
        return None
    return (f"RegisteredUsers: user {unchanged[0]!r} still has the first-run password of docker/orthanc.json; "
            "set a long random one before real use (docs/operations.md, The first-run password)")


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` readable and writable by the owner only (mode 0600), whatever the umask;
    an existing file is restricted before the new text goes in, so no password is ever readable by others."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        data = text.encode("utf-8")
        while data:
            data = data[os.write(fd, data):]
    finally:
        os.close(fd)


class OrthancProcess:
    """One Orthanc server started from an orthanc.json, with a deadline to become ready.

    Use as a context manager or call :meth:`start` / :meth:`stop`. The process is stopped by PID
    (SIGTERM, then SIGKILL after a grace period) so its ports can be reused.
    """

    def __init__(
        self,
        run_dir: Path,
        config: Path | Mapping[str, Any] = DEFAULT_CONFIG,
        *,
        http_port: int | None = None,
        dicom_port: int | None = None,
        aet: str | None = None,
        modalities: Mapping[str, Any] | None = None,
        overrides: Mapping[str, Any] | None = None,
        plugin: bool = True,
        env: Mapping[str, str] | None = None,
        verbose: bool = False,
        postgres: str | PostgresTarget | None = None,
    ) -> None:
        self.run_dir = Path(run_dir).resolve()
        if isinstance(config, Path):
            base, config_dir = load_json_config(config), config.resolve().parent
        else:
            base, config_dir = dict(config), REPO_ROOT / "docker"
        self.http_port = http_port if http_port is not None else free_port()
        self.dicom_port = dicom_port if dicom_port is not None else free_port()
        self.config = effective_config(
            base, config_dir, run_dir=self.run_dir, http_port=self.http_port, dicom_port=self.dicom_port,
            aet=aet, modalities=modalities, overrides=overrides, plugin=plugin,
            postgres=parse_url(postgres) if isinstance(postgres, str) else postgres,
        )
        self.aet = str(self.config.get("DicomAet", "ORTHANC"))
        self.plugin = plugin
        self._env = plugin_environment(env)
        self._verbose = verbose
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """Base URL of the HTTP API on loopback (``https`` when the configuration enables SSL)."""
        return f"{'https' if self.config.get('SslEnabled') else 'http'}://127.0.0.1:{self.http_port}"

    @property
    def credentials(self) -> tuple[str, str] | None:
        """First registered user when authentication is on (the documented first-run credential)."""
        users = self.config.get("RegisteredUsers") or {}
        if self.config.get("AuthenticationEnabled", True) and users:
            user = sorted(users)[0]
            return user, str(users[user])
        return None

    @property
    def config_path(self) -> Path:
        """Where the effective configuration is written."""
        return self.run_dir / "orthanc.json"

    @property
    def log_path(self) -> Path:
        """Orthanc's stdout/stderr."""
        return self.run_dir / "orthanc.log"

    @property
    def pid(self) -> int | None:
        """PID of the running Orthanc, if started."""
        return self.process.pid if self.process else None

    def _auth_header(self) -> dict[str, str]:
        creds = self.credentials
        if creds is None:
            return {}
        token = base64.b64encode(f"{creds[0]}:{creds[1]}".encode()).decode()
        return {"Authorization": f"Basic {token}"}

    def is_ready(self) -> bool:
        """Whether ``GET /system`` answers, from this very Orthanc (its DICOM port, not another server's)."""
        request = urllib.request.Request(self.url + "/system", headers=self._auth_header())
        # Loopback to a server whose certificate names its public host, not 127.0.0.1.
        context = ssl._create_unverified_context() if self.url.startswith("https") else None  # noqa: S323
        try:
            with urllib.request.urlopen(request, timeout=2, context=context) as response:
                system = json.loads(response.read())
        except (urllib.error.URLError, OSError, ValueError):
            return False
        return bool(system.get("DicomPort") == self.dicom_port)

    def write_config(self) -> Path:
        """Write the effective configuration Orthanc is started with (owner-only: it holds the
        ``RegisteredUsers`` passwords and any PostgreSQL or DICOMweb password)."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        write_private(self.config_path, json.dumps(self.config, indent=2))
        return self.config_path

    def start(self, timeout: float = 30.0) -> OrthancProcess:
        """Write the effective config, start Orthanc, and wait until it answers (or raise)."""
        if not Path(ORTHANC_BINARY).exists():
            raise LaunchError(f"{ORTHANC_BINARY} not found: install Debian's packages orthanc and orthanc-python")
        (self.run_dir / "storage").mkdir(parents=True, exist_ok=True)
        self.write_config()
        args = [ORTHANC_BINARY, str(self.config_path)]
        if self._verbose:
            args.insert(1, "--verbose")
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=self._env,
                                            cwd=self.run_dir, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise LaunchError(f"Orthanc exited with code {self.process.returncode}; see {self.log_path}:\n"
                                  + self.tail_log())
            if self.is_ready():
                return self
            time.sleep(0.1)
        self.stop()
        raise LaunchError(f"Orthanc did not answer on {self.url} within {timeout:.0f} s; see {self.log_path}")

    def tail_log(self, lines: int = 30) -> str:
        """Last lines of Orthanc's log (for error messages)."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM, wait for exit, SIGKILL after ``timeout``."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)

    def kill(self) -> None:
        """SIGKILL, as a crash would (for recovery tests)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def __enter__(self) -> OrthancProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _parse_modality(text: str) -> tuple[str, list[Any]]:
    try:
        name, rest = text.split("=", 1)
        aet, hostport = rest.split("@", 1)
        host, port = hostport.rsplit(":", 1)
        return name, [aet, host, int(port)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected NAME=AET@HOST:PORT, got {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    """``rtharvest-orthanc``: run Orthanc with the plugin in the foreground until Ctrl-C."""
    parser = argparse.ArgumentParser(prog="rtharvest-orthanc", description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="orthanc.json (default: %(default)s)")
    parser.add_argument("--run-dir", type=Path, default=Path("var/orthanc"), help="storage, database, log")
    parser.add_argument("--http-port", type=int, default=None, help="default: the config's HttpPort")
    parser.add_argument("--dicom-port", type=int, default=None, help="default: the config's DicomPort")
    parser.add_argument("--aet", default=None)
    parser.add_argument("--modality", action="append", type=_parse_modality, default=None,
                        metavar="NAME=AET@HOST:PORT", help="replace DicomModalities (repeatable)")
    parser.add_argument("--set", action="append", default=[], metavar="DOTTED.KEY=JSON",
                        help="override any setting, e.g. --set RtHarvest.Workers=2")
    parser.add_argument("--no-plugin", action="store_true", help="plain Orthanc (e.g. a demo source)")
    parser.add_argument("--postgres", default=None, metavar="URL",
                        help="keep Orthanc's index in PostgreSQL: postgresql://user:password@host:5432/database "
                             "(default: the config's PostgreSQL section if it has EnableIndex: true, else SQLite)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait until ready")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)

    try:
        base = load_json_config(args.config)
    except (OSError, json.JSONDecodeError) as exc:
        print(f"rtharvest-orthanc: cannot read {args.config}: {exc}", file=sys.stderr)
        return 2
    overrides: dict[str, Any] = {}
    for item in args.set:
        key, _, raw = item.partition("=")
        try:
            overrides[key] = json.loads(raw)
        except json.JSONDecodeError:
            overrides[key] = raw
    modalities = dict(args.modality) if args.modality else None
    try:
        proc = OrthancProcess(
            args.run_dir, args.config,
            http_port=args.http_port if args.http_port is not None else int(base.get("HttpPort", 8042)),
            dicom_port=args.dicom_port if args.dicom_port is not None else int(base.get("DicomPort", 4242)),
            aet=args.aet, modalities=modalities, overrides=overrides, plugin=not args.no_plugin,
            verbose=args.verbose, postgres=args.postgres,
        )
        proc.start(args.timeout)
    except (LaunchError, PostgresError) as exc:
        print(f"rtharvest-orthanc: {exc}", file=sys.stderr)
        return 1
    creds = proc.credentials
    print(f"Orthanc is ready: {proc.url}/app/explorer.html  (AET {proc.aet}, DICOM port {proc.dicom_port})")
    if creds:
        print(f"  log in as {creds[0]!r} (password in {args.config}: change it before real use)")
    if index_enabled(proc.config):
        section = proc.config["PostgreSQL"]
        print(f"  index: PostgreSQL {section.get('Username')}@{section.get('Host')}:{section.get('Port')}/"
              f"{section.get('Database')}; images: {proc.config['StorageDirectory']}")
    queue = proc.config.get("RtHarvest", {}).get("DatabasePath")
    if queue:  # what docs/operations.md ("Backing up and restoring") calls the queue database
        print(f"  queue: {queue}")
    print(f"  log: {proc.log_path}   stop: Ctrl-C", flush=True)
    stop = False

    def _stop(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, _stop)
    try:
        while not stop and proc.process is not None and proc.process.poll() is None:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    proc.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
