"""rtharvest: rebuild complete radiotherapy patient datasets inside Orthanc.

The package is importable without Orthanc; only :mod:`rtharvest.edge.sdk` talks to the ``orthanc``
module that the Orthanc Python plugin provides.
"""

__version__ = "0.1.0"
