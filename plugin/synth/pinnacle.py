"""Synthetic Pinnacle patients written from a known geometry in DICOM patient coordinates.

The truth is defined first, in DICOM millimetres (CT slice positions, an asymmetric bone marker, circular
contours on given slices, POIs, beam isocentres, MLC and jaw settings, dose hot spots and the dose grid
box); the Pinnacle files are then *derived* from it with this module's own inverse mapping (DICOM → Pinnacle
cm, minus the pre-9.0 y offset for old versions). A converter round trip must land on the truth, never on
what a parser read back.

Covered quirks: all four orientations; a pre-9.0 (8.0m, big-endian image, couch height set) and a current
version; several plans and several trials per plan (several ``Trial`` blocks in one ``plan.Trial``); XDR
numbering that counts other binary attributes, so beam order ≠ binary order; binary bytes and Latin-1 in
comments and names; dotted keys; a plan without ToolType; an isocentre POI whose name is not "iso" while
another POI is called "iso"; leaf pairs listed from +Y to −Y with non-uniform widths; a duplicated
closing contour point; ``ImageSet_N.DICOM`` present or not, ``ImageSet_N.img`` present or not.
"""

from __future__ import annotations

import math
import struct
import tarfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset

from rtharvest.core.dicombuild import frame_of_reference
from rtharvest.core.sopclass import SopClass

from . import iods

Point = tuple[float, float, float]

#: DICOM axis signs per orientation (Pinnacle cm → DICOM mm is 10·sign·value; the inverse is the same).
_SIGNS = {"HFS": (1, -1, -1), "HFP": (-1, 1, -1), "FFS": (-1, -1, 1), "FFP": (1, 1, 1)}
#: The standard DICOM ImageOrientationPatient of an axial scan in each orientation.
_IOP = {"HFS": (1, 0, 0, 0, 1, 0), "HFP": (-1, 0, 0, 0, -1, 0), "FFS": (-1, 0, 0, 0, 1, 0), "FFP": (1, 0, 0, 0, -1, 0)}

COLS, ROWS, SLICES = 24, 20, 12
PIXEL_MM, SLICE_MM = 12.5, 5.0
#: Machine leaf pairs as (centre, width) in cm, listed from +Y to −Y (the order Pinnacle may use).
LEAF_PAIRS = [
    (7.5, 1.0),
    (6.5, 1.0),
    (5.75, 0.5),
    (5.25, 0.5),
    (4.75, 0.5),
    (4.25, 0.5),
    (3.5, 1.0),
    (2.5, 1.0),
    (1.5, 1.0),
    (0.5, 1.0),
    (-0.5, 1.0),
    (-1.5, 1.0),
    (-2.5, 1.0),
    (-3.5, 1.0),
    (-4.5, 1.0),
    (-5.5, 1.0),
    (-6.5, 1.0),
    (-7.5, 1.0),
]
DOSE_SIGMA_MM = 25.0
FRACTIONS = 25


@dataclass(frozen=True)
class PinnacleCase:
    """One synthetic patient: orientation, version, which image files the archive keeps."""

    orientation: str = "HFS"
    version: str = "16.2"
    with_dicom: bool = True
    with_img: bool = True
    number: int = 1

    @property
    def pre9(self) -> bool:
        """Whether this case is written by a Pinnacle older than 9.0."""
        return int(self.version.split(".")[0]) < 9

    @property
    def mrn(self) -> str:
        """MedicalRecordNumber (the DICOM PatientID)."""
        return f"PIN{self.number:03d}{self.orientation}{'OLD' if self.pre9 else 'NEW'}"


@dataclass
class BeamTruth:
    """Expected DICOM values of one beam."""

    name: str
    number: int
    isocenter: Point
    gantry: list[float]
    mu: float
    jaws: list[tuple[float, float, float, float]]  # per Pinnacle control point: X1, X2, Y1, Y2 (mm)
    bank_a: list[list[float]]  # per control point, pairs from −Y to +Y (mm)
    bank_b: list[list[float]]
    peak: Point
    peak_gy: float  # per fraction at the hot spot
    beam_type: str = "STATIC"
    #: Per DICOM control point: the Pinnacle control point it comes from and its cumulative meterset weight.
    cp_source: list[int] = field(default_factory=list)
    cumulative: list[float] = field(default_factory=list)


