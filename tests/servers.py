"""Real DICOM servers on loopback for the integration tests.

Each source kind the harvester must work against is started as its real program:

* a plain Orthanc (no plugin) — through the same launcher users run;
* dcmtk ``dcmqrscp`` with a generated configuration, default mode and strict (``-XF -XM``) mode;
* pynetdicom's Q/R SCP application (``python -m pynetdicom qrscp``).

Every process gets free ports, a deadline to become ready, and is stopped by PID.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from rtharvest.edge.launcher import OrthancProcess, free_port

LOCALHOST = "127.0.0.1"
HARVEST_AET = "HARVEST"


def wait_for_echo(port: int, aet: str, deadline_s: float = 20.0, process: subprocess.Popen[bytes] | None = None,
                  calling_aet: str = "PROBE") -> None:
    """Block until a C-ECHO to ``aet`` on ``port`` succeeds, or raise after the deadline."""
    ae = AE(ae_title=calling_aet)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = 3
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{aet} exited with code {process.returncode}")
        assoc = ae.associate(LOCALHOST, port, ae_title=aet)
        if assoc.is_established:
            status = assoc.send_c_echo()
            assoc.release()
            if status and status.Status == 0:
                return
        time.sleep(0.2)
    raise RuntimeError(f"{aet} on port {port} did not answer C-ECHO within {deadline_s} s")


def stop_pid(process: subprocess.Popen[bytes] | None, grace: float = 10.0) -> None:
    """SIGTERM the process group, then SIGKILL after ``grace`` seconds."""
    if process is None or process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(5)


@dataclass
class DicomSource:
    """Something the harvester can query and retrieve from."""

    name: str  # the harvester's DicomModalities key
    aet: str
    port: int
    kind: str  # "orthanc" | "dcmqrscp" | "dcmqrscp-strict" | "pynetdicom"
    process: subprocess.Popen[bytes] | None = None
    orthanc: OrthancProcess | None = None
    storage: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def modality_entry(self) -> dict[str, Any]:
        """This source as a DicomModalities entry of the harvester (it may store into the harvester)."""
        return {"AET": self.aet, "Host": LOCALHOST, "Port": self.port, "AllowEcho": True, "AllowFind": False,
                "AllowMove": False, "AllowGet": False, "AllowStore": True}

    def stop(self) -> None:
        """Stop by PID."""
        if self.orthanc is not None:
            self.orthanc.stop()
        stop_pid(self.process)


def start_orthanc_source(run_dir: Path, harvest_port: int, name: str = "ORTHANC_SRC",
                         aet: str = "ORTHANCSRC") -> DicomSource:
    """A plain Orthanc (no plugin) that knows the harvester as a move destination."""
    config = {
        "Name": aet,
        "DicomAet": aet,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomAlwaysAllowStore": True,
        "DicomAlwaysAllowEcho": True,
        "DicomCheckModalityHost": False,
        "OverwriteInstances": True,
        "DicomModalities": {"HARVEST": [HARVEST_AET, LOCALHOST, harvest_port]},
    }
    orthanc = OrthancProcess(run_dir, config, aet=aet, plugin=False,
                             modalities={"HARVEST": [HARVEST_AET, LOCALHOST, harvest_port]})
    orthanc.start()
    return DicomSource(name=name, aet=aet, port=orthanc.dicom_port, kind="orthanc", orthanc=orthanc)


def _dcmqrscp_config(port: int, aet: str, storage: Path, harvest_port: int) -> str:
    # HostTable entries are the only move destinations dcmqrscp knows; peers not listed may still
    # query and store because the AETable access is ANY.
    return (
        f"NetworkTCPPort = {port}\n"
        "MaxPDUSize = 16384\n"
        "MaxAssociations = 32\n"
        "HostTable BEGIN\n"
        f"harvest = ({HARVEST_AET}, {LOCALHOST}, {harvest_port})\n"
        "HostTable END\n"
        "VendorTable BEGIN\n"
        "VendorTable END\n"
        "AETable BEGIN\n"
        f"{aet} {storage} RW (10000, 4096mb) ANY\n"
        "AETable END\n"
    )


def start_dcmqrscp(run_dir: Path, harvest_port: int, strict: bool = False, name: str | None = None,
                   aet: str | None = None) -> DicomSource:
    """dcmtk's Q/R SCP in fork mode (``--single-process`` crashes after one association)."""
    binary = shutil.which("dcmqrscp")
    if binary is None:
        raise RuntimeError("dcmqrscp not found: install Debian's dcmtk")
    aet = aet or ("DCMQRSTRICT" if strict else "DCMQR")
    name = name or ("DCMQRSCP_STRICT" if strict else "DCMQRSCP")
    run_dir.mkdir(parents=True, exist_ok=True)
    storage = run_dir / "storage"
    storage.mkdir(exist_ok=True)
    port = free_port()
    cfg = run_dir / "dcmqrscp.cfg"
    cfg.write_text(_dcmqrscp_config(port, aet, storage, harvest_port))
    args = [binary, "-c", str(cfg)]
    if strict:
        args += ["-XF", "-XM"]
    args.append(str(port))
    env = dict(os.environ, TCP_NODELAY="1")
    log = open(run_dir / "dcmqrscp.log", "ab")  # noqa: SIM115 - kept open for the process lifetime
    process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=run_dir,
                               start_new_session=True)
    wait_for_echo(port, aet, process=process)
    return DicomSource(name=name, aet=aet, port=port, kind="dcmqrscp-strict" if strict else "dcmqrscp",
                       process=process, storage=storage)


