"""Errors of the Pinnacle converter: every one names the file, and syntax errors the line and column."""

from __future__ import annotations


class PinnacleError(Exception):
    """A Pinnacle patient cannot be converted (bad or missing files); the batch goes on."""

    reason = "bad-pinnacle-data"


class PinnacleSyntaxError(PinnacleError):
    """Text that does not follow the grammar, at ``source:line:column``."""

    reason = "syntax-error"

    def __init__(self, source: str, line: int, column: int, message: str) -> None:
        super().__init__(f"{source}:{line}:{column}: {message}")
        self.source = source
        self.line = line
        self.column = column
        self.message = message


class PinnacleFormatError(PinnacleError):
    """Well-formed text whose content is unusable (a missing key, a binary of the wrong size...)."""

    reason = "bad-pinnacle-data"


class UnsafeArchiveError(PinnacleError):
    """A tar member that would land outside the extraction folder (path traversal, links out, devices)."""

    reason = "unsafe-archive"
