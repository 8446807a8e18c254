"""Read one ``Patient_N`` folder into the typed model of :mod:`.models`.

Which key is read for what (Pinnacle spells keys this way; absent optional keys get documented defaults):

- ``Patient``: MedicalRecordNumber (DICOM PatientID), LastName/FirstName/MiddleName, DateOfBirth,
  Gender, ImageSetList/ImageSet (ImageSetID, ImageName, Modality, SeriesDescription), PlanList/Plan
  (PlanID, PlanName, PrimaryCTImageSetID, ToolType: may be missing, then ``Pinnacle``).
- ``ImageSet_N.header`` (free format), ``ImageSet_N.ImageInfo`` (ImageInfo items),
  ``ImageSet_N.DICOM/`` and ``ImageSet_N.img`` (presence only; pixels are read by the writers).
- ``Plan_N/``: ``plan.Trial`` (one or more ``Trial``), ``plan.roi``, ``plan.Points`` (Poi),
  ``plan.PatientSetup``, ``plan.Pinnacle.Machines`` (Machine with MultiLeaf LeafPairList), ``plan.PlanInfo``
  (PinnacleVersionDescription: the version that decides the pre-9.0 offset).
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

from .errors import PinnacleError, PinnacleFormatError
from .freeformat import parse_free_file
from .grammar import Obj, Value, XdrRef, decode, parse_file
from .models import (
    Beam,
    ControlPoint,
    Curve,
    DoseGrid,
    ImageHeader,
    ImageSet,
    LeafPair,
    Machine,
    MonitorUnitInfo,
    Orientation,
    Patient,
    Plan,
    Poi,
    Prescription,
    Roi,
    SliceInfo,
    Trial,
    Version,
)

_VERSION = re.compile(r"(?:v|version\s*|pinnacle\S*\s*)(\d+)\.(\d+)", re.IGNORECASE)


def _require(path: Path) -> Path:
    if not path.is_file():
        raise PinnacleFormatError(f"{path}: missing")
    return path


def _num(obj: Obj, key: str, source: str, default: float | None = None) -> float:
    value = obj.num(key, default)
    if value is None:
        raise PinnacleFormatError(f"{source}: {key} is missing or not a number")
    return value


def parse_version(text: str) -> Version | None:
    """``Pinnacle 8.0m``, ``v9.10``, ``Launch Pad: 16.0`` → Version; ``None`` when no version is found."""
    match = _VERSION.search(text) or re.search(r"(\d+)\.(\d+)", text)
    if not match:
        return None
    return Version(int(match.group(1)), int(match.group(2)))


def parse_orientation(text: str) -> Orientation | None:
    """``HFS``... or PatientSetup wording (``Head First Into Scanner`` + ``On back (supine)``)."""
    upper = text.strip().upper()
    for item in Orientation:
        if upper == item.value:
            return item
    return None


def _setup_orientation(setup: Obj) -> Orientation | None:
    node = setup.obj("PatientSetup") or setup
    position = node.text("Position").lower()
    orientation = node.text("Orientation").lower()
    if not position or not orientation:
        return None
    head = "head" in orientation
    supine = "supine" in position or "back" in position
    return Orientation(("HF" if head else "FF") + ("S" if supine else "P"))


def read_header(path: Path) -> ImageHeader:
    """``ImageSet_N.header``."""
    obj = parse_free_file(path)
    src = str(path)
    position = obj.text("patient_position")
    return ImageHeader(
        x_dim=int(_num(obj, "x_dim", src)),
        y_dim=int(_num(obj, "y_dim", src)),
        z_dim=int(_num(obj, "z_dim", src)),
        x_pixdim=_num(obj, "x_pixdim", src),
        y_pixdim=_num(obj, "y_pixdim", src),
        z_pixdim=_num(obj, "z_pixdim", src),
        x_start=_num(obj, "x_start", src),
        y_start=_num(obj, "y_start", src),
        z_start=_num(obj, "z_start", src),
        byte_order=int(_num(obj, "byte_order", src, 0)),
        patient_position=parse_orientation(position) if position else None,
        couch_height=_num(obj, "couch_height", src, 0.0),
        bytes_pix=int(_num(obj, "bytes_pix", src, 2)),
        manufacturer=obj.text("manufacturer"),
        model=obj.text("model"),
        scan_date=obj.text("date"),
    )


def read_image_info(path: Path) -> list[SliceInfo]:
    """``ImageSet_N.ImageInfo``: ImageInfo items at the top level or inside ImageInfoList."""
    root = parse_file(path)
    items = root.objs("ImageInfo")
    for holder in root.objs("ImageInfoList"):
        items += holder.objs("ImageInfo") or holder.items()
    slices = []
    for number, item in enumerate(items):
        slices.append(
            SliceInfo(
                table_position=_num(item, "TablePosition", f"{item.at(str(path))}: ImageInfo {number}"),
                slice_number=int(item.num("SliceNumber", number + 1) or number + 1),
                series_uid=item.text("SeriesUID"),
                study_uid=item.text("StudyInstanceUID"),
                frame_uid=item.text("FrameUID"),
                class_uid=item.text("ClassUID"),
                instance_uid=item.text("InstanceUID"),
            )
        )
    return slices


def read_image_set(folder: Path, entry: Obj) -> ImageSet:
    """One ImageSet of the Patient file and its ``ImageSet_N.*`` files."""
    number = int(entry.num("ImageSetID", 0) or 0)
    name = entry.text("ImageName") or f"ImageSet_{number}"
    if not (folder / f"{name}.header").is_file():
        # ImageName is the file stem in every archive seen; should it hold a display name, the ID names the files.
        name = f"ImageSet_{number}"
    base = folder / name
    header = read_header(_require(base.with_name(name + ".header")))
    info = base.with_name(name + ".ImageInfo")
    slices = read_image_info(info) if info.is_file() else []
    dicom_dir = base.with_name(name + ".DICOM")
    img = base.with_name(name + ".img")
    return ImageSet(
        number=number,
        name=name,
        modality=entry.text("Modality", "CT") or "CT",
        description=entry.text("SeriesDescription") or entry.text("ImageName"),
        header=header,
        slices=slices,
        dicom_dir=dicom_dir if dicom_dir.is_dir() else None,
        img_path=img if img.is_file() else None,
        scan_date=entry.text("ScanTimeFromScanner"),
    )


def _points(value: Value) -> list[float]:
    if isinstance(value, list):
        return value
    return []


def _leaf_positions(item: Obj, file: str, label: str) -> tuple[tuple[float, float], ...]:
    """``MLCLeafPositions ={ RawData ={ NumberOfPoints = n; Points[] ={ x1,x2, ... }; }; }`` of one control point.

    Resolved through its parent keys only: the control point's ``ModifierList`` (blocks, MLC-conformed
    outlines) holds ``RawData`` blocks too, written *before* the leaves, and is never read for them.
    """
    raw = item.path("MLCLeafPositions", "RawData")
    if not isinstance(raw, Obj):
        return ()
    values = _points(raw.get("Points"))
    if len(values) % 2:
        raise PinnacleFormatError(
            f"{raw.at(file)}: {label} MLCLeafPositions has an odd count of values ({len(values)})"
        )
    declared = raw.num("NumberOfPoints")
    if declared is not None and int(declared) != len(values) // 2:
        raise PinnacleFormatError(
            f"{raw.at(file)}: {label} MLCLeafPositions says NumberOfPoints = {int(declared)} "
            f"but lists {len(values) // 2}"
        )
    return tuple((values[i], values[i + 1]) for i in range(0, len(values), 2))


def read_control_point(item: Obj, file: str, label: str = "control point") -> ControlPoint:
    """One control point of a beam's ControlPointList (``file`` is plan.Trial; errors name its line and ``label``)."""
    source = f"{item.at(file)}: {label}"
    return ControlPoint(
        gantry=item.num("Gantry", 0.0) or 0.0,
        collimator=item.num("Collimator", 0.0) or 0.0,
        couch=item.num("Couch", 0.0) or 0.0,
        left_jaw=_num(item, "LeftJawPosition", source),
        right_jaw=_num(item, "RightJawPosition", source),
        top_jaw=_num(item, "TopJawPosition", source),
        bottom_jaw=_num(item, "BottomJawPosition", source),
        leaves=_leaf_positions(item, file, label),
        weight=item.num("Weight", 1.0) or 0.0,
    )


