"""De-identified export of harvested plans to a research archive.

``deid`` is the pure de-identification layer; ``selection`` picks a harvest's objects plan by plan;
``destinations`` sends to a DICOM node, a DICOMweb server or a folder; ``verify`` re-runs the reference
walk and a PHI scan on what a destination received; ``service`` runs exports as durable queue jobs.
"""
