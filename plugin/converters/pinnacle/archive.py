"""Pinnacle archives: what the command line names, safe tar extraction, and the patient folders inside.

A PATH is a tar (``.tar``, ``.tar.gz``, ``.tgz``), a directory holding tars, an institution (or any)
directory holding ``Patient_N`` trees, or one patient directory. A patient folder is any directory with a
``Patient`` file.

Extraction never trusts member names (Python 3.11.2 has no ``tarfile`` data filter): absolute names,
``..`` components, devices and FIFOs are refused; links are not created: a link whose target stays inside
the archive is materialised as a copy of that member, one pointing outside is refused. Each refused member
is reported and the rest of the archive is still converted.
"""

from __future__ import annotations

import os
import posixpath
import shutil
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .errors import UnsafeArchiveError

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")


def is_tar_name(path: Path) -> bool:
    """Whether ``path`` is named like a Pinnacle archive."""
    return path.name.lower().endswith(TAR_SUFFIXES)


@dataclass(frozen=True)
class Source:
    """One thing to convert: a tar to extract, or a folder to search for patients."""

    path: Path
    is_tar: bool


def sources(paths: list[Path]) -> Iterator[Source]:
    """Expand command-line PATHs into tars and folders (a folder's tars and its patient trees both count)."""
    for path in paths:
        if path.is_file():
            yield Source(path, True)
        elif path.is_dir():
            tars = sorted(p for p in path.iterdir() if p.is_file() and is_tar_name(p))
            for tar in tars:
                yield Source(tar, True)
            if not tars or find_patients(path):
                yield Source(path, False)
        else:
            raise FileNotFoundError(f"{path}: no such file or directory")


def find_patients(root: Path) -> list[Path]:
    """Every patient folder at or below ``root`` (symbolic links are not followed)."""
    if (root / "Patient").is_file():
        return [root]
    found = []
    for folder, dirs, files in os.walk(root, followlinks=False):
        dirs.sort()
        if "Patient" in files and Path(folder, "Patient").is_file():
            found.append(Path(folder))
            dirs.clear()  # a patient folder holds no other patient
    return sorted(found)


def _clean_name(name: str) -> str:
    """The member name as a safe relative POSIX path; :class:`UnsafeArchiveError` when it is not one."""
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        raise UnsafeArchiveError(f"absolute member name {name!r}")
    normal = posixpath.normpath(name.replace("\\", "/"))
    if normal == ".." or normal.startswith("../") or "/../" in f"/{normal}/":
        raise UnsafeArchiveError(f"member {name!r} leaves the extraction folder")
    return "" if normal == "." else normal


def safe_extract(tar_path: Path, dest: Path) -> list[str]:
    """Extract ``tar_path`` under ``dest`` safely; returns a message per refused member."""
    refused: list[str] = []
    links: list[tuple[str, str]] = []  # (member, target inside the archive)
    dest = dest.resolve()
    with tarfile.open(tar_path, "r:*") as tar:
        for member in tar:
            try:
                name = _clean_name(member.name)
                if not name:
                    continue
                target = dest / name
                if member.isdir():
                    target.mkdir(parents=True, exist_ok=True)
                elif member.isfile():
                    target.parent.mkdir(parents=True, exist_ok=True)
                    source = tar.extractfile(member)
                    if source is None:
                        raise UnsafeArchiveError(f"member {member.name!r} has no data")
                    with source, open(target, "wb") as out:
                        shutil.copyfileobj(source, out)
                elif member.issym() or member.islnk():
                    base = posixpath.dirname(name) if member.issym() else ""
                    if member.linkname.startswith("/"):
                        raise UnsafeArchiveError(f"link {member.name!r} points outside the archive")
                    linked = _clean_name(posixpath.join(base, member.linkname))
                    links.append((name, linked))
                else:
                    raise UnsafeArchiveError(f"member {member.name!r} is a device or FIFO")
            except UnsafeArchiveError as exc:
                refused.append(f"{tar_path.name}: {exc}")
    for name, linked in links:
        source_path, target = dest / linked, dest / name
        if not source_path.is_file() or source_path.is_symlink():
            refused.append(f"{tar_path.name}: link {name!r} does not point at a file of the archive")
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source_path, target)
    return refused
