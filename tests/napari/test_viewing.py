"""Window/level presets, mouse window/level, radiological orientation, three views."""

from __future__ import annotations

import numpy as np
import pytest

from difftumor_napari.viewing import (
    PRESETS,
    contrast_limits_to_window,
    drag_window_level,
    vertical_orientation,
    window_to_contrast_limits,
)


# -- pure functions ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, limits",
    [("abdomen", (-150, 250)), ("liver", (-45, 105)), ("soft tissue", (-135, 215)),
     ("bone", (-500, 1300)), ("lung", (-1350, 150))],
)
def test_presets_to_contrast_limits(name, limits):
    assert window_to_contrast_limits(*PRESETS[name]) == limits
    assert contrast_limits_to_window(*limits) == PRESETS[name]


@pytest.mark.parametrize("width", [0, -10])
def test_window_width_must_be_positive(width):
    with pytest.raises(ValueError, match="width"):
        window_to_contrast_limits(width, 40)


def test_drag_window_level():
    assert drag_window_level(400, 50, 0, 0) == (400, 50)
    w, lv = drag_window_level(400, 50, 10, -5, hu_per_pixel=2)
    assert (w, lv) == (420, 40)  # right: wider, up: lower level
    assert drag_window_level(400, 50, -1000, 0)[0] == 1.0  # never below the minimum width


def test_vertical_orientation_keeps_superior_up():
    assert vertical_orientation((0, 1, 2), 2, 3) == "down"  # axial: anterior at the top
    assert vertical_orientation((1, 0, 2), 2, 3) == "up"  # coronal
    assert vertical_orientation((2, 0, 1), 2, 3) == "up"  # sagittal
    assert vertical_orientation((0, 1, 2), 3, 3) == "down"  # 3D view untouched
    assert vertical_orientation((0, 1), 2, 2) == "down"


# -- with a viewer ----------------------------------------------------------------------------
@pytest.fixture
def ct_viewer(make_napari_viewer):
    from backend.io import Geometry, Volume
    from difftumor_napari._reader import volume_to_layer_data

    rng = np.random.default_rng(0)
    ct = rng.integers(-1000, 1200, size=(12, 20, 24)).astype(np.int16)
    lab = np.zeros(ct.shape, np.uint8)
    lab[3:8, 5:12, 4:10] = 5
    geo = Geometry((24, 20, 12), (1.5, 1.5, 3.0), (-20.0, -30.0, 100.0), (-1, 0, 0, 0, -1, 0, 0, 0, 1))
    viewer = make_napari_viewer()
    for vol, kind in ((Volume(ct, geo), "ct"), (Volume(lab, geo), "labels")):
        data, kw, layer_type = volume_to_layer_data(vol, kind=kind, name=kind)
        getattr(viewer, f"add_{layer_type}")(data, **kw)
    return viewer


@pytest.fixture
def widget(ct_viewer, qtbot):
    from difftumor_napari._qt.viewing_widget import ViewingWidget

    w = ViewingWidget(ct_viewer)
    qtbot.addWidget(w.native)
    return w


def test_widget_presets_set_contrast_limits(ct_viewer, widget):
    ct = ct_viewer.layers["ct"]
    assert widget.layer.value is ct
    assert tuple(ct.contrast_limits) == (-150, 250)  # opened with the abdomen window
    assert (widget.width_box.value, widget.level_box.value) == (400, 50)
    widget.preset_buttons["lung"].clicked.emit()
    assert tuple(ct.contrast_limits) == (-1350, 150)  # beyond the data range: range extended
    assert (widget.width_box.value, widget.level_box.value) == (1500, -600)
    widget.apply_preset("bone")
    assert tuple(ct.contrast_limits) == (-500, 1300)
    widget.width_box.value = 100
    widget.level_box.value = 30
    assert tuple(ct.contrast_limits) == (-20, 80)
    ct.contrast_limits = (0, 100)  # changes made elsewhere show in the boxes
    assert (widget.width_box.value, widget.level_box.value) == (100, 50)


