"""The "Tumor placement" widget driven with make_napari_viewer + qtbot (run under xvfb-run)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from difftumor_napari import placement as pl

pytestmark = pytest.mark.gui



@pytest.fixture
def real_viewer(make_napari_viewer, totalseg_ct, totalseg_seg):
    from difftumor_napari._reader import read_layer_data

    viewer = make_napari_viewer()
    for path in (totalseg_ct, totalseg_seg):
        data, kwargs, kind = read_layer_data(path)
        getattr(viewer, f"add_{kind}")(data, **kwargs)
    return viewer


def _widget(viewer, qtbot):
    from difftumor_napari._qt.placement_widget import PlacementWidget

    w = PlacementWidget(viewer)
    qtbot.addWidget(w.native)
    return w


def _inner_voxel(mask: np.ndarray) -> tuple[int, int, int]:
    """An organ voxel far from the organ's border."""
    from scipy import ndimage

    d = ndimage.distance_transform_edt(mask)
    return tuple(int(v) for v in np.unravel_index(np.argmax(d), mask.shape))


def test_autodetects_layers_and_places_by_click(real_viewer, qtbot, errors, totalseg_ct, tmp_path):
    viewer = real_viewer
    w = _widget(viewer, qtbot)
    ct, seg = viewer.layers["example_ct_sm"], viewer.layers["example_seg"]
    assert w.ct_layer.value is ct and w.organ_layer.value is seg
    assert "liver" in w.status.value and "click inside the organ" in w.status.value  # what to do first
    w.organ.value = "liver"
    liver = w.organ_mask()
    voxel = _inner_voxel(liver)
    world = np.asarray(ct.data_to_world(voxel))
    np.testing.assert_allclose(pl.world_to_data(world, ct.scale, ct.translate), voxel, atol=1e-6)

    # click mode: a press + release without motion places the tumour at the clicked world point
    w.place_mode.value = True
    assert w._on_click in viewer.mouse_drag_callbacks
    event = SimpleNamespace(button=1, type="mouse_press", position=tuple(world))
    gen = w._on_click(viewer, event)
    next(gen)
    event.type = "mouse_release"
    with pytest.raises(StopIteration):
        next(gen)
    layer = viewer.layers["tumor mask"]
    assert layer.data[voxel] == 1 and errors == []
    organ_colours = {tuple(np.round(seg.get_color(i), 3)) for i in (1, 2, 3, 5, 7)}
    assert tuple(np.round(layer.get_color(1), 3)) not in organ_colours  # tumour 1 is not painted like the spleen
    assert np.allclose(layer.get_color(1), layer.get_color(4))  # every tumour in the tumour colour
    assert w.status.value.startswith("Tumour 1:") and "Synthesis > Synthesize" in w.status.value  # what next
    assert not ((layer.data > 0) & ~liver).any()  # keep inside organ (default on)
    assert layer.scale == pytest.approx(ct.scale) and layer.translate == pytest.approx(ct.translate)
    assert layer.metadata["difftumor"]["geometry"] == ct.metadata["difftumor"]["geometry"]
    # the placement can be reproduced from the file: world mm (LPS) and the file's own voxel index
    from backend.io import Geometry, read_image

    placed = layer.metadata["difftumor"]["placements"][0]
    file_geo = read_image(totalseg_ct).geometry
    np.testing.assert_allclose(file_geo.voxel_to_world(np.asarray(placed["centre_file_voxel_xyz"])),
                               placed["centre_world_mm_lps"], atol=0.02)
    assert Geometry.from_dict(ct.metadata["difftumor"]["geometry"]) == file_geo
    from difftumor_napari._writer import write_layer

    saved = read_image(write_layer(tmp_path / "mask.nii.gz", layer.data, {"name": "m", "metadata": layer.metadata,
                                   "scale": layer.scale, "translate": layer.translate}, labels=True))
    x, y, z = np.rint(placed["centre_file_voxel_xyz"]).astype(int)
    assert saved.array[z, y, x] == 1  # the recorded file voxel is the clicked tumour's centre in the saved file
    # a drag pans instead of placing
    event = SimpleNamespace(button=1, type="mouse_press", position=tuple(world))
    gen = w._on_click(viewer, event)
    next(gen)
    event.type = "mouse_move"
    next(gen)
    event.type = "mouse_release"
    with pytest.raises(StopIteration):
        next(gen)
    assert layer.data.max() == 1
    w.place_mode.value = False
    assert w._on_click not in viewer.mouse_drag_callbacks


