"""External programs the suite needs (Debian packages in run.sh's APT_PACKAGES, installed by
``./run.sh test``): a missing one fails the test that needs it, it never skips it."""

from __future__ import annotations

import shutil

import pytest

#: Program → Debian package.
PACKAGE_OF = {"dciodvfy": "dicom3tools", "dcmqridx": "dcmtk", "dcmqrscp": "dcmtk", "storescu": "dcmtk"}


def required_tool(name: str) -> str:
    """The path of ``name``; fails the calling test (not skips) when it is not installed."""
    path = shutil.which(name)
    if path is None:
        package = PACKAGE_OF.get(name, "its Debian package")
        pytest.fail(f"{name} is not installed ({package}, in run.sh APT_PACKAGES): run ./run.sh setup", pytrace=False)
    return path