def test_mouse_window_level_drag(ct_viewer, widget):

    ct = ct_viewer.layers["ct"]
    widget.mouse_wl.value = True
    assert widget._drag_window_level in ct_viewer.mouse_drag_callbacks
    assert ct_viewer.camera.mouse_pan is False

    class Ev:  # the attributes a napari mouse event carries that the callback reads
        def __init__(self, type_, pos, button=1):
            self.type, self.pos, self.button = type_, np.array(pos, float), button

    ev = Ev("mouse_press", (100, 100))
    gen = widget._drag_window_level(ct_viewer, ev)
    next(gen)
    ev.type, ev.pos = "mouse_move", np.array([150.0, 80.0])  # right 50 px, up 20 px
    next(gen)
    assert contrast_limits_to_window(*ct.contrast_limits) == (500, 10)
    ev.type = "mouse_release"
    with pytest.raises(StopIteration):
        next(gen)
    widget.mouse_wl.value = False
    assert widget._drag_window_level not in ct_viewer.mouse_drag_callbacks
    assert ct_viewer.camera.mouse_pan is True


def test_radiological_orientation_follows_dims_order(ct_viewer, widget):
    assert ct_viewer.camera.orientation2d[0] == "down"
    ct_viewer.dims.order = (1, 0, 2)  # coronal in the main canvas
    assert ct_viewer.camera.orientation2d[0] == "up"
    ct_viewer.dims.order = (0, 1, 2)
    assert ct_viewer.camera.orientation2d[0] == "down"


def test_three_views_linked_to_the_main_cursor(ct_viewer, widget):
    assert widget.toggle_three_views() is True
    views = widget._three_views
    cor, sag = views.models["coronal"], views.models["sagittal"]
    assert [ly.name for ly in cor.layers] == ["ct", "labels", "cursor"]
    assert tuple(cor.dims.displayed) == (0, 2) and tuple(sag.dims.displayed) == (0, 1)
    assert cor.camera.orientation2d == ("up", "right") and sag.camera.orientation2d == ("up", "right")
    # each view says which way the patient lies (z up = superior; x grows to the patient's left, y posterior)
    assert cor.text_overlay.visible and "patient's left on the right" in cor.text_overlay.text
    assert sag.text_overlay.visible and "anterior on the left" in sag.text_overlay.text
    assert cor.layers["ct"].data is ct_viewer.layers["ct"].data  # shared, not copied
    # moving the main viewer's cursor moves the slices of both views
    ct_viewer.dims.set_point(1, -30.0 - 1.5 * 10)  # world y (posterior, mm)
    ct_viewer.dims.set_point(2, -20.0 - 1.5 * 7)
    assert cor.dims.point[1] == pytest.approx(ct_viewer.dims.point[1])
    assert sag.dims.point[2] == pytest.approx(ct_viewer.dims.point[2])
    # and a slider move in a view moves the main viewer (axial slice)
    cor.dims.set_point(0, 100.0 + 3.0 * 4)
    assert ct_viewer.dims.point[0] == pytest.approx(112.0)
    # the crosshair of each view crosses at the cursor: the coronal view's lines are the axial slice (z) and
    # the sagittal slice (x); the sagittal view's the axial slice and the coronal slice (y)
    z, y, x = ct_viewer.dims.point
    for model, (rows, cols) in ((cor, (0, 2)), (sag, (0, 1))):
        cursor = model.layers["cursor"]
        assert list(cursor._data_view._displayed) == [True, True]  # on the slice shown, so drawn
        along_cols, along_rows = (np.array([cursor.data_to_world(v) for v in line]) for line in cursor.data)
        assert np.allclose(along_cols[:, rows], ct_viewer.dims.point[rows])  # horizontal line
        assert np.allclose(along_rows[:, cols], ct_viewer.dims.point[cols])  # vertical line
        lo, hi = ct_viewer.layers.extent.world  # the lines span the images
        assert min(along_cols[:, cols]) <= lo[cols] and max(along_cols[:, cols]) >= hi[cols]
        assert min(along_rows[:, rows]) <= lo[rows] and max(along_rows[:, rows]) >= hi[rows]
    # a click in the main (axial) view moves the cursor there, and the coronal view's lines follow
    click_at(ct_viewer, (z, -30.0 - 1.5 * 3, -20.0 - 1.5 * 15))
    assert ct_viewer.dims.point[1] == pytest.approx(-34.5) and ct_viewer.dims.point[2] == pytest.approx(-42.5)
    assert cor.dims.point[1] == pytest.approx(-34.5)
    assert np.allclose([cor.layers["cursor"].data_to_world(v)[2] for v in cor.layers["cursor"].data[1]], -42.5)
    assert list(cor.layers["cursor"]._data_view._displayed) == [True, True]
    # contrast follows the original layer
    widget.apply_preset("liver")
    assert tuple(cor.layers["ct"].contrast_limits) == (-45, 105)
    assert widget.toggle_three_views() is False