@dataclass
class TrialTruth:
    """Expected dose grid (DICOM mm) and beams of a trial."""

    name: str
    beams: list[BeamTruth]
    dose_min: Point
    dose_max: Point
    dose_spacing: Point
    dose_dims: tuple[int, int, int]
    fractions: int = FRACTIONS


@dataclass
class PlanTruth:
    """One plan's trials."""

    number: int
    name: str
    trials: list[TrialTruth]


@dataclass
class PatientTruth:
    """Everything a converter must reproduce for one patient, in DICOM patient coordinates (mm)."""

    folder: str
    mrn: str
    orientation: str
    version: str
    pre9: bool
    with_dicom: bool
    with_img: bool
    study_uid: str
    series_uid: str
    for_uid: str
    slice_uids: list[str]
    slice_positions: list[Point]
    orientation_cosines: tuple[int, ...]
    pixel_mm: float
    marker: Point  # centre of a bone cube (HU 1000) in an otherwise water/air phantom
    contours: dict[str, list[list[Point]]]
    pois: dict[str, Point]
    leaf_boundaries: list[float]
    plans: list[PlanTruth] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return asdict(self)


# -- geometry ---------------------------------------------------------------------------------------


def _to_pinnacle(p: Point, orientation: str, y_shift: float = 0.0) -> Point:
    """DICOM mm → Pinnacle cm, minus ``y_shift`` (the pre-9.0 offset of Pinnacle's frame)."""
    sx, sy, sz = _SIGNS[orientation]
    return (sx * p[0] / 10.0, sy * p[1] / 10.0 - y_shift, sz * p[2] / 10.0)


def _to_dicom(p: Point, orientation: str) -> Point:
    sx, sy, sz = _SIGNS[orientation]
    return (10.0 * sx * p[0], 10.0 * sy * p[1], 10.0 * sz * p[2])


def _corner(points: list[Point], pick: Any) -> Point:
    """The per-axis ``min`` or ``max`` corner of ``points``."""
    return (pick(p[0] for p in points), pick(p[1] for p in points), pick(p[2] for p in points))


def _hu(p: Point, marker: Point) -> int:
    """The phantom: air, a water ellipse around the axis, a 25 mm bone cube at ``marker``."""
    if all(abs(p[i] - marker[i]) <= 12.5 for i in range(3)):
        return 1000
    if (p[0] / 120.0) ** 2 + ((p[1] - 10.0) / 90.0) ** 2 <= 1.0:
        return 0
    return -1000


def _fmt(v: float) -> str:
    return f"{v:.6f}".rstrip("0").rstrip(".") if v != 0 else "0"


# -- writers of Pinnacle text -----------------------------------------------------------------------


def _write(path: Path, text: str) -> None:
    path.write_bytes(text.encode("latin-1"))


def _header(case: PinnacleCase, x_start: float, y_start: float, z_start: float, couch: float) -> str:
    lines = [
        f"byte_order = {1 if case.pre9 else 0};",
        'read_conversion : "";',
        "t_dim = 0;",
        f"x_dim = {COLS};",
        f"y_dim = {ROWS};",
        f"z_dim = {SLICES};",
        "datatype = 1;",
        "bitpix = 16;",
        "bytes_pix = 2;",
        f"x_pixdim = {_fmt(PIXEL_MM / 10)};",
        f"y_pixdim = {_fmt(PIXEL_MM / 10)};",
        f"z_pixdim = {_fmt(SLICE_MM / 10)};",
        f"x_start = {_fmt(x_start)};",
        f"y_start = {_fmt(y_start)};",
        f"z_start = {_fmt(z_start)};",
        "db_name : PINNACLE3",
        "date : 20200102",
        "scanner_id : SYNTHCT",
        f"patient_position : {case.orientation}",
        "comment :",
        "manufacturer : rtharvest",
        "model : synthetic",
        f"couch_height = {_fmt(couch)};",
    ]
    return "\n".join(lines) + "\n"


