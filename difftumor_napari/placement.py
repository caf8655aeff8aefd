"""Tumour placement without Qt: click -> voxel, ellipsoid / random tumours, undo stack, layer guesses.

The placement widget (``_qt/placement_widget.py``) only collects values and calls these functions. Arrays are
in the napari display order (z, y, x) of the DiffTumor reader (an LPS grid); the grid itself is a
:class:`backend.io.Geometry` built by :func:`layer_geometry` from the layer's metadata (or its
``scale``/``translate``). Shapes come from :mod:`backend.synthesis.masks` (the engine's generators):
:func:`masks.ellipsoid_mask` for a placed tumour, :func:`backend.synthesis.engine.random_tumor_masks`
(the release's random generator, run in 1 mm model space and brought back) for random placement.

The tumour-mask layer holds one id per placed tumour (1, 2, ...) so each has its own colour and can
be undone on its own; synthesis treats every non-zero voxel as tumour.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from backend.errors import DiffTumorError

if TYPE_CHECKING:
    from backend.io import Geometry

PLACEABLE_ORGANS = ("liver", "pancreas", "kidney", "spleen")
SIZE_NAMES = ("tiny", "small", "medium", "large")
CT_MIN_HU, CT_MAX_HU = -500.0, 100.0  # a CT reaches below -500 (air/lung) and above 100 (bone, contrast)


# --------------------------------------------------------------------------------------------
# coordinates and grids
# --------------------------------------------------------------------------------------------
def world_to_data(world: Sequence[float], scale: Sequence[float], translate: Sequence[float]) -> np.ndarray:
    """World position (napari order, last 3 = z, y, x in mm) -> continuous data index (z, y, x).

    ``data = (world - translate) / scale``, the inverse of napari's scale + translate transform.
    """
    w = np.asarray(world, dtype=np.float64)[-3:]
    return (w - np.asarray(translate, np.float64)[-3:]) / np.asarray(scale, np.float64)[-3:]


def layer_geometry(shape: Sequence[int], scale: Sequence[float], translate: Sequence[float],
                   metadata: dict | None = None) -> Geometry:
    """The grid of a displayed layer: the reader's ``display_geometry`` when recorded, else an
    axis-aligned LPS grid from ``scale``/``translate`` (reversed to SimpleITK (x, y, z) order)."""
    from backend.io import Geometry

    info = (metadata or {}).get("difftumor") or {}
    if "display_geometry" in info:
        g = Geometry.from_dict(info["display_geometry"])
        if g.shape == tuple(shape):
            return g
    return Geometry(tuple(shape)[::-1], tuple(scale)[-3:][::-1], tuple(translate)[-3:][::-1])


def size_class_radii(size: str) -> tuple[float, float, float]:
    """Radii (mm) for a size class: its base radius on all three axes (diameter = 2 r)."""
    from backend.synthesis.masks import SIZE_CLASSES

    if size not in SIZE_CLASSES:
        raise DiffTumorError(f"size class '{size}': choose one of {', '.join(SIZE_CLASSES)}")
    r = float(SIZE_CLASSES[size].radius)
    return (r, r, r)


def size_class_text(size: str) -> str:
    """'small: 12–20 mm diameter' for tooltips."""
    from backend.synthesis.masks import SIZE_CLASSES

    lo, hi = SIZE_CLASSES[size].diameter_mm
    return f"{size}: {lo}–{hi} mm diameter"


# --------------------------------------------------------------------------------------------
# layer guesses (duck-typed: anything with .data / .metadata works)
# --------------------------------------------------------------------------------------------
def looks_like_ct(data: Any) -> bool:
    """3D intensities spanning a CT-like HU range (something below -500 and above 100)."""
    arr = np.asarray(data)
    if arr.ndim != 3 or arr.dtype == np.bool_ or arr.size == 0:
        return False
    step = max(1, int(round((arr.size / 2e6) ** (1 / 3))))
    sample = arr[::step, ::step, ::step]
    return float(sample.min()) < CT_MIN_HU and float(sample.max()) > CT_MAX_HU


def is_single_organ_map(data: Any) -> bool:
    """An MSD/LiTS/KiTS-style map (values within {0, 1, 2}): one organ, which the user must name."""
    from backend.organs import detect_convention

    arr = np.asarray(data)
    return arr.ndim == 3 and arr.size > 0 and (np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_) \
        and detect_convention(arr) == "msd"


def organs_in_labels(data: Any) -> list[str]:
    """Placeable organs present in a label map (TotalSegmentator ids, or MSD 1 = organ -> all)."""
    from backend.organs import detect_convention, organs_present

    arr = np.asarray(data)
    if arr.ndim != 3 or arr.size == 0 or not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_):
        return []
    if arr.dtype != np.bool_ and arr.min() < 0:
        return []
    if detect_convention(arr) == "msd":
        return list(PLACEABLE_ORGANS) if (arr == 1).any() else []
    present = organs_present(arr, convention="totalseg")
    found = [o for o in PLACEABLE_ORGANS if o in present]
    if "kidney" not in found and ("kidney_left" in present or "kidney_right" in present):
        found.insert(2 if len(found) >= 2 else len(found), "kidney")
    return [o for o in PLACEABLE_ORGANS if o in found]


def pick_ct_layer(layers: Sequence[Any]):
    """The CT among image layers: DiffTumor kind 'ct' first, then any CT-like image (None if none)."""
    images = [ly for ly in layers if type(ly).__name__ == "Image" and not getattr(ly, "rgb", False)]
    for ly in images:
        if ly.metadata.get("difftumor", {}).get("kind") == "ct":
            return ly
    for ly in images:
        if looks_like_ct(ly.data):
            return ly
    return None


def pick_organ_layer(layers: Sequence[Any]):
    """The first Labels layer whose values include organ ids (our own tumour layers excluded)."""
    for ly in layers:
        if type(ly).__name__ != "Labels" or ly.metadata.get("difftumor", {}).get("kind") in ("tumor", "synthetic"):
            continue
        if organs_in_labels(ly.data):
            return ly
    return None


def organ_mask(labels: Any, organ: str, *, name: str = "organ labels") -> np.ndarray:
    """Boolean organ mask from a label layer's data (the 4 conventions of :mod:`backend.organs`)."""
    return organ_and_tumors(labels, organ, name=name)[0]