def click_at(viewer, world_point):
    """Simulate a click without drag at ``world_point`` through the viewer's mouse callbacks."""
    from napari.utils.interactions import mouse_press_callbacks, mouse_release_callbacks

    class Event:
        type, button, buttons, modifiers, handled = "mouse_press", 1, [1], [], False
        position, view_direction, dims_displayed = tuple(world_point), None, list(viewer.dims.displayed)
        pos = (0, 0)

    press = Event()
    mouse_press_callbacks(viewer, press)
    release = Event()
    release.type = "mouse_release"
    mouse_release_callbacks(viewer, release)


def test_opening_three_views_refits_the_axial_view(make_napari_viewer, qtbot):
    """The bottom dock halves the canvas: the axial view is fitted again so the whole body stays in view."""
    from difftumor_napari._qt.viewing_widget import ViewingWidget

    viewer = make_napari_viewer(show=True)
    viewer.window._qt_window.resize(1400, 900)
    viewer.add_image(np.zeros((20, 300, 200), np.int16), scale=(3.0, 1.0, 1.0))  # tall: the height limits the fit
    w = ViewingWidget(viewer)
    viewer.window.add_dock_widget(w, area="right")
    qtbot.wait(100)
    viewer.reset_view()
    zoom_before = viewer.camera.zoom
    assert w.toggle_three_views()
    qtbot.waitUntil(lambda: viewer.camera.zoom < 0.9 * zoom_before, timeout=3000)
    w.toggle_three_views()


def test_any_difftumor_widget_keeps_the_view_radiological(make_napari_viewer, qtbot):
    """Docking only Tumor placement (from the Plugins menu) names the sliders and keeps superior up when the
    user shows a coronal plane; a second widget does not connect the handlers twice."""
    from difftumor_napari import viewing

    viewer = make_napari_viewer()
    viewer.add_image(np.zeros((20, 30, 40), np.int16))
    viewer.window.add_plugin_dock_widget("difftumor", "Tumor placement")
    assert tuple(viewer.dims.axis_labels) == viewing.SLIDER_NAMES
    viewer.dims.order = (1, 0, 2)  # coronal in the main canvas
    assert viewer.camera.orientation2d[0] == "up"
    n = len(viewer.dims.events.order.callbacks)
    viewer.window.add_plugin_dock_widget("difftumor", "Synthesis")
    assert len(viewer.dims.events.order.callbacks) == n


def test_crosshair_is_drawn_over_the_labels(make_napari_viewer, qtbot, totalseg_ct, totalseg_seg):
    """Rendered, on the real CT with its organ labels: the crosshair's pixels appear in both extra views where
    the cursor is (a crosshair drawn with depth testing was hidden behind the labels layer)."""
    from difftumor_napari._qt.three_views import ThreeViews
    from difftumor_napari._reader import read_layer_data

    viewer = make_napari_viewer(show=True)
    for path, kind in ((totalseg_ct, "ct"), (totalseg_seg, "labels")):
        data, kw, layer_type = read_layer_data(path, kind=kind)
        getattr(viewer, f"add_{layer_type}")(data, **kw)
    views = ThreeViews(viewer)
    qtbot.addWidget(views.widget)
    views.widget.resize(900, 320)
    views.widget.show()
    qtbot.wait(200)
    colour = np.array(ThreeViews.CROSSHAIR_COLOR[:3]) * 255
    for i, name in enumerate(views.models):
        shot = views.widget.widget(i).screenshot(flash=False)[..., :3].astype(float)
        close = np.abs(shot - colour).max(axis=-1) < 60  # blended at 70 % over grey/labels
        rows, cols = np.nonzero(close)
        assert close.sum() > 200, name
        # one horizontal and one vertical line: some row and some column hold many crosshair pixels
        assert np.bincount(rows).max() > 100 and np.bincount(cols).max() > 40, name
    views.close()


def test_slider_names_survive_swapping_the_only_volume():
    """The reading session removes a case's layer before adding the next: napari then keeps two of our names
    and prepends '-3'; the sliders must still read axial / coronal / sagittal. User-chosen names stay."""
    from napari.components import ViewerModel

    from difftumor_napari import viewing
    from difftumor_napari._qt import viewing_widget

    viewer = ViewerModel()
    viewing_widget.keep_radiological(viewer)
    first = viewer.add_image(np.zeros((4, 5, 6), np.int16), name="case 1")
    assert tuple(viewer.dims.axis_labels) == viewing.SLIDER_NAMES
    viewer.layers.remove(first)
    viewer.add_image(np.zeros((4, 5, 6), np.int16), name="case 2")
    assert tuple(viewer.dims.axis_labels) == viewing.SLIDER_NAMES
    viewer.dims.axis_labels = ("z", "y", "x")
    viewer.layers.remove(viewer.layers[0])
    viewer.add_image(np.zeros((4, 5, 6), np.int16), name="case 3")
    assert tuple(viewer.dims.axis_labels)[1:] == ("y", "x")


