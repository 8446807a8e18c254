"""Pinnacle's two line-oriented formats: ``plan.roi`` and ``ImageSet_N.header``.

``plan.roi`` (``//`` comments, one statement per line)::

    roi={
        name: BODY                      -- ``key: text`` up to the end of the line
        flags =   135168;               -- ``key = value;``
        num_curve = 1;
        curve={
            num_points = 3;
            points={
                -12.9 2.1 -10.6         -- x y z in cm, one point per line (any count per line is read)
            };
        };
    };

A numeric block may also sit on one line (``points={ 1 2 3 };``). Counts are checked where the file
declares them, so a contour can never be lost quietly: a ``curve`` whose ``num_points`` differs from the
points read, or a ``roi`` whose ``num_curve`` differs from its curves, is an error at the block's line.

``ImageSet_N.header`` mixes ``key = value;`` and ``key : value`` lines at the top level. Both parse into
the same :class:`~.grammar.Obj` tree as the object text (a ``points`` block becomes a list of floats).
"""

from __future__ import annotations

import re
from pathlib import Path

from .errors import PinnacleSyntaxError
from .grammar import Obj, Value, decode

_OPEN = re.compile(r"^([A-Za-z_][\w]*)\s*=\s*\{\s*$")
_CLOSE = re.compile(r"^\}\s*;?\s*$")
_ASSIGN = re.compile(r"^([A-Za-z_][\w.]*)\s*=\s*(.*?)\s*;\s*$")
_COLON = re.compile(r"^([A-Za-z_][\w. ]*?)\s*:\s*(.*?)\s*$")
_NUMBERS = re.compile(r"^[-+0-9.eE,\s]+$")
_ONE_LINE = re.compile(r"^([A-Za-z_][\w]*)\s*=\s*\{(.*)\}\s*;?\s*$")
#: Blocks whose content is whitespace/comma separated numbers (contour points; the surface meshes that
#: newer versions add after the curves).
_NUMERIC_BLOCKS = frozenset({"points", "vertices", "triangles"})


def _scalar(text: str) -> Value:
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] == '"':
        return text[1:-1]
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return text


def parse_free_text(text: str, source: str = "<text>") -> Obj:
    """Parse ``plan.roi``/header text into an :class:`Obj`; errors name ``source``, line and column."""
    root = Obj()
    stack: list[tuple[str, Obj | list[float], int, int]] = [("", root, 0, 1)]
    for number, raw in enumerate(text.splitlines(), start=1):
        cut = raw.find("//")
        line = raw if cut < 0 else raw[:cut]
        stripped = line.strip()
        if not stripped:
            continue
        column = len(line) - len(line.lstrip()) + 1
        name, node, opened, opened_column = stack[-1]
        if isinstance(node, list):
            if _CLOSE.match(stripped):
                stack.pop()
                parent = stack[-1][1]
                assert isinstance(parent, Obj)
                parent.entries.append((name, node))
                continue
            node.extend(_coordinates(stripped, name, source, number, column))
            continue
        if (match := _ONE_LINE.match(stripped)) and match.group(1) in _NUMERIC_BLOCKS:
            inner = column + match.start(2)
            node.entries.append((match.group(1), _coordinates(match.group(2), match.group(1), source, number, inner)))
        elif match := _OPEN.match(stripped):
            key = match.group(1)
            stack.append((key, [] if key in _NUMERIC_BLOCKS else Obj(line=number), number, column))
        elif _CLOSE.match(stripped):
            if len(stack) == 1:
                raise PinnacleSyntaxError(source, number, column, "'}' without an open block")
            stack.pop()
            _check_counts(name, node, source, opened, opened_column)
            parent = stack[-1][1]
            assert isinstance(parent, Obj)
            parent.entries.append((name, node))
        elif _NUMBERS.match(stripped) and any(ch.isdigit() for ch in stripped):
            # Bare numbers in a block not known to be numeric (another mesh list): kept, not an error.
            node.entries.append(("values", [float(w) for _, w in _words(stripped)]))
        elif match := _ASSIGN.match(stripped):
            node.entries.append((match.group(1), _scalar(match.group(2))))
        elif match := _COLON.match(stripped):
            node.entries.append((match.group(1), _scalar(match.group(2).rstrip(";").rstrip())))
        else:
            raise PinnacleSyntaxError(source, number, column, f"cannot read {stripped[:40]!r}")
    if len(stack) > 1:
        name, _, opened, _ = stack[-1]
        raise PinnacleSyntaxError(source, opened, 1, f"block {name!r} opened here is not closed")
    return root


def _words(text: str) -> list[tuple[int, str]]:
    return [(m.start(), m.group(0)) for m in re.finditer(r"[^\s,]+", text)]


def _coordinates(text: str, block: str, source: str, line: int, column: int) -> list[float]:
    """The numbers of one line of a numeric block (``column`` is where ``text`` starts)."""
    values = []
    for offset, word in _words(text):
        try:
            values.append(float(word))
        except ValueError:
            raise PinnacleSyntaxError(
                source, line, column + offset, f"expected a coordinate in {block}, found {word!r}"
            ) from None
    return values


def _check_counts(name: str, block: Obj, source: str, line: int, column: int) -> None:
    """A closed ``curve`` or ``roi`` holds as many points or curves as its ``num_points``/``num_curve`` says."""
    if name == "curve":
        declared, points = block.num("num_points"), block.get("points")
        found = len(points) / 3 if isinstance(points, list) else 0
        if declared is not None and declared != found:
            raise PinnacleSyntaxError(
                source, line, column, f"curve declares num_points = {declared:g} but {found:g} points were read"
            )
    elif name == "roi":
        declared, curves = block.num("num_curve"), len(block.objs("curve"))
        if declared is not None and declared != curves:
            raise PinnacleSyntaxError(
                source, line, column, f"roi declares num_curve = {declared:g} but {curves} curves were read"
            )


def parse_free_file(path: Path, source: str | None = None) -> Obj:
    """Parse one ``plan.roi`` or ImageSet header file (Latin-1)."""
    return parse_free_text(decode(path.read_bytes()), source or str(path))
