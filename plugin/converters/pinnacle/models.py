"""Typed model of one Pinnacle patient, as read from its files (all lengths in Pinnacle's cm).

Coordinates here are Pinnacle's own: (x, y, z) in cm, y anterior for a supine patient, before any
orientation mapping or pre-9.0 correction (see :mod:`.coords`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from .errors import PinnacleError

Point = tuple[float, float, float]


class Orientation(Enum):
    """Patient position on the couch, as DICOM PatientPosition."""

    HFS = "HFS"
    HFP = "HFP"
    FFS = "FFS"
    FFP = "FFP"


@dataclass(frozen=True)
class Version:
    """Pinnacle version that wrote the files (major, minor); ``known`` is False when no file said."""

    major: int
    minor: int = 0
    known: bool = True

    @property
    def pre_9(self) -> bool:
        """Data written before Pinnacle 9.0 carry the y offset of :func:`.coords.pre9_y_offset`."""
        return self.known and self.major < 9

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}" if self.known else "unknown"


@dataclass(frozen=True)
class ImageHeader:
    """``ImageSet_N.header``: volume size, voxel size and first voxel (cm), byte order, position."""

    x_dim: int
    y_dim: int
    z_dim: int
    x_pixdim: float
    y_pixdim: float
    z_pixdim: float
    x_start: float
    y_start: float
    z_start: float
    byte_order: int
    patient_position: Orientation | None
    couch_height: float
    bytes_pix: int = 2
    manufacturer: str = ""
    model: str = ""
    scan_date: str = ""


@dataclass(frozen=True)
class SliceInfo:
    """One ``ImageInfo`` item: the slice's table position (cm) and the original CT's UIDs."""

    table_position: float
    slice_number: int
    series_uid: str
    study_uid: str
    frame_uid: str
    class_uid: str
    instance_uid: str


@dataclass
class ImageSet:
    """``ImageSet_N``: header, slice list, and which pixel sources exist."""

    number: int
    name: str
    modality: str
    description: str
    header: ImageHeader
    slices: list[SliceInfo]
    dicom_dir: Path | None
    img_path: Path | None
    scan_date: str = ""

    def uid(self, attribute: str) -> str:
        """A UID the original CT had (``series_uid``, ``study_uid``, ``frame_uid``), if ImageInfo kept it."""
        for item in self.slices:
            value = getattr(item, attribute)
            if value:
                return str(value)
        return ""


@dataclass(frozen=True)
class Poi:
    """A point of interest of ``plan.Points`` (cm)."""

    name: str
    point: Point


@dataclass(frozen=True)
class Curve:
    """One closed planar contour (cm), as written (a duplicated closing point may be present)."""

    points: tuple[Point, ...]


@dataclass(frozen=True)
class Roi:
    """One ``roi={...}`` of ``plan.roi``."""

    name: str
    interpreted_type: str
    color: str
    volume_name: str
    curves: tuple[Curve, ...]


@dataclass(frozen=True)
class LeafPair:
    """One MLC leaf pair of the machine file: centre and width across the leaves (cm at isocentre)."""

    y_centre: float
    width: float


@dataclass(frozen=True)
class Machine:
    """``plan.Pinnacle.Machines`` entry: name, SAD (cm) and MLC leaf geometry in file order."""

    name: str
    sad: float
    leaf_pairs: tuple[LeafPair, ...]

    def boundaries_mm(self) -> list[float]:
        """DICOM LeafPositionBoundaries (mm, ascending): the leaf edges of the pairs sorted by centre."""
        pairs = sorted(self.leaf_pairs, key=lambda p: p.y_centre)
        edges = [10.0 * (pairs[0].y_centre - pairs[0].width / 2)]
        edges += [10.0 * (p.y_centre + p.width / 2) for p in pairs]
        return edges

    def pair_order(self) -> list[int]:
        """Indexes into :attr:`leaf_pairs` in ascending y: DICOM lists leaf pairs from −Y to +Y."""
        return sorted(range(len(self.leaf_pairs)), key=lambda i: self.leaf_pairs[i].y_centre)


@dataclass(frozen=True)
class ControlPoint:
    """One Pinnacle control point: angles (degrees), jaws (cm from the axis), leaves (cm), weight."""

    gantry: float
    collimator: float
    couch: float
    left_jaw: float
    right_jaw: float
    top_jaw: float
    bottom_jaw: float
    #: MLC positions per leaf pair in the machine's order: (left bank, right bank), both as Pinnacle
    #: writes them: the left value is a distance towards −X (DICOM bank A = −10·left).
    leaves: tuple[tuple[float, float], ...]
    weight: float


@dataclass(frozen=True)
class MonitorUnitInfo:
    """The beam's MU equation inputs (Pinnacle ``MonitorUnitInfo``)."""

    prescription_dose: float  # cGy per fraction at the normalisation point
    normalized_dose: float  # cGy per MU
    collimator_output_factor: float
    total_transmission_fraction: float

    @property
    def mu(self) -> float:
        """MU per fraction = prescription dose / (dose per MU × output factor × transmission).

        This is the MU Pinnacle itself displays; tools that take ``NormalizedDose`` alone disagree by the
        output factor and transmission, so all four factors are applied.
        """
        denominator = self.normalized_dose * self.collimator_output_factor * self.total_transmission_fraction
        return self.prescription_dose / denominator if denominator > 0 else 0.0