def _cp_manager(beam: Obj) -> Obj | None:
    """``CPManager ={ CPManagerObject ={ ... ControlPointList ={...}; GantryIsCCW = 0; }; }`` of a beam.

    Pinnacle nests the list in ``CPManagerObject``; a ``CPManager`` holding ``ControlPointList`` itself is
    read as the same block.
    """
    manager = beam.obj("CPManager")
    if manager is None:
        return None
    return manager.obj("CPManagerObject") or manager


def _energy(text: str) -> float:
    match = re.search(r"\d+(\.\d+)?", text)
    return float(match.group(0)) if match else 0.0


def read_beam(item: Obj, index: int, source: str, trial: str = "") -> Beam:
    """One Beam of a trial's BeamList (``source`` is the file; errors name it and the line)."""
    name = item.text("Name") or f"Beam {index + 1}"
    label = f"trial {trial!r} beam {name!r}" if trial else f"beam {name!r}"
    where = f"{item.at(source)}: {label}"
    manager = _cp_manager(item)
    cplist = manager.obj("ControlPointList") if manager is not None else None
    cps = [
        read_control_point(cp, source, f"{label} control point {i}")
        for i, cp in enumerate(cplist.items() or cplist.children() if cplist is not None else [])
    ]
    if not cps:
        raise PinnacleFormatError(f"{where}: no control points")
    mu = item.obj("MonitorUnitInfo") or Obj()
    dose_volume = item.get("DoseVolume")
    kind = item.text("SetBeamType", "Static").lower()
    modality = item.text("Modality", "Photons").lower()
    machine = item.text("MachineNameAndVersion") or item.text("MachineName")
    number = item.num("BeamNumber")
    electron = modality.startswith("electron")
    if electron or item.num("UseMLC", 1) == 0:
        # Leaf values a control point still carries are not delivered: an electron field is shaped by its
        # applicator, and a photon beam with UseMLC = 0 by its jaws (and blocks).
        cps = [replace(cp, leaves=()) for cp in cps]
    applicator = item.text("ElectronApplicatorName") if electron else ""
    ccw = manager.num("GantryIsCCW") if manager is not None else None
    if ccw is None:
        ccw = item.num("GantryIsCCW", 0)
    return Beam(
        name=name,
        number=int(number) if number else index + 1,
        isocenter_name=item.text("IsocenterName"),
        prescription_name=item.text("PrescriptionName"),
        machine_name=machine.split(":")[0].strip(),
        energy=_energy(item.text("MachineEnergyName")),
        modality="ELECTRON" if electron else "PHOTON",
        beam_type="DYNAMIC" if ("arc" in kind or "dynamic" in kind or "vmat" in kind) else "STATIC",
        ssd=item.num("SSD"),
        dose_volume=dose_volume.index if isinstance(dose_volume, XdrRef) else None,
        mu_info=MonitorUnitInfo(
            prescription_dose=mu.num("PrescriptionDose", 0.0) or 0.0,
            normalized_dose=mu.num("NormalizedDose", 0.0) or 0.0,
            collimator_output_factor=mu.num("CollimatorOutputFactor", 1.0) or 1.0,
            total_transmission_fraction=mu.num("TotalTransmissionFraction", 1.0) or 1.0,
        ),
        control_points=tuple(cps),
        gantry_ccw=bool(ccw),
        line=item.line,
        applicator="" if applicator.lower() in ("", "none") else applicator,
    )