# -- issue 16: three views kept up to date one layer at a time -----------------------------------
def test_three_views_add_and_remove_only_the_layer_concerned(ct_viewer, widget):
    """A layer added or removed changes only its own copy (the others are the same objects, no rebuild),
    copies share the data array, and the axial slice stays where the user put it."""
    widget.toggle_three_views()
    views = widget._three_views
    cor = views.models["coronal"]
    before = {ly.name: ly for ly in cor.layers}
    ct_viewer.dims.set_point(0, 100.0 + 3.0 * 9)  # axial slice 9 of 12, not the middle
    z = ct_viewer.dims.point[0]
    mask = ct_viewer.add_labels(np.zeros((12, 20, 24), np.uint8), name="tumour", scale=(3.0, 1.5, 1.5),
                                translate=(100.0, -30.0, -20.0))
    assert ct_viewer.dims.point[0] == pytest.approx(z)  # the slice did not jump back to the middle
    assert views.pending() == 2  # copied on the next event-loop turns, one view a turn
    views.flush()
    assert ct_viewer.dims.point[0] == pytest.approx(z)
    assert [ly.name for ly in cor.layers] == ["ct", "labels", "tumour", "cursor"]
    assert cor.layers["ct"] is before["ct"] and cor.layers["labels"] is before["labels"]
    assert cor.layers["tumour"].data is mask.data
    ct_viewer.layers.move(ct_viewer.layers.index(mask), 0)  # reordered: the copies follow
    assert [ly.name for ly in cor.layers] == ["tumour", "ct", "labels", "cursor"]
    ct_viewer.layers.remove(mask)
    assert [ly.name for ly in cor.layers] == ["ct", "labels", "cursor"]
    assert cor.layers["ct"] is before["ct"]
    assert ct_viewer.dims.point[0] == pytest.approx(z)
    mask.data[0, 0, 0] = 1  # a removed layer is no longer followed
    widget.toggle_three_views()


def test_removing_a_layer_collects_garbage_once(ct_viewer, widget, monkeypatch):
    """napari collects garbage once per canvas losing a layer (~0.4 s each with torch loaded): the extra
    views' collections skip the objects that existed before, so one full collection remains."""
    import gc

    widget.toggle_three_views()
    extra = ct_viewer.add_labels(np.zeros((12, 20, 24), np.uint8), name="extra")
    widget._three_views.flush()
    calls = []
    real = gc.collect
    monkeypatch.setattr(gc, "collect", lambda *a: calls.append(gc.get_freeze_count()) or real(*a))
    ct_viewer.layers.remove(extra)
    assert len(calls) >= 1
    assert sum(1 for frozen in calls if frozen == 0) == 1, calls  # only the main canvas's collection is full
    assert gc.get_freeze_count() == 0  # nothing stays frozen
    widget.toggle_three_views()


def test_window_level_acts_on_the_result_too(ct_viewer, widget):
    """Presets, the spin boxes and contrast set anywhere apply to the original CT and the synthesis result on
    its grid alike (before: only to the hidden original)."""
    ct = ct_viewer.layers["ct"]
    info = dict(ct.metadata["difftumor"], kind="synthetic")
    result = ct_viewer.add_image(np.asarray(ct.data).copy(), name="CT + synthetic tumor", scale=ct.scale,
                                 translate=ct.translate, contrast_limits=ct.contrast_limits,
                                 metadata={"difftumor": info})
    other = ct_viewer.add_image(np.zeros((5, 5, 5), np.int16), name="other grid",
                                metadata={"difftumor": {"kind": "ct"}})
    ct.visible = False  # as after a synthesis: the result shown
    widget.apply_preset("liver")
    assert tuple(result.contrast_limits) == (-45, 105) and tuple(ct.contrast_limits) == (-45, 105)
    assert tuple(other.contrast_limits) != (-45, 105)  # another grid: another CT, left alone
    result.contrast_limits = (0, 100)  # e.g. napari's layer controls on the result
    assert tuple(ct.contrast_limits) == (0, 100)
    assert (widget.width_box.value, widget.level_box.value) == (100, 50)


