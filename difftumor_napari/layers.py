"""The layers every DiffTumor widget shares, and bringing a tumour into view. Qt-free: napari layers and a
napari ``ViewerModel`` (its dims point, camera and canvas size) and numpy masks only.

* Which layer is which: :func:`ct_image_layers` (the CT first), :func:`organ_label_layers` (organ ids first),
  :func:`label_facts` (the organs a label map holds, computed once per array), :func:`unwrap` (the layer behind
  napari's plugin proxy).
* The tumour mask's look: :data:`TUMOR_LAYER`, :func:`tumor_colormap`, :func:`tumor_layer_metadata`.
* The view: :func:`tumor_focus` finds what to look at (the centre of mass of the largest connected component of
  a mask, in world millimetres, and its radius); :func:`focus_views` moves the view there, in the main viewer
  and in the "Window / level" widget's coronal and sagittal views (:func:`three_views_of`).
* The tumour's outline: :func:`outline_paths`, :func:`outline_layer`.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from difftumor_napari import placement as pl

if TYPE_CHECKING:
    import napari

    from difftumor_napari._qt.three_views import ThreeViews

TUMOR_LAYER = "tumor mask"


def unwrap(layer):
    """The layer itself behind napari's ``PublicOnlyProxy``: a plugin widget's viewer hands out a new
    proxy on every ``viewer.layers[...]``, so ``is`` between two look-ups is False for the same layer."""
    return getattr(layer, "__wrapped__", layer)


TUMOR_RGBA = (1.0, 0.85, 0.0, 1.0)  # one bright yellow for every tumour id: never an organ's colour


def tumor_colormap():
    """Tumour masks in one colour of their own (napari's default label colours would paint tumour 1 in
    the spleen's colour, 2 in the right kidney's, ... of the organ layer beneath)."""
    from napari.utils.colormaps import DirectLabelColormap

    return DirectLabelColormap(color_dict={None: TUMOR_RGBA, 0: (0.0, 0.0, 0.0, 0.0)})


def tumor_layer_metadata(ct_layer, kind: str = "tumor") -> dict:
    """Metadata for a mask made on ``ct_layer``'s grid: the CT's geometry record, integer dtype."""
    info = dict(ct_layer.metadata.get("difftumor", {}))
    info.update(kind=kind, dtype="uint8")
    info.pop("data_range", None)
    return {"difftumor": info}


def ct_image_layers(viewer) -> list:
    """3D single-channel image layers, the most CT-like first (synthetic results last)."""
    from napari.layers import Image

    layers = [ly for ly in viewer.layers if isinstance(ly, Image) and not ly.rgb and ly.ndim == 3
              and ly.metadata.get("difftumor", {}).get("kind") not in ("difference", "intermediate")]
    best = pl.pick_ct_layer([ly for ly in layers if ly.metadata.get("difftumor", {}).get("kind") != "synthetic"])
    layers.sort(key=lambda ly: (ly is not best, ly.metadata.get("difftumor", {}).get("kind") == "synthetic"))
    return layers


@dataclass(frozen=True)
class LabelFacts:
    """What the widgets need to know about a label layer's values (see :func:`label_facts`)."""

    organs: tuple[str, ...]  # placeable organs present (:func:`difftumor_napari.placement.organs_in_labels`)
    single_organ: bool  # an MSD/LiTS/KiTS-style 0/1/2 map (:func:`~difftumor_napari.placement.is_single_organ_map`)
    has_tumour: bool  # ... holding a labelled tumour (value 2)


_FACTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # layer -> (its data array, LabelFacts)


def label_facts(layer) -> LabelFacts:
    """:class:`LabelFacts` of a Labels layer, computed once per data array: every widget asks on every layer
    added or removed (three widgets, several choice boxes each), and a full pass over a 512 x 512 x 300 label
    map is ~0.3 s. A new array (``layer.data = ...``) or a brush stroke (the layer's paint event) recomputes."""
    layer = unwrap(layer)
    data = layer.data
    cached = _FACTS.get(layer)
    if cached is not None and cached[0] is data:
        return cached[1]
    if cached is None:  # first look at this layer: forget the facts when it is painted
        ref = weakref.ref(layer)
        layer.events.paint.connect(lambda _event=None: _FACTS.pop(ref(), None) if ref() is not None else None)
    organs = tuple(pl.organs_in_labels(data))
    single = pl.is_single_organ_map(data)
    facts = LabelFacts(organs, single, bool(single and (np.asarray(data) == 2).any()))
    _FACTS[layer] = (data, facts)
    return facts