def _ct_dataset(case: PinnacleCase, truth: PatientTruth, index: int, pixels: bytes) -> Dataset:
    patient = iods.Patient(case.mrn, "M\u00fcller^Anna", "19500102", "F")
    study = iods.Study(truth.study_uid, "20200102", "090000", "Planning CT", "1", "ACC1")
    series = iods.Series(truth.series_uid, 1, "CT", "Planning CT", "20200102", "090000")
    ds = iods.base_dataset(
        SopClass.CT_IMAGE.value,
        truth.slice_uids[index],
        patient,
        study,
        series,
        instance_number=index + 1,
        content_date="20200102",
        content_time="090000",
    )
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.AcquisitionDate = "20200102"
    ds.AcquisitionTime = "090000"
    ds.AcquisitionNumber = 1
    ds.Laterality = ""
    ds.PatientPosition = case.orientation
    frame_of_reference(ds, truth.for_uid)
    ds.ImageOrientationPatient = [str(v) for v in truth.orientation_cosines]
    ds.ImagePositionPatient = [_fmt(v) for v in truth.slice_positions[index]]
    ds.SliceLocation = _fmt(truth.slice_positions[index][2])
    ds.PixelSpacing = [_fmt(PIXEL_MM), _fmt(PIXEL_MM)]
    ds.SliceThickness = _fmt(SLICE_MM)
    ds.Rows, ds.Columns = ROWS, COLS
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.KVP = "120"
    ds.RescaleIntercept = "-1024"  # a scanner's convention; Pinnacle's own .img uses water = 1000
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    ds.PixelData = pixels
    ds["PixelData"].VR = "OW"
    return ds


def _mlc(segment: int, beam: int) -> list[tuple[float, float]]:
    """Pinnacle (left, right) cm per leaf pair in the machine's (+Y → −Y) order, varied by segment."""
    out = []
    for i, (centre, _) in enumerate(LEAF_PAIRS):
        half = 3.0 + 0.5 * segment + 0.1 * beam + 0.05 * i
        out.append((round(half - 0.3 * centre / 7.5, 3), round(half + 0.2 * centre / 7.5, 3)))
    return out