def test_user_errors_become_notifications_and_change_nothing(real_viewer, qtbot, errors):
    viewer = real_viewer
    w = _widget(viewer, qtbot)
    ct = viewer.layers["example_ct_sm"]
    assert not w.place_at_voxel((0, 0, 0))  # air, outside the liver
    assert "click outside the liver" in errors[-1] and "click outside the liver" in w.status.value
    assert "tumor mask" not in viewer.layers  # a failed first click leaves no empty tumour layer behind
    voxel = _inner_voxel(w.organ_mask())
    w.size.value = "custom (radii below)"
    w.radius_x.value = w.radius_y.value = w.radius_z.value = 100
    assert not w.place_at_voxel(voxel)
    assert "larger than the liver" in errors[-1]
    assert not w.place_at_world(np.asarray(ct.data_to_world((0, 0, 0))) - 1000)
    assert "outside the image" in errors[-1]
    viewer.layers.remove("example_seg")
    assert w.organ_layer.value is None
    assert not w.place_random()
    assert "no organ label layer" in errors[-1]
    assert all("\n" not in e for e in errors)
    assert "tumor mask" not in viewer.layers or not viewer.layers["tumor mask"].data.any()


def test_random_placement_undo_redo_and_brush(real_viewer, qtbot, errors):
    viewer = real_viewer
    w = _widget(viewer, qtbot)
    w.random_size.value = "medium"
    w.count.value = 2
    w.seed.value = 3
    assert w.place_random() == 2
    layer = viewer.layers["tumor mask"]
    assert set(np.unique(layer.data)) == {0, 1, 2}
    first = layer.data.copy()
    assert [p["kind"] for p in w.placements()] == ["random", "random"]
    # napari's brush: paint then napari undo restores
    layer.selected_label = 9
    layer.brush_size = 1
    spot = tuple(int(v) for v in np.argwhere(layer.data == 0)[0])
    layer.paint(spot, 9)
    assert layer.data[spot] == 9
    layer.undo()
    assert layer.data[spot] == 0
    # placement undo / redo
    assert w.undo()
    assert set(np.unique(layer.data)) == {0, 1}
    assert w.redo()
    np.testing.assert_array_equal(layer.data, first)
    assert w.undo() and w.undo() and not w.undo()
    assert not layer.data.any()
    # same seed -> same tumours
    w.seed.value = 3
    w.place_random()
    np.testing.assert_array_equal(layer.data, first)
    assert errors == []


def test_size_class_sets_radii(make_napari_viewer, qtbot):
    w = _widget(make_napari_viewer(), qtbot)
    w.size.value = "medium"
    assert (w.radius_x.value, w.radius_y.value, w.radius_z.value) == pl.size_class_radii("medium")
    assert "24–40 mm" in w.size.tooltip


def test_docked_from_the_plugins_menu_undo_and_provenance_keep_every_placement(real_viewer, qtbot, errors):
    """napari gives a plugin widget a proxy viewer that hands out a new layer proxy on every look-up; the
    placement history must still follow the same tumour layer (undo used to say "Nothing to undo")."""
    viewer = real_viewer
    _dock, w = viewer.window.add_plugin_dock_widget("difftumor", "Tumor placement")
    w.organ.value = "liver"
    liver = w.organ_mask()
    voxel = _inner_voxel(liver)
    assert w.place_at_voxel(voxel)
    w.random_size.value = "tiny"
    assert w.place_random() == 1
    layer = viewer.layers["tumor mask"]
    assert layer.data.max() == 2
    assert len(layer.metadata["difftumor"]["placements"]) == 2
    assert w.undo() and layer.data.max() == 1 and errors == []
    assert len(layer.metadata["difftumor"]["placements"]) == 1


def test_click_mode_leaves_brush_and_eraser_clicks_to_the_labels_tool(real_viewer, qtbot, errors):
    viewer = real_viewer
    w = _widget(viewer, qtbot)
    w.organ.value = "liver"
    voxel = _inner_voxel(w.organ_mask())
    assert w.place_at_voxel(voxel)
    layer = viewer.layers["tumor mask"]
    w.place_mode.value = True
    world = tuple(np.asarray(viewer.layers["example_ct_sm"].data_to_world(voxel)) + np.array([0, 6, 6]))
    for mode in ("paint", "erase", "fill"):
        layer.mode = mode
        viewer.layers.selection.active = layer
        gen = w._on_click(viewer, SimpleNamespace(button=1, type="mouse_press", position=world))
        with pytest.raises(StopIteration):  # not taken by the placement click
            next(gen)
    assert layer.data.max() == 1
    layer.mode = "pan_zoom"
    event = SimpleNamespace(button=1, type="mouse_press", position=world)
    gen = w._on_click(viewer, event)
    next(gen)
    event.type = "mouse_release"
    with pytest.raises(StopIteration):
        next(gen)
    assert layer.data.max() == 2  # back in pan/zoom mode a click places again
    w.place_mode.value = False


