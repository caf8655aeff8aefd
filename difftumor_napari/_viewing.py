"""Viewing CT the way radiologists do: window/level presets, mouse window/level, three views.

Pure functions first (no viewer needed): :func:`window_to_contrast_limits`,
:func:`contrast_limits_to_window`, :func:`drag_window_level`, :func:`vertical_orientation`.
Then the Qt side: :func:`keep_radiological` (superior stays at the top whenever the z axis is shown
vertically), :class:`ThreeViews` (coronal + sagittal canvases linked to the main viewer's cursor)
and :class:`ViewingWidget`, the "Window / level" dock widget.

Layers opened by the DiffTumor reader are in LPS order (z, y, x) = (superior, posterior, left), so the
default axial view shows anterior at the top and the patient's left on the screen's right.
"""

from __future__ import annotations

import contextlib
import gc
import weakref
from typing import TYPE_CHECKING

import numpy as np
from magicgui.widgets import CheckBox, ComboBox, FloatSpinBox, PushButton
from qtpy.QtCore import QEvent

from difftumor_napari._dock import ScrollableContainer, clear_errors_on_success, watch

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


_RADIOLOGICAL: weakref.WeakSet = weakref.WeakSet()  # viewers already kept radiological


def keep_radiological(viewer: napari.components.ViewerModel) -> None:
    """Keep superior at the top whenever the z axis is displayed vertically (now and later), name the
    sliders after their planes, and let a success close stale error toasts
    (:func:`~difftumor_napari._dock.clear_errors_on_success`). Every DiffTumor widget calls it; a viewer
    is set up once."""
    model = getattr(viewer, "__wrapped__", viewer)  # the same viewer behind napari's plugin proxy
    if model in _RADIOLOGICAL:
        return
    _RADIOLOGICAL.add(model)
    clear_errors_on_success(model)  # every DiffTumor widget comes through here once per viewer

    def _update(event=None):
        up = vertical_orientation(tuple(viewer.dims.order), viewer.dims.ndisplay, viewer.dims.ndim)
        if viewer.camera.orientation2d[0] != up:
            viewer.camera.orientation2d = (up, viewer.camera.orientation2d[1])
        name_slider_axes(viewer)

    for emitter in (viewer.dims.events.order, viewer.dims.events.ndisplay, viewer.dims.events.ndim):
        emitter.connect(_update)
    _update()


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


@contextlib.contextmanager
def _collection_deferred():
    """Let napari's per-canvas ``gc.collect()`` on a layer removal skip the objects that existed before.

    napari collects garbage whenever a canvas loses a layer (a Windows OpenGL work-around); with torch,
    MONAI and napari loaded that is 0.3-0.6 s per collection on a 2-core machine, and each extra view
    is one more canvas. Objects alive before the block are frozen (``gc.freeze``, O(1)) and given back
    to the oldest generation after it, so the cycles left by the removed copies are collected with the
    main canvas's own collection (see :meth:`ThreeViews._on_removing`) or the next automatic one.
    """
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def too_thin(shape_zyx, scale_zyx) -> str | None:
    """Why a volume is too thin for coronal and sagittal views, or None: fewer than 8 slices, or a
    superior-inferior extent under a tenth of its larger in-plane side (a strip a few pixels high)."""
    n = int(shape_zyx[0])
    depth = n * float(scale_zyx[0])
    side = max(int(shape_zyx[1]) * float(scale_zyx[1]), int(shape_zyx[2]) * float(scale_zyx[2]))
    if n < 8 or depth < 0.1 * side:
        return f"{n} slice{'s' if n != 1 else ''} ({depth:g} mm)"
    return None


def _mirrorable(layer) -> bool:
    from napari.layers import Image, Labels

    return isinstance(layer, (Image, Labels)) and layer.ndim == 3 and not getattr(layer, "rgb", False)


_THREE_VIEWS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # viewer model -> its ThreeViews


def three_views_of(viewer) -> ThreeViews | None:
    """The :class:`ThreeViews` shown for ``viewer`` (None when three views were never opened)."""
    return _THREE_VIEWS.get(getattr(viewer, "__wrapped__", viewer))