def write_patient(root: Path, case: PinnacleCase) -> PatientTruth:
    """Write ``root/Patient_<n>/`` for ``case``; return the truth it was written from."""
    o = case.orientation
    folder = root / f"Patient_{case.number}"
    folder.mkdir(parents=True, exist_ok=True)
    uid = lambda *k: iods.make_uid("pinnacle-synth", case.mrn, *k)  # noqa: E731
    iop = _IOP[o]
    row_dir, col_dir = iop[:3], iop[3:]
    # Slice z values in DICOM (ascending in file order), first voxel of each slice in the corner where
    # the standard IOP puts it.
    x0 = -row_dir[0] * (COLS - 1) * PIXEL_MM / 2.0 + 5.0
    y0 = -col_dir[1] * (ROWS - 1) * PIXEL_MM / 2.0 - 7.5
    zs = [-30.0 + k * SLICE_MM for k in range(SLICES)]
    positions = [(x0, y0, z) for z in zs]
    marker = (35.0 + 5.0, -20.0 - 7.5, zs[3])
    truth = PatientTruth(
        folder=folder.name,
        mrn=case.mrn,
        orientation=o,
        version=case.version,
        pre9=case.pre9,
        with_dicom=case.with_dicom,
        with_img=case.with_img,
        study_uid=uid("study"),
        series_uid=uid("series"),
        for_uid=uid("for"),
        slice_uids=[uid("slice", k) for k in range(SLICES)],
        slice_positions=positions,
        orientation_cosines=iop,
        pixel_mm=PIXEL_MM,
        marker=marker,
        contours={},
        pois={},
        leaf_boundaries=[],
    )

    def voxel(i: int, j: int, z: float) -> Point:
        return (x0 + i * PIXEL_MM * row_dir[0], y0 + j * PIXEL_MM * col_dir[1], z)

    # Pinnacle image frame: the voxel corners in Pinnacle cm, derived from the DICOM corners.
    corners = [_to_pinnacle(voxel(i, j, z), o) for i in (0, COLS - 1) for j in (0, ROWS - 1) for z in (zs[0], zs[-1])]
    x_start = min(c[0] for c in corners)
    y_start = min(c[1] for c in corners)
    z_start = min(c[2] for c in corners)
    # Before 9.0 Pinnacle's whole y frame (image header, contours, points, dose grid) sat ``y_shift`` below the
    # DICOM one: the image centred on Pinnacle's own y origin, its DICOM y given by the couch height. The
    # file values are the true ones minus y_shift, and the couch height is the one that makes the documented
    # offset formula equal y_shift.
    y_shift, written_y_start, couch = 0.0, y_start, 0.0
    if case.pre9:
        y_pix = PIXEL_MM / 10
        written_y_start = -(ROWS - 1) * y_pix / 2.0 + 1.7
        y_shift = y_start - written_y_start
        couch = y_shift + written_y_start - y_pix + (ROWS - 1) * y_pix / 2.0
    name = "ImageSet_0"
    _write(folder / f"{name}.header", _header(case, x_start, written_y_start, z_start, couch))
    # ImageInfo: one item per slice in Pinnacle's order (ascending Pinnacle z), original UIDs kept.
    pin_order = sorted(range(SLICES), key=lambda k: _to_pinnacle(positions[k], o)[2])
    info = ["ImageInfoList ={"]
    for n, k in enumerate(pin_order):
        info += [
            "  ImageInfo ={",
            f"    TablePosition = {_fmt(-zs[k] / 10)};",
            f"    SliceNumber = {n + 1};",
            f'    SeriesUID = "{truth.series_uid}";',
            f'    StudyInstanceUID = "{truth.study_uid}";',
            f'    FrameUID = "{truth.for_uid}";',
            f'    ClassUID = "{SopClass.CT_IMAGE.value}";',
            f'    InstanceUID = "{truth.slice_uids[k]}";',
            "  };",
        ]
    info.append("};")
    _write(folder / f"{name}.ImageInfo", "\n".join(info) + "\n")
    if case.with_img:
        endian = ">" if case.pre9 else "<"
        raw = bytearray()
        for n in range(SLICES):
            zp = z_start + n * SLICE_MM / 10
            for j in range(ROWS):  # row 0 = maximum Pinnacle y
                yp = y_start + (ROWS - 1 - j) * PIXEL_MM / 10
                for i in range(COLS):
                    p = _to_dicom((x_start + i * PIXEL_MM / 10, yp, zp), o)
                    raw += struct.pack(endian + "h", _hu(p, marker) + 1000)
        (folder / f"{name}.img").write_bytes(bytes(raw))
    if case.with_dicom:
        dicom_dir = folder / f"{name}.DICOM"
        dicom_dir.mkdir(exist_ok=True)
        for k in range(SLICES):
            pixels = b"".join(
                struct.pack("<H", _hu(voxel(i, j, zs[k]), marker) + 1024) for j in range(ROWS) for i in range(COLS)
            )
            ds = _ct_dataset(case, truth, k, pixels)
            ds.save_as(dicom_dir / f"{truth.slice_uids[k]}.img", enforce_file_format=True)

    # ROIs: circles (DICOM) on some slices; the second ROI repeats its first point at the end.
    rois = {"PTV": (20.0, -10.0, 30.0, [4, 5, 6, 7]), "Spinal Cord": (0.0, 40.0, 8.0, [2, 3, 4, 5, 6, 7, 8])}
    roi_text = [
        "// Region of Interest file",
        f"// Pinnacle Treatment Planning System Version {case.version}",
        "// \u00e9t\u00e9 r\u00f4le",
    ]
    for roi_name, (cx, cy, radius, slices) in rois.items():
        truth.contours[roi_name] = []
        roi_text += [
            " roi={",
            f"   name: {roi_name}",
            f"   volume_name: {name}",
            "   roiinterpretedtype:  ORGAN" if roi_name != "PTV" else "   roiinterpretedtype:  PTV",
            "   color:  red",
            "   flags =  135168;",
            f"   num_curve = {len(slices)};",
        ]
        for k in slices:
            pts = [
                (cx + radius * math.cos(2 * math.pi * a / 12), cy + radius * math.sin(2 * math.pi * a / 12), zs[k])
                for a in range(12)
            ]
            truth.contours[roi_name].append(pts)
            written = pts + ([pts[0]] if roi_name == "Spinal Cord" else [])
            roi_text += ["   curve={", f"     num_points = {len(written)};", "     points={"]
            roi_text += ["       " + " ".join(_fmt(v) for v in _to_pinnacle(p, o, y_shift)) for p in written]
            roi_text += ["     };", "   }; // End of points"]
        roi_text.append(" }; // End of ROI")
    # POIs: the beams' isocentre is "Iso_RX"; a point called "iso" sits elsewhere (name-lookup trap).
    truth.pois = {"Iso_RX": (20.0, -10.0, zs[5]), "iso": (-50.0, 30.0, zs[2]), "REF": (0.0, 0.0, zs[6])}
    points_text = []
    for poi_name, p in truth.pois.items():
        q = _to_pinnacle(p, o, y_shift)
        points_text += [
            "Poi ={",
            f'  Name = "{poi_name}";',
            f"  XCoord = {_fmt(q[0])};",
            f"  YCoord = {_fmt(q[1])};",
            f"  ZCoord = {_fmt(q[2])};",
            '  CoordSys = "CT";',
            "};",
        ]
    machine = [
        "Machine ={",
        '  Name = "SynthLinac";',
        "  SAD = 100;",
        "  MultiLeaf ={",
        '    LeftBankName = "B";',
        "    LeafPairList ={",
    ]
    for centre, width in LEAF_PAIRS:
        # Pinnacle's own layout: one MLCLeafPair per pair, file order = leaf order, the centre in YCenterPosition.
        machine += [
            "      MLCLeafPair ={",
            f"        YCenterPosition = {_fmt(centre)};",
            "        NegateLeafCoordinate = 0;",
            f"        Width = {_fmt(width)};",
            "        MinTipPosition = -20;",
            "        MaxTipPosition = 20;",
            "      };",
        ]
    machine += ["    };", "  };", "};"]
    ordered = sorted(LEAF_PAIRS)
    truth.leaf_boundaries = [10 * (ordered[0][0] - ordered[0][1] / 2)] + [10 * (c + w / 2) for c, w in ordered]
    setup = {
        "HFS": ("On back (supine)", "Head First Into Scanner"),
        "HFP": ("On front (prone)", "Head First Into Scanner"),
        "FFS": ("On back (supine)", "Feet First Into Scanner"),
        "FFP": ("On front (prone)", "Feet First Into Scanner"),
    }[o]

    plan_entries = []
    for plan_no, trial_names in ((0, ["Trial_1", "Trial 2"]), (1, ["Boost"])):
        plan_folder = folder / f"Plan_{plan_no}"
        plan_folder.mkdir(exist_ok=True)
        _write(plan_folder / "plan.roi", "\n".join(roi_text) + "\n")
        _write(plan_folder / "plan.Points", "\n".join(points_text) + "\n")
        _write(plan_folder / "plan.Pinnacle.Machines", "\n".join(machine) + "\n")
        _write(
            plan_folder / "plan.PatientSetup",
            f'PatientSetup ={{\n  Position = "{setup[0]}";\n  Orientation = "{setup[1]}";\n}};\n',
        )
        _write(plan_folder / "plan.PlanInfo", f'PinnacleVersionDescription = "Pinnacle {case.version}";\n')
        plan_truth = PlanTruth(plan_no, f"Plan {plan_no}", [])
        trial_text: list[str] = []
        xdr = 0
        binaries: dict[int, bytes] = {}
        for t_no, trial_name in enumerate(trial_names):
            # Dose grid in true Pinnacle cm; written shifted for pre-9.0.
            voxel_cm = (0.5, 0.4, 0.3)
            dims = (14 + t_no, 12, 9 + plan_no)
            iso_p = _to_pinnacle(truth.pois["Iso_RX"], o)
            origin_true = (
                round(iso_p[0] - 3.0 + 0.5 * t_no, 3),
                round(iso_p[1] - 2.0, 3),
                round(iso_p[2] - 1.2 + 0.3 * plan_no, 3),
            )
            grid_pts = [
                _to_dicom(
                    (
                        origin_true[0] + a * voxel_cm[0] * (dims[0] - 1),
                        origin_true[1] + b * voxel_cm[1] * (dims[1] - 1),
                        origin_true[2] + c * voxel_cm[2] * (dims[2] - 1),
                    ),
                    o,
                )
                for a in (0, 1)
                for b in (0, 1)
                for c in (0, 1)
            ]
            trial = TrialTruth(
                trial_name,
                [],
                _corner(grid_pts, min),
                _corner(grid_pts, max),
                (10 * voxel_cm[0], 10 * voxel_cm[1], 10 * voxel_cm[2]),
                dims,
            )
            beams_text: list[str] = []
            # A binary attribute that is not a dose comes first, so XDR numbers do not follow beam order.
            fluence = xdr
            binaries[fluence] = b"\x00" * 16
            xdr += 1
            # The Boost trial adds a clockwise dynamic arc (three control points, weights 0.5/0.5/0).
            for b_no in range(3 if plan_no == 1 else 2):
                number = b_no + 1
                arc = b_no == 2
                mu = round(110.0 + 17.5 * b_no + 3.0 * t_no + 5.0 * plan_no, 1)
                of, ttf, rx = 1.02, 0.98, 200.0
                normalized = rx / (mu * of * ttf)
                peak = (20.0 + 10 * b_no, -10.0 - 5 * t_no, zs[5] + 5.0 * b_no)
                peak_gy = 1.0 + 0.25 * b_no + 0.1 * t_no
                gantries = [0.0 + 90 * b_no + 10 * t_no, 0.0 + 90 * b_no + 10 * t_no]
                weights = [0.5, 0.5]
                if arc:
                    gantries, weights = [180.0, 270.0, 0.0], [0.5, 0.5, 0.0]
                cps_text = []
                bt = BeamTruth(
                    f"B{number} {trial_name}", number, truth.pois["Iso_RX"], [], mu, [], [], [], peak, peak_gy
                )
                if arc:
                    bt.beam_type, bt.cp_source, bt.cumulative = "DYNAMIC", [0, 1, 2], [0.0, 0.5, 1.0]
                else:
                    bt.cp_source, bt.cumulative = [0, 0, 1, 1], [0.0, 0.5, 0.5, 1.0]
                for seg in range(len(gantries)):
                    leaves = _mlc(seg, b_no)
                    jaws = (5.0 + seg, 6.0, 4.5, 5.5 - 0.5 * seg)
                    bt.gantry.append(gantries[seg])
                    bt.jaws.append((-10 * jaws[0], 10 * jaws[1], -10 * jaws[3], 10 * jaws[2]))
                    order = sorted(range(len(LEAF_PAIRS)), key=lambda n: LEAF_PAIRS[n][0])
                    bt.bank_a.append([-10 * leaves[n][0] for n in order])
                    bt.bank_b.append([10 * leaves[n][1] for n in order])
                    cps_text += [
                        f"            #{seg} ={{",
                        f"              Gantry = {_fmt(gantries[seg])};",
                        "              Couch = 0;",
                        "              Collimator = 0;",
                        f"              LeftJawPosition = {_fmt(jaws[0])};",
                        f"              RightJawPosition = {_fmt(jaws[1])};",
                        f"              TopJawPosition = {_fmt(jaws[2])};",
                        f"              BottomJawPosition = {_fmt(jaws[3])};",
                        f"              Weight = {_fmt(weights[seg])};",
                        # As Pinnacle writes it, a block outline (its own RawData) comes before the leaves.
                        "              ModifierList ={ BeamModifier ={ Name = \"BeamModifier_1\";",
                        "                ContourList ={ CurvePainter ={ Curve ={ RawData ={",
                        "                  NumberOfDimensions = 2; NumberOfPoints = 4;",
                        "                  Points[] ={ -3,-3, 3,-3, 3,3, -3,3 };",
                        "                }; }; }; };",
                        "              }; };",
                        "              MLCLeafPositions ={ RawData ={ NumberOfDimensions = 2;",
                        f"                NumberOfPoints = {len(leaves)};",
                        "                Points[] ={",
                        "                  " + ",".join(f"{_fmt(left)},{_fmt(right)}" for left, right in leaves),
                        "                };",
                        "              }; };",
                        "            };",
                    ]
                trial.beams.append(bt)
                # The beam's dose binary: value = Gy·100/MU, big-endian float32, X fastest, row 0 = max y.
                dose_index = xdr + 1  # leave a gap: another binary (a DRR) sits between the doses
                binaries[xdr] = b"DRR!"
                xdr += 2
                values = bytearray()
                for c in range(dims[2]):
                    for r in range(dims[1]):
                        for a in range(dims[0]):
                            pin = (
                                origin_true[0] + a * voxel_cm[0],
                                origin_true[1] + (dims[1] - 1 - r) * voxel_cm[1],
                                origin_true[2] + c * voxel_cm[2],
                            )
                            d = _to_dicom(pin, o)
                            dist2 = sum((d[i] - peak[i]) ** 2 for i in range(3))
                            gy = peak_gy * math.exp(-dist2 / (2 * DOSE_SIGMA_MM**2))
                            values += struct.pack(">f", gy * 100.0 / mu)
                binaries[dose_index] = bytes(values)
                beams_text += [
                    "    Beam ={",
                    f'      Name = "{bt.name}";',
                    f"      BeamNumber = {number};",
                    '      IsocenterName = "Iso_RX";',
                    '      PrescriptionName = "PTV Rx";',
                    '      MachineNameAndVersion = "SynthLinac: 2";',
                    '      MachineEnergyName = "6X";',
                    '      Modality = "Photons";',
                    f'      SetBeamType = "{"Dynamic Arc" if arc else "Step & Shoot MLC"}";',
                    "      SSD = 92.5;",
                    f"      DoseVolume = \\XDR:{dose_index}\\;",
                    "      MonitorUnitInfo ={",
                    f"        PrescriptionDose = {_fmt(rx)};",
                    f"        NormalizedDose = {normalized!r};",
                    f"        CollimatorOutputFactor = {_fmt(of)};",
                    f"        TotalTransmissionFraction = {_fmt(ttf)};",
                    "      };",
                    "      CPManager ={",
                    "        CPManagerObject ={",
                    "          ControlPointList ={",
                    *cps_text,
                    "          };",
                    "        };",
                    "      };",
                    "    };",
                ]
            shifted = (origin_true[0], origin_true[1] - y_shift, origin_true[2])
            trial_text += [
                "Trial ={",
                f'  Name = "{trial_name}";  /* binary: \u00ff\u00fe\u0000\u0080 end */',
                f"  FluenceVolume = \\XDR:{fluence}\\;",
                f"  DoseGrid .VoxelSize .X = {_fmt(voxel_cm[0])};",
                f"  DoseGrid .VoxelSize .Y = {_fmt(voxel_cm[1])};",
                f"  DoseGrid .VoxelSize .Z = {_fmt(voxel_cm[2])};",
                f"  DoseGrid .Dimension .X = {dims[0]};",
                f"  DoseGrid .Dimension .Y = {dims[1]};",
                f"  DoseGrid .Dimension .Z = {dims[2]};",
                "  DoseGrid .Origin ={",
                f"    X = {_fmt(shifted[0])};",
                f"    Y = {_fmt(shifted[1])};",
                f"    Z = {_fmt(shifted[2])};",
                "  };",
                "  PrescriptionList ={",
                "    Prescription ={",
                '      Name = "PTV Rx";',
                "      PrescriptionDose = 200;",
                f"      NumberOfFractions = {FRACTIONS};",
                "    };",
                "  };",
                "  BeamList ={",
                *beams_text,
                "  };",
                "};",
            ]
            plan_truth.trials.append(trial)
        _write(plan_folder / "plan.Trial", "\n".join(trial_text) + "\n")
        for index, data in binaries.items():
            (plan_folder / f"plan.Trial.binary.{index:03d}").write_bytes(data)
        truth.plans.append(plan_truth)
        tool = "" if plan_no == 1 else '    ToolType = "Pinnacle^3";\n'  # ToolType may be missing
        plan_entries.append(
            f'  Plan ={{\n    PlanID = {plan_no};\n    PlanName = "Plan {plan_no}";\n{tool}'
            f"    PrimaryCTImageSetID = 0;\n  }};\n"
        )
    patient = (
        f'PatientID = {case.number};\nPatientPath = "Institution_1/Mount_0/Patient_{case.number}";\n'
        f'MedicalRecordNumber = "{case.mrn}";\nLastName = "M\u00fcller";  /* \u00ff\u0001 binary comment */\n'
        'FirstName = "Anna";\nMiddleName = "";\nDateOfBirth = "1950-01-02";\nGender = "Female";\n'
        f'ObjectVersion ={{ WriteVersion = "Pinnacle v{case.version}"; }};\n'
        'ImageSetList ={\n  ImageSet ={\n    ImageSetID = 0;\n    ImageName = "ImageSet_0";\n    Modality = "CT";\n'
        '    SeriesDescription = "Planning CT";\n    ScanTimeFromScanner = "2020-01-02";\n  };\n};\n'
        "PlanList ={\n" + "".join(plan_entries) + "};\n"
    )
    _write(folder / "Patient", patient)
    return truth


