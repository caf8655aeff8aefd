"""The coronal and sagittal views beside the main (axial) canvas: :class:`ThreeViews`.

Each side view is a napari ``ViewerModel`` with its own canvas holding light copies of the main viewer's 3D
image and labels layers (the same arrays, never a data copy), kept up to date one layer at a time, plus the
side view's own drawing of the synthetic tumour's outline (a Shapes layer cannot be sliced across planes).
The "Window / level" widget (:mod:`difftumor_napari._qt.viewing_widget`) shows them;
:func:`~difftumor_napari.layers.three_views_of` finds them for a viewer (:func:`~difftumor_napari.layers.focus_views`
frames the tumour in them).
"""

from __future__ import annotations

import contextlib
import gc
from typing import TYPE_CHECKING

import numpy as np

from difftumor_napari._qt.viewing_widget import keep_slider_labels_readable
from difftumor_napari.layers import _THREE_VIEWS
from difftumor_napari.viewing import name_slider_axes

if TYPE_CHECKING:
    import napari

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


def _outline_mask(layer):
    """The mask a tumour outline (:func:`difftumor_napari.layers.outline_layer`) was drawn from, else None."""
    from napari.layers import Shapes

    return layer.metadata.get("difftumor", {}).get("outline_of") if isinstance(layer, Shapes) else None


