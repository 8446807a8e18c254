"""RayStation: a script run inside RayStation exports treated plans to the auxiliary PACS.

:mod:`.selection` holds the plain functions (beam-set selection, export arguments, precondition-warning
handling, the per-patient loop); :mod:`.export_script` is the thin script an operator runs in RayStation.
Neither imports anything but the standard library at module import (RayStation's interpreter has no pydicom).
"""