def organ_and_tumors(labels: Any, organ: str, *, name: str = "organ labels") -> tuple[np.ndarray, np.ndarray | None]:
    """(organ mask, tumours already labelled in it, e.g. label 2 of an MSD/LiTS/KiTS map, or None)."""
    from backend.organs import load_organ_and_tumors

    if labels is None:
        raise DiffTumorError("organ labels: no organ label layer; open or draw an organ segmentation first")
    try:
        return load_organ_and_tumors(np.asarray(labels), organ)
    except DiffTumorError as exc:
        raise DiffTumorError(str(exc).replace("<label array>", name)) from None


# --------------------------------------------------------------------------------------------
# placements and their undo stack
# --------------------------------------------------------------------------------------------
@dataclass
class TumorSpec:
    """One placed ellipsoid: centre as a data index (z, y, x), radii (mm) along x (R-L), y (A-P),
    z (S-I), rotation (Euler degrees about x, y, z), irregularity in [0, 1] and its seed."""

    centre_zyx: tuple[float, float, float]
    radii_mm: tuple[float, float, float]
    rotation_deg: tuple[float, float, float] = (0.0, 0.0, 0.0)
    irregularity: float = 0.0
    seed: int = 0

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


@dataclass
class Placement:
    """What one placement wrote: voxel indices, their previous values and the id it painted."""

    label: int
    index: tuple[np.ndarray, ...]
    previous: np.ndarray
    params: dict = field(default_factory=dict)