def test_docked_with_a_ct_but_no_organ_labels_says_what_to_open(make_napari_viewer, qtbot, totalseg_ct):
    """A first-time user who opened only the CT sees what is missing at once, not an empty status line."""
    from difftumor_napari._reader import read_layer_data

    viewer = make_napari_viewer()
    data, kwargs, kind = read_layer_data(totalseg_ct)
    viewer.add_image(data, **kwargs)
    w = _widget(viewer, qtbot)
    assert w.organ_layer.value is None
    assert "organ label layer" in w.status.value


def _msd_liver(viewer, w):
    """Turn the organ layer into an MSD/LiTS map: 1 liver, 2 a labelled real tumour (a ball deep in the liver);
    returns (liver mask, real tumour mask, a voxel of the real tumour's centre)."""
    from scipy import ndimage

    seg = viewer.layers["example_seg"]
    w.organ.value = "liver"
    liver = w.organ_mask()
    d = ndimage.distance_transform_edt(liver, sampling=seg.scale)
    centre = np.unravel_index(np.argmax(d), liver.shape)
    zz, yy, xx = np.indices(liver.shape, sparse=True)
    dist = np.sqrt(sum(((g - c) * s) ** 2 for g, c, s in zip((zz, yy, xx), centre, seg.scale)))
    real = liver & (dist <= 12.0)
    msd = liver.astype(np.uint8)
    msd[real] = 2
    seg.data = msd
    w._on_organ_layer()
    return liver, real, tuple(int(c) for c in centre)


def test_a_click_on_a_labelled_tumour_is_refused_and_overlap_left_out(real_viewer, qtbot, errors):
    """Defect 7: placing by click on a labelled LiTS tumour was accepted silently while random placement avoided
    it. A click on it is refused in one sentence; a tumour overlapping it keeps off it and the status says so."""
    viewer = real_viewer
    w = _widget(viewer, qtbot)
    liver, real, centre = _msd_liver(viewer, w)
    w.size.value = "small"
    assert not w.place_at_voxel(centre)
    assert "already labelled" in errors[-1] and "\n" not in errors[-1] and w.status.value == errors[-1]
    assert "tumor mask" not in viewer.layers
    edge = np.argwhere(real)[np.argmax(np.argwhere(real)[:, 2])]  # the real tumour's edge along x ...
    step = int(np.ceil(4.0 / viewer.layers["example_ct_sm"].scale[2]))
    beside = (int(edge[0]), int(edge[1]), int(edge[2]) + step)  # ... and 4 mm past it (radius 8 mm), in the liver
    assert liver[beside] and not real[beside]
    n = len(errors)
    assert w.place_at_voxel(beside)
    layer = viewer.layers["tumor mask"]
    assert layer.data[beside] > 0 and not ((layer.data > 0) & real).any()
    assert "labelled tumour" in w.status.value and len(errors) == n
    assert w.placements()[-1]["overlap_left_out_voxels"] > 0


def test_after_a_placement_the_view_goes_to_the_tumour(real_viewer, qtbot, errors):
    """Defect 3 (placement): the slice, the camera centre and the zoom go to the placed tumour."""
    from difftumor_napari.layers import _camera, view_size_px

    viewer = real_viewer
    w = _widget(viewer, qtbot)
    ct = viewer.layers["example_ct_sm"]
    w.organ.value = "liver"
    liver = w.organ_mask()
    voxel = _inner_voxel(liver)
    viewer.dims.set_point(0, float(ct.data_to_world((0, 0, 0))[0]))
    viewer.reset_view()
    assert w.place_at_voxel(voxel)
    mask = viewer.layers["tumor mask"].data > 0
    centre = np.asarray(ct.data_to_world(np.argwhere(mask).mean(0)))
    assert viewer.dims.point[0] == pytest.approx(centre[0], abs=ct.scale[0])
    camera = _camera(viewer)
    np.testing.assert_allclose(np.asarray(camera.center)[-2:], centre[-2:], atol=float(max(ct.scale)))
    extent = float(max((np.ptp(np.argwhere(mask), axis=0)[1:] + 1) * np.asarray(ct.scale)[1:]))
    assert 0.1 <= extent * camera.zoom / float(min(view_size_px(viewer))) <= 0.6
    # random placement: the view goes to the (largest) new tumour
    viewer.reset_view()
    w.random_size.value = "medium"
    assert w.place_random() == 1
    new = viewer.layers["tumor mask"].data == 2
    np.testing.assert_allclose(np.asarray(camera.center)[-2:], np.asarray(ct.data_to_world(np.argwhere(new).mean(0)))[-2:],
                               atol=float(max(ct.scale)))
    assert errors == []