class _Framing:
    """What a view's camera shows: the whole volume (``fit``) or a point (``focus``), re-applied when its
    canvas is resized as long as the camera is where it was last put (the user has not panned or zoomed)."""

    def __init__(self, model):
        self.model = model
        self.target = None  # None: fit the whole volume; else (center_world, radius_mm)
        self._placed = None  # (center, zoom) as last set
        model.canvas.events.size.connect(self._on_resize)

    def disconnect(self) -> None:
        self.model.canvas.events.size.disconnect(self._on_resize)

    def fit(self) -> None:
        self.target = None
        self._apply()

    def focus(self, center, radius_mm: float) -> None:
        self.target = (tuple(center), radius_mm)
        self._apply()

    def _camera_state(self):
        camera = self.model.camera
        return tuple(np.round(camera.center, 6)), round(float(camera.zoom), 9)

    def _apply(self) -> None:
        model = self.model
        content = [ly for ly in model.layers if ly.name != ThreeViews.CROSSHAIR]  # its lines overshoot the images
        if not content:
            return
        model.fit_to_view(layers=content)
        if self.target is not None:
            center, radius = self.target
            rows, cols = model.dims.displayed
            fit_zoom = float(model.camera.zoom)
            cam_center = list(model.camera.center)
            cam_center[-2], cam_center[-1] = center[rows], center[cols]
            model.camera.center = tuple(cam_center)
            from difftumor_napari._focus import focus_zoom

            model.camera.zoom = focus_zoom(radius, model.canvas.size, fit_zoom)
        self._placed = self._camera_state()

    def _on_resize(self, event=None) -> None:
        if self._placed is not None and self._camera_state() == self._placed:
            self._apply()


