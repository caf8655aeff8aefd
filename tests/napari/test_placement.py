"""Qt-free placement logic: click -> voxel, ellipsoids, random tumours, undo/redo, layer guesses."""

from __future__ import annotations

import numpy as np
import pytest

from backend.errors import DiffTumorError
from backend.io import Geometry
from difftumor_napari import placement as pl


@pytest.fixture
def grid():
    """40 x 50 x 60 (z, y, x) LPS grid, spacing (x, y, z) = (0.8, 0.8, 2.5) mm, organ = a box."""
    geo = Geometry((60, 50, 40), (0.8, 0.8, 2.5), (-20.0, 10.0, 100.0))
    organ = np.zeros(geo.shape, bool)
    organ[5:35, 10:45, 10:55] = True
    return geo, organ


def test_world_to_data_inverts_scale_and_translate():
    scale, translate = (2.5, 0.8, 0.8), (100.0, 10.0, -20.0)
    data = np.array([7.0, 12.5, 30.0])
    world = data * np.array(scale) + np.array(translate)
    np.testing.assert_allclose(pl.world_to_data(world, scale, translate), data)
    # extra leading (e.g. time) world dims are ignored
    np.testing.assert_allclose(pl.world_to_data([3.0, *world], scale, translate), data)


def test_layer_geometry_prefers_recorded_display_geometry(grid):
    geo, _ = grid
    g = pl.layer_geometry(geo.shape, (1, 1, 1), (0, 0, 0), {"difftumor": {"display_geometry": geo.to_dict()}})
    assert g.matches(geo)
    g2 = pl.layer_geometry(geo.shape, geo.spacing[::-1], geo.origin[::-1])
    assert g2.matches(geo)


def test_place_ellipsoid_has_radii_in_mm_and_undo_redo(grid):
    geo, organ = grid
    labels = np.zeros(geo.shape, np.uint8)
    hist = pl.PlacementHistory()
    spec = pl.TumorSpec((20, 25, 30), (8.0, 8.0, 8.0))
    p1 = pl.place_ellipsoid(labels, hist, geo, organ, spec, organ_name="liver")
    assert p1.label == 1
    zs, ys, xs = np.nonzero(labels == 1)
    # extent in mm along each axis ~ diameter 16 mm
    assert (xs.max() - xs.min() + 1) * 0.8 == pytest.approx(16, abs=1.7)
    assert (zs.max() - zs.min() + 1) * 2.5 == pytest.approx(16, abs=5.1)
    assert labels[20, 25, 30] == 1
    p2 = pl.place_ellipsoid(labels, hist, geo, organ, pl.TumorSpec((10, 20, 20), (4, 4, 4)), organ_name="liver")
    assert p2.label == 2 and (labels == 2).any()
    # a brush stroke on top of tumour 2 survives its undo
    labels[10, 20, 20] = 7
    hist.undo(labels)
    assert not (labels == 2).any() and labels[10, 20, 20] == 7
    hist.redo(labels)
    assert (labels == 2).any()
    hist.undo(labels)
    hist.undo(labels)
    assert set(np.unique(labels)) == {0, 7}
    assert hist.undo(labels) is None
    assert hist.params() == []


def test_keep_inside_organ_clips(grid):
    geo, organ = grid
    labels = np.zeros(geo.shape, np.uint8)
    hist = pl.PlacementHistory()
    spec = pl.TumorSpec((20, 11, 30), (10, 10, 10))  # near the organ's y border
    pl.place_ellipsoid(labels, hist, geo, organ, spec, organ_name="liver", keep_inside_organ=True)
    assert (labels > 0).any() and not ((labels > 0) & ~organ).any()
    labels2 = np.zeros(geo.shape, np.uint8)
    pl.place_ellipsoid(labels2, pl.PlacementHistory(), geo, organ, spec, organ_name="liver", keep_inside_organ=False)
    assert ((labels2 > 0) & ~organ).any()


def test_user_errors_are_one_clear_line(grid):
    geo, organ = grid
    labels = np.zeros(geo.shape, np.uint8)
    hist = pl.PlacementHistory()
    with pytest.raises(DiffTumorError, match="outside the liver"):
        pl.place_ellipsoid(labels, hist, geo, organ, pl.TumorSpec((1, 1, 1), (5, 5, 5)), organ_name="liver")
    with pytest.raises(DiffTumorError, match="outside the image"):
        pl.place_ellipsoid(labels, hist, geo, organ, pl.TumorSpec((-3, 1, 1), (5, 5, 5)), organ_name="liver")
    with pytest.raises(DiffTumorError, match="larger than the liver"):
        pl.place_ellipsoid(labels, hist, geo, organ, pl.TumorSpec((20, 25, 30), (80, 80, 80)), organ_name="liver")
    with pytest.raises(DiffTumorError, match="no organ mask"):
        pl.place_ellipsoid(labels, hist, geo, None, pl.TumorSpec((20, 25, 30), (5, 5, 5)), organ_name="liver")
    with pytest.raises(DiffTumorError, match="no organ label layer"):
        pl.organ_mask(None, "liver")
    with pytest.raises(DiffTumorError, match="no 'liver' voxels"):
        pl.organ_mask(np.full((4, 4, 4), 7, np.uint8), "liver", name="organs")
    assert not labels.any() and hist.done == []  # nothing changed


