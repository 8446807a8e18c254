"""Tokenizer and recursive-descent parser for Pinnacle's object text (``Patient``, ``plan.Trial``...).

Grammar (as Pinnacle writes it; files are Latin-1, so every byte decodes and binary bytes inside
comments cannot break the parse)::

    file       := entry*
    entry      := key '=' value ';'
    key        := ('#' NUMBER) | word ('.' word)* ('[' ']')?     -- words may be separated by blanks:
                                                                 -- ``DoseGrid .VoxelSize .X = 0.4;``
    value      := '{' block '}' | STRING | NUMBER | XDR | word | (empty)
    block      := entry*                  -- for a key ending in ``[]``: NUMBER (',' NUMBER)* ','?
    XDR        := '\\XDR:' NUMBER '\\'    -- a binary attribute stored in ``<file>.binary.NNN``
    comments   := '/* ... */' | '// ... end of line'

Repeated keys (``Beam ={...}; Beam ={...};``) are kept in order; :meth:`Obj.all` returns every one.
A dotted key assigns inside nested objects, creating them when absent. Indexed items (``#0 ={...};``)
are entries whose key is ``#0``; :meth:`Obj.items` lists them in file order.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

from .errors import PinnacleSyntaxError


@dataclass(frozen=True)
class XdrRef:
    """``\\XDR:n\\``: binary attribute number ``n`` of the file (``<file>.binary.<n:03d>``)."""

    index: int


Value = Union[str, int, float, XdrRef, list[float], "Obj", None]


@dataclass
class Obj:
    """One ``{ ... }`` block: ordered ``(key, value)`` entries, keys may repeat.

    ``line`` is where the block's key stands in its file (0 when unknown, e.g. the file itself), so that
    content errors found later (a missing key, a wrong count) can name the line as syntax errors do.
    """

    entries: list[tuple[str, Value]] = field(default_factory=list)
    line: int = field(default=0, compare=False)

    def at(self, source: str) -> str:
        """``source:line`` of this block (``source`` alone when the line is unknown)."""
        return f"{source}:{self.line}" if self.line else source

    def get(self, key: str, default: Value = None) -> Value:
        """The first value of ``key`` (``default`` when absent)."""
        for name, value in self.entries:
            if name == key:
                return value
        return default

    def all(self, key: str) -> list[Value]:
        """Every value of ``key`` in file order (a repeated key is a list)."""
        return [value for name, value in self.entries if name == key]

    def objs(self, key: str) -> list[Obj]:
        """Every block value of ``key``."""
        return [value for value in self.all(key) if isinstance(value, Obj)]

    def obj(self, key: str) -> Obj | None:
        """The first block value of ``key``, or ``None``."""
        found = self.objs(key)
        return found[0] if found else None

    def items(self) -> list[Obj]:
        """Indexed items ``#0 ={...}; #1 ={...};`` in file order."""
        return [value for name, value in self.entries if name.startswith("#") and isinstance(value, Obj)]

    def children(self) -> list[Obj]:
        """Every block value, whatever its key (lists whose item key varies between versions)."""
        return [value for _, value in self.entries if isinstance(value, Obj)]

    def path(self, *keys: str) -> Value:
        """Follow ``keys`` through nested blocks; ``None`` when any step is missing."""
        node: Value = self
        for key in keys:
            if not isinstance(node, Obj):
                return None
            node = node.get(key)
        return node

    def text(self, key: str, default: str = "") -> str:
        """``key`` as text (numbers are formatted; missing or empty gives ``default``)."""
        value = self.get(key)
        if value is None or isinstance(value, Obj | XdrRef | list):
            return default
        return str(value)

    def num(self, key: str, default: float | None = None) -> float | None:
        """``key`` as a number (text holding a number is accepted); ``default`` otherwise."""
        value = self.get(key)
        if isinstance(value, bool):
            return default
        if isinstance(value, int | float):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                return default
        return default

    def set_path(self, keys: list[str], value: Value, line: int = 0) -> None:
        """Assign ``value`` at a dotted path, creating intermediate blocks (``A .B .C = v``) at ``line``."""
        node = self
        for key in keys[:-1]:
            child = node.obj(key)
            if child is None:
                child = Obj(line=line)
                node.entries.append((key, child))
            node = child
        node.entries.append((keys[-1], value))


@dataclass(frozen=True)
class Token:
    """One lexical token with its 1-based position."""

    kind: str  # WORD NUMBER STRING XDR PUNCT EOF
    text: str
    line: int
    column: int


_PUNCT = set("={};,[]#.:")


def _is_word_start(ch: str) -> bool:
    return ch.isalpha() or ch == "_"


def _is_word_char(ch: str) -> bool:
    return ch.isalnum() or ch in "_^-"


