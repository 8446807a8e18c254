"""Pinnacle coordinates (cm) to DICOM patient coordinates (mm), per patient orientation.

Pinnacle keeps x to the patient's left and y anterior *as seen on the image*, whatever the orientation;
DICOM axes follow the patient. The mapping is a sign flip per axis (docs/converters-pinnacle.md, checked against the
original CT in tests)::

    HFS (10x, −10y, −10z)   HFP (−10x, 10y, −10z)   FFS (−10x, −10y, 10z)   FFP (10x, 10y, 10z)

CT slices sit at DICOM z = −10 × TablePosition (ImageInfo), in every orientation.

Pre-9.0 data: Pinnacle before 9.0 kept its own y origin (the image centred on it, the DICOM position
given by the couch height), so its whole frame (image header, contours, POIs, isocentres, dose grid: a
planner drew the contours on that image, they stay aligned with it) sits ``offset`` below the DICOM one:
the true Pinnacle y is ``y + offset`` with ``offset = −y_start + couch_height + y_pixdim − (y_dim − 1)·y_pixdim/2``
(header values, cm). The offset lives in Pinnacle's frame, so it is added *before* the orientation's sign
flip; for HFS this gives the documented ``y_DICOM = −10y − 10·offset``, and it puts the image centre at
DICOM y = −10·(couch_height + y_pixdim) (sign per orientation). When the original CT is in the archive,
:func:`frame_mismatch` checks the result against it.

Image and dose voxels are stored with X fastest and row 0 at the maximum Pinnacle y, so the DICOM row
direction is ``(sx, 0, 0)`` and the column direction ``(0, −sy, 0)``.
"""

from __future__ import annotations

from dataclasses import dataclass

from .models import ImageHeader, Orientation, Point, Version

#: Sign of each axis from Pinnacle (cm) to DICOM (mm), per orientation.
SIGNS: dict[Orientation, tuple[int, int, int]] = {
    Orientation.HFS: (1, -1, -1),
    Orientation.HFP: (-1, 1, -1),
    Orientation.FFS: (-1, -1, 1),
    Orientation.FFP: (1, 1, 1),
}


def pre9_y_offset(header: ImageHeader) -> float:
    """The pre-9.0 y offset (cm) of plan coordinates, from the primary image set's header."""
    return -header.y_start + header.couch_height + header.y_pixdim - (header.y_dim - 1) * header.y_pixdim / 2.0


@dataclass(frozen=True)
class Frame:
    """How one plan's coordinates map to DICOM: orientation and the y offset (0 from 9.0 on)."""

    orientation: Orientation
    y_offset: float = 0.0

    @classmethod
    def for_plan(cls, orientation: Orientation, version: Version, header: ImageHeader) -> Frame:
        """The frame of a plan written by ``version`` on the image set with ``header``."""
        return cls(orientation, pre9_y_offset(header) if version.pre_9 else 0.0)

    @property
    def signs(self) -> tuple[int, int, int]:
        """Axis signs of the orientation."""
        return SIGNS[self.orientation]

    def point(self, p: Point) -> Point:
        """A Pinnacle point (voxel centre, contour point, POI, isocentre, dose voxel), cm → DICOM mm."""
        sx, sy, sz = self.signs
        return (10.0 * sx * p[0], 10.0 * sy * (p[1] + self.y_offset), 10.0 * sz * p[2])

    def first_voxel(self, header: ImageHeader, z_pinn: float) -> Point:
        """DICOM position of the first stored voxel (x_start, maximum y) of the slice at Pinnacle ``z_pinn``."""
        return self.point((header.x_start, header.y_start + (header.y_dim - 1) * header.y_pixdim, z_pinn))

    def orientation_cosines(self) -> list[float]:
        """ImageOrientationPatient of Pinnacle's voxel layout (X fastest, row 0 at maximum y)."""
        sx, sy, _ = self.signs
        return [float(sx), 0.0, 0.0, 0.0, float(-sy), 0.0]

    def normal_z(self) -> int:
        """z component of the slice normal (row × column direction) of :meth:`orientation_cosines`."""
        sx, sy, _ = self.signs
        return -sx * sy


def slice_z(table_position: float) -> float:
    """DICOM z (mm) of a CT slice from its ImageInfo TablePosition (cm)."""
    return -10.0 * table_position


def frame_mismatch(frame: Frame, header: ImageHeader, original_ipp: Point) -> float:
    """Distance (mm, in x and y) between where ``frame`` puts the image and an original slice's IPP.

    Both describe the first stored voxel of a slice, so a correct orientation and pre-9.0 offset give 0
    (z is left out: it comes from TablePosition, not from this mapping).
    """
    mapped = frame.first_voxel(header, 0.0)
    return float(((mapped[0] - original_ipp[0]) ** 2 + (mapped[1] - original_ipp[1]) ** 2) ** 0.5)