def _xyz(obj: Obj | None, source: str) -> tuple[float, float, float]:
    if obj is None:
        raise PinnacleFormatError(f"{source}: missing")
    return (_num(obj, "X", source), _num(obj, "Y", source), _num(obj, "Z", source))


def read_trial(item: Obj, source: str) -> Trial:
    """One Trial of ``plan.Trial`` (``source`` is the file; errors name it and the line)."""
    name = item.text("Name") or "Trial"
    grid = item.obj("DoseGrid") or Obj(line=item.line)
    dims = _xyz(grid.obj("Dimension"), f"{grid.at(source)}: trial {name!r} DoseGrid.Dimension")
    prescriptions = []
    for holder in item.objs("PrescriptionList"):
        for rx in holder.objs("Prescription") or holder.children():
            fractions = max(int(rx.num("NumberOfFractions", 1) or 1), 1)
            dose = rx.num("PrescriptionDose", 0.0) or 0.0
            # PrescriptionPeriod says whether the dose is per fraction (the default) or for the course.
            period = rx.text("PrescriptionPeriod").lower()
            if any(word in period for word in ("overall", "total", "course")):
                dose /= fractions
            prescriptions.append(Prescription(name=rx.text("Name"), dose_per_fraction=dose, fractions=fractions))
    beams = []
    for holder in item.objs("BeamList"):
        for i, beam in enumerate(holder.objs("Beam") or holder.children()):
            beams.append(read_beam(beam, i, source, name))
    return Trial(
        name=name,
        dose_grid=DoseGrid(
            voxel=_xyz(grid.obj("VoxelSize"), f"{grid.at(source)}: trial {name!r} DoseGrid.VoxelSize"),
            dims=(int(dims[0]), int(dims[1]), int(dims[2])),
            origin=_xyz(grid.obj("Origin"), f"{grid.at(source)}: trial {name!r} DoseGrid.Origin"),
        ),
        prescriptions=prescriptions,
        beams=beams,
    )


