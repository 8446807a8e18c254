"""HTTP client for the harvester's own REST API on 127.0.0.1, used from worker threads.

Why not ``orthanc.RestApi*``: the Python plugin holds the GIL for the whole of every ``orthanc.*`` call
(docs/platform.md, "The GIL trap"). A remote C-FIND or a synchronous C-MOVE issued that way freezes every
other Python callback, including the OnStoredInstance callback of the very instances being moved, which
then time out. A plain socket wait in :mod:`urllib` releases the GIL, so workers talk to Orthanc over
HTTP on loopback, authenticated by the token from ``orthanc.GenerateRestApiAuthorizationToken()``
(inside Orthanc) or by HTTP basic auth (tests, CLI).

Besides the generic JSON verbs, the client has the short local calls workers need: look an instance
up by SOP Instance UID, read its file, set provenance metadata, delete it.
"""

from __future__ import annotations

import http.client
import json
import ssl
import threading
import time
import urllib.parse
from typing import Any

__all__ = ["LoopbackClient", "LoopbackError"]



def loopback_url(ssl_enabled: bool, http_port: int) -> str:
    """This Orthanc's REST API on 127.0.0.1, in the scheme it serves (with ``SslEnabled`` only HTTPS)."""
    return f"{'https' if ssl_enabled else 'http'}://127.0.0.1:{http_port}"


class LoopbackError(Exception):
    """A call to the harvester's REST API failed.

    Attributes:
        status: the HTTP status, or 0 when no HTTP answer came (connection refused, timeout).
        message: what went wrong (Orthanc's ``Details`` or ``Message`` when it sent a JSON error).
        body: the parsed JSON error body when there was one (Orthanc's ``{"HttpStatus", "Details", ...}``).
        timed_out: whether the HTTP call hit its own timeout.
    """

    def __init__(self, status: int, message: str, *, body: Any = None, timed_out: bool = False,
                 method: str = "", path: str = "") -> None:
        where = f"{method} {path}: " if method else ""
        super().__init__(f"{where}HTTP {status}: {message}" if status else f"{where}{message}")
        self.status = status
        self.message = message
        self.body = body
        self.timed_out = timed_out
        self.method = method
        self.path = path


#: Methods whose repetition has no further effect (RFC 9110, 9.2.2): resent after a dropped connection.
_IDEMPOTENT = frozenset({"GET", "HEAD", "PUT", "DELETE", "OPTIONS"})
#: A keep-alive connection idle longer than this is not used for a non-idempotent request.
_IDLE_REUSE_SECONDS = 0.5