def start_pynetdicom_qrscp(run_dir: Path, harvest_port: int, name: str = "PYNETDICOM",
                           aet: str = "PYQR", patient_id_nocase: bool = False, move_delay: float = 0.0,
                           move_log: Path | None = None) -> DicomSource:
    """pynetdicom's Q/R SCP application with the harvester as its one move destination (matching PatientID
    case-insensitively with ``patient_id_nocase``; waiting ``move_delay`` seconds before each sub-operation
    of a C-MOVE of several instances; appending every C-MOVE it receives to ``move_log`` as a JSON line)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    ini = run_dir / "qrscp.ini"
    ini.write_text(
        "[DEFAULT]\n"
        f"    ae_title: {aet}\n"
        f"    port: {port}\n"
        "    max_pdu: 16382\n"
        "    acse_timeout: 30\n    dimse_timeout: 30\n    network_timeout: 30\n"
        f"    bind_address: {LOCALHOST}\n"
        f"    instance_location: {run_dir / 'instances'}\n"
        f"    database_location: {run_dir / 'instances.sqlite'}\n"
        "    log_identifier: False\n"
        f"[{HARVEST_AET}]\n"
        f"    address: {LOCALHOST}\n"
        f"    port: {harvest_port}\n"
    )
    log = open(run_dir / "qrscp.log", "ab")  # noqa: SIM115 - kept open for the process lifetime
    wrapper = Path(__file__).with_name("qrscp_nodelay.py")
    env = dict(os.environ, QRSCP_PATIENT_ID_NOCASE="1" if patient_id_nocase else "0",
               QRSCP_MOVE_DELAY=str(move_delay), QRSCP_MOVE_LOG=str(move_log or ""))
    process = subprocess.Popen([sys.executable, str(wrapper), "-c", str(ini)], stdout=log,
                               stderr=subprocess.STDOUT, cwd=run_dir, start_new_session=True, env=env)
    wait_for_echo(port, aet, process=process)
    return DicomSource(name=name, aet=aet, port=port, kind="pynetdicom", process=process,
                       storage=run_dir / "instances")


class RestClient:
    """Minimal JSON client for an Orthanc HTTP API (tests only; the CLI has its own)."""

    def __init__(self, url: str, credentials: tuple[str, str] | None) -> None:
        self.url = url.rstrip("/")
        # A loopback HTTPS server's certificate names its public host, not 127.0.0.1.
        self.context = ssl._create_unverified_context() if self.url.startswith("https") else None  # noqa: S323
        self.headers: dict[str, str] = {}
        if credentials:
            token = base64.b64encode(f"{credentials[0]}:{credentials[1]}".encode()).decode()
            self.headers["Authorization"] = f"Basic {token}"

    def request(self, method: str, path: str, body: Any = None, raw: bytes | None = None,
                headers: dict[str, str] | None = None, timeout: float = 60) -> tuple[int, Any]:
        """Send a request; return (status, parsed JSON or text) without raising on 4xx/5xx."""
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={**self.headers, **(headers or {})})
        try:
            with urllib.request.urlopen(req, timeout=timeout, context=self.context) as resp:
                status, payload = resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            status, payload = exc.code, exc.read()
        try:
            return status, json.loads(payload) if payload else None
        except json.JSONDecodeError:
            return status, payload.decode("utf-8", "replace")

    def get(self, path: str) -> Any:
        """GET that must succeed."""
        status, body = self.request("GET", path)
        assert status == 200, f"GET {path} -> {status}: {body}"
        return body

    def post(self, path: str, body: Any = None) -> Any:
        """POST that must succeed."""
        status, result = self.request("POST", path, body if body is not None else {})
        assert status == 200, f"POST {path} -> {status}: {result}"
        return result


def _postgres_bin(name: str) -> str:
    """A PostgreSQL server program (Debian keeps them in /usr/lib/postgresql/<major>/bin, off PATH)."""
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"),
                        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0)
    if not candidates:
        raise RuntimeError(f"{name} not found: install Debian's postgresql")
    return str(candidates[-1])


@dataclass
class PostgresCluster:
    """A throw-away PostgreSQL cluster on loopback (its own data directory and port, stopped by PID)."""

    data_dir: Path
    port: int
    process: subprocess.Popen[bytes]
    user: str
    #: How the server was started (to start it again after :meth:`halt`).
    command: tuple[str, ...] = ()

    def halt(self) -> None:
        """Stop the server (fast shutdown: clients are disconnected) and keep its data: an outage."""
        self._interrupt()
        self.process.wait(60)

    def _interrupt(self) -> None:
        # To the process group (its own session): runuser does not pass SIGINT on to postgres.
        try:
            os.killpg(self.process.pid, signal.SIGINT)
        except ProcessLookupError:
            pass

    def resume(self, deadline_s: float = 60.0) -> None:
        """Start the halted server again on the same data and port; returns when it accepts connections."""
        with open(self.data_dir.parent / "postgres.log", "ab") as log:
            self.process = subprocess.Popen(list(self.command), stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        deadline = time.monotonic() + deadline_s
        while subprocess.run([_postgres_bin("pg_isready"), "-h", LOCALHOST, "-p", str(self.port), "-U", self.user,
                              "-q"]).returncode != 0:
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("postgres did not come back: "
                                   + (self.data_dir.parent / "postgres.log").read_text(errors="replace")[-2000:])
            time.sleep(0.1)

    def url(self, database: str) -> str:
        """Connection URL for ``database`` (trust authentication on loopback: no password)."""
        return f"postgresql://{self.user}@{LOCALHOST}:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """Create an empty database and return its URL."""
        subprocess.run([_postgres_bin("createdb"), "-h", LOCALHOST, "-p", str(self.port), "-U", self.user, name],
                       check=True, capture_output=True, timeout=60)
        return self.url(name)

    def psql(self, database: str, sql: str) -> str:
        """Run one SQL statement and return the unaligned output."""
        done = subprocess.run([_postgres_bin("psql"), "-h", LOCALHOST, "-p", str(self.port), "-U", self.user,
                               "-d", database, "-At", "-c", sql], check=True, capture_output=True, timeout=60)
        return done.stdout.decode().strip()

    def dump(self, database: str, path: Path) -> None:
        """``pg_dump -Fc``: a consistent snapshot of one database, taken while it is in use."""
        subprocess.run([_postgres_bin("pg_dump"), "-h", LOCALHOST, "-p", str(self.port), "-U", self.user, "-Fc",
                        "-f", str(path), database], check=True, capture_output=True, timeout=600)

    def restore(self, path: Path, database: str) -> str:
        """Create ``database`` from a ``pg_dump -Fc`` file; returns its URL."""
        url = self.create_database(database)
        subprocess.run([_postgres_bin("pg_restore"), "-h", LOCALHOST, "-p", str(self.port), "-U", self.user,
                        "-d", database, "--no-owner", str(path)], check=True, capture_output=True, timeout=600)
        return url

    def stop(self) -> None:
        """Fast shutdown (SIGINT) by PID, SIGKILL after a grace period; the data directory is removed."""
        if self.process.poll() is None:
            self._interrupt()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        shutil.rmtree(self.data_dir.parent, ignore_errors=True)


def start_postgres(deadline_s: float = 60.0) -> PostgresCluster:
    """initdb a cluster in a temporary directory and start ``postgres`` on a free port.

    PostgreSQL refuses to run as root, and tests run as root in CI: then the cluster belongs to the
    ``postgres`` system user (created by the Debian package) and runs under ``runuser``. Its directory is
    made outside pytest's private temporary tree, which that user could not enter.
    """
    import tempfile

    as_root = os.geteuid() == 0
    top = Path(tempfile.mkdtemp(prefix="rtharvest-pg-"))
    data = top / "data"
    prefix: list[str] = []
    if as_root:
        import pwd

        entry = pwd.getpwnam("postgres")
        os.chown(top, entry.pw_uid, entry.pw_gid)
        prefix = ["runuser", "-u", "postgres", "--"]
    user = "postgres"
    subprocess.run([*prefix, _postgres_bin("initdb"), "-D", str(data), "-U", user, "--auth=trust", "-E", "UTF8",
                    "--no-sync", "--locale=C"], check=True, capture_output=True, timeout=120)
    port = free_port()
    log = open(top / "postgres.log", "ab")  # noqa: SIM115 - kept open for the process lifetime
    command = (*prefix, _postgres_bin("postgres"), "-D", str(data), "-p", str(port), "-k", str(top),
               "-c", f"listen_addresses={LOCALHOST}", "-c", "fsync=off", "-c", "max_connections=50")
    process = subprocess.Popen(list(command), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    cluster = PostgresCluster(data, port, process, user, command)
    ready = _postgres_bin("pg_isready")
    deadline = time.monotonic() + deadline_s
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"postgres exited with code {process.returncode}: "
                               + (top / "postgres.log").read_text(errors="replace")[-2000:])
        if subprocess.run([ready, "-h", LOCALHOST, "-p", str(port), "-U", user, "-q"]).returncode == 0:
            return cluster
        if time.monotonic() > deadline:
            cluster.stop()
            raise RuntimeError(f"postgres did not accept connections within {deadline_s} s")
        time.sleep(0.1)
