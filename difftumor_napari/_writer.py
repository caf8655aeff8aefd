"""npe2 writers: image and labels layers -> NIfTI (or NRRD/MHA) in the ORIGINAL geometry and orientation.

A layer opened by :mod:`difftumor_napari._reader` carries ``metadata["difftumor"]`` with the file's
geometry and the LPS reorientation; the writer undoes the reorientation and writes with that
geometry (atomically, through :func:`backend.io.write_image`). A layer made in napari (e.g. a new
Labels layer) has no such record: it is written on the LPS grid given by its ``scale`` and
``translate`` - the same grid the reader displays. CT stays int16 and labels stay integer.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from backend.io import Geometry

SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")  # single-file formats: written atomically


def write_image(path: str, data: Any, meta: dict) -> list[str]:
    """npe2 single-layer writer for image layers."""
    return [str(write_layer(path, data, meta, labels=False))]


def write_labels(path: str, data: Any, meta: dict) -> list[str]:
    """npe2 single-layer writer for labels layers."""
    return [str(write_layer(path, data, meta, labels=True))]


def write_layer(path, data, meta: dict, *, labels: bool) -> Path:
    """Undo the display reorientation and write ``data`` with the original geometry.

    Raises :class:`backend.errors.DiffTumorError` (one line naming the file) for data that does not
    fit the recorded grid, a non-3D layer, or a non-integer labels layer.
    """
    from backend.io import write_image

    target = Path(path)
    if not target.name.lower().endswith(SUFFIXES):
        target = target.with_name(target.name + ".nii.gz")
    array, geometry = layer_volume(data, meta, labels=labels, target=target)
    return write_image(array, target, geometry)


def layer_volume(data, meta: dict, *, labels: bool, target) -> tuple[np.ndarray, Geometry]:
    """A layer's data as (array, geometry) of its original file: display reorientation undone, dtype restored
    (see :func:`write_layer`; ``target`` names the file in errors)."""
    from backend.errors import DiffTumorError
    from backend.io import Geometry

    target = Path(target)
    array = np.asarray(data)
    name = meta.get("name", "layer")
    if array.ndim != 3:
        raise DiffTumorError(f"{target}: layer '{name}' is {array.ndim}D {array.shape}; only 3D volumes can be saved")
    info = (meta.get("metadata") or {}).get("difftumor")
    if info and "geometry" in info:
        from difftumor_napari._reader import from_display

        geometry = Geometry.from_dict(info["geometry"])
        shown = Geometry.from_dict(info["display_geometry"])
        if tuple(array.shape) != shown.shape:
            raise DiffTumorError(
                f"{target}: layer '{name}' has shape {array.shape} but its recorded grid is {shown.shape}; "
                "cannot restore the original geometry"
            )
        array = from_display(array, info["axes"], info["flip"])
        dtype = np.dtype(info.get("dtype", array.dtype))
    else:
        scale = tuple(float(s) for s in meta.get("scale", (1.0, 1.0, 1.0)))
        translate = tuple(float(t) for t in meta.get("translate", (0.0, 0.0, 0.0)))
        geometry = Geometry(array.shape[::-1], scale[::-1], translate[::-1])
        dtype = array.dtype
    array = _as_dtype(array, dtype, labels=labels, target=target, name=name)
    return np.ascontiguousarray(array), geometry


def _as_dtype(array: np.ndarray, dtype: np.dtype, *, labels: bool, target: Path, name: str) -> np.ndarray:
    """Back to the file's dtype when the values fit exactly; labels must be whole numbers."""
    from backend.errors import DiffTumorError

    if array.dtype == np.bool_:
        array = array.astype(np.uint8)
    if labels and not np.issubdtype(array.dtype, np.integer):
        if not np.array_equal(array, np.round(array)):
            raise DiffTumorError(f"{target}: labels layer '{name}' holds non-integer values")
        array = array.astype(np.int32)
    if labels and not np.issubdtype(dtype, np.integer):
        dtype = np.dtype(np.uint8) if array.min() >= 0 and array.max() <= 255 else np.dtype(np.int32)
    if array.dtype == dtype:
        return array
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        if array.size and (array.min() < info.min or array.max() > info.max):
            return array if np.issubdtype(array.dtype, np.integer) else array.astype(np.float32)
        if not np.issubdtype(array.dtype, np.integer):
            rounded = np.round(array)
            if not np.array_equal(rounded, array):
                return array.astype(np.float32)  # edited intensities that are not whole HU: keep them
            array = rounded
    return array.astype(dtype)