class LoopbackClient:
    """JSON over HTTP to Orthanc's REST API (normally the harvester itself on 127.0.0.1).

    ``authorization`` is the complete value of the ``Authorization`` header (e.g. ``"Basic ..."`` or the
    token string from ``GenerateRestApiAuthorizationToken``), or ``None`` when authentication is off.
    ``timeout`` is the default per request; long operations pass their own.
    """

    def __init__(self, base_url: str, authorization: str | None, *, timeout: float = 30.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.authorization = authorization
        self.timeout = timeout
        parsed = urllib.parse.urlsplit(self.base_url)
        self._https = parsed.scheme == "https"
        self._host = parsed.hostname or "127.0.0.1"
        self._port = parsed.port or (443 if self._https else 80)
        self._prefix = parsed.path.rstrip("/")
        # One keep-alive connection per thread: provenance alone is five requests per stored instance, and
        # a new TCP connection for each costs more than the request itself.
        self._local = threading.local()

    def _connection(self, timeout: float, fresh: bool) -> tuple[http.client.HTTPConnection, bool]:
        conn: http.client.HTTPConnection | None = getattr(self._local, "conn", None)
        if conn is not None and fresh and time.monotonic() - getattr(self._local, "used", 0.0) > _IDLE_REUSE_SECONDS:
            # Orthanc closes idle keep-alive connections after about a second; a request that is not safe
            # to send twice goes on a fresh connection rather than risk the server closing this one under it.
            self._drop_connection()
            conn = None
        reused = conn is not None
        if conn is None:
            if self._https:
                # Loopback to this very Orthanc: its certificate names the public host, not 127.0.0.1.
                context = ssl._create_unverified_context()  # noqa: S323
                conn = http.client.HTTPSConnection(self._host, self._port, timeout=timeout, context=context)
            else:
                conn = http.client.HTTPConnection(self._host, self._port, timeout=timeout)
            self._local.conn = conn
        conn.timeout = timeout
        if conn.sock is not None:
            conn.sock.settimeout(timeout)
        return conn, reused

    def _drop_connection(self) -> None:
        conn = getattr(self._local, "conn", None)
        self._local.conn = None
        if conn is not None:
            conn.close()

    def _send(self, method: str, path: str, data: bytes | None, headers: dict[str, str],
              timeout: float) -> tuple[int, str, bytes]:
        idempotent = method.upper() in _IDEMPOTENT
        for attempt in (1, 2):
            conn, reused = self._connection(timeout, fresh=not idempotent)
            sent = False
            try:
                conn.request(method, self._prefix + path, body=data, headers=headers)
                sent = True
                response = conn.getresponse()
                payload = response.read()
            except (ConnectionResetError, BrokenPipeError, http.client.RemoteDisconnected,
                    http.client.CannotSendRequest, http.client.BadStatusLine):
                self._drop_connection()
                # The server closed an idle keep-alive connection. A request it could not have read (the
                # send failed) or one that is safe to repeat goes again on a fresh connection; a POST that
                # was sent may have been processed (a C-MOVE started), so it is never sent blindly twice.
                if reused and attempt == 1 and (idempotent or not sent):
                    continue
                raise
            except BaseException:
                self._drop_connection()
                raise
            self._local.used = time.monotonic()
            if response.will_close:
                self._drop_connection()
            return response.status, response.reason, payload
        raise ConnectionError("unreachable")  # pragma: no cover - the loop returns or raises

    def close(self) -> None:
        """Close this thread's keep-alive connection."""
        self._drop_connection()

    # --- generic verbs -------------------------------------------------------------------------------

    def request(self, method: str, path: str, body: Any = None, *, raw: bytes | str | None = None,
                timeout: float | None = None, content_type: str = "application/json",
                parse: bool = True) -> Any:
        """Send one request and return the parsed JSON answer (``None`` for an empty body).

        ``body`` is sent as JSON; ``raw`` is sent as is (strings as UTF-8). With ``parse=False`` the raw
        answer bytes are returned.

        Raises:
            LoopbackError: for any HTTP status >= 400, connection failure or timeout.
        """
        data: bytes | None
        if raw is not None:
            data = raw.encode("utf-8") if isinstance(raw, str) else raw
        elif body is not None:
            data = json.dumps(body).encode("utf-8")
        else:
            data = None
        headers = {"Accept": "application/json"}
        if data is not None:
            headers["Content-Type"] = content_type
        if self.authorization:
            headers["Authorization"] = self.authorization
        wait = self.timeout if timeout is None else timeout
        try:
            status, reason, payload = self._send(method, path, data, headers, wait)
        except TimeoutError as exc:
            raise LoopbackError(0, f"no answer within {wait:g} s", timed_out=True, method=method,
                                path=path) from exc
        except (ConnectionError, OSError, http.client.HTTPException) as exc:
            raise LoopbackError(0, f"cannot reach {self.base_url}: {exc}", method=method, path=path) from exc
        if status >= 400:
            error_body = _parse_json(payload)
            raise LoopbackError(status, _orthanc_message(error_body, reason), body=error_body, method=method,
                                path=path)
        if not parse:
            return payload
        return _parse_json(payload) if payload else None

    def get(self, path: str, *, timeout: float | None = None) -> Any:
        """GET ``path``; parsed JSON."""
        return self.request("GET", path, timeout=timeout)

    def post(self, path: str, body: Any = None, *, timeout: float | None = None) -> Any:
        """POST ``body`` as JSON (``{}`` when omitted); parsed JSON."""
        return self.request("POST", path, {} if body is None else body, timeout=timeout)

    def put(self, path: str, body: Any = None, *, timeout: float | None = None) -> Any:
        """PUT ``body`` as JSON; parsed JSON."""
        return self.request("PUT", path, {} if body is None else body, timeout=timeout)

    def delete(self, path: str, *, timeout: float | None = None) -> Any:
        """DELETE ``path``; parsed JSON (usually ``None``/``{}``)."""
        return self.request("DELETE", path, timeout=timeout)

    # --- short local calls for workers ---------------------------------------------------------------

    def find_instance(self, sop_instance_uid: str) -> str | None:
        """Orthanc ID of the stored instance with this SOP Instance UID, or ``None``.

        Uses ``POST /tools/lookup`` (an index look-up, no DICOM traffic); the same UID could in theory
        name a study or series too, so only ``Type == "Instance"`` counts.
        """
        found = self.request("POST", "/tools/lookup", raw=sop_instance_uid, content_type="text/plain")
        for entry in found or []:
            if isinstance(entry, dict) and entry.get("Type") == "Instance":
                return str(entry["ID"])
        return None

    def instance_exists(self, sop_instance_uid: str) -> bool:
        """Whether an instance with this SOP Instance UID is stored in the harvester."""
        return self.find_instance(sop_instance_uid) is not None

    def get_instance_file(self, orthanc_id: str, *, timeout: float | None = None) -> bytes:
        """The stored DICOM file (Part 10 bytes) of instance ``orthanc_id``."""
        data: bytes = self.request("GET", f"/instances/{_segment(orthanc_id)}/file", timeout=timeout,
                                   parse=False)
        return data

    def set_metadata(self, orthanc_id: str, name: str, value: str) -> None:
        """Set metadata ``name`` (declared in ``UserMetadata``) of instance ``orthanc_id`` to ``value``."""
        self.request("PUT", f"/instances/{_segment(orthanc_id)}/metadata/{_segment(name)}", raw=value,
                     content_type="text/plain")

    def get_metadata(self, orthanc_id: str, name: str) -> str | None:
        """Metadata ``name`` of instance ``orthanc_id``; ``None`` when not set."""
        try:
            data = self.request("GET", f"/instances/{_segment(orthanc_id)}/metadata/{_segment(name)}",
                                parse=False)
        except LoopbackError as exc:
            if exc.status == 404:
                return None
            raise
        return bytes(data).decode("utf-8")

    def delete_instance(self, orthanc_id: str) -> None:
        """Delete instance ``orthanc_id`` from the harvester (missing is not an error)."""
        try:
            self.request("DELETE", f"/instances/{_segment(orthanc_id)}")
        except LoopbackError as exc:
            if exc.status != 404:
                raise


def _segment(value: str) -> str:
    return urllib.parse.quote(value, safe="")


def _parse_json(payload: bytes) -> Any:
    if not payload:
        return None
    try:
        return json.loads(payload)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return payload.decode("utf-8", "replace")


def _orthanc_message(body: Any, fallback: Any) -> str:
    # Orthanc's error body: {"HttpStatus", "Message", "Details" (the useful part), "OrthancError", ...}
    if isinstance(body, dict):
        details = body.get("Details")
        message = body.get("Message") or body.get("OrthancError")
        if details and message:
            return f"{message}: {details}"
        if details or message:
            return str(details or message)
    if isinstance(body, str) and body.strip():
        return body.strip()[:500]
    return str(fallback)
