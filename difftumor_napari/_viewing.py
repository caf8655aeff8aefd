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

import weakref
from typing import TYPE_CHECKING

import numpy as np

from magicgui.widgets import CheckBox, ComboBox, FloatSpinBox, PushButton

from difftumor_napari._dock import ScrollableContainer

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


_RADIOLOGICAL: "weakref.WeakSet" = weakref.WeakSet()  # viewers already kept radiological


def keep_radiological(viewer: napari.components.ViewerModel) -> None:
    """Keep superior at the top whenever the z axis is displayed vertically (now and later), and name
    the sliders after their planes. Every DiffTumor widget calls it; a viewer is set up once."""
    model = getattr(viewer, "__wrapped__", viewer)  # the same viewer behind napari's plugin proxy
    if model in _RADIOLOGICAL:
        return
    _RADIOLOGICAL.add(model)

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


class ThreeViews:
    """Coronal and sagittal canvases beside the main (axial) canvas, sharing its cursor.

    Each extra view is a napari ``ViewerModel`` with its own ``QtViewer`` canvas holding light copies
    of the main viewer's image and labels layers (same arrays, no data copy) whose contrast,
    colormap, visibility, opacity and data follow the originals. Moving the slider in any view moves
    the others; a click (without drag) in any of the three views moves the cursor (and so the other
    views' slices) there. Each extra view draws a crosshair through the cursor: its horizontal line is
    the axial slice, its vertical line the slice of the other extra view.
    """

    CROSSHAIR = "cursor"  # name of the crosshair layer in the extra views (not a copy of a main layer)
    CROSSHAIR_COLOR = (0.35, 0.8, 1.0, 0.7)  # light blue: no organ or tumour colour

    # name -> dims order; the last two axes are displayed (vertical, horizontal)
    VIEWS = {"coronal": (1, 0, 2), "sagittal": (2, 0, 1)}
    # what each view's screen directions are in the patient (LPS grid, superior kept at the top)
    CAPTIONS = {"coronal": "Coronal · superior up · patient's left on the right",
                "sagittal": "Sagittal · superior up · anterior on the left"}

    def __init__(self, viewer: napari.Viewer):
        from napari.components import ViewerModel
        from napari.qt import QtViewer
        from qtpy.QtCore import Qt
        from qtpy.QtWidgets import QSplitter

        self.viewer = viewer
        self.models: dict[str, ViewerModel] = {}
        self.widget = QSplitter(Qt.Orientation.Horizontal)
        self.widget.setMinimumHeight(260)
        for name in self.VIEWS:
            model = ViewerModel(title=name)
            model.text_overlay.update({"visible": True, "text": self.CAPTIONS[name], "position": "top_left",
                                       "font_size": 9, "color": (0.85, 0.85, 0.85, 1.0)})
            qt_viewer = QtViewer(model)
            self.models[name] = model
            self.widget.addWidget(qt_viewer)  # Qt owns the canvas; no Python reference kept here
            model.dims.events.current_step.connect(self._on_view_step)
            model.mouse_drag_callbacks.append(self._click_to_cursor)
        self._links: list[tuple[object, object]] = []
        self._syncing = False
        viewer.dims.events.current_step.connect(self._on_main_step)
        viewer.dims.events.point.connect(self._update_crosshairs)
        viewer.mouse_drag_callbacks.append(self._click_to_cursor)
        for emitter in (viewer.layers.events.inserted, viewer.layers.events.removed,
                        viewer.layers.events.reordered):
            emitter.connect(self.rebuild)
        self.rebuild()

    # -- layers ---------------------------------------------------------------------------------
    def rebuild(self, event=None) -> None:
        """Recreate the copies from the main viewer's 3D image/labels layers."""
        from napari.layers import Image, Labels, Layer

        for source_emitter, callback in self._links:
            source_emitter.disconnect(callback)
        self._links = []
        sources = [ly for ly in self.viewer.layers
                   if isinstance(ly, (Image, Labels)) and ly.ndim == 3 and not getattr(ly, "rgb", False)]
        for name, model in self.models.items():
            model.layers.clear()
            for src in sources:
                data, state, kind = src.as_layer_data_tuple()
                copy = Layer.create(data, state, kind)
                model.layers.append(copy)
                self._link(src, copy)
            if sources:
                # on the first layer's voxel grid: a shape is drawn only on the slice its (rounded) vertex
                # coordinates fall in, and the cursor sits on voxel centres of that grid
                model.add_shapes(name=self.CROSSHAIR, ndim=3, scale=sources[0].scale, translate=sources[0].translate,
                                 edge_color=[self.CROSSHAIR_COLOR], face_color="transparent", opacity=1.0,
                                 blending="translucent_no_depth")  # drawn over the labels
                model.dims.order = self.VIEWS[name]
                name_slider_axes(model)
                model.camera.orientation2d = ("up", "right")  # superior at the top
                model.reset_view()
        self._on_main_step()
        self._update_crosshairs()

    def _update_crosshairs(self, event=None) -> None:
        """Redraw each extra view's crosshair through the main viewer's cursor, spanning the images."""
        extent = self.viewer.layers.extent.world  # (2, ndim) world min / max of the main layers
        point = np.asarray(self.viewer.dims.point, float)
        for model in self.models.values():
            if self.CROSSHAIR not in model.layers or point.size != 3 or not np.all(np.isfinite(extent)):
                continue
            rows, cols = model.dims.displayed  # vertical, horizontal axes of this view
            layer = model.layers[self.CROSSHAIR]
            lines = []
            for axis in (cols, rows):  # a line along `axis` through the cursor
                a, b = point.copy(), point.copy()
                a[axis], b[axis] = extent[0, axis], extent[1, axis]
                lines.append(np.stack([layer.world_to_data(a), layer.world_to_data(b)]))
            # about 0.4 % of the view's larger side, in the layer's data units (voxels) across each line
            side = 0.004 * float(max(extent[1, rows] - extent[0, rows], extent[1, cols] - extent[0, cols]))
            layer.data = lines
            layer.shape_type = ["line", "line"]
            layer.edge_width = [side / float(layer.scale[rows]), side / float(layer.scale[cols])]
            layer.edge_color = [self.CROSSHAIR_COLOR] * 2

    def _link(self, src, copy) -> None:
        names = ["visible", "opacity", "data"]
        names += ["contrast_limits", "colormap", "gamma"] if hasattr(src, "contrast_limits") else []
        for attr in names:
            emitter = getattr(src.events, attr)

            def _follow(event=None, attr=attr, copy=copy, src=src):
                setattr(copy, attr, getattr(src, attr))

            emitter.connect(_follow)
            self._links.append((emitter, _follow))
        if hasattr(src.events, "paint"):
            emitter = src.events.paint
            emitter.connect(copy.refresh)
            self._links.append((emitter, copy.refresh))

    # -- cursor ---------------------------------------------------------------------------------
    def _on_main_step(self, event=None) -> None:
        if self._syncing:
            return
        self._syncing = True
        try:
            for model in self.models.values():
                if model.dims.ndim == self.viewer.dims.ndim:
                    model.dims.point = self.viewer.dims.point
        finally:
            self._syncing = False

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
        for emitter in (self.viewer.layers.events.inserted, self.viewer.layers.events.removed,
                        self.viewer.layers.events.reordered):
            emitter.disconnect(self.rebuild)
        self.viewer.dims.events.current_step.disconnect(self._on_main_step)
        self.viewer.dims.events.point.disconnect(self._update_crosshairs)
        if self._click_to_cursor in self.viewer.mouse_drag_callbacks:
            self.viewer.mouse_drag_callbacks.remove(self._click_to_cursor)
        for source_emitter, callback in self._links:
            source_emitter.disconnect(callback)
        self._links = []
        for model in self.models.values():
            model.layers.clear()


class ViewingWidget(ScrollableContainer):
    """Dock widget: window/level presets, W/L spin boxes, mouse window/level mode, three views."""

    def __init__(self, viewer: napari.viewer.Viewer):
        super().__init__(labels=True)
        self._viewer = viewer
        self._three_views: ThreeViews | None = None
        self._dock = None
        self._views_shown = False
        self._saved_pan = True

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
        keep_radiological(viewer)
        self.reset_choices()
        self._on_layer()

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
        """Set W/L on the chosen CT layer (and the spin boxes)."""
        layer = self.layer.value
        if layer is None:
            from napari.utils.notifications import show_warning

            show_warning("Window / level: open a CT image first")
            return
        low, high = window_to_contrast_limits(width, level)
        lo_range, hi_range = layer.contrast_limits_range
        if low < lo_range or high > hi_range:  # let the window reach beyond the data range
            layer.contrast_limits_range = (min(lo_range, low), max(hi_range, high))
        layer.contrast_limits = (low, high)

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
            self._three_views = ThreeViews(self._viewer)
            self._dock = window.add_dock_widget(self._three_views.widget, name="Three views", area="bottom")
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
