"""npe2 reader: CT and label volumes (NIfTI, NRRD, MHA/MHD, DICOM series folders) as napari layers.

Each volume is re-oriented to LPS for display (numpy axes (z, y, x) pointing to superior, posterior
and the patient's left), so an axial slice shows anterior at the top and the patient's left on the
screen's right. ``scale`` is the spacing and ``translate`` the origin of that LPS grid (both
reversed to (z, y, x)), so layers of one scan overlay in millimetres. ``metadata["difftumor"]``
keeps the original geometry and the reorientation (``axes``, ``flip``) so that
:mod:`difftumor_napari._writer` restores the file exactly.

Integer volumes with a handful of non-negative values (or a file name saying seg/label/mask) open
as Labels layers; TotalSegmentator and MSD label ids are named in the layer's ``features``
(shown in the status bar) and in ``metadata["difftumor"]["label_names"]``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from backend.io import Geometry, Volume

SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".dcm")
LABEL_NAME_HINTS = ("seg", "label", "mask", "organ", "annot")
MAX_LABELS = 256  # more distinct values than this -> an image, not a label map
ABDOMEN_WINDOW = (400.0, 50.0)  # W, L in HU

LayerData = tuple  # (data, kwargs, layer_type)


# ---------------------------------------------------------------------------------------------
# npe2 entry point
# ---------------------------------------------------------------------------------------------
def get_reader(path: str | Sequence[str]) -> Callable[[Any], list[LayerData]] | None:
    """Return :func:`read_layers` when every path looks like ours (by name only), else None."""
    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    if not paths or not all(_is_ours(p) for p in paths):
        return None
    return read_layers


def _is_ours(path) -> bool:
    p = Path(path)
    if p.is_dir():
        return _looks_like_dicom_folder(p)
    return p.name.lower().endswith(SUFFIXES)


def _looks_like_dicom_folder(folder: Path) -> bool:
    """A folder with a .dcm file or a file carrying the DICOM preamble ('DICM' at byte 128)."""
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)[:64]
    except OSError:
        return False
    for entry in entries:
        if not entry.is_file():
            continue
        if entry.name.lower().endswith(".dcm"):
            return True
        try:
            with open(entry.path, "rb") as fh:
                fh.seek(128)
                if fh.read(4) == b"DICM":
                    return True
        except OSError:
            continue
    return False


def read_layers(path: str | Sequence[str]) -> list[LayerData]:
    """Read each path into a layer; a file we cannot read gives one error notification, no layer."""
    from backend.errors import DiffTumorError

    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    layers: list[LayerData] = []
    for p in paths:
        try:
            layers.append(read_layer_data(p))
        except DiffTumorError as exc:
            from napari.utils.notifications import show_error

            show_error(str(exc))
    return layers or [(None,)]  # napari's "nothing to add" sentinel: no second, generic error


def read_layer_data(path, *, kind: str | None = None) -> LayerData:
    """One file (or DICOM folder) -> napari LayerData; raises DiffTumorError naming the file."""
    from backend.io import read_image

    p = Path(path)
    if p.is_file() and p.name.lower().endswith(".dcm"):
        p = p.parent  # a slice of a series: read the whole series
    volume = read_image(p)
    if kind is None:
        kind = "labels" if looks_like_labels(volume.array, p.name) else "ct"
    return volume_to_layer_data(volume, kind=kind, name=layer_name(p))


def layer_name(path: Path) -> str:
    name = path.name
    for suffix in SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def looks_like_labels(array: np.ndarray, name: str = "") -> bool:
    """Integer, non-negative, and few distinct values (or a seg/label/mask file name)."""
    if array.dtype == np.bool_:
        return True
    if not np.issubdtype(array.dtype, np.integer) or array.size == 0:
        return False
    low, high = int(array.min()), int(array.max())
    if low < 0:
        return False
    if any(h in name.lower() for h in LABEL_NAME_HINTS):
        return True
    if high >= 1 << 16:
        return False
    return int(np.count_nonzero(np.bincount(array.ravel()))) <= MAX_LABELS


# ---------------------------------------------------------------------------------------------
# orientation: file grid <-> LPS display grid
# ---------------------------------------------------------------------------------------------
def lps_reorientation(geometry: Geometry) -> tuple[tuple[int, int, int], tuple[int, ...]]:
    """numpy ``axes`` (for ``transpose``) and axes to ``flip`` afterwards that bring a (z, y, x)
    array onto the nearest LPS grid. Oblique directions go to the closest axis permutation."""
    d = geometry.direction_matrix  # column j: world direction of index axis j (x, y, z)
    world_of_index = [int(np.argmax(np.abs(d[:, j]))) for j in range(3)]
    if sorted(world_of_index) != [0, 1, 2]:  # degenerate: keep the file's axes
        world_of_index = [0, 1, 2]
    index_of_world = {w: j for j, w in enumerate(world_of_index)}
    # numpy axis p holds index axis 2 - p; the new numpy axis p must hold world axis 2 - p
    axes = tuple(2 - index_of_world[2 - p] for p in range(3))
    flip = tuple(p for p in range(3) if d[2 - p, index_of_world[2 - p]] < 0)
    return axes, flip


def to_display(array: np.ndarray, axes: Sequence[int], flip: Sequence[int]) -> np.ndarray:
    out = np.transpose(array, axes)
    return np.flip(out, tuple(flip)) if flip else out


def from_display(array: np.ndarray, axes: Sequence[int], flip: Sequence[int]) -> np.ndarray:
    out = np.flip(array, tuple(flip)) if flip else array
    return np.transpose(out, np.argsort(axes))


def display_geometry(geometry: Geometry, axes: Sequence[int], flip: Sequence[int]) -> Geometry:
    """The geometry of the re-oriented array (origin = world position of its first voxel)."""
    from backend.io import Geometry

    d = geometry.direction_matrix
    # new index axis k (x, y, z order) = numpy axis 2 - k = old numpy axis axes[2 - k] = old index 2 - axes[2 - k]
    old_index = [2 - axes[2 - k] for k in range(3)]
    flipped = [(2 - k) in flip for k in range(3)]
    spacing = [geometry.spacing[j] for j in old_index]
    size = [geometry.size[j] for j in old_index]
    cols = [d[:, j] * (-1.0 if f else 1.0) for j, f in zip(old_index, flipped)]
    origin = np.asarray(geometry.origin, dtype=np.float64)
    for j, f in zip(old_index, flipped):
        if f:
            origin = origin + d[:, j] * geometry.spacing[j] * (geometry.size[j] - 1)
    direction = np.stack(cols, axis=1)
    return Geometry(tuple(size), tuple(spacing), tuple(origin), tuple(direction.ravel()))


# ---------------------------------------------------------------------------------------------
# Volume -> layer data
# ---------------------------------------------------------------------------------------------
def label_names(array: np.ndarray) -> dict[int, str]:
    """Names of the label ids present: TotalSegmentator v2 or MSD (organ/tumor) vocabulary."""
    from backend.organs import MSD_LABELS, TOTALSEG_IDS, detect_convention
    from backend.phantom import PHANTOM_LABELS  # TotalSegmentator v2 names of the phantom's ids

    values = [int(v) for v in np.flatnonzero(np.bincount(np.asarray(array).ravel().astype(np.int64)))]
    if detect_convention(array) == "msd":
        vocab = dict(MSD_LABELS)
    else:
        vocab = {**PHANTOM_LABELS, **{v: k for k, v in TOTALSEG_IDS.items()}}
    return {v: vocab.get(v, f"label {v}") for v in values if v != 0}


def volume_to_layer_data(volume: Volume, *, kind: str = "ct", name: str | None = None) -> LayerData:
    """A :class:`backend.io.Volume` -> (data, kwargs, 'image'|'labels') in LPS display order."""
    from napari.utils.notifications import show_warning

    if kind not in ("ct", "labels"):
        raise ValueError(f"kind must be 'ct' or 'labels', got {kind!r}")
    axes, flip = lps_reorientation(volume.geometry)
    data = to_display(volume.array, axes, flip)
    shown = display_geometry(volume.geometry, axes, flip)
    if not np.allclose(shown.direction_matrix, np.eye(3), atol=1e-3):
        show_warning(f"{volume.name}: oblique direction; displayed on the nearest axis-aligned grid")
    meta = {
        "kind": kind,
        "source": str(volume.path) if volume.path is not None else None,
        "geometry": volume.geometry.to_dict(),
        "display_geometry": shown.to_dict(),
        "axes": list(axes),
        "flip": list(flip),
        "dtype": str(volume.dtype),
    }
    kwargs: dict[str, Any] = {
        "name": name or (Path(volume.path).name if volume.path else kind),
        "scale": tuple(shown.spacing[::-1]),
        "translate": tuple(shown.origin[::-1]),
        "metadata": {"difftumor": meta},
    }
    if kind == "labels":
        if data.dtype == np.bool_:
            data = data.astype(np.uint8)
        names = label_names(data)
        meta["label_names"] = {str(k): v for k, v in names.items()}
        kwargs["features"] = {
            "index": np.array([0, *names], dtype=np.int64),
            "organ": np.array(["background", *names.values()], dtype=object),
        }
        kwargs["opacity"] = 0.5
        return data, kwargs, "labels"
    from difftumor_napari.viewing import window_to_contrast_limits

    kwargs["contrast_limits"] = window_to_contrast_limits(*ABDOMEN_WINDOW)
    kwargs["colormap"] = "gray"
    kwargs["interpolation2d"] = "linear"
    return data, kwargs, "image"
