"""The PythonScript Orthanc loads: registers the rtharvest plugin and nothing else.

Orthanc's Python plugin puts this file's folder first on sys.path, so this folder must hold no module
named like a standard-library one. PYTHONPATH entries are not processed for ``.pth`` files by Python;
an editable install (development) needs them, so they are processed here.
"""

import os
import site
import sys

for _entry in list(sys.path):
    if _entry.endswith("site-packages") and os.path.isdir(_entry):
        site.addsitedir(_entry)

from rtharvest.edge import app  # noqa: E402

app.install()
