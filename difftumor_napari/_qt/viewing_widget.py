"""The "Window / level" dock widget (:class:`ViewingWidget`: presets, mouse window/level, three views) and
what keeps every DiffTumor viewer radiological (:func:`keep_radiological`: superior stays at the top whenever
the z axis is shown vertically, the sliders named and readable). The window arithmetic is Qt-free, in
:mod:`difftumor_napari.viewing`; the coronal + sagittal views are :mod:`difftumor_napari._qt.three_views`.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING

from magicgui.widgets import CheckBox, ComboBox, FloatSpinBox, PushButton
from qtpy.QtCore import QEvent

from difftumor_napari._qt.dock import ScrollableContainer, clear_errors_on_success, watch
from difftumor_napari.viewing import (
    MIN_WIDTH,
    PRESETS,
    apply_window,
    contrast_limits_to_window,
    ct_layers,
    drag_window_level,
    linked_ct_layers,
    name_slider_axes,
    vertical_orientation,
    window_to_contrast_limits,
)

if TYPE_CHECKING:
    import napari

_RADIOLOGICAL: weakref.WeakSet = weakref.WeakSet()  # viewers already kept radiological


def keep_radiological(viewer: napari.components.ViewerModel) -> None:
    """Keep superior at the top whenever the z axis is displayed vertically (now and later), name the
    sliders after their planes, and let a success close stale error toasts
    (:func:`~difftumor_napari._qt.dock.clear_errors_on_success`). Every DiffTumor widget calls it; a viewer
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
        self._three_views = None  # the ThreeViews, once shown
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
            from difftumor_napari._qt.three_views import ThreeViews

            self._three_views = ThreeViews(self._viewer)
            self._dock = window.add_dock_widget(self._three_views.widget, name="Three views", area="bottom")
            if isinstance(main, QMainWindow):  # about 40 % of the window: the axial view keeps the rest
                main.resizeDocks([getattr(self._dock, "__wrapped__", self._dock)], [max(260, int(0.4 * main.height()))],
                                 Qt.Orientation.Vertical)
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