@dataclass(frozen=True)
class Beam:
    """One beam of a trial."""

    name: str
    number: int
    isocenter_name: str
    prescription_name: str
    machine_name: str
    energy: float
    modality: str  # PHOTON / ELECTRON
    beam_type: str  # STATIC / DYNAMIC
    ssd: float | None
    dose_volume: int | None  # XDR index of the beam's dose grid
    mu_info: MonitorUnitInfo
    control_points: tuple[ControlPoint, ...]
    gantry_ccw: bool = False
    line: int = 0  # of ``Beam ={`` in plan.Trial (0: unknown), for errors found while writing
    applicator: str = ""  # ElectronApplicatorName of an electron beam ("" for photons or "None")


@dataclass(frozen=True)
class Prescription:
    """A prescription of the trial: dose per fraction (cGy) and number of fractions."""

    name: str
    dose_per_fraction: float
    fractions: int


@dataclass(frozen=True)
class DoseGrid:
    """Trial dose grid: voxel size, dimensions and origin (centre of the first voxel, cm)."""

    voxel: Point
    dims: tuple[int, int, int]
    origin: Point


@dataclass
class Trial:
    """One ``Trial ={...}`` of ``plan.Trial``."""

    name: str
    dose_grid: DoseGrid
    prescriptions: list[Prescription]
    beams: list[Beam]


@dataclass
class Plan:
    """``Plan_N``: its trials, ROIs, POIs, machines and the image set it was planned on."""

    number: int
    name: str
    primary_image_set: int
    tool_type: str
    folder: Path
    trials: list[Trial]
    rois: list[Roi]
    pois: list[Poi]
    machines: dict[str, Machine]
    version: Version
    setup_position: Orientation | None = None
    #: Why ``plan.Trial`` or ``plan.Pinnacle.Machines`` could not be read (``trials`` is then empty): the
    #: plan's structure set and points are still written, its RTPLANs and doses are not.
    trial_error: PinnacleError | None = None

    def binary(self, index: int) -> Path:
        """The file of binary attribute ``index`` (``plan.Trial.binary.NNN``; unpadded names are accepted)."""
        padded = self.folder / f"plan.Trial.binary.{index:03d}"
        plain = self.folder / f"plan.Trial.binary.{index}"
        return plain if not padded.exists() and plain.exists() else padded


@dataclass
class Patient:
    """One ``Patient_N`` folder."""

    folder: Path
    internal_id: str
    mrn: str
    last_name: str
    first_name: str
    middle_name: str
    birth_date: str
    sex: str
    image_sets: dict[int, ImageSet]
    plans: list[Plan]
    version: Version = field(default_factory=lambda: Version(0, 0, known=False))
    #: Image sets and plans that could not be read (each names its file); the others still convert.
    problems: list[PinnacleError] = field(default_factory=list)

    @property
    def dicom_name(self) -> str:
        """PatientName as DICOM PN (``Last^First^Middle``)."""
        parts = [
            "".join(c for c in part if c not in "\\^=" and ord(c) >= 32).strip()[:64]
            for part in (self.last_name, self.first_name, self.middle_name)
        ]
        return "^".join(parts).rstrip("^")