def test_random_tumors_are_seeded_and_inside_organ(grid):
    geo, organ = grid
    shapes, params = pl.random_tumors(geo, organ, "liver", size="small", count=3, seed=4)
    assert len(shapes) == 3 and all(s.any() and not (s & ~organ).any() for s in shapes)
    assert all(p["size"] == "small" and p["kind"] == "random" for p in params)
    again, _ = pl.random_tumors(geo, organ, "liver", size="small", count=3, seed=4)
    assert all(np.array_equal(a, b) for a, b in zip(shapes, again))
    other, _ = pl.random_tumors(geo, organ, "liver", size="small", count=3, seed=5)
    assert not all(np.array_equal(a, b) for a, b in zip(shapes, other))
    with pytest.raises(DiffTumorError, match="at least 1"):
        pl.random_tumors(geo, organ, "liver", size="small", count=0, seed=0)
    with pytest.raises(DiffTumorError, match="size class"):
        pl.random_tumors(geo, organ, "liver", size="huge", count=1, seed=0)


def test_layer_guesses():
    ct = np.full((8, 8, 8), -1000, np.int16)
    ct[2:6, 2:6, 2:6] = 300
    seg = np.zeros((8, 8, 8), np.uint8)
    seg[1:4] = 5
    seg[5:7] = 3
    Image = type("Image", (), {})
    Labels = type("Labels", (), {})

    def layer(cls, data, kind=None):
        ly = cls()
        ly.data, ly.rgb, ly.metadata = data, False, ({"difftumor": {"kind": kind}} if kind else {})
        return ly

    soft = layer(Image, np.zeros((8, 8, 8), np.float32))
    ct_layer = layer(Image, ct)
    assert pl.pick_ct_layer([soft, ct_layer]) is ct_layer
    assert pl.pick_ct_layer([soft]) is None
    tumor_layer = layer(Labels, seg, kind="tumor")
    seg_layer = layer(Labels, seg)
    assert pl.pick_organ_layer([tumor_layer, seg_layer]) is seg_layer
    assert pl.organs_in_labels(seg) == ["liver", "kidney"]
    assert pl.organs_in_labels(np.zeros((4, 4, 4), np.uint8)) == []
    assert pl.organs_in_labels(np.ones((4, 4, 4), np.uint8)) == list(pl.PLACEABLE_ORGANS)  # MSD organ label


def test_stage_from_size(grid):
    geo, organ = grid
    labels = np.zeros(geo.shape, np.uint8)
    hist = pl.PlacementHistory()
    pl.place_ellipsoid(labels, hist, geo, organ, pl.TumorSpec((20, 25, 30), pl.size_class_radii("small")), organ_name="liver")
    assert pl.tumor_stages(labels, geo) == ["early"]
    pl.place_ellipsoid(labels, hist, geo, organ, pl.TumorSpec((20, 25, 30), pl.size_class_radii("medium")), organ_name="liver")
    assert pl.tumor_stages(labels, geo) == ["mid_late"]
    assert pl.size_class_text("small") == "small: 12–20 mm diameter"


def test_random_tumors_on_real_ct(totalseg_seg):
    from difftumor_napari._reader import read_layer_data

    data, kw, kind = read_layer_data(totalseg_seg)
    assert kind == "labels"
    geo = pl.layer_geometry(data.shape, kw["scale"], kw["translate"], kw["metadata"])
    assert "liver" in pl.organs_in_labels(data)
    liver = pl.organ_mask(data, "liver")
    shapes, _ = pl.random_tumors(geo, liver, "liver", size="medium", count=1, seed=0)
    assert shapes[0].sum() > 10 and not (shapes[0] & ~liver).any()


def test_stages_match_the_engine_for_tumours_sharing_a_crop():
    """Two 10 mm tumours 40 mm apart share one crop, which the engine paints with the early model; the widget
    measured the pair as one 50 mm blob and announced the mid/late model."""
    geo = Geometry((64, 64, 64), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    zz, yy, xx = np.indices(geo.shape)
    labels = np.zeros(geo.shape, np.uint8)
    for z in (12, 52):
        labels[(zz - z) ** 2 + (yy - 32) ** 2 + (xx - 32) ** 2 <= 25] = 1
    assert pl.tumor_stages(labels, geo) == ["early"]


def test_placement_keeps_off_tumours_already_labelled(grid):
    """Defect 7: an ellipsoid over a labelled real tumour was accepted (1,594 of 2,010 voxels on a LiTS
    metastasis); now a click on it is refused and the overlap is left out, with and without keep-inside."""
    geo, organ = grid
    real = np.zeros(geo.shape, bool)
    real[15:25, 20:35, 30:45] = True  # a labelled tumour inside the organ box
    for keep in (True, False):
        labels = np.zeros(geo.shape, np.uint8)
        hist = pl.PlacementHistory()
        with pytest.raises(DiffTumorError, match="already labelled") as err:
            pl.place_ellipsoid(labels, hist, geo, organ, pl.TumorSpec((20, 27, 37), (6, 6, 6)), organ_name="liver",
                               keep_inside_organ=keep, existing=real)
        assert "\n" not in str(err.value) and not labels.any() and hist.done == []
        p = pl.place_ellipsoid(labels, hist, geo, organ, pl.TumorSpec((20, 27, 26), (8, 8, 8)), organ_name="liver",
                               keep_inside_organ=keep, existing=real)
        assert (labels > 0).any() and not ((labels > 0) & real).any()
        assert p.params["overlap_left_out_voxels"] > 0  # reported, so the widget can say so
