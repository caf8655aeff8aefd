"""Preprocessing shared by every stage: canonical orientation, 1 mm resampling, HU windows.

**Model space** (what the networks see; same as MONAI ``Orientationd(axcodes="RAS")`` +
``Spacingd(1 mm)`` in the official pipeline): array layout **(X, Y, Z)**, index X increasing toward
the patient's right, Y anterior, Z superior, 1 mm voxels.

``sitk.DICOMOrient(image, code)`` names, per index axis, the direction the axis points *to*:
``"LPS"`` gives the identity direction, ``"RAS"`` gives diag(-1, -1, 1) (checked in
``tests/backend/test_preprocess.py``). So model space is ``DICOMOrient(image, "RAS")`` whose
(z, y, x) numpy array is transposed to (x, y, z). Orientation only permutes/flips axes, like
MONAI's ``Orientation``; the residual rotation of an oblique scan is kept in the model-space
geometry (again like MONAI), so voxels are never interpolated just to straighten the grid.

**Resampling** uses SimpleITK (linear for images, nearest neighbour for labels). The 1 mm grid
keeps the first voxel *centre* of the oriented image and extends (whole 1 mm steps) into the outer
half source voxel, so the whole field of view is covered; points beyond the source take the nearest
source voxel (never a fill value). Whenever the source spacing is a whole multiple of 1 mm (e.g. the
usual 1, 2, 3, 5 mm slices), every source voxel centre is also a model voxel centre and going back
is exact up to float32 rounding; otherwise it is a second linear interpolation. Labels come back exactly
whenever the source spacing is >= the model spacing (no label is lost by upsampling). Data that is already
at the target spacing is only re-oriented (no interpolation at all, exact both ways); :func:`reorient_only` forces that.

**HU windows**: [-175, 250] HU -> [-1, 1] (autoencoder/diffusion) or [0, 1] (segmentation).
Values outside the window are clipped, so :func:`unit_to_hu` inverts :func:`hu_to_unit` exactly
(up to float32 rounding; rounding to whole HU gives back the integer) only *inside* the window.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from backend.io import Geometry, Volume

HU_MIN, HU_MAX = -175.0, 250.0
UnitRange = Literal["[-1,1]", "[0,1]"]
UNIT_RANGES: tuple[str, ...] = ("[-1,1]", "[0,1]")
MODEL_ORIENTATION = "RAS"  # DICOMOrient code of model space: direction diag(-1, -1, 1)
MODEL_SPACING = (1.0, 1.0, 1.0)


@dataclass
class ModelSpaceVolume:
    """An array in model space plus what is needed to put results back on the source grid."""

    array: np.ndarray  # (X, Y, Z): float32 image or integer label map
    geometry: Geometry  # model-space grid, SimpleITK (x, y, z) order
    source_geometry: Geometry  # the original file-space grid
    source_dtype: str  # dtype of the original array
    is_label: bool
    resampled: bool  # False: pure axis permutation/flip (exactly invertible)

    def to_volume(self) -> Volume:
        """The model-space data as a file-space style Volume ((z, y, x) array), e.g. to save it."""
        return Volume(np.ascontiguousarray(self.array.transpose(2, 1, 0)), self.geometry)


# ------------------------------------------------------------------------------------ orientation
def orientation_code(geometry: Geometry) -> str:
    """The 3-letter DICOMOrient code of a grid ("LPS" for identity, "RAS" for diag(-1,-1,1))."""
    import SimpleITK as sitk

    return sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(geometry.direction)


def _label_dtype(array: np.ndarray) -> np.dtype:
    if array.dtype == np.bool_ or (array.size and array.min() >= 0 and array.max() <= 255):
        return np.dtype(np.uint8)
    return np.dtype(np.int32)


def _to_sitk(volume: Volume, is_label: bool):
    import SimpleITK as sitk

    arr = volume.array
    arr = arr.astype(_label_dtype(arr)) if is_label else arr.astype(np.float32, copy=False)
    return volume.geometry.apply_to(sitk.GetImageFromArray(np.ascontiguousarray(arr)))


def _model_grid(image, spacing: tuple[float, float, float]) -> Geometry:
    """Grid at ``spacing`` sharing the first voxel centre and direction of ``image``.

    It reaches at least the last source centre and extends by whole steps into the outer half
    source voxel on both sides, so the source field of view is covered.
    """
    src_sp = np.asarray(image.GetSpacing())
    size = np.asarray(image.GetSize())
    new_sp = np.asarray(spacing, dtype=np.float64)
    pad = np.floor(0.5 * src_sp / new_sp + 1e-6)
    n = np.ceil((size - 1) * src_sp / new_sp - 1e-6) + 1 + 2 * pad
    d = np.asarray(image.GetDirection()).reshape(3, 3)
    origin = np.asarray(image.GetOrigin()) - d @ (pad * new_sp)
    return Geometry(tuple(int(v) for v in n), tuple(new_sp), tuple(origin), image.GetDirection())


def _resample(image, grid: Geometry, is_label: bool):
    """Resample onto ``grid``; points beyond the source take the nearest source voxel (no fill value)."""
    import SimpleITK as sitk

    return sitk.Resample(
        image,
        list(grid.size),
        sitk.Transform(),
        sitk.sitkNearestNeighbor if is_label else sitk.sitkLinear,
        grid.origin,
        grid.spacing,
        grid.direction,
        0.0,
        image.GetPixelID(),
        True,  # useNearestNeighborExtrapolator
    )


def to_model_space(
    volume: Volume,
    *,
    spacing: tuple[float, float, float] | None = MODEL_SPACING,
    is_label: bool = False,
) -> ModelSpaceVolume:
    """File space -> model space: orient to RAS, resample to ``spacing`` (None: orientation only).

    Images come out float32 (HU unchanged; use :func:`hu_to_unit` for the network range), labels
    as uint8 (int32 if ids exceed 255). Resampling is skipped when the spacing already matches.
    """
    import SimpleITK as sitk

    image = sitk.DICOMOrient(_to_sitk(volume, is_label), MODEL_ORIENTATION)
    resampled = spacing is not None and not np.allclose(image.GetSpacing(), spacing, rtol=1e-6, atol=1e-5)
    if resampled:
        grid = _model_grid(image, tuple(float(s) for s in spacing))
        image = _resample(image, grid, is_label)
    array = sitk.GetArrayFromImage(image).transpose(2, 1, 0)  # (z, y, x) -> (X, Y, Z)
    return ModelSpaceVolume(
        array=np.ascontiguousarray(array),
        geometry=Geometry.from_image(image),
        source_geometry=volume.geometry,
        source_dtype=str(volume.array.dtype),
        is_label=is_label,
        resampled=bool(resampled),
    )


def reorient_only(volume: Volume, *, is_label: bool = False) -> ModelSpaceVolume:
    """Orientation to model space without resampling (for data already at 1 mm); exactly invertible."""
    return to_model_space(volume, spacing=None, is_label=is_label)


def from_model_space(
    array: np.ndarray,
    ref: ModelSpaceVolume,
    *,
    is_label: bool | None = None,
    dtype: np.dtype | str | None = None,
) -> np.ndarray:
    """Model-space (X, Y, Z) array -> (z, y, x) array on ``ref``'s original grid and orientation.

    Images are interpolated linearly, labels (default: ``ref.is_label``) by nearest neighbour.
    ``dtype``: output type; integer types are rounded and clipped to their range. Default:
    float32 for images, the source dtype for labels.
    """
    import SimpleITK as sitk

    array = np.asarray(array)
    if array.shape != ref.array.shape:
        raise ValueError(f"model-space array has shape {array.shape}, expected {ref.array.shape} (X, Y, Z)")
    is_label = ref.is_label if is_label is None else is_label
    arr = array.astype(_label_dtype(array)) if is_label else array.astype(np.float32, copy=False)
    image = ref.geometry.apply_to(sitk.GetImageFromArray(np.ascontiguousarray(arr.transpose(2, 1, 0))))
    src = ref.source_geometry
    if ref.resampled:
        image = _resample(image, src, is_label)
    else:
        image = sitk.DICOMOrient(image, orientation_code(src))
    out = sitk.GetArrayFromImage(image)
    if out.shape != src.shape:  # pragma: no cover - would be a bug in the orientation bookkeeping
        raise RuntimeError(f"inverse orientation produced {out.shape}, expected {src.shape}")

    if dtype is None:
        dtype = ref.source_dtype if is_label else np.float32
    dtype = np.dtype(dtype)
    if np.issubdtype(dtype, np.integer) and not np.issubdtype(out.dtype, np.integer):
        info = np.iinfo(dtype)
        out = np.clip(np.rint(out), info.min, info.max)
    return out.astype(dtype, copy=False)


# ------------------------------------------------------------------------------------ HU windows
def _check_range(range: str) -> None:
    if range not in UNIT_RANGES:
        raise ValueError(f"unknown intensity range {range!r}; choose one of {', '.join(UNIT_RANGES)}")


def _clip(x, lo: float, hi: float):
    return x.clip(lo, hi) if hasattr(x, "clip") and not isinstance(x, np.ndarray) else np.clip(x, lo, hi)


def _as_float(x):
    if isinstance(x, (np.ndarray, np.generic, int, float, list, tuple)):
        return np.asarray(x, dtype=np.float64)  # numpy: computed in float64, returned as float32
    return x.float() if hasattr(x, "float") else x  # torch tensor


def _as_output(u):
    return u.astype(np.float32) if isinstance(u, np.ndarray) else u


def hu_to_unit(hu, range: UnitRange = "[-1,1]", *, window: tuple[float, float] = (HU_MIN, HU_MAX)):
    """Clip HU to ``window`` ([-175, 250] unless a config sets another) and map it linearly to [-1, 1]
    (autoencoder, diffusion) or [0, 1] (segmentation). numpy in -> float32 out (computed in float64);
    a torch tensor stays a tensor of its float dtype. The one HU window of the project: the synthesis
    engine, the trainers and segmentation inference all call it."""
    _check_range(range)
    lo, hi = float(window[0]), float(window[1])
    u = (_clip(_as_float(hu), lo, hi) - lo) / (hi - lo)
    return _as_output(u * 2.0 - 1.0 if range == "[-1,1]" else u)


def unit_to_hu(unit, range: UnitRange = "[-1,1]", *, window: tuple[float, float] = (HU_MIN, HU_MAX)):
    """Inverse of :func:`hu_to_unit`: [-1, 1] or [0, 1] (clipped) -> HU in ``window``."""
    _check_range(range)
    lo, hi = float(window[0]), float(window[1])
    u = _as_float(unit)
    u = _clip((u + 1.0) * 0.5, 0.0, 1.0) if range == "[-1,1]" else _clip(u, 0.0, 1.0)
    return _as_output(u * (hi - lo) + lo)