def organ_label_layers(viewer) -> list:
    """Labels layers that are not tumour masks, those holding organ ids first."""
    from napari.layers import Labels

    layers = [ly for ly in viewer.layers if isinstance(ly, Labels) and ly.name != TUMOR_LAYER
              and ly.metadata.get("difftumor", {}).get("kind") not in ("tumor", "synthetic")]
    best = next((ly for ly in layers if label_facts(ly).organs), None)
    layers.sort(key=lambda ly: ly is not best)
    return layers


_THREE_VIEWS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # viewer model -> its ThreeViews


def three_views_of(viewer) -> ThreeViews | None:
    """The coronal and sagittal views (:class:`~difftumor_napari._qt.three_views.ThreeViews`) shown for
    ``viewer`` (None when three views were never opened); they register themselves here."""
    return _THREE_VIEWS.get(getattr(viewer, "__wrapped__", viewer))


# --------------------------------------------------------------------------------------------
# bring a tumour into view: its slice, centred, zoomed so that it spans a readable part of the canvas
# --------------------------------------------------------------------------------------------
#: the view shows at least this many tumour diameters across its shorter side ...
DIAMETERS_ACROSS = 4.0
#: ... and never less than this many millimetres (a 5 mm tumour is not blown up to fill a 3 mm-voxel screen)
MIN_FIELD_MM = 60.0


def _bounding_box(mask: np.ndarray) -> tuple[slice, ...] | None:
    """The smallest box holding every non-zero voxel (one pass per axis over a reduced array)."""
    mask = np.asarray(mask) != 0
    if not mask.any():
        return None
    box = []
    for axis in range(mask.ndim):
        others = tuple(a for a in range(mask.ndim) if a != axis)
        hit = np.flatnonzero(mask.any(axis=others))
        box.append(slice(int(hit[0]), int(hit[-1]) + 1))
    return tuple(box)


def largest_component_focus(mask: np.ndarray, spacing: Sequence[float]) -> tuple[np.ndarray, float] | None:
    """(centre of mass as a continuous data index (z, y, x), radius in mm) of the largest 26-connected
    component of ``mask``; None when the mask is empty. The radius is the largest distance from the centre
    to a voxel of the component plus half a voxel, so the whole component fits a circle of that radius."""
    box = _bounding_box(mask)
    if box is None:
        return None
    return _box_focus(np.asarray(mask)[box] != 0, [s.start for s in box], spacing)


def voxels_focus(index: Sequence[np.ndarray], spacing: Sequence[float]) -> tuple[np.ndarray, float] | None:
    """:func:`largest_component_focus` of the voxels ``index`` (as ``np.nonzero`` gives them), without a
    mask of the whole volume: what a placement just painted."""
    index = [np.asarray(i, int) for i in index]
    if not index or index[0].size == 0:
        return None
    lo = [int(i.min()) for i in index]
    sub = np.zeros([int(i.max()) - low + 1 for i, low in zip(index, lo)], bool)
    sub[tuple(i - low for i, low in zip(index, lo))] = True
    return _box_focus(sub, lo, spacing)


def _box_focus(sub: np.ndarray, offset: Sequence[int], spacing: Sequence[float]) -> tuple[np.ndarray, float]:
    from scipy import ndimage

    comps, n = ndimage.label(sub, structure=np.ones((3,) * sub.ndim, bool))
    if n > 1:
        sizes = np.bincount(comps.ravel())[1:]
        sub = comps == int(np.argmax(sizes)) + 1
    points = np.argwhere(sub).astype(float)
    centre = points.mean(axis=0)
    s = np.asarray(spacing, float)[-sub.ndim:]
    radius = float(np.sqrt((((points - centre) * s) ** 2).sum(axis=1)).max()) + 0.5 * float(s.max())
    return centre + np.asarray(offset, float), radius