#: (orientation, version) → (with ImageSet_N.DICOM, with ImageSet_N.img). The original CT is kept wherever
#: the frame (orientation and pre-9.0 offset) has a mapping worth checking against it: every pre-9.0 case
#: but FFP, and current HFP and FFP. Current HFS and pre-9.0 FFP keep only the .img, so the converter's
#: own rebuilt CT is what the RT objects reference; current FFS keeps neither, so its objects must
#: reference the original CT by ImageInfo's UIDs. The .img is kept beside the DICOM where there is one,
#: so the rebuilt CT can be checked against the same truth in every orientation and version.
CASE_FILES: dict[tuple[str, str], tuple[bool, bool]] = {
    ("HFS", "8.0"): (True, True),
    ("HFS", "16.2"): (False, True),
    ("HFP", "8.0"): (True, True),
    ("HFP", "16.2"): (True, True),
    ("FFS", "8.0"): (True, True),
    ("FFS", "16.2"): (False, False),
    ("FFP", "8.0"): (False, True),
    ("FFP", "16.2"): (True, True),
}


def all_cases() -> list[PinnacleCase]:
    """Four orientations × (pre-9.0, current), with and without ImageSet_N.DICOM and .img (:data:`CASE_FILES`)."""
    return [
        PinnacleCase(orientation, version, with_dicom=dicom, with_img=img, number=number)
        for number, ((orientation, version), (dicom, img)) in enumerate(CASE_FILES.items(), start=1)
    ]


def write_institution(out: Path, cases: list[PinnacleCase], institution: int = 1) -> list[PatientTruth]:
    """``out/Institution_N/Mount_0/Patient_*`` for every case."""
    mount = out / f"Institution_{institution}" / "Mount_0"
    return [write_patient(mount, case) for case in cases]


def write_tar(path: Path, source: Path, members: list[str]) -> Path:
    """A (gzip when the name says so) tar of ``members`` (paths relative to ``source``)."""
    mode = "w:gz" if path.name.endswith((".tar.gz", ".tgz")) else "w"
    with tarfile.open(path, mode) as tar:  # type: ignore[call-overload]
        for member in members:
            tar.add(source / member, arcname=member)
    return path
