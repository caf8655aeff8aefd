"""backend.preprocess: model-space orientation, 1 mm resampling and exact inverses, HU windows."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from backend.io import Geometry, Volume, read_image
from backend.preprocess import (
    HU_MAX,
    HU_MIN,
    from_model_space,
    hu_to_unit,
    orientation_code,
    reorient_only,
    to_model_space,
    unit_to_hu,
)

LPS = (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0)
RAS = (-1.0, 0, 0, 0, -1.0, 0, 0, 0, 1.0)
# index x -> patient's anterior, index y -> patient's right, index z -> inferior (a scrambled scan)
SCRAMBLED = (0.0, -1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, -1.0)


def _rotation_z(deg: float) -> np.ndarray:
    a = np.deg2rad(deg)
    return np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])


def _world_pattern(g: Geometry) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Three (z, y, x) images holding each voxel's world L, P and S coordinate (mm)."""
    k, j, i = np.meshgrid(*(np.arange(n) for n in g.shape), indexing="ij")
    world = g.voxel_to_world(np.stack([i, j, k], -1).reshape(-1, 3)).reshape(*g.shape, 3)
    return world[..., 0], world[..., 1], world[..., 2]


def test_dicomorient_codes_are_as_documented():
    img = sitk.Image(4, 5, 6, sitk.sitkFloat32)
    assert sitk.DICOMOrient(img, "LPS").GetDirection() == LPS
    assert sitk.DICOMOrient(img, "RAS").GetDirection() == RAS
    assert orientation_code(Geometry((2, 2, 2), (1, 1, 1), (0, 0, 0), RAS)) == "RAS"
    assert orientation_code(Geometry((2, 2, 2), (1, 1, 1), (0, 0, 0), SCRAMBLED)) == "ARI"


@pytest.mark.parametrize("direction", [LPS, RAS, SCRAMBLED], ids=["LPS", "RAS", "scrambled"])
def test_model_space_axes_point_right_anterior_superior(direction):
    g = Geometry((6, 7, 5), (1.0, 1.0, 1.0), (10.0, -20.0, 30.0), direction)
    L, P, S = _world_pattern(g)
    m = {name: reorient_only(Volume(a.astype(np.float32), g)).array for name, a in zip("LPS", (L, P, S))}
    # (X, Y, Z): +X toward the patient's right (L decreases), +Y anterior (P decreases), +Z superior
    assert np.all(np.diff(m["L"], axis=0) < 0) and np.allclose(np.diff(m["L"], axis=1), 0)
    assert np.all(np.diff(m["P"], axis=1) < 0) and np.allclose(np.diff(m["P"], axis=2), 0)
    assert np.all(np.diff(m["S"], axis=2) > 0) and np.allclose(np.diff(m["S"], axis=0), 0)
    assert reorient_only(Volume(L, g)).geometry.direction == RAS


def test_model_space_array_layout_by_hand():
    g = Geometry((6, 7, 5), (0.8, 1.2, 2.5), (10.0, -20.0, 30.0), SCRAMBLED)
    arr = np.random.default_rng(0).normal(size=g.shape).astype(np.float32)  # arr[k, j, i]
    got = reorient_only(Volume(arr, g)).array
    # SCRAMBLED: i -> anterior, j -> right, k -> inferior, so model (X, Y, Z) = (j, i, reversed k)
    np.testing.assert_array_equal(got, arr[::-1].transpose(1, 2, 0))


def test_model_space_equals_monai_orientation_ras():
    pytest.importorskip("nibabel", reason="MONAI's Orientation transform needs nibabel (not a dependency here)")
    from monai.data import MetaTensor
    from monai.transforms import Orientation

    g = Geometry((6, 7, 5), (0.8, 1.2, 2.5), (10.0, -20.0, 30.0), SCRAMBLED)
    arr = np.random.default_rng(0).normal(size=g.shape).astype(np.float32)
    d = np.reshape(g.direction, (3, 3)) * np.asarray(g.spacing)
    affine_lps = np.eye(4)
    affine_lps[:3, :3], affine_lps[:3, 3] = d, g.origin
    affine_ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine_lps  # MONAI/NIfTI affines are RAS+
    mt = MetaTensor(arr.transpose(2, 1, 0)[None].copy(), affine=affine_ras)  # channel-first (C, i, j, k)
    got = reorient_only(Volume(arr, g)).array
    np.testing.assert_array_equal(got, Orientation(axcodes="RAS")(mt)[0].numpy())


def test_real_ct_round_trip(totalseg_ct, totalseg_seg):
    ct = read_image(totalseg_ct)  # 3 mm, direction diag(-1, -1, 1)
    m = to_model_space(ct)
    assert m.resampled and m.array.dtype == np.float32
    assert m.array.shape == (366, 303, 90)  # 122*3, 101*3, 30*3 voxels: the whole field of view at 1 mm
    assert m.geometry.spacing == (1.0, 1.0, 1.0) and m.geometry.direction == RAS
    back = from_model_space(m.array, m, dtype=np.int16)
    np.testing.assert_array_equal(back, ct.array)  # 3 mm is a whole multiple of 1 mm: exact
    assert np.abs(from_model_space(m.array, m) - ct.array).max() < 1e-3

    seg = read_image(totalseg_seg)
    ms = to_model_space(seg, is_label=True)
    assert ms.array.dtype == np.uint8 and set(np.unique(ms.array)) == set(np.unique(seg.array))
    np.testing.assert_array_equal(from_model_space(ms.array, ms), seg.array)
    # images and labels land on the same model grid
    assert ms.geometry == m.geometry


