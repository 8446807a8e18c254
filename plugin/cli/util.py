"""What the ``rtharvest`` command and its ``export`` commands share: the HTTP client, errors, exit codes, output.

Both :mod:`rtharvest.cli.commands` and :mod:`rtharvest.export.cli` import from here (and neither from the other's
private names), so the command line has no import cycle.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from typing import IO, Any, NoReturn

#: Exit codes (``rtharvest --help`` and README.md list them). 5 and 6 are about what was waited for:
#: it ended, but not as hoped; 1 is a request the server refused.
EXIT_OK = 0
EXIT_REFUSED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_TIMEOUT = 4
EXIT_FAILURES = 5
EXIT_NOT_COMPLETED = 6
EXIT_CODES_HELP = """exit codes:
  0  done
  1  the server refused the request (its Error is printed), or did not answer the API
  2  usage error
  3  the server cannot be reached
  4  waiting timed out
  5  completed with failures: a harvest with failed jobs, an export whose verification failed
  6  ended without completing: a harvest or export cancelled, an export Failed"""
DEFAULT_URL = "http://localhost:8042"


class CliError(Exception):
    """Ends the command with a message on stderr and an exit code."""

    def __init__(self, message: str, code: int = EXIT_REFUSED) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


class Client:
    """A minimal JSON client of ``/rtharvest`` (urllib: nothing to install on a hospital workstation)."""

    def __init__(self, url: str, user: str | None = None, password: str | None = None,
                 timeout: float = 30.0) -> None:
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise CliError(f"--url must be an http(s) URL such as {DEFAULT_URL}, got {url!r}", EXIT_USAGE)
        self.url = url.rstrip("/")
        self.timeout = timeout
        self._auth: str | None = None
        if user is not None:
            token = base64.b64encode(f"{user}:{password or ''}".encode()).decode("ascii")
            self._auth = f"Basic {token}"

    def request(self, method: str, path: str, query: dict[str, Any] | None = None, body: Any = None,
                timeout: float | None = None) -> bytes:
        """Send one request; return the body of a 2xx answer, raise :class:`CliError` otherwise."""
        params = {k: v for k, v in (query or {}).items() if v is not None and v != ""}
        url = self.url + path + (("?" + urllib.parse.urlencode(params)) if params else "")
        data = None if body is None else json.dumps(body).encode("utf-8")
        req = urllib.request.Request(url, data=data, method=method)
        req.add_header("Accept", "application/json")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        if self._auth:
            req.add_header("Authorization", self._auth)
        try:
            with urllib.request.urlopen(req, timeout=timeout or self.timeout) as resp:  # noqa: S310 - http(s) only
                return bytes(resp.read())
        except urllib.error.HTTPError as exc:
            raise CliError(_http_error_message(exc, method, path)) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise CliError(f"cannot reach {self.url}: {reason} (is Orthanc running? check --url or "
                           "RTHARVEST_URL)", EXIT_UNREACHABLE) from None

    def json(self, method: str, path: str, query: dict[str, Any] | None = None, body: Any = None,
             timeout: float | None = None) -> Any:
        """:meth:`request` with the answer parsed as JSON."""
        raw = self.request(method, path, query, body, timeout)
        try:
            return json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise CliError(f"{method} {path}: the server did not answer JSON (is {self.url} an Orthanc with the "
                           "rtharvest plugin?)") from None


def _http_error_message(exc: urllib.error.HTTPError, method: str, path: str) -> str:
    try:
        raw = exc.read()
    except Exception:  # a broken error body must not hide the status
        raw = b""
    text = raw.decode("utf-8", "replace").strip()
    detail = ""
    try:
        body = json.loads(text) if text else None
    except json.JSONDecodeError:
        body = None
    if isinstance(body, dict):
        # The plugin answers {"Error": ...}; Orthanc's own errors carry Message/Details.
        detail = str(body.get("Error") or body.get("Details") or body.get("Message") or "")
    elif text and not text.lstrip().startswith("<"):
        detail = text[:300]
    if exc.code == 401:
        return ("authentication failed (401): give --user/--password or set RTHARVEST_USER/RTHARVEST_PASSWORD"
                + (f": {detail}" if detail else ""))
    if exc.code == 403:
        return f"forbidden (403): this user may not {method} {path}" + (f": {detail}" if detail else "")
    if exc.code == 405 and not detail:  # Orthanc sends a 405 without a body; Allow names the methods
        detail = f"{method} is not allowed here; use {exc.headers.get('Allow') or 'another method'}"
    if not detail:
        detail = exc.reason if isinstance(exc.reason, str) else "no details"
        if exc.code == 404:
            detail += " (is the rtharvest plugin loaded in this Orthanc?)"
    return f"server refused {method} {path} ({exc.code}): {detail}"


# ---------------------------------------------------------------------------------------------------
# Output helpers


def table(rows: Sequence[Sequence[Any]], header: Sequence[str], out: IO[str]) -> None:
    """Left-aligned columns; the last column is not padded (it may be long free text)."""
    cells = [[("" if v is None else str(v)) for v in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(header)]
    for row in [list(header), *cells]:
        line = "  ".join(v.ljust(widths[i]) if i < len(row) - 1 else v for i, v in enumerate(row))
        print(line.rstrip(), file=out)


def dump(value: Any, out: IO[str]) -> None:
    """A JSON document, indented."""
    print(json.dumps(value, indent=2), file=out)



def positive(value: str) -> float:
    """argparse type: a positive number of seconds."""
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {value!r}") from None
    if number <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value!r}")
    return number


def date(value: str) -> str:
    """argparse type: a date as YYYYMMDD (YYYY-MM-DD accepted)."""
    compact = value.replace("-", "")
    if len(compact) != 8 or not compact.isdigit():
        raise argparse.ArgumentTypeError(f"expected a date as YYYYMMDD or YYYY-MM-DD, got {value!r}")
    return compact


class Parser(argparse.ArgumentParser):
    """argparse with exit code 2 and a hint, for every usage error (sub-parsers included); descriptions and
    epilogs (the examples) keep their line breaks."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def json_flag() -> Parser:
    """A parent parser giving a sub-command ``--json`` (also accepted before the command: ``rtharvest --json
    ...``); SUPPRESS keeps the top-level value when the sub-command does not repeat it."""
    parent = Parser(add_help=False)
    parent.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="print the server's JSON document instead of a summary")
    return parent


def examples(*lines: str) -> str:
    """An epilog of example command lines."""
    return "examples:\n" + "\n".join(f"  {line}" for line in lines)