class Lexer:
    """Splits Pinnacle text into tokens, skipping blanks and comments; tracks line and column."""

    def __init__(self, text: str, source: str) -> None:
        self.text = text
        self.source = source
        self.pos = 0
        self.line = 1
        self.col = 1

    def error(self, message: str, line: int | None = None, column: int | None = None) -> PinnacleSyntaxError:
        """A syntax error at the current (or given) position."""
        return PinnacleSyntaxError(self.source, line or self.line, column or self.col, message)

    def _advance(self, count: int = 1) -> None:
        for _ in range(count):
            if self.pos >= len(self.text):
                return
            if self.text[self.pos] == "\n":
                self.line += 1
                self.col = 1
            else:
                self.col += 1
            self.pos += 1

    def _skip(self) -> None:
        text = self.text
        while self.pos < len(text):
            ch = text[self.pos]
            if ch.isspace() or ch == "\x00":
                self._advance()
            elif text.startswith("/*", self.pos):
                line, col = self.line, self.col
                end = text.find("*/", self.pos + 2)
                if end < 0:
                    raise self.error("unterminated /* comment", line, col)
                self._advance(end + 2 - self.pos)
            elif text.startswith("//", self.pos):
                end = text.find("\n", self.pos)
                self._advance((len(text) if end < 0 else end) - self.pos)
            else:
                return

    def _number_end(self) -> int:
        text, i = self.text, self.pos
        if i < len(text) and text[i] in "+-":
            i += 1
        digits = False
        while i < len(text) and text[i].isdigit():
            i += 1
            digits = True
        if i < len(text) and text[i] == "." and (i + 1 >= len(text) or not _is_word_start(text[i + 1])):
            i += 1
            while i < len(text) and text[i].isdigit():
                i += 1
                digits = True
        if not digits:
            return self.pos
        if i < len(text) and text[i] in "eE":
            j = i + 1
            if j < len(text) and text[j] in "+-":
                j += 1
            if j < len(text) and text[j].isdigit():
                i = j
                while i < len(text) and text[i].isdigit():
                    i += 1
        return i

    def tokens(self) -> Iterator[Token]:
        """Every token, ending with one ``EOF``."""
        text = self.text
        while True:
            self._skip()
            line, col = self.line, self.col
            if self.pos >= len(text):
                yield Token("EOF", "", line, col)
                return
            ch = text[self.pos]
            if ch == '"':
                out = []
                i = self.pos + 1
                while i < len(text) and text[i] != '"':
                    if text[i] == "\\" and i + 1 < len(text) and text[i + 1] in '"\\':
                        i += 1
                    out.append(text[i])
                    i += 1
                if i >= len(text):
                    raise self.error("unterminated string", line, col)
                self._advance(i + 1 - self.pos)
                yield Token("STRING", "".join(out), line, col)
            elif ch == "\\":
                end = text.find("\\", self.pos + 1)
                body = text[self.pos + 1 : end] if end > 0 else ""
                # ``\\XDR_COPY:n\\`` (Pinnacle 16, e.g. a compensator's Thickness) names binary n like ``\\XDR:n\\``.
                kind, _, number = body.partition(":")
                if kind.upper() not in ("XDR", "XDR_COPY") or not number.strip().isdigit():
                    raise self.error("malformed binary reference (expected \\XDR:n\\)", line, col)
                self._advance(end + 1 - self.pos)
                yield Token("XDR", number.strip(), line, col)
            elif ch.isdigit() or (ch in "+-." and self._number_end() > self.pos):
                end = self._number_end()
                if end == self.pos:
                    raise self.error(f"unexpected character {ch!r}", line, col)
                number = text[self.pos : end]
                self._advance(end - self.pos)
                yield Token("NUMBER", number, line, col)
            elif _is_word_start(ch):
                i = self.pos
                while i < len(text) and _is_word_char(text[i]):
                    i += 1
                word = text[self.pos : i]
                self._advance(i - self.pos)
                yield Token("WORD", word, line, col)
            elif ch in _PUNCT:
                self._advance()
                yield Token("PUNCT", ch, line, col)
            else:
                raise self.error(f"unexpected character {ch!r}", line, col)


def _number(text: str) -> int | float:
    if any(c in text for c in ".eE"):
        return float(text)
    return int(text)