class ThreeViews:
    """Coronal and sagittal canvases beside the main (axial) canvas, sharing its cursor.

    Each extra view is a napari ``ViewerModel`` with its own ``QtViewer`` canvas holding one light copy
    of each of the main viewer's 3D image and labels layers (same array, never a data copy) whose
    contrast, colormap, visibility, opacity, contour and data follow the original. The copies are kept
    up to date one at a time: a layer added to the main viewer adds its copy, a layer removed removes
    only its copy, a reorder moves copies; nothing else is rebuilt, and the cursor (the slices shown)
    does not move. Moving the slider in any view moves the others; a click (without drag) in any of the
    three views moves the cursor there. Each extra view draws a crosshair through the cursor: its
    horizontal line is the axial slice, its vertical line the slice of the other extra view. Each view
    fits the whole volume to its canvas (again when the canvas is resized) unless
    :func:`difftumor_napari._focus.focus_views` framed a point or the user panned or zoomed.
    """

    CROSSHAIR = "cursor"  # name of the crosshair layer in the extra views (not a copy of a main layer)
    CROSSHAIR_COLOR = (0.35, 0.8, 1.0, 0.7)  # light blue: no organ or tumour colour

    # name -> dims order; the last two axes are displayed (vertical, horizontal)
    VIEWS = {"coronal": (1, 0, 2), "sagittal": (2, 0, 1)}
    # what each view's screen directions are in the patient (LPS grid, superior kept at the top)
    CAPTIONS = {"coronal": "Coronal · superior up · patient's left on the right",
                "sagittal": "Sagittal · superior up · anterior on the left"}
    FOLLOWED = ("visible", "opacity", "data", "name", "blending", "contrast_limits", "colormap", "gamma",
                "contour", "show_selected_label", "selected_label")

    def __init__(self, viewer: napari.Viewer):
        from napari.components import ViewerModel
        from napari.qt import QtViewer
        from qtpy.QtCore import Qt
        from qtpy.QtWidgets import QSplitter

        self.viewer = viewer = getattr(viewer, "__wrapped__", viewer)  # the model: a plugin proxy re-wraps each layer
        self.models: dict[str, ViewerModel] = {}
        self.framings: dict[str, _Framing] = {}
        self._copies: dict[str, dict[int, object]] = {}  # view name -> {id(source layer): copy}
        self._links: dict[int, list[tuple[object, object]]] = {}  # id(source) -> [(emitter, callback)]
        self._thin_noted: set[str] = set()
        self._crosshair_extent = None  # the extent the crosshair lines were made for
        self.widget = QSplitter(Qt.Orientation.Horizontal)
        self.widget.setMinimumHeight(260)
        self._syncing = False
        for name in self.VIEWS:
            model = ViewerModel(title=name)
            model.text_overlay.update({"visible": True, "text": self.CAPTIONS[name], "position": "top_left",
                                       "font_size": 9, "color": (0.85, 0.85, 0.85, 1.0)})
            qt_viewer = QtViewer(model)
            keep_slider_labels_readable(qt_viewer.dims, model.dims, axis_names=False)
            self.models[name] = model
            self.framings[name] = _Framing(model)
            self._copies[name] = {}
            self.widget.addWidget(qt_viewer)  # Qt owns the canvas; no Python reference kept here
            model.dims.events.current_step.connect(self._on_view_step)
            model.mouse_drag_callbacks.append(self._click_to_cursor)
        _THREE_VIEWS[viewer] = self
        viewer.dims.events.current_step.connect(self._on_main_step)
        viewer.dims.events.point.connect(self._update_crosshairs)
        viewer.mouse_drag_callbacks.append(self._click_to_cursor)
        self._list_events = ((viewer.layers.events.inserted, self._on_inserted),
                             (viewer.layers.events.removing, self._on_removing),
                             (viewer.layers.events.removed, self._on_removed),
                             (viewer.layers.events.moved, self._sync_order),
                             (viewer.layers.events.reordered, self._sync_order))
        for emitter, callback in self._list_events:
            emitter.connect(callback)
        for layer in list(viewer.layers):
            self._add_copies(layer)
        self._sync_order()
        self._on_main_step()
        self._update_crosshairs()

    # -- layers ---------------------------------------------------------------------------------
    def sources(self) -> list:
        """The main viewer's layers that have copies, in its order."""
        return [ly for ly in self.viewer.layers if _mirrorable(ly)]

    def _on_inserted(self, event) -> None:
        self._add_copies(event.value)
        self._sync_order()

    def _add_copies(self, src) -> None:
        from napari.layers import Layer

        if not _mirrorable(src) or id(src) in self._copies["coronal"]:
            return
        data, state, kind = src.as_layer_data_tuple()
        first = not self._copies["coronal"]
        self._syncing = True  # a view's first layer moves its own slider to the middle: not the cursor
        try:
            for name, model in self.models.items():
                copy = Layer.create(data, state, kind)
                index = len(self._copies[name])  # below the crosshair; _sync_order fixes the order
                model.layers.insert(index, copy)
                self._copies[name][id(src)] = copy
                if first:
                    self._start_view(name, model, src)
        finally:
            self._syncing = False
        self._link(src)
        self._shape_crosshairs()
        self._on_main_step()
        if first:
            for framing in self.framings.values():
                framing.fit()
            self._say_if_too_thin(src)

    def _start_view(self, name, model, src) -> None:
        """With its first layer: the crosshair on that layer's grid, the view's plane, superior up."""
        if self.CROSSHAIR not in model.layers:
            # two lines through the layer's origin, moved to the cursor by its translate (a Shapes layer's
            # data is slow to set: ~0.1 s a time, on every cursor move); the first layer's voxel size, so
            # that the views' sliders keep that layer's steps
            model.add_shapes(name=self.CROSSHAIR, ndim=3, scale=src.scale, edge_color=[self.CROSSHAIR_COLOR],
                             face_color="transparent", opacity=1.0,
                             blending="translucent_no_depth")  # drawn over the labels
        if tuple(model.dims.order) != self.VIEWS[name]:
            model.dims.order = self.VIEWS[name]
        name_slider_axes(model)
        model.camera.orientation2d = ("up", "right")  # superior at the top

    def _on_removing(self, event) -> None:
        """Before the main viewer removes a layer: remove its copies, so that the main canvas's own garbage
        collection (which follows) frees them too, instead of one collection per extra canvas."""
        layer = self.viewer.layers[event.index]
        if id(layer) not in self._copies["coronal"]:
            return
        self._unlink(layer)
        with _collection_deferred():
            for name, model in self.models.items():
                copy = self._copies[name].pop(id(layer))
                with model.dims.events.current_step.blocker(self._on_view_step):
                    model.layers.remove(copy)

    def _on_removed(self, event=None) -> None:
        if self._copies["coronal"]:
            self._shape_crosshairs()

    def _sync_order(self, event=None) -> None:
        """Copies in the main viewer's order, the crosshair on top."""
        for name, model in self.models.items():
            wanted = [self._copies[name][id(src)] for src in self.sources() if id(src) in self._copies[name]]
            for i, copy in enumerate(wanted):
                j = model.layers.index(copy)
                if j != i:
                    model.layers.move(j, i)

    def _say_if_too_thin(self, src) -> None:
        why = too_thin(src.data.shape, src.scale)
        for name, model in self.models.items():
            model.text_overlay.text = (f"{name.title()}: too thin to show ({why})" if why else self.CAPTIONS[name])
        if why and src.name not in self._thin_noted:
            from napari.utils.notifications import show_info

            self._thin_noted.add(src.name)
            show_info(f"{src.name}: only {why}, too thin for the coronal and sagittal views; use the axial view")

    def _link(self, src) -> None:
        links = self._links.setdefault(id(src), [])
        for attr in self.FOLLOWED:
            emitter = getattr(src.events, attr, None)
            if emitter is None or not hasattr(src, attr):
                continue

            def _follow(event=None, attr=attr, src=src):
                for copies in self._copies.values():
                    copy = copies.get(id(src))
                    if copy is not None and getattr(copy, attr) is not getattr(src, attr):
                        setattr(copy, attr, getattr(src, attr))

            emitter.connect(_follow)
            links.append((emitter, _follow))
        emitter = getattr(src.events, "paint", None)  # painted in place: the shared array is redrawn
        if emitter is not None:
            def _refresh(event=None, src=src):
                for copies in self._copies.values():
                    copy = copies.get(id(src))
                    if copy is not None and copy.data is src.data:
                        copy.refresh()

            emitter.connect(_refresh)
            links.append((emitter, _refresh))

    def _unlink(self, src) -> None:
        for emitter, callback in self._links.pop(id(src), []):
            emitter.disconnect(callback)

    def _shape_crosshairs(self) -> None:
        """Lines long enough to span the images from any cursor inside them, about 0.4 % of the view's larger
        side wide; set when the layers' extent changes (a layer added or removed), not on cursor moves."""
        extent = np.asarray(self.viewer.layers.extent.world, float)  # (2, ndim) world min / max
        if extent.shape[-1] != 3 or not np.all(np.isfinite(extent)) or self._crosshair_extent is not None \
                and np.array_equal(extent, self._crosshair_extent):
            self._update_crosshairs()
            return
        self._crosshair_extent = extent
        size = extent[1] - extent[0]
        first = self.sources()[0] if self.sources() else None
        for model in self.models.values():
            if self.CROSSHAIR not in model.layers:
                continue
            rows, cols = model.dims.displayed  # vertical, horizontal axes of this view
            lines = []
            for axis in (cols, rows):  # a line along `axis` through the origin (the cursor once translated)
                line = np.zeros((2, 3))
                line[0, axis], line[1, axis] = -size[axis], size[axis]
                lines.append(line)
            width = 0.004 * float(max(size[rows], size[cols]))
            layer = model.layers[self.CROSSHAIR]
            if first is not None and tuple(layer.scale) != tuple(first.scale):  # the (new) first layer's voxels
                layer.scale = first.scale
            scale = np.asarray(layer.scale, float)
            layer.data = [line / scale for line in lines]  # in the layer's data units
            layer.shape_type = ["line", "line"]
            layer.edge_width = [width / scale[rows], width / scale[cols]]
            layer.edge_color = [self.CROSSHAIR_COLOR] * 2
        self._update_crosshairs()

    def _update_crosshairs(self, event=None) -> None:
        """Move each extra view's crosshair to the cursor: to the point its view slices at (so the lines lie
        exactly on the slice shown, and are drawn)."""
        for model in self.models.values():
            if self.CROSSHAIR not in model.layers or model.dims.ndim != 3:
                continue
            layer = model.layers[self.CROSSHAIR]
            point = tuple(float(v) for v in model.dims.point)
            if tuple(layer.translate) != point:
                layer.translate = point

    # -- cursor ---------------------------------------------------------------------------------
    def _on_main_step(self, event=None) -> None:
        if self._syncing:
            return
        self._syncing = True
        try:
            for model in self.models.values():
                if model.dims.ndim == self.viewer.dims.ndim and model.layers:
                    model.dims.point = self.viewer.dims.point
        finally:
            self._syncing = False
        self._update_crosshairs()

    def _on_view_step(self, event=None) -> None:
        if self._syncing:
            return
        source = next((m for m in self.models.values() if m.dims is event.source), None)
        if source is None or source.dims.ndim != self.viewer.dims.ndim:
            return
        self._syncing = True
        try:
            self.viewer.dims.point = source.dims.point
            for model in self.models.values():
                if model is not source:
                    model.dims.point = source.dims.point
        finally:
            self._syncing = False
        self._on_main_step()

    def _click_to_cursor(self, model, event):
        """A click without drag (in the main view or an extra one) moves the shared cursor to the
        clicked point."""
        moved = False
        yield
        while event.type == "mouse_move":
            moved = True
            yield
        if not moved and event.button == 1 and model.dims.ndisplay == 2:
            axes = tuple(model.dims.displayed)
            self.viewer.dims.set_point(axes, tuple(event.position[a] for a in axes))

    def close(self) -> None:
        for emitter, callback in self._list_events:
            emitter.disconnect(callback)
        self.viewer.dims.events.current_step.disconnect(self._on_main_step)
        self.viewer.dims.events.point.disconnect(self._update_crosshairs)
        if self._click_to_cursor in self.viewer.mouse_drag_callbacks:
            self.viewer.mouse_drag_callbacks.remove(self._click_to_cursor)
        for key in list(self._links):
            for emitter, callback in self._links.pop(key):
                emitter.disconnect(callback)
        for framing in self.framings.values():
            framing.disconnect()
        with _collection_deferred():
            for name, model in self.models.items():
                model.layers.clear()
                self._copies[name].clear()
        _THREE_VIEWS.pop(self.viewer, None)