def read_rois(path: Path) -> list[Roi]:
    """``plan.roi``."""
    root = parse_free_file(path)
    rois = []
    for roi in root.objs("roi"):
        curves = []
        for curve in roi.objs("curve"):
            values = _points(curve.get("points"))
            if len(values) % 3:
                raise PinnacleFormatError(
                    f"{curve.at(str(path))}: ROI {roi.text('name')!r} has a point with missing coordinates"
                )
            curves.append(Curve(tuple((values[i], values[i + 1], values[i + 2]) for i in range(0, len(values), 3))))
        rois.append(
            Roi(
                name=roi.text("name"),
                interpreted_type=roi.text("roiinterpretedtype"),
                color=roi.text("color"),
                volume_name=roi.text("volume_name"),
                curves=tuple(curves),
            )
        )
    return rois


def read_pois(path: Path) -> list[Poi]:
    """``plan.Points``."""
    root = parse_file(path)
    items = root.objs("Poi")
    for holder in root.objs("PoiList"):
        items += holder.objs("Poi")
    pois = []
    for p in items:
        where = f"{p.at(str(path))}: Poi {p.text('Name')!r}"
        point = (_num(p, "XCoord", where), _num(p, "YCoord", where), _num(p, "ZCoord", where))
        pois.append(Poi(p.text("Name"), point))
    return pois


def _sad(machine: Obj) -> float:
    """Source-axis distance (cm): SAD or its spelled-out forms; 100 cm when the file does not say."""
    for key in ("SAD", "SourceToAxisDistance", "SourceAxisDistance"):
        value = machine.num(key)
        if value:
            return value
    return 100.0


def _leaf_pair(pair: Obj, where: str) -> LeafPair:
    """One ``MLCLeafPair``: ``YCenterPosition`` and ``Width`` (cm); ``NegateLeafCoordinate = 1`` flips the centre.

    The flip is what Pinnacle itself shows: with ``NegateLeafCoordinate = 1`` the first pair of a file whose
    ``YCenterPosition`` is −19.5 is labelled ``1. Y = 19.50 cm`` in each control point's RowLabelList.
    """
    centre = _num(pair, "YCenterPosition", where)
    return LeafPair(-centre if pair.num("NegateLeafCoordinate", 0) else centre, _num(pair, "Width", where))


def read_machines(path: Path) -> dict[str, Machine]:
    """``plan.Pinnacle.Machines``: every machine (``#n ={...}`` or ``Machine ={...}``) with its leaf pairs.

    Leaf pairs are ``MultiLeaf ={ LeafPairList ={ MLCLeafPair ={...}; MLCLeafPair ={...}; ... }; }`` in file
    order, which is the order of every control point's ``MLCLeafPositions``. A machine without
    ``MultiLeaf`` (an electron-only or jaw-only machine) has no leaf pairs.
    """
    root = parse_file(path)
    machines = {}
    for item in root.objs("Machine") or root.items():
        name = item.text("Name")
        pairs_obj = item.path("MultiLeaf", "LeafPairList")
        pairs = []
        if isinstance(pairs_obj, Obj):
            for k, p in enumerate(pairs_obj.objs("MLCLeafPair")):
                pairs.append(_leaf_pair(p, f"{p.at(str(path))}: machine {name!r} leaf pair {k}"))
        machines[name] = Machine(name=name, sad=_sad(item), leaf_pairs=tuple(pairs))
    return machines


def read_plan_version(folder: Path, from_patient: Version | None = None) -> Version | None:
    """The plan's version: ``plan.PlanInfo`` (PinnacleVersionDescription), else ``from_patient`` (the
    Patient file's entry for the plan), else the ``plan.roi`` header; ``None`` when none says."""
    info = folder / "plan.PlanInfo"
    if info.is_file():
        obj = parse_file(info)
        for key in ("PinnacleVersionDescription", "WriteVersion"):
            text = obj.text(key)
            if text and (found := parse_version(text)):
                return found
    if from_patient is not None:
        return from_patient
    roi = folder / "plan.roi"
    if roi.is_file():
        head = decode(roi.read_bytes()[:2000])
        # "// Pinnacle Treatment Planning System Version 16.0" heads the file (also "Pinnacle Version: 8.0");
        # the file_stamp block of newer versions says "write_version: 16.0".
        match = re.search(r"Pinnacle[^\n]*?Versions?:?\s*v?(\d+)\.(\d+)", head) or re.search(
            r"write_version:\s*v?(\d+)\.(\d+)", head)
        if match:
            return Version(int(match.group(1)), int(match.group(2)))
    return None


