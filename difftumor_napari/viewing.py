"""Viewing CT the way radiologists do, without Qt: window/level presets and arithmetic, which axis is shown
vertically, the sliders' plane names, the CT layers that share one window.

Pure functions first (no viewer needed): :func:`window_to_contrast_limits`, :func:`contrast_limits_to_window`,
:func:`drag_window_level`, :func:`vertical_orientation`; then functions of a napari ``ViewerModel`` or layer:
:func:`name_slider_axes`, :func:`ct_layers`, :func:`linked_ct_layers`, :func:`apply_window`. The "Window /
level" dock widget is :mod:`difftumor_napari._qt.viewing_widget`.

Layers opened by the DiffTumor reader are in LPS order (z, y, x) = (superior, posterior, left), so the
default axial view shows anterior at the top and the patient's left on the screen's right.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import napari
    import napari.layers

# name -> (window width, window level) in HU
PRESETS: dict[str, tuple[float, float]] = {
    "abdomen": (400.0, 50.0),
    "liver": (150.0, 30.0),
    "soft tissue": (350.0, 40.0),
    "bone": (1800.0, 400.0),
    "lung": (1500.0, -600.0),
}
DEFAULT_PRESET = "abdomen"
# HU per screen pixel of mouse drag for the width (horizontal) and level (vertical)
DRAG_HU_PER_PIXEL = 2.0
MIN_WIDTH = 1.0


def window_to_contrast_limits(width: float, level: float) -> tuple[float, float]:
    """(W, L) -> napari contrast limits ``[L - W/2, L + W/2]``; W400/L50 -> (-150, 250)."""
    if not width > 0:
        raise ValueError(f"window width must be > 0, got {width}")
    return (float(level) - float(width) / 2.0, float(level) + float(width) / 2.0)


def contrast_limits_to_window(low: float, high: float) -> tuple[float, float]:
    """Napari contrast limits -> (W, L), the inverse of :func:`window_to_contrast_limits`."""
    return (float(high) - float(low), (float(high) + float(low)) / 2.0)


def drag_window_level(
    width: float, level: float, dx: float, dy: float, *, hu_per_pixel: float = DRAG_HU_PER_PIXEL
) -> tuple[float, float]:
    """New (W, L) after dragging the mouse by (dx, dy) screen pixels from where (W, L) was set.

    Right widens the window, left narrows it (never below :data:`MIN_WIDTH`); down raises the
    level (image darker), up lowers it (image brighter) - the usual workstation convention.
    """
    return (max(MIN_WIDTH, width + dx * hu_per_pixel), level + dy * hu_per_pixel)


def vertical_orientation(dims_order: tuple[int, ...], ndisplay: int, ndim: int) -> str:
    """'up' when the superior-inferior axis (z = world axis ``ndim - 3``) is shown vertically.

    In a 2D view the vertical screen axis is ``dims_order[-2]``; z grows toward superior in LPS, so
    it must grow upward on screen for coronal and sagittal views. Axial views keep 'down'
    (posterior grows downward: anterior at the top).
    """
    if ndisplay != 2 or ndim < 3:
        return "down"
    return "up" if dims_order[-2] == ndim - 3 else "down"


SLIDER_NAMES = ("axial", "coronal", "sagittal")  # what moving world axis z / y / x scrolls through


def name_slider_axes(viewer: napari.components.ViewerModel) -> None:
    """Name the three spatial sliders after the plane they scroll, over napari's default (numeric) names
    and over ours: after the last layer is removed napari keeps two of our names and prepends '-3' when the
    next volume comes (the reading session swaps its case layer so). Names a user set stay."""
    labels = tuple(viewer.dims.axis_labels)
    if (viewer.dims.ndim == 3 and labels != SLIDER_NAMES
            and all(lbl.lstrip("-").isdigit() or lbl in SLIDER_NAMES for lbl in labels)):
        viewer.dims.axis_labels = SLIDER_NAMES


def ct_layers(viewer: napari.components.ViewerModel) -> list[napari.layers.Image]:
    """Single-channel image layers, CT (DiffTumor metadata kind 'ct') first."""
    from napari.layers import Image

    images = [ly for ly in viewer.layers if isinstance(ly, Image) and not ly.rgb]
    return sorted(images, key=lambda ly: ly.metadata.get("difftumor", {}).get("kind") != "ct")


def linked_ct_layers(viewer: napari.components.ViewerModel, layer) -> list[napari.layers.Image]:
    """The CT layers that share one window with ``layer``: ``layer`` and every other CT or synthesis result
    (DiffTumor kind 'ct' or 'synthetic') on the same voxel grid, so that the original and 'CT + synthetic
    tumor' always show with the same W/L, whichever is visible."""
    def same_grid(other):
        return (tuple(other.data.shape) == tuple(layer.data.shape) and np.allclose(other.scale, layer.scale)
                and np.allclose(other.translate, layer.translate))

    linked = [layer]
    for other in ct_layers(viewer):
        if other is not layer and other.metadata.get("difftumor", {}).get("kind") in ("ct", "synthetic") \
                and same_grid(other):
            linked.append(other)
    return linked


def apply_window(layer, low: float, high: float) -> None:
    """Set contrast limits, widening the layer's contrast range when the window reaches beyond it."""
    lo_range, hi_range = layer.contrast_limits_range
    if low < lo_range or high > hi_range:  # let the window reach beyond the data range
        layer.contrast_limits_range = (min(lo_range, low), max(hi_range, high))
    if tuple(layer.contrast_limits) != (low, high):
        layer.contrast_limits = (low, high)