def fit_slider_labels(qt_dims, *, axis_names: bool = True) -> None:
    """Give every slider's slice numbers the width their own font needs, and hide the axis names when
    ``axis_names`` is False (an extra view: its caption names the plane).

    napari sizes the numbers with its dims widget's font metrics, narrower than the labels' styled font
    ("100" was drawn as "10C"), and caps the axis name at a fifth of the slider ("co…" in a narrow view)."""
    for slider in getattr(qt_dims, "slider_widgets", []):
        nsteps = int(slider.dims.nsteps[slider.axis]) if slider.axis < len(slider.dims.nsteps) else 1
        digits = "8" * len(str(max(nsteps - 1, 0)))
        for label in (slider.curslice_label, slider.totslice_label):
            width = label.fontMetrics().horizontalAdvance(digits) + 14
            if label.minimumWidth() < width:
                label.setFixedWidth(width)
        if not axis_names:
            slider.axis_label.hide()


def keep_slider_labels_readable(qt_dims, dims, *, axis_names: bool = True) -> None:
    """:func:`fit_slider_labels` now and after each change napari re-sizes the labels on (on the next
    event-loop turn, after napari's own handlers)."""
    from qtpy.QtCore import QTimer

    ref = weakref.ref(qt_dims)

    def _fit():
        widget = ref()
        if widget is not None:
            try:
                fit_slider_labels(widget, axis_names=axis_names)
            except RuntimeError:  # the Qt widget is already deleted
                pass

    def _later(event=None):
        QTimer.singleShot(0, _fit)

    for name in ("ndim", "range", "order", "axis_labels", "ndisplay"):
        getattr(dims.events, name).connect(_later)
    _later()