def test_side_views_fit_the_whole_volume_when_resized(make_napari_viewer, qtbot):
    """A 128³ volume: each extra view shows it whole (not fitted to the width, cutting top and bottom), also
    after its canvas changed size."""
    from difftumor_napari._qt.three_views import ThreeViews

    viewer = make_napari_viewer()
    viewer.add_image(np.zeros((128, 128, 128), np.int16), scale=(1.0, 0.8, 0.8))
    views = ThreeViews(viewer)
    qtbot.addWidget(views.widget)
    for size in ((1000, 300), (600, 500)):
        views.widget.resize(*size)
        views.widget.show()
        qtbot.wait(150)
        for model in views.models.values():
            rows, cols = model.dims.displayed
            extent = viewer.layers.extent.world
            shown = model.camera.zoom * (extent[1] - extent[0])
            height, width = model.canvas.size
            assert shown[rows] <= height + 1 and shown[cols] <= width + 1, (size, model.title)
            assert shown[rows] >= 0.8 * height or shown[cols] >= 0.8 * width  # and fills the canvas
    views.close()


def test_a_thin_volume_says_so(make_napari_viewer, qtbot, monkeypatch):
    import napari.utils.notifications as notifications

    from difftumor_napari._qt.three_views import ThreeViews, too_thin

    assert too_thin((3, 512, 512), (5.0, 0.7, 0.7)) == "3 slices (15 mm)"
    assert too_thin((30, 101, 122), (3.0, 3.0, 3.0)) is None
    said = []
    monkeypatch.setattr(notifications, "show_info", lambda msg: said.append(msg))
    viewer = make_napari_viewer()
    viewer.add_image(np.zeros((3, 64, 64), np.int16), name="dicom", scale=(5.0, 0.7, 0.7))
    views = ThreeViews(viewer)
    qtbot.addWidget(views.widget)
    assert len(said) == 1 and "dicom" in said[0] and "too thin" in said[0] and "\n" not in said[0]
    assert "too thin" in views.models["coronal"].text_overlay.text
    views.close()


def test_focus_views_frames_a_point_in_all_three_views(ct_viewer, widget):
    from difftumor_napari.layers import focus_views

    widget.toggle_three_views()
    views = widget._three_views
    target = (100.0 + 3.0 * 6, -30.0 - 1.5 * 8, -20.0 - 1.5 * 5)
    zooms = {name: m.camera.zoom for name, m in views.models.items()}
    main_zoom = ct_viewer.camera.zoom
    focus_views(ct_viewer, target, 6.0)
    assert ct_viewer.dims.point == pytest.approx(target)
    assert ct_viewer.camera.center[-2:] == pytest.approx(target[1:])
    assert ct_viewer.camera.zoom >= main_zoom
    for name, model in views.models.items():
        rows, cols = model.dims.displayed
        assert model.dims.point == pytest.approx(target)
        assert model.camera.center[-2:] == pytest.approx((target[rows], target[cols]))
        assert model.camera.zoom >= zooms[name]
    widget.toggle_three_views()


def test_focus_zoom():
    from difftumor_napari.layers import focus_zoom

    assert focus_zoom(10.0, (400, 600)) == pytest.approx(5.0)  # four diameters (80 mm) across 400 px
    assert focus_zoom(1.0, (400, 600)) == pytest.approx(400 / 60)  # never closer than 60 mm
    assert focus_zoom(100.0, (400, 600), fit_zoom=2.0) == 2.0  # never farther than the whole volume


def test_slider_numbers_get_the_width_their_font_needs(make_napari_viewer):
    from difftumor_napari._qt.viewing_widget import fit_slider_labels

    viewer = make_napari_viewer(show=True)
    viewer.add_image(np.zeros((128, 8, 8), np.uint8))
    qt_dims = viewer.window._qt_viewer.dims
    fit_slider_labels(qt_dims)
    slider = qt_dims.slider_widgets[0]
    for label in (slider.curslice_label, slider.totslice_label):
        assert label.width() >= label.fontMetrics().horizontalAdvance("127") + 6