def _mirrorable(layer) -> bool:
    """3D image and labels layers, and a tumour outline (a Shapes layer that names its mask)."""
    from napari.layers import Image, Labels, Shapes

    if isinstance(layer, Shapes):
        return layer.ndim == 3 and _outline_mask(layer) is not None
    return isinstance(layer, (Image, Labels)) and layer.ndim == 3 and not getattr(layer, "rgb", False)


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
            from difftumor_napari.layers import focus_zoom

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
    :func:`difftumor_napari.layers.focus_views` framed a point or the user panned or zoomed.
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
    FOLLOWED_OUTLINE = ("visible", "opacity", "name", "blending")  # an outline copy draws its own lines

    def __init__(self, viewer: napari.Viewer):
        from napari.components import ViewerModel
        from napari.qt import QtViewer
        from qtpy.QtCore import Qt, QTimer
        from qtpy.QtWidgets import QSplitter

        self.viewer = viewer = getattr(viewer, "__wrapped__", viewer)  # the model: a plugin proxy re-wraps each layer
        self.models: dict[str, ViewerModel] = {}
        self.framings: dict[str, _Framing] = {}
        self._copies: dict[str, dict[int, object]] = {}  # view name -> {id(source layer): copy}
        self._links: dict[int, list[tuple[object, object]]] = {}  # id(source) -> [(emitter, callback)]
        self._thin_noted: set[str] = set()
        self._crosshair_extent: dict[str, np.ndarray] = {}  # view name -> the extent its crosshair was made for
        self._pending: list[tuple[object, str]] = []  # (source layer, view name) still to be copied, in order
        self._timer = QTimer()
        self._timer.setSingleShot(True)
        self._timer.setInterval(0)
        self._timer.timeout.connect(self._copy_next)
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
        for layer in list(viewer.layers):  # what is open already is shown at once
            self._add_source(layer)
        self.flush()
        self._on_main_step()
        self._update_crosshairs()

    # -- layers ---------------------------------------------------------------------------------
    def sources(self) -> list:
        """The main viewer's layers that are (or will be) copied, in its order."""
        return [ly for ly in self.viewer.layers if _mirrorable(ly)]

    def pending(self) -> int:
        """How many copies (one layer in one view) are still to be made."""
        return len(self._pending)

    def flush(self) -> None:
        """Make every pending copy now (scripts and tests; the GUI makes one per event-loop turn)."""
        while self._pending:
            self._copy_next()

    def _on_inserted(self, event) -> None:
        self._add_source(event.value)

    def _add_source(self, src) -> None:
        if not _mirrorable(src) or id(src) in self._links:
            return
        self._link(src)
        self._queue(src)

    def _queue(self, src) -> None:
        """Copy ``src`` into each view on later event-loop turns, one view a turn: a copy costs its view a
        new canvas visual (0.2-0.5 s on a loaded 2-core machine), and made in the handler of the main
        viewer's insert the two added up with the main canvas's own into one frozen window. A hidden layer
        (the original CT after a synthesis, the tumour labels under their outline) waits until it is shown."""
        if not src.visible:
            return
        for name in self.models:
            if id(src) not in self._copies[name] and (src, name) not in self._pending:
                self._pending.append((src, name))
        if self._pending and not self._timer.isActive():
            self._timer.start()

    def _copy_next(self) -> None:
        while self._pending:
            src, name = self._pending.pop(0)
            if id(src) in self._links and id(src) not in self._copies[name]:  # still in the main viewer
                self._add_copy(src, name)
                break
        if self._pending:
            self._timer.start()

    def _make_copy(self, src, view: str):
        """A light copy of ``src`` for ``view``: the same data array; an outline is drawn in the view's plane."""
        from napari.layers import Layer

        mask = _outline_mask(src)
        if mask is not None:  # the voxels' edge in this view's plane: napari's label contour (a Shapes outline
            # computed per plane rendered with gaps in these views), on a uint8 view of the mask, not a copy
            from napari.layers import Labels

            from difftumor_napari.layers import tumor_colormap

            data = np.asarray(mask)
            data = data.view(np.uint8) if data.dtype == np.bool_ else data
            copy = Labels(data, name=src.name, scale=src.scale, translate=src.translate, colormap=tumor_colormap(),
                          opacity=src.opacity, visible=src.visible, blending="translucent_no_depth",
                          metadata={"difftumor": {"kind": "outline"}})
            copy.contour = 1
            return copy
        return Layer.create(*src.as_layer_data_tuple())

    def _add_copy(self, src, name: str) -> None:
        model = self.models[name]
        first = not self._copies[name]
        self._syncing = True  # a view's first layer moves its own slider to the middle: not the cursor
        try:
            copy = self._make_copy(src, name)
            index = len(self._copies[name])  # below the crosshair; _sync_order fixes the order
            model.layers.insert(index, copy)
            self._copies[name][id(src)] = copy
            if first:
                self._start_view(name, model)
        finally:
            self._syncing = False
        self._sync_order()
        self._shape_crosshair(name)
        self._on_main_step()
        if first:
            self.framings[name].fit()
            self._say_if_too_thin(src, name)

    def _start_view(self, name, model) -> None:
        """With its first layer: the view's plane, superior up."""
        if tuple(model.dims.order) != self.VIEWS[name]:
            model.dims.order = self.VIEWS[name]
        name_slider_axes(model)
        model.camera.orientation2d = ("up", "right")  # superior at the top

    def _on_removing(self, event) -> None:
        """Before the main viewer removes a layer: remove its copies, so that the main canvas's own garbage
        collection (which follows) frees them too, instead of one collection per extra canvas."""
        layer = self.viewer.layers[event.index]
        if id(layer) not in self._links:
            return
        self._unlink(layer)
        self._pending = [(src, name) for src, name in self._pending if src is not layer]
        with _collection_deferred():
            for name, model in self.models.items():
                copy = self._copies[name].pop(id(layer), None)
                if copy is not None:
                    with model.dims.events.current_step.blocker(self._on_view_step):
                        model.layers.remove(copy)

    def _on_removed(self, event=None) -> None:
        for name in self.models:
            if self._copies[name]:
                self._shape_crosshair(name)

    def _sync_order(self, event=None) -> None:
        """Copies in the main viewer's order, the crosshair on top."""
        for name, model in self.models.items():
            wanted = [self._copies[name][id(src)] for src in self.sources() if id(src) in self._copies[name]]
            for i, copy in enumerate(wanted):
                j = model.layers.index(copy)
                if j != i:
                    model.layers.move(j, i)

    def _say_if_too_thin(self, src, name: str) -> None:
        why = too_thin(src.data.shape, src.scale) if hasattr(src.data, "shape") else None
        self.models[name].text_overlay.text = (f"{name.title()}: too thin to show ({why})" if why
                                               else self.CAPTIONS[name])
        if why and src.name not in self._thin_noted:
            from napari.utils.notifications import show_info

            self._thin_noted.add(src.name)
            show_info(f"{src.name}: only {why}, too thin for the coronal and sagittal views; use the axial view")

    def _link(self, src) -> None:
        """Copies follow ``src``'s display settings (an outline copy: only how it is shown, its lines are its
        own); ``src`` shown for the first time gets its copies."""
        links = self._links.setdefault(id(src), [])
        for attr in self.FOLLOWED_OUTLINE if _outline_mask(src) is not None else self.FOLLOWED:
            emitter = getattr(src.events, attr, None)
            if emitter is None or not hasattr(src, attr):
                continue

            def _follow(event=None, attr=attr, src=src):
                for copies in self._copies.values():
                    copy = copies.get(id(src))
                    if copy is not None and getattr(copy, attr) is not getattr(src, attr):
                        setattr(copy, attr, getattr(src, attr))
                if attr == "visible" and src.visible:
                    self._queue(src)

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

    def _shape_crosshair(self, name: str) -> None:
        """The crosshair of view ``name``: two lines through the origin of the first layer's grid, moved to the
        cursor by their translate (a Shapes layer's data is slow to set: ~0.1 s a time, so not on every cursor
        move), long enough to span the images from any cursor inside them, about 0.4 % of the view's larger
        side wide; made with the view's first copy and set again when the layers' extent changes (a layer
        added or removed), drawn over the labels (no depth test)."""
        from napari.layers import Shapes

        model = self.models[name]
        extent = np.asarray(self.viewer.layers.extent.world, float)  # (2, ndim) world min / max
        sources = [src for src in self.sources() if id(src) in self._copies[name]]
        made = self._crosshair_extent.get(name)
        if extent.shape[-1] != 3 or not np.all(np.isfinite(extent)) or not sources \
                or made is not None and np.array_equal(extent, made):
            self._update_crosshairs()
            return
        self._crosshair_extent[name] = extent
        size = extent[1] - extent[0]
        rows, cols = model.dims.displayed  # vertical, horizontal axes of this view
        scale = np.asarray(sources[0].scale, float)  # the first layer's voxels: the sliders keep its steps
        lines = []
        for axis in (cols, rows):  # a line along `axis` through the origin (the cursor once translated)
            line = np.zeros((2, 3))
            line[0, axis], line[1, axis] = -size[axis], size[axis]
            lines.append(line / scale)  # in the layer's data units
        width = 0.004 * float(max(size[rows], size[cols]))
        widths = [width / scale[rows], width / scale[cols]]
        if self.CROSSHAIR in model.layers:
            layer = model.layers[self.CROSSHAIR]
            if tuple(layer.scale) != tuple(scale):
                layer.scale = scale
            layer.data = lines
            layer.shape_type = ["line", "line"]
            layer.edge_width = widths
            layer.edge_color = [self.CROSSHAIR_COLOR] * 2
        else:  # everything in one constructor: one slice and one visual instead of one per property
            model.layers.append(Shapes(lines, ndim=3, shape_type="line", name=self.CROSSHAIR, scale=scale,
                                       edge_width=widths, edge_color=[self.CROSSHAIR_COLOR] * 2,
                                       face_color="transparent", opacity=1.0, blending="translucent_no_depth"))
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
        self._timer.stop()
        self._pending.clear()
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