def tumor_focus(mask: np.ndarray, layer) -> tuple[np.ndarray, float] | None:
    """(centre in napari world coordinates (z, y, x), radius in mm) of the largest tumour in ``mask``,
    a volume on ``layer``'s grid (the CT or the tumour layer: its ``scale``/``translate`` place it)."""
    found = largest_component_focus(mask, tuple(layer.scale)[-3:])
    if found is None:
        return None
    centre, radius = found
    return np.asarray(layer.data_to_world(centre), float)[-3:], radius


def _camera(viewer):
    scene = getattr(viewer, "scene", None)  # napari >= 0.9; viewer.camera before (deprecated since)
    return scene.camera if scene is not None and hasattr(scene, "camera") else viewer.camera


def view_size_px(viewer) -> np.ndarray:
    """(height, width) in screen pixels of one view box (a grid cell when napari's grid is on)."""
    canvas = getattr(viewer, "canvas", None)
    if canvas is not None and hasattr(canvas, "viewbox_size"):
        size = np.asarray(canvas.viewbox_size(viewer.layers), float)
    else:  # napari < 0.9
        size = np.asarray(getattr(viewer, "_canvas_size", (600, 800)), float)
    return np.where(size > 1, size, 600.0)


def focus_zoom(radius_mm: float, view_px: Sequence[float], fit_zoom: float | None = None) -> float:
    """Screen pixels per millimetre that make a tumour of ``radius_mm`` span a readable part of the view:
    :data:`DIAMETERS_ACROSS` diameters (at least :data:`MIN_FIELD_MM`) across the shorter side, but never
    zoomed out beyond ``fit_zoom`` (the whole volume in view)."""
    field = max(DIAMETERS_ACROSS * 2.0 * float(radius_mm), MIN_FIELD_MM)
    zoom = float(min(view_px)) / field
    return max(zoom, fit_zoom) if fit_zoom is not None else zoom


def _fit_zoom(viewer, view_px: np.ndarray) -> float | None:
    """The zoom at which every layer fits the view (what reset_view gives, without its margin)."""
    extent = np.asarray(viewer.layers.extent.world, float)
    if extent.shape[-1] < 2 or not np.all(np.isfinite(extent)):
        return None
    size = (extent[1] - extent[0])[list(viewer.dims.displayed)][-2:]
    size = np.where(size > 0, size, 1.0)
    return float(np.min(view_px / size))


def focus_views(viewer: napari.components.ViewerModel, center_world: Sequence[float], radius_mm: float) -> None:
    """Move every view to ``center_world`` (napari world coordinates, dims order (z, y, x)): the slices
    through it, the camera centred on it and zoomed (:func:`focus_zoom`) so that a tumour of
    ``radius_mm`` spans a readable part of the canvas. The main viewer (one grid cell when napari's grid
    is on) and, when the "Window / level" widget shows them, the coronal and sagittal views, which keep
    this framing when their canvases are resized until the user pans or zooms."""
    ndim = viewer.dims.ndim
    point = np.asarray(center_world, float)[-3:]
    if ndim < 3 or point.size != 3 or not np.all(np.isfinite(point)):
        return
    axes = tuple(range(ndim - 3, ndim))
    viewer.dims.set_point(axes, tuple(float(v) for v in point))
    camera = _camera(viewer)
    displayed = list(viewer.dims.displayed)
    centre = [float(point[a - (ndim - 3)]) for a in displayed if a >= ndim - 3]
    if len(centre) in (2, 3):
        camera.center = tuple(centre)
    px = view_size_px(viewer)
    camera.zoom = focus_zoom(radius_mm, px, _fit_zoom(viewer, px))
    views = three_views_of(viewer) if ndim == 3 else None
    if views is not None:
        for side in views.framings.values():
            side.focus(tuple(float(v) for v in point), float(radius_mm))


