"""Pinnacle (Philips TPS) archives to DICOM CT, RTSTRUCT, RTPLAN and RTDOSE.

Modules by role: :mod:`.grammar` (object text), :mod:`.freeformat` (``plan.roi`` and ImageSet headers),
:mod:`.models` and :mod:`.reader` (typed patient model), :mod:`.coords` (Pinnacle to DICOM patient
coordinates), :mod:`.writers` (DICOM objects), :mod:`.archive` (tars, safe extraction), :mod:`.convert`
(one patient to a sink), :mod:`.cli` (``rtharvest-convert pinnacle``).
"""