def test_synthetic_oblique_non_unit_round_trip():
    rot = _rotation_z(17) @ np.reshape(SCRAMBLED, (3, 3))
    g = Geometry((20, 16, 9), (0.75, 1.5, 2.5), (-30.5, 12.25, 80.0), tuple(rot.ravel()))
    L, P, S = _world_pattern(g)
    smooth = (L + 2 * P - S).astype(np.float32)  # linear in world space: linear interpolation is exact
    m = to_model_space(Volume(smooth, g))
    assert np.allclose(m.geometry.spacing, 1.0)
    np.testing.assert_allclose(np.reshape(m.geometry.direction, (3, 3)), _rotation_z(17) @ np.reshape(RAS, (3, 3)),
                               atol=1e-12)
    # model voxels hold the same world function: orientation and origin are right
    idx = np.stack(np.meshgrid(*(np.arange(n) for n in m.array.shape), indexing="ij"), -1).reshape(-1, 3)
    w = m.geometry.voxel_to_world(idx)
    inside = np.all((g.world_to_voxel(w) >= 0) & (g.world_to_voxel(w) <= np.asarray(g.size) - 1), axis=1)
    expected = (w[:, 0] + 2 * w[:, 1] - w[:, 2]).reshape(m.array.shape)
    np.testing.assert_allclose(m.array.reshape(-1)[inside], expected.reshape(-1)[inside], atol=1e-3)
    # back on the source grid: linear interpolation of a linear function is exact away from the
    # outer faces (where 0.75 / 1.5 / 2.5 mm centres do not line up with 1 mm centres, values are clamped)
    back = from_model_space(m.array, m)
    np.testing.assert_allclose(back[1:-1, 1:-1, 1:-1], smooth[1:-1, 1:-1, 1:-1], atol=1e-3)
    assert np.abs(back - smooth).max() < 3.0  # < one source voxel step of the pattern

    labels = np.zeros(g.shape, np.uint8)
    labels[2:6, 3:9, 4:15] = 5
    labels[4, 5, 6] = 7
    ml = to_model_space(Volume(labels, g), is_label=True)
    assert ml.geometry == m.geometry
    # source spacing 0.75 mm < 1 mm along x: labels are exact where upsampled; check the bulk is kept
    back = from_model_space(ml.array, ml)
    assert back.dtype == np.uint8 and set(np.unique(back)) <= {0, 5, 7}
    assert (back == labels).mean() > 0.95


def test_labels_exact_when_upsampling():
    g = Geometry((10, 8, 6), (1.5, 2.0, 3.0), (0.0, 0.0, 0.0), SCRAMBLED)
    labels = np.random.default_rng(1).integers(0, 4, size=g.shape).astype(np.uint8)
    m = to_model_space(Volume(labels, g), is_label=True)
    np.testing.assert_array_equal(from_model_space(m.array, m), labels)


def test_reorient_only_is_exact_and_cheap():
    g = Geometry((6, 7, 5), (1.0, 1.0, 1.0), (1.0, 2.0, 3.0), SCRAMBLED)
    ct = np.random.default_rng(2).integers(-1000, 2000, size=g.shape).astype(np.int16)
    m = to_model_space(Volume(ct, g))  # already 1 mm: no resampling
    assert not m.resampled and m.array.shape == (7, 6, 5)
    np.testing.assert_array_equal(from_model_space(m.array, m, dtype=np.int16), ct)
    assert reorient_only(Volume(ct, Geometry(g.size, (3, 3, 3), g.origin, g.direction))).array.shape == (7, 6, 5)


def test_from_model_space_checks_shape():
    g = Geometry((6, 7, 5), (1.0, 1.0, 1.0), (0, 0, 0))
    m = to_model_space(Volume(np.zeros(g.shape, np.float32), g))
    with pytest.raises(ValueError, match="expected"):
        from_model_space(np.zeros((5, 5, 5)), m)


@pytest.mark.parametrize("rng_name, lo", [("[-1,1]", -1.0), ("[0,1]", 0.0)])
def test_hu_window_inverse_inside_window(rng_name, lo):
    hu = np.arange(-175, 251, dtype=np.int16)
    u = hu_to_unit(hu, rng_name)
    assert u.dtype == np.float32 and u.min() == pytest.approx(lo) and u.max() == pytest.approx(1.0)
    back = unit_to_hu(u, rng_name)
    np.testing.assert_allclose(back, hu, atol=1e-3)
    np.testing.assert_array_equal(np.rint(back).astype(np.int16), hu)
    # outside the window values are clipped: the inverse gives the window edges
    assert hu_to_unit(np.array([-1000, 3000]), rng_name).tolist() == [lo, 1.0]
    assert unit_to_hu(np.array([lo - 1, 2.0]), rng_name).tolist() == [HU_MIN, HU_MAX]


def test_hu_window_torch_and_bad_range():
    import torch

    t = torch.tensor([-175.0, 37.5, 250.0])
    torch.testing.assert_close(hu_to_unit(t), torch.tensor([-1.0, 0.0, 1.0]))
    torch.testing.assert_close(unit_to_hu(hu_to_unit(t, "[0,1]"), "[0,1]"), t)
    with pytest.raises(ValueError, match=r"unknown intensity range '\[0,255\]'"):
        hu_to_unit(np.zeros(3), "[0,255]")