def ellipsoid_on_grid(geometry: Geometry, spec: TumorSpec) -> np.ndarray:
    """The tumour of ``spec`` on the display grid (boolean (z, y, x))."""
    from backend.synthesis.masks import ellipsoid_mask

    z, y, x = spec.centre_zyx
    return ellipsoid_mask(geometry, (x, y, z), spec.radii_mm, voxel=True, rotation=spec.rotation_deg,
                          irregularity=spec.irregularity, rng=spec.seed)


def check_centre(centre_zyx: Sequence[float], organ: np.ndarray | None, organ_name: str) -> tuple[int, int, int]:
    """Nearest voxel of a clicked point; refuse points outside the image or outside the organ."""
    idx = np.rint(np.asarray(centre_zyx, np.float64)).astype(int)
    shape = np.asarray(organ.shape if organ is not None else (0, 0, 0))
    if organ is None:
        raise DiffTumorError(f"{organ_name}: no organ mask; choose an organ label layer first")
    if np.any(idx < 0) or np.any(idx >= shape):
        raise DiffTumorError(f"click outside the image (voxel {idx.tolist()} z, y, x; image {shape.tolist()})")
    if not organ[tuple(idx)]:
        raise DiffTumorError(f"click outside the {organ_name} (voxel {idx.tolist()} z, y, x); click inside the organ")
    return tuple(int(v) for v in idx)


def check_fits(tumor: np.ndarray, organ: np.ndarray, organ_name: str, spacing_zyx: Sequence[float]) -> None:
    """Refuse a tumour larger than the organ it is placed in."""
    vox_ml = float(np.prod(spacing_zyx)) / 1000.0
    n_t, n_o = int(tumor.sum()), int(organ.sum())
    if n_t > n_o:
        raise DiffTumorError(
            f"tumour of {n_t * vox_ml:.1f} ml is larger than the {organ_name} ({n_o * vox_ml:.1f} ml); choose smaller radii"
        )


class PlacementHistory:
    """Undo/redo of placements on a label array (the tumour-mask layer's data, edited in place).

    Undo puts back the previous values only where the voxel still holds the placement's id, so brush
    strokes made after the placement survive; napari's own Ctrl+Z keeps undoing brush strokes.
    """

    def __init__(self) -> None:
        self.done: list[Placement] = []
        self.undone: list[Placement] = []

    def next_label(self, labels: np.ndarray) -> int:
        return int(labels.max()) + 1 if labels.size else 1

    def apply(self, labels: np.ndarray, mask: np.ndarray, *, params: dict | None = None, label: int | None = None) -> Placement:
        if mask.shape != labels.shape:
            raise DiffTumorError(f"tumour mask layer: shape {labels.shape} differs from the CT {mask.shape}; remove it and place again")
        label = self.next_label(labels) if label is None else label
        index = np.nonzero(mask)
        placement = Placement(label, index, labels[index].copy(), dict(params or {}))
        labels[index] = label
        self.done.append(placement)
        self.undone.clear()
        return placement

    def undo(self, labels: np.ndarray) -> Placement | None:
        if not self.done:
            return None
        p = self.done.pop()
        still = labels[p.index] == p.label
        sub = tuple(i[still] for i in p.index)
        labels[sub] = p.previous[still]
        self.undone.append(p)
        return p

    def redo(self, labels: np.ndarray) -> Placement | None:
        if not self.undone:
            return None
        p = self.undone.pop()
        p.previous = labels[p.index].copy()
        labels[p.index] = p.label
        self.done.append(p)
        return p

    def params(self) -> list[dict]:
        """The parameters of the placements still in effect (for provenance)."""
        return [dict(p.params, label=p.label) for p in self.done]