class Parser:
    """Recursive descent over the token stream of one file."""

    def __init__(self, text: str, source: str) -> None:
        self.lexer = Lexer(text, source)
        self.source = source
        self._tokens = self.lexer.tokens()
        self.tok = next(self._tokens)

    def _error(self, message: str, tok: Token | None = None) -> PinnacleSyntaxError:
        tok = tok or self.tok
        return PinnacleSyntaxError(self.source, tok.line, tok.column, message)

    def _next(self) -> Token:
        tok = self.tok
        self.tok = next(self._tokens)
        return tok

    def _is(self, text: str) -> bool:
        return self.tok.kind == "PUNCT" and self.tok.text == text

    def _expect(self, text: str, what: str) -> Token:
        if not self._is(text):
            found = self.tok.text or "end of file"
            raise self._error(f"expected {text!r} {what}, found {found!r}")
        return self._next()

    def parse(self) -> Obj:
        """The whole file as one block."""
        root = self._block(top=True)
        if self.tok.kind != "EOF":
            raise self._error(f"unexpected {self.tok.text!r}")
        return root

    def _block(self, top: bool = False) -> Obj:
        obj = Obj()
        while True:
            if self.tok.kind == "EOF":
                if top:
                    return obj
                raise self._error("unexpected end of file: a '{' block is not closed")
            if self._is("}"):
                if top:
                    raise self._error("'}' without an open block")
                return obj
            if self._is(";"):  # a stray ';' (seen after some nested blocks) carries nothing
                self._next()
                continue
            self._entry(obj)

    def _key(self) -> tuple[list[str], bool]:
        """The key path and whether it ends in ``[]`` (an array)."""
        if self._is("#"):
            self._next()
            if self.tok.kind != "NUMBER":
                raise self._error("expected an item number after '#'")
            return ["#" + self._next().text], False
        parts: list[str] = []
        while True:
            if self.tok.kind not in ("WORD", "NUMBER"):
                raise self._error(f"expected a key, found {self.tok.text or 'end of file'!r}")
            parts.append(self._next().text)
            if self._is("."):
                self._next()
                continue
            if self.tok.kind == "NUMBER" and self.tok.text.startswith("."):
                # ``A .0`` is not Pinnacle's; a number right after a key word is an error below.
                raise self._error("unexpected number in key")
            break
        array = False
        if self._is("["):
            self._next()
            self._expect("]", "to close '[' of an array key")
            array = True
        return parts, array

    def _entry(self, obj: Obj) -> None:
        line = self.tok.line
        keys, array = self._key()
        self._expect("=", f"after key {'.'.join(keys)!r}")
        value: Value
        if self._is("{"):
            self._next()
            if array:
                value = self._array()
            else:
                value = self._block()
                value.line = line
            self._expect("}", "to close the block")
        elif self._is(";"):
            value = None
        elif self.tok.kind == "STRING":
            value = self._next().text
        elif self.tok.kind == "XDR":
            value = XdrRef(int(self._next().text))
        elif self.tok.kind in ("WORD", "NUMBER"):
            value = self._bare_value()
        else:
            raise self._error(f"expected a value for {'.'.join(keys)!r}, found {self.tok.text!r}")
        self._expect(";", f"after the value of {'.'.join(keys)!r}")
        obj.set_path(keys, value, line)

    def _bare_value(self) -> Value:
        """A number, or unquoted text up to ';' (``Color = red;``, ``Version = 9.0m;``) kept as written."""
        first = self._next()
        if first.kind == "NUMBER" and not (self.tok.kind in ("WORD", "NUMBER") and self._touches(first)):
            return _number(first.text)
        text, last = first.text, first
        while self.tok.kind in ("WORD", "NUMBER") or (self._is(".") and self._touches(last)):
            token = self._next()
            text += ("" if self._touches(last, token) else " ") + token.text
            last = token
        return text

    def _touches(self, before: Token, after: Token | None = None) -> bool:
        """Whether ``after`` (default: the current token) follows ``before`` with no blank between."""
        after = after or self.tok
        return after.line == before.line and after.column == before.column + len(before.text)

    def _array(self) -> list[float]:
        values: list[float] = []
        while not self._is("}"):
            if self.tok.kind != "NUMBER":
                raise self._error(f"expected a number in the array, found {self.tok.text or 'end of file'!r}")
            values.append(float(self._next().text))
            if self._is(","):
                self._next()
            elif not self._is("}") and self.tok.kind != "NUMBER":
                raise self._error("expected ',' or '}' in the array")
        return values


def decode(data: bytes) -> str:
    """Pinnacle files are Latin-1: every byte is a character, so binary comment bytes never fail."""
    return data.decode("latin-1")


def parse_text(text: str, source: str = "<text>") -> Obj:
    """Parse Pinnacle object text; :class:`PinnacleSyntaxError` names ``source``, line and column."""
    return Parser(text, source).parse()


def parse_file(path: Path, source: str | None = None) -> Obj:
    """Parse one Pinnacle object file."""
    return parse_text(decode(path.read_bytes()), source or str(path))