def focus_on_mask(viewer, mask: np.ndarray, layer) -> tuple[np.ndarray, float] | None:
    """:func:`focus_views` on the largest tumour of ``mask`` (on ``layer``'s grid); returns what it
    focused on (centre in world coordinates, radius in mm), or None for an empty mask."""
    found = tumor_focus(mask, layer)
    if found is not None:
        focus_views(viewer, *found)
    return found


def focus_on_voxels(viewer, index: Sequence[np.ndarray], layer) -> tuple[np.ndarray, float] | None:
    """:func:`focus_on_mask` for the voxels ``index`` of ``layer`` (what a placement painted)."""
    found = voxels_focus(index, tuple(layer.scale)[-3:])
    if found is None:
        return None
    centre, radius = np.asarray(layer.data_to_world(found[0]), float)[-3:], found[1]
    focus_views(viewer, centre, radius)
    return centre, radius


# --------------------------------------------------------------------------------------------
# the tumour's outline: a thin line between the tumour's voxels and their neighbours
# --------------------------------------------------------------------------------------------
OUTLINE_RGBA = (1.0, 0.85, 0.0, 1.0)  # the tumour colour of the placement mask
OUTLINE_WIDTH_MM = 0.35  # a line, not a ring of voxels over the tumour's margin (where the blending happens)


def outline_paths(mask: np.ndarray, axis: int = 0) -> list[np.ndarray]:
    """The tumour's boundary on every slice across ``axis`` (0: axial, 1: coronal, 2: sagittal) as closed
    polylines in data coordinates (z, y, x): marching squares (``skimage.measure.find_contours``) at 0.5, i.e.
    half-way between a tumour voxel's centre and its neighbour's, so the line runs along the tumour's edge
    without covering any voxel of it."""
    from skimage import measure

    box = _bounding_box(mask)
    if box is None:
        return []
    sub = np.moveaxis(np.asarray(mask)[box] != 0, axis, 0)
    others = [a for a in range(3) if a != axis]
    offset = np.array([box[a].start for a in others], float)
    paths = []
    for k in range(sub.shape[0]):
        if not sub[k].any():
            continue
        for line in measure.find_contours(np.pad(sub[k], 1).astype(np.float32), 0.5):
            path = np.empty((len(line), 3))
            path[:, axis] = float(box[axis].start + k)
            path[:, others] = line - 1 + offset
            paths.append(path)
    return paths


def outline_layer(mask: np.ndarray, ref, name: str, *, axis: int = 0, metadata: dict | None = None,
                  visible: bool = True, opacity: float = 1.0):
    """A napari Shapes layer (not yet added) drawing :func:`outline_paths` of ``mask`` across ``axis`` on
    ``ref``'s grid (its ``scale`` and ``translate``), :data:`OUTLINE_WIDTH_MM` wide, in the tumour colour.
    Its metadata names the mask (``difftumor.outline_of``), from which the coronal and sagittal views
    (:mod:`difftumor_napari._qt.three_views`) draw the outline in their own planes."""
    from napari.layers import Shapes

    scale = np.asarray(ref.scale, float)[-3:]
    paths = outline_paths(mask, axis)
    in_plane = [s for a, s in enumerate(scale) if a != axis]
    meta = dict(metadata or {})
    meta["difftumor"] = {**meta.get("difftumor", {}), "outline_of": mask}
    # a closed contour (marching squares on a padded slice always closes) as a polygon without fill: a "path"
    # whose last point repeats the first left a gap where the two ends meet
    closed = [len(p) > 3 and np.allclose(p[0], p[-1]) for p in paths]
    paths = [p[:-1] if c else p for p, c in zip(paths, closed)]
    layer = Shapes(paths, ndim=3, shape_type=["polygon" if c else "path" for c in closed] or "path", name=name,
                   scale=ref.scale, translate=ref.translate,
                   edge_color=[OUTLINE_RGBA] * len(paths) if paths else "yellow", face_color="transparent",
                   edge_width=OUTLINE_WIDTH_MM / float(np.mean(in_plane)), opacity=opacity, visible=visible,
                   blending="translucent_no_depth", metadata=meta)
    return layer