def read_plan(patient_folder: Path, entry: Obj, patient_version: Version) -> Plan:
    """One Plan of the Patient file and its ``Plan_N/`` folder."""
    number = int(entry.num("PlanID", 0) or 0)
    folder = patient_folder / f"Plan_{number}"
    if not folder.is_dir():
        raise PinnacleFormatError(f"{folder}: plan folder missing")
    roi_file = folder / "plan.roi"
    points_file = folder / "plan.Points"
    machines_file = folder / "plan.Pinnacle.Machines"
    setup_file = folder / "plan.PatientSetup"
    # The plan's own version: plan.PlanInfo, else the Patient file's entry for the plan (Pinnacle 16 writes
    # PinnacleVersionDescription there), else the plan.roi header, else the Patient file's.
    entry_version = parse_version(entry.text("PinnacleVersionDescription"))
    version = read_plan_version(folder, entry_version) or patient_version
    # The trials (beams, control points) and machines fail apart from the plan's ROIs and points: a beam the
    # converter cannot read costs its plan's RTPLANs and doses, never the plan's structure set.
    trials: list[Trial] = []
    machines: dict[str, Machine] = {}
    trial_error: PinnacleError | None = None
    try:
        trial_root = parse_file(_require(folder / "plan.Trial"))
        trials = [read_trial(t, str(folder / "plan.Trial")) for t in trial_root.objs("Trial")]
        machines = read_machines(machines_file) if machines_file.is_file() else {}
    except PinnacleError as exc:
        trials, machines, trial_error = [], {}, exc
    return Plan(
        number=number,
        name=entry.text("PlanName") or f"Plan_{number}",
        primary_image_set=int(entry.num("PrimaryCTImageSetID", 0) or 0),
        tool_type=entry.text("ToolType") or "Pinnacle",
        folder=folder,
        trials=trials,
        rois=read_rois(roi_file) if roi_file.is_file() else [],
        pois=read_pois(points_file) if points_file.is_file() else [],
        machines=machines,
        version=version,
        setup_position=_setup_orientation(parse_file(setup_file)) if setup_file.is_file() else None,
        trial_error=trial_error,
    )


_SEX = {"male": "M", "female": "F", "m": "M", "f": "F", "other": "O", "o": "O"}


def _birth_date(text: str) -> str:
    digits = re.findall(r"\d+", text)[:3]  # a time may follow the date
    if len(digits) == 3:
        if len(digits[0]) == 4:
            year, month, day = digits
        else:  # Pinnacle's US style MM/DD/YYYY
            month, day, year = digits
        return f"{int(year):04d}{int(month):02d}{int(day):02d}"
    return ""


def read_patient(folder: Path) -> Patient:
    """The whole ``Patient_N`` folder; :class:`~.errors.PinnacleError` names the file at fault."""
    root = parse_file(_require(folder / "Patient"))
    version = Version(0, 0, known=False)
    written = root.path("ObjectVersion", "WriteVersion")
    if isinstance(written, str) and (found := parse_version(written)):
        version = found
    image_sets = {}
    problems: list[PinnacleError] = []
    # An unreadable image set or plan is recorded and the rest of the patient still converts.
    for holder in root.objs("ImageSetList"):
        for entry in holder.objs("ImageSet") or holder.children():
            try:
                image_set = read_image_set(folder, entry)
            except PinnacleError as exc:
                problems.append(exc)
                continue
            image_sets[image_set.number] = image_set
    plans = []
    for holder in root.objs("PlanList"):
        for entry in holder.objs("Plan") or holder.children():
            try:
                plans.append(read_plan(folder, entry, version))
            except PinnacleError as exc:
                problems.append(exc)
    mrn = root.text("MedicalRecordNumber")
    if not mrn:
        raise PinnacleFormatError(f"{folder / 'Patient'}: MedicalRecordNumber is missing (it is the DICOM PatientID)")
    return Patient(
        folder=folder,
        internal_id=root.text("PatientID"),
        mrn=mrn,
        last_name=root.text("LastName"),
        first_name=root.text("FirstName"),
        middle_name=root.text("MiddleName"),
        birth_date=_birth_date(root.text("DateOfBirth")),
        sex=_SEX.get(root.text("Gender").lower(), ""),
        image_sets=image_sets,
        plans=plans,
        problems=problems,
        version=version,
    )