def place_ellipsoid(labels: np.ndarray, history: PlacementHistory, geometry: Geometry, organ: np.ndarray | None,
                    spec: TumorSpec, *, organ_name: str, keep_inside_organ: bool = True,
                    file_geometry: Geometry | None = None, existing: np.ndarray | None = None) -> Placement:
    """Validate ``spec`` against the organ, draw it (clipped to the organ if asked) and record it.

    ``existing``: tumours already labelled in the organ labels (label 2 of an MSD/LiTS/KiTS map). A centre on
    one is refused; the voxels of the ellipsoid that fall on one are left out (with or without
    ``keep_inside_organ``: the engine never paints over a real tumour), and their number is recorded as
    ``overlap_left_out_voxels``. The record gives the centre on the display grid (``centre_zyx``), in world
    millimetres (``centre_world_mm_lps``) and, with ``file_geometry`` (the CT file's own grid), as that file's
    voxel index (``centre_file_voxel_xyz``), so a placement can be reproduced with ``difftumor synthesize``."""
    voxel = check_centre(spec.centre_zyx, organ, organ_name)
    real = None if existing is None else np.asarray(existing, bool)
    if real is not None and real[voxel]:
        raise DiffTumorError(f"click on a tumour already labelled in the organ labels (voxel {list(voxel)} z, y, x); "
                             f"click in tumour-free {organ_name} tissue")
    tumor = ellipsoid_on_grid(geometry, spec)
    healthy = organ if real is None else organ & ~real
    check_fits(tumor, healthy, organ_name, geometry.spacing[::-1])
    if keep_inside_organ:
        tumor &= organ
    left_out = 0
    if real is not None:
        left_out = int((tumor & real).sum())
        tumor &= ~real
    if not tumor.any():
        where = "outside the labelled tumours" if left_out else "of the " + organ_name
        raise DiffTumorError(f"tumour at {list(spec.centre_zyx)} covers no voxel {where}; enlarge the radii")
    world = geometry.voxel_to_world(np.asarray(spec.centre_zyx, float)[::-1])
    where = {"centre_world_mm_lps": [round(float(v), 2) for v in world]}
    if file_geometry is not None:
        where["centre_file_voxel_xyz"] = [round(float(v), 2) for v in file_geometry.world_to_voxel(world)]
    if real is not None:
        where["overlap_left_out_voxels"] = left_out
    return history.apply(labels, tumor, params={"kind": "ellipsoid", "organ": organ_name,
                                                "keep_inside_organ": keep_inside_organ, **spec.to_dict(), **where})


def random_tumors(geometry: Geometry, organ: np.ndarray, organ_name: str, *, size: str, count: int,
                  seed: int, keep_inside_organ: bool = True) -> tuple[list[np.ndarray], list[dict]]:
    """``count`` tumours of ``size`` at valid places in the organ, from the release's generator.

    :func:`backend.synthesis.engine.random_tumor_masks` (the engine's generator: 1 mm model space on the
    organ's neighbourhood, one draw per tumour from the same seeded stream) gives one mask per tumour on
    the display grid; ``keep_inside_organ`` clips each to the organ (unless that would empty it).
    """
    from backend.synthesis.engine import random_tumor_masks

    if organ is None or not np.any(organ):
        raise DiffTumorError(f"{organ_name}: the organ is absent from the label layer; choose another organ")
    masks_, drawn = random_tumor_masks(geometry, organ, organ=organ_name, size=size, count=count, seed=seed)
    shapes, params = [], []
    for back, tp in zip(masks_, drawn):
        if keep_inside_organ:
            clipped = back & organ
            back = clipped if clipped.any() else back
        p = {"kind": "random", "organ": organ_name, "seed": int(seed), "keep_inside_organ": keep_inside_organ,
             **{k: list(v) if isinstance(v, tuple) else v for k, v in tp.to_dict().items()}}
        shapes.append(back)
        params.append(p)
    return shapes, params


def tumor_stages(labels: np.ndarray, geometry: Geometry) -> list[str]:
    """The stage the engine will choose for each tumour group (its largest tumour: 'early' below 20 mm, else
    'mid_late'; :func:`backend.synthesis.engine.planned_stages`)."""
    from backend.synthesis.engine import planned_stages

    tumor = np.asarray(labels) > 0
    if not tumor.any():
        raise DiffTumorError("tumour mask: it is empty; place a tumour first")
    return [stage.value for stage in planned_stages(tumor, geometry)]
