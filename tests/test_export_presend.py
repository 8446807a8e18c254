"""The check before sending: identifying values planted in kept descriptors never reach the destination.

The synthetic clinic gets its patients' surnames (components of PatientName) planted in ROI names, series
descriptions and plan labels, edited with pydicom in a copy of the generated files, as a planner might type
them. An export to a real folder must then end ``Completed`` with a verification that finds nothing, the
cleanings listed (UID, attribute, kind; never the value); with ``OnPhiFound: hold`` the objects are not
sent at all and the export ends ``HeldBack``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset

from rtharvest.export.cli import _progress
from rtharvest.export.deid import PhiAction, Profile
from rtharvest.export.presend import REPLACEMENT, FindingAction, check_before_send
from rtharvest.export.verify import phi_values, scan_for_phi
from rtharvest.synth.groundtruth import GroundTruth

from .test_export_service import Site, _drain, _service

#: Where the names are planted (attribute paths as the findings name them).
PLANTED = {"StructureSetROISequence[0].ROIName", "SeriesDescription", "RTPlanLabel"}


def _surname(ds: Dataset) -> str:
    return str(ds.PatientName).split("^")[1]


@pytest.fixture(scope="module")
def planted(synthetic: tuple[Path, GroundTruth], tmp_path_factory: pytest.TempPathFactory) -> tuple[Site, int]:
    """A copy of the synthetic clinic with each patient's surname in its ROI names (lower case), image
    series descriptions and plan labels (title case); the number of objects edited."""
    root, truth = synthetic
    copy = tmp_path_factory.mktemp("planted") / "clinic"
    shutil.copytree(root, copy)
    edited = 0
    for info in truth.objects.values():
        path = copy / info.path
        ds = pydicom.dcmread(path)
        name = _surname(ds)
        if ds.Modality == "RTSTRUCT" and ds.get("StructureSetROISequence"):
            ds.StructureSetROISequence[0].ROIName = f"ptv_{name.lower()}"
        elif ds.Modality in ("CT", "MR", "PT"):
            ds.SeriesDescription = f"{name} planning scan"
        elif ds.Modality == "RTPLAN":
            ds.RTPlanLabel = f"{name.title()} 1"
        else:
            continue
        ds.save_as(path)
        edited += 1
    return Site(copy, truth), edited


def _export(site: Site, tmp: Path, profile: dict[str, object] | None = None) -> tuple[dict, Path]:
    service = _service(tmp, site)
    body: dict[str, object] = {"Harvest": "H1", "Destination": "ARCHIVE", "Plans": "All"}
    if profile is not None:
        body["Profile"] = profile
    answer = service.create(body)
    _drain(service)
    doc = service.document(answer["ID"])
    doc["AllFindings"] = service.findings(answer["ID"], limit=100_000)
    return doc, tmp / "archive" / answer["ID"]


def test_planted_names_are_cleaned_before_sending(planted: tuple[Site, int], tmp_path: Path) -> None:
    site, edited = planted
    doc, folder = _export(site, tmp_path)
    assert doc["State"] == "Completed", doc
    verification = doc["Verification"]
    assert verification["Passed"] and verification["PhiHitCount"] == 0
    check = doc["PreSendCheck"]
    assert check["OnPhiFound"] == "clean" and check["Held"] == 0 and doc["Progress"]["InstancesHeld"] == 0
    # Every planted object that was selected is listed as cleaned, by attribute and kind.
    findings = doc["AllFindings"]
    assert check["FindingsCount"] == len(findings) == check["Cleaned"] > 0
    assert check["InstancesCleaned"] == len({f["SOPInstanceUID"] for f in findings}) <= edited
    assert {f["Attribute"] for f in findings} == PLANTED
    assert {f["Kind"] for f in findings} == {"PatientName:component"} and {f["Action"] for f in findings} == {
        "cleaned"}
    # Every file in the folder: no name left (read independently of the plugin), the rest of the text kept.
    originals = [pydicom.dcmread(p, stop_before_pixels=True) for p in site.files.values()]
    values = phi_values(originals, Profile())
    assert {"PatientName:component"} <= set(values.values())
    sent = [pydicom.dcmread(p, stop_before_pixels=True) for p in folder.rglob("*.dcm")]
    assert len(sent) == doc["Progress"]["InstancesSent"] > 0
    assert [h for ds in sent for h in scan_for_phi(ds, values)] == []
    by_uid = {str(ds.SOPInstanceUID): ds for ds in sent}
    cleaned = {f["SOPInstanceUID"]: f["Attribute"] for f in findings}
    labels = {str(by_uid[u].RTPlanLabel) for u, a in cleaned.items() if a == "RTPlanLabel"}
    assert labels == {f"{REPLACEMENT} 1"}
    rois = {str(by_uid[u].StructureSetROISequence[0].ROIName) for u, a in cleaned.items() if a.endswith("ROIName")}
    assert rois == {f"ptv_{REPLACEMENT}"}
    # The document lists UIDs of the copy, never a value.
    text = json.dumps(doc)
    assert not any(value in text.upper() for value, kind in values.items() if kind == "PatientName:component")
    assert set(cleaned) <= set(by_uid)


def test_hold_keeps_the_objects_at_the_site(planted: tuple[Site, int], tmp_path: Path) -> None:
    site, _ = planted
    doc, folder = _export(site, tmp_path, {"OnPhiFound": "hold"})
    assert doc["State"] == "HeldBack", doc
    progress, check = doc["Progress"], doc["PreSendCheck"]
    assert progress["InstancesHeld"] == check["InstancesHeld"] > 0 and check["Cleaned"] == 0
    assert progress["InstancesSent"] + progress["InstancesHeld"] == progress["InstancesTotal"]
    assert doc["Verification"]["PhiHitCount"] == 0 and doc["Verification"]["AbsentCount"] == 0
    held = {f["SOPInstanceUID"] for f in doc["AllFindings"]}
    assert {f["Action"] for f in doc["AllFindings"]} == {"held"} and len(held) == progress["InstancesHeld"]
    sent = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in folder.rglob("*.dcm")}
    assert len(sent) == progress["InstancesSent"] and not sent & held
    line = _progress(doc)
    assert line.startswith("HeldBack:") and f"{progress['InstancesHeld']} held back" in line


def _values() -> dict[str, str]:
    return {"ALPHA": "PatientName:component", "SYN001": "PatientID"}


def _dataset() -> Dataset:
    ds = Dataset()
    ds.SOPInstanceUID = "2.25.1"
    ds.SeriesDescription = "Alpha-PTV alphabet"
    ds.StudyDescription = "plan of syn001."
    ds.ProtocolName = "ALPHABETA"
    return ds


def test_cleaning_is_whole_word_and_case_insensitive() -> None:
    ds = _dataset()
    send, findings = check_before_send(ds, _values(), PhiAction.CLEAN)
    assert send
    assert str(ds.SeriesDescription) == f"{REPLACEMENT}-PTV alphabet" and ds.ProtocolName == "ALPHABETA"
    assert str(ds.StudyDescription) == f"plan of {REPLACEMENT}."
    assert {(f.attribute, f.kind, f.action) for f in findings} == {
        ("SeriesDescription", "PatientName:component", FindingAction.CLEANED),
        ("StudyDescription", "PatientID", FindingAction.CLEANED)}


def test_what_cannot_be_cleaned_is_held() -> None:
    ds = _dataset()
    values = {**_values(), "12345": "AccessionNumber"}
    ds.SeriesNumber = "12345"  # IS: a number cannot be cleaned into text
    send, findings = check_before_send(ds, values, PhiAction.CLEAN)
    assert not send
    assert ("SeriesNumber", "AccessionNumber", FindingAction.HELD) in {(f.attribute, f.kind, f.action)
                                                                       for f in findings}


def test_hold_leaves_the_object_untouched() -> None:
    ds = _dataset()
    send, findings = check_before_send(ds, _values(), PhiAction.HOLD)
    assert not send and {f.action for f in findings} == {FindingAction.HELD}
    assert str(ds.SeriesDescription) == "Alpha-PTV alphabet"


def test_values_are_found_in_elements_not_yet_converted_whatever_their_encoding() -> None:
    """A dataset read from bytes keeps its elements raw until used; the scan must find the same as in a
    converted one: an ASCII value, a UTF-8 value (a word of letters of any script), and a value in a
    multi-valued element."""
    from io import BytesIO

    from pydicom import dcmread

    from rtharvest.export.verify import scan_for_phi

    ds = _dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SeriesDescription = "Müller-PTV"
    ds.ImageType = ["ORIGINAL", "SYN001"]
    buffer = BytesIO()
    ds.save_as(buffer, implicit_vr=False, little_endian=True)
    values = {"MÜLLER": "PatientName:component", "SYN001": "PatientID"}
    raw = dcmread(BytesIO(buffer.getvalue()), force=True)
    expected = {("SeriesDescription", "PatientName:component"), ("StudyDescription", "PatientID"),
                ("ImageType", "PatientID")}
    assert {(h.attribute, h.kind) for h in scan_for_phi(raw, values)} == expected
    assert {(h.attribute, h.kind) for h in scan_for_phi(ds, values)} == expected
    # And cleaned as a whole word in any case (the "-" separates words, "ü" is a letter).
    send, _ = check_before_send(raw, values, PhiAction.CLEAN)
    assert send and str(raw.SeriesDescription) == f"{REPLACEMENT}-PTV"
