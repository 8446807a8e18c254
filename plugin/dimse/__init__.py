"""DICOM network backends: the same operations through Orthanc's REST API or pynetdicom."""