def test_a_success_closes_stale_error_toasts(make_napari_viewer, qtbot):
    from napari._qt.dialogs.qt_notification import NapariQtNotification
    from napari.utils.notifications import Notification, NotificationSeverity, notification_manager

    from difftumor_napari._qt.dock import clear_errors_on_success

    viewer = make_napari_viewer(show=True)
    clear_errors_on_success(viewer)
    canvas = viewer.window._qt_viewer.canvas.native
    notification_manager.dispatch(Notification("Save: cannot write", severity=NotificationSeverity.ERROR))
    toast = NapariQtNotification("Save: cannot write", NotificationSeverity.ERROR, parent=canvas)
    toast.show()
    assert toast in NapariQtNotification._instances
    viewer.add_image(np.zeros((4, 4), np.uint8))  # something worked
    assert toast not in NapariQtNotification._instances


def test_default_save_folder(tmp_path, monkeypatch):
    from pathlib import Path

    import difftumor_napari
    from difftumor_napari.synthesis import default_save_folder

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home" / "Documents").mkdir(parents=True)
    ct = tmp_path / "cases" / "ct.nii.gz"
    ct.parent.mkdir()
    ct.write_bytes(b"")
    assert default_save_folder(str(ct)) == tmp_path / "cases" / "difftumor_results"
    assert default_save_folder(None) == tmp_path / "home" / "Documents" / "DiffTumor"
    inside = Path(difftumor_napari.__file__).parent / "ct.nii.gz"  # never inside the package
    assert default_save_folder(str(inside)) == tmp_path / "home" / "Documents" / "DiffTumor"


# -- issue 16 (second pass): copies made off the insert, hidden layers later, the outline in every plane -----
def test_copies_are_made_one_view_per_event_loop_turn(ct_viewer, widget, qtbot):
    """Adding a layer does not build its side-view copies in the same event (the window would stay frozen for
    the main canvas and both copies at once): they follow on the next turns of the event loop."""
    widget.toggle_three_views()
    views = widget._three_views
    ct_viewer.add_labels(np.zeros((12, 20, 24), np.uint8), name="tumour", scale=(3.0, 1.5, 1.5),
                         translate=(100.0, -30.0, -20.0))
    assert "tumour" not in views.models["coronal"].layers and "tumour" not in views.models["sagittal"].layers
    qtbot.waitUntil(lambda: views.pending() == 0, timeout=5000)
    assert all("tumour" in m.layers for m in views.models.values())
    widget.toggle_three_views()


def test_a_hidden_layer_is_copied_when_first_shown(ct_viewer, widget):
    widget.toggle_three_views()
    views = widget._three_views
    hidden = ct_viewer.add_labels(np.zeros((12, 20, 24), np.uint8), name="hidden", visible=False,
                                  scale=(3.0, 1.5, 1.5), translate=(100.0, -30.0, -20.0))
    views.flush()
    assert "hidden" not in views.models["coronal"].layers
    hidden.visible = True
    views.flush()
    assert views.models["coronal"].layers["hidden"].data is hidden.data
    assert [ly.name for ly in views.models["coronal"].layers] == ["ct", "labels", "hidden", "cursor"]
    hidden.visible = False
    assert views.models["coronal"].layers["hidden"].visible is False
    ct_viewer.layers.remove(hidden)
    assert "hidden" not in views.models["coronal"].layers
    widget.toggle_three_views()


def test_tumour_outline_is_drawn_in_the_side_views(ct_viewer, widget):
    """The synthetic tumour's outline (a Shapes layer: napari cannot slice it across planes) is drawn in the
    coronal and sagittal views as the contour of its mask, and is toggled with the main outline."""
    from napari.layers import Labels

    from difftumor_napari.layers import outline_layer

    widget.toggle_three_views()
    views = widget._three_views
    ct = ct_viewer.layers["ct"]
    mask = np.zeros((12, 20, 24), bool)
    mask[4:8, 6:12, 8:14] = True
    outline = ct_viewer.add_layer(outline_layer(mask, ct, "synthetic tumor outline"))
    views.flush()
    for name in ("coronal", "sagittal"):
        copy = views.models[name].layers["synthetic tumor outline"]
        assert isinstance(copy, Labels) and copy.contour == 1  # the edge of the voxels in the view's plane
        assert np.shares_memory(copy.data, mask) and copy.visible  # a view of the mask, not a copy
        assert views.models[name].layers[-1].name == "cursor"
    outline.visible = False
    assert not views.models["coronal"].layers["synthetic tumor outline"].visible
    ct_viewer.layers.remove(outline)
    assert "synthetic tumor outline" not in views.models["sagittal"].layers
    widget.toggle_three_views()