class ViewingWidget(ScrollableContainer):
    """Dock widget: window/level presets, W/L spin boxes, mouse window/level mode, three views."""

    def __init__(self, viewer: napari.viewer.Viewer):
        super().__init__(labels=True)
        self._viewer = viewer
        self._model = getattr(viewer, "__wrapped__", viewer)  # napari's plugin proxy wraps each layer anew
        self._three_views: ThreeViews | None = None
        self._dock = None
        self._views_shown = False
        self._saved_pan = True
        self._linking = False

        self.layer = ComboBox(label="CT layer", choices=self._layer_choices, nullable=True)
        self.width_box = FloatSpinBox(label="Window (W)", min=MIN_WIDTH, max=10000, step=10, value=400)
        self.level_box = FloatSpinBox(label="Level (L)", min=-3000, max=5000, step=5, value=50)
        self.preset_buttons = {name: PushButton(text=f"{name.title()}  W{w:g}/L{lv:g}")
                               for name, (w, lv) in PRESETS.items()}
        self.mouse_wl = CheckBox(text="Mouse window/level (left-drag)")
        self.three_views_button = PushButton(text="Three views (axial / coronal / sagittal)")
        self.extend([self.layer, self.width_box, self.level_box, *self.preset_buttons.values(),
                     self.mouse_wl, self.three_views_button])

        for name, button in self.preset_buttons.items():
            button.changed.connect(lambda _=None, name=name: self.apply_preset(name))
        self.width_box.changed.connect(self._on_boxes)
        self.level_box.changed.connect(self._on_boxes)
        self.layer.changed.connect(self._on_layer)
        self.mouse_wl.changed.connect(self._on_mouse_wl)
        self.three_views_button.changed.connect(lambda _=None: self.toggle_three_views())
        for emitter in (viewer.layers.events.inserted, viewer.layers.events.removed):
            emitter.connect(self.reset_choices)
        viewer.layers.events.inserted.connect(self._link_windows)
        keep_radiological(viewer)
        self.reset_choices()
        self._link_windows()
        self._on_layer()
        self._slider_hook = watch(self.native, (QEvent.Type.Show,), self._fit_main_sliders, once=True)

    def _fit_main_sliders(self, native) -> None:
        """Once docked: keep the main viewer's slider labels readable (found through the window this dock is in:
        no private napari attribute)."""
        from napari._qt.widgets.qt_dims import QtDims

        window = native.window()
        for qt_dims in window.findChildren(QtDims) if window is not None else ():
            if qt_dims.dims is self._model.dims:
                keep_slider_labels_readable(qt_dims, self._model.dims)

    def _layer_choices(self, widget=None):
        return [(ly.name, ly) for ly in ct_layers(self._viewer)]

    def reset_choices(self, *_) -> None:
        """Refresh the layer list; pick the CT when nothing is chosen yet."""
        super().reset_choices()
        choices = [c for c in self.layer.choices if c is not None]
        if self.layer.value is None and choices:
            self.layer.value = choices[0]

    # -- window / level -------------------------------------------------------------------------
    def apply_preset(self, name: str) -> None:
        width, level = PRESETS[name]
        self.set_window(width, level)

    def set_window(self, width: float, level: float) -> None:
        """Set W/L on the chosen CT layer and the CT layers linked to it (the original and the synthesis
        result on its grid: see :func:`linked_ct_layers`), and show it in the spin boxes."""
        layer = self.layer.value
        if layer is None:
            from napari.utils.notifications import show_warning

            show_warning("Window / level: open a CT image first")
            return
        low, high = window_to_contrast_limits(width, level)
        self._linking = True
        try:
            for linked in linked_ct_layers(self._model, getattr(layer, "__wrapped__", layer)):
                apply_window(linked, low, high)
        finally:
            self._linking = False

    def _link_windows(self, event=None) -> None:
        """Follow contrast changes made anywhere (napari's layer controls included) on every CT layer."""
        for layer in ct_layers(self._model):
            layer.events.contrast_limits.connect(self._on_any_limits)  # no-op when connected

    def _on_any_limits(self, event) -> None:
        if self._linking:
            return
        source = event.source
        if not any(ly is source for ly in self._model.layers):
            return
        low, high = (float(v) for v in source.contrast_limits)
        self._linking = True
        try:
            for linked in linked_ct_layers(self._model, source)[1:]:
                apply_window(linked, low, high)
        finally:
            self._linking = False

    def _on_boxes(self, _=None) -> None:
        if self.layer.value is not None:
            current = contrast_limits_to_window(*self.layer.value.contrast_limits)
            wanted = (self.width_box.value, self.level_box.value)
            if max(abs(a - b) for a, b in zip(current, wanted)) > 1e-6:
                self.set_window(*wanted)

    def _on_layer(self, _=None) -> None:
        for layer in ct_layers(self._viewer):
            layer.events.contrast_limits.disconnect(self._show_limits)
        if self.layer.value is not None:
            self.layer.value.events.contrast_limits.connect(self._show_limits)
            self._show_limits()

    def _show_limits(self, event=None) -> None:
        width, level = contrast_limits_to_window(*self.layer.value.contrast_limits)
        with self.width_box.changed.blocked(), self.level_box.changed.blocked():
            self.width_box.value = max(MIN_WIDTH, width)
            self.level_box.value = level

    # -- mouse window / level -------------------------------------------------------------------
    def _on_mouse_wl(self, on: bool) -> None:
        callbacks = self._viewer.mouse_drag_callbacks
        if on and self._drag_window_level not in callbacks:
            callbacks.append(self._drag_window_level)
            self._saved_pan = self._viewer.camera.mouse_pan
            self._viewer.camera.mouse_pan = False
        elif not on and self._drag_window_level in callbacks:
            callbacks.remove(self._drag_window_level)
            self._viewer.camera.mouse_pan = self._saved_pan

    def _drag_window_level(self, viewer, event):
        """Left-drag: horizontal changes the width, vertical the level (see drag_window_level)."""
        layer = self.layer.value
        if layer is None or event.button != 1:
            return
        start = tuple(event.pos)
        width0, level0 = contrast_limits_to_window(*layer.contrast_limits)
        yield
        while event.type == "mouse_move":
            dx, dy = event.pos[0] - start[0], event.pos[1] - start[1]
            self.set_window(*drag_window_level(width0, level0, dx, dy))
            yield

    # -- three views ----------------------------------------------------------------------------
    def toggle_three_views(self) -> bool:
        """Show (or hide) the coronal + sagittal views; returns whether they are shown."""
        window = getattr(self._viewer, "window", None)
        if window is None:
            from napari.utils.notifications import show_error

            show_error("Three views: needs a napari window (not a headless viewer model)")
            return False
        if self._dock is None:
            from qtpy.QtCore import Qt
            from qtpy.QtWidgets import QMainWindow

            main = self.native.window()
            if isinstance(main, QMainWindow):  # the layer list and controls keep the full height on the left
                main.setCorner(Qt.Corner.BottomLeftCorner, Qt.DockWidgetArea.LeftDockWidgetArea)
            self._three_views = ThreeViews(self._viewer)
            self._dock = window.add_dock_widget(self._three_views.widget, name="Three views", area="bottom")
            if isinstance(main, QMainWindow):  # about 40 % of the window: the axial view keeps the rest
                main.resizeDocks([getattr(self._dock, "__wrapped__", self._dock)], [max(260, int(0.4 * main.height()))], Qt.Orientation.Vertical)
            self._views_shown = True
        else:
            self._views_shown = not self._views_shown
            self._dock.setVisible(self._views_shown)
        self._refit_after_layout()
        return self._views_shown

    def _refit_after_layout(self) -> None:
        """Fit the axial view again once the canvas got its new height (the bottom dock halves it, which
        otherwise cuts off the front and back of the abdomen)."""
        from qtpy.QtCore import QTimer

        viewer = self._viewer
        QTimer.singleShot(0, lambda: viewer.reset_view() if viewer.layers else None)
