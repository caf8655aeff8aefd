"""Model-based shapes and locations: round small tumours, lobulated large ones, vessels and real tumours avoided."""

import numpy as np
import pytest

from backend.synthesis.shapes import draw_shape, place_tumor, random_tumor, tumor_shape, vessel_mask


@pytest.fixture(scope="module")
def phantom():
    from backend.phantom import make_phantom

    ct, lab = make_phantom(0)
    return ct.array, lab.array == 5, tuple(ct.geometry.spacing[::-1])


def _shape_metrics(mask, spacing):
    from difftumor_napari import inspection as ins

    return ins.shape_metrics(mask, spacing)


@pytest.mark.parametrize("size", ["tiny", "small", "medium", "large"])
def test_shapes_round_when_small_lobulated_when_large(size):
    spacing = (1.0, 1.0, 1.0) if size != "large" else (2.0, 2.0, 2.0)
    sph, sol = [], []
    for seed in range(4):
        p = draw_shape(size, np.random.default_rng(seed))
        m = tumor_shape(p, spacing)
        assert m.any() and all(n % 2 == 1 for n in m.shape)
        assert not (m[0].any() or m[-1].any() or m[:, 0].any() or m[:, :, 0].any())  # the box holds the whole shape
        if size in ("tiny", "small"):
            assert p["lobes"] == 0
        else:
            assert 2 <= p["lobes"] <= 4
        if size != "tiny":
            s = _shape_metrics(m, spacing)
            sph.append(s["sphericity"])
            sol.append(s["solidity"])
    if size in ("medium", "large"):
        # lobulated but not a sickle or strip (Inspection: sphericity >= 0.6, solidity >= 0.7)
        assert min(sph) >= 0.6 and min(sol) >= 0.7 and np.mean(sol) < 0.99
    elif size == "small":
        assert min(sph) > 0.8 and min(sol) > 0.95


def test_same_seed_same_shape():
    a = tumor_shape(draw_shape("medium", np.random.default_rng(3)), (0.8, 0.8, 2.0))
    b = tumor_shape(draw_shape("medium", np.random.default_rng(3)), (0.8, 0.8, 2.0))
    c = tumor_shape(draw_shape("medium", np.random.default_rng(4)), (0.8, 0.8, 2.0))
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_vessel_mask_finds_the_phantom_vessels(phantom):
    ct, liver, spacing = phantom
    v = vessel_mask(ct, liver, spacing)
    bright = liver & (ct > 150)  # the phantom paints its hepatic vessels at 165 HU
    assert v[bright].mean() > 0.7
    assert (v & liver & (ct < 110)).sum() < 0.15 * liver.sum()
    assert v.sum() < 0.3 * liver.sum()


def test_placement_avoids_vessels_and_real_tumours(phantom):
    ct, liver, spacing = phantom
    real = np.zeros(liver.shape, bool)
    zs, ys, xs = np.nonzero(liver)
    c = (int(np.median(zs)), int(np.median(ys)), int(np.median(xs)))
    real[c[0] - 4:c[0] + 4, c[1] - 8:c[1] + 8, c[2] - 8:c[2] + 8] = True
    real &= liver
    vessels = vessel_mask(ct, liver, spacing)
    for seed in range(4):
        mask, info = random_tumor(ct, liver, spacing, np.random.default_rng(seed), size="small", avoid=real)
        assert mask.any() and not (mask & real).any() and not (mask & ~liver).any()
        assert info["phase"] == "enhanced" and info["collision_voxels"] == 0 and not info["relaxed"]
        assert not (mask & vessels).any()


def test_placement_relaxes_and_says_so_when_nothing_fits():
    organ = np.zeros((20, 20, 20), bool)
    organ[5:15, 5:15, 5:15] = True
    obstacles = organ.copy()
    obstacles[10, 10, 10] = False
    shape = np.ones((5, 5, 5), bool)
    mask, info = place_tumor(organ, (1, 1, 1), shape, np.random.default_rng(0), obstacles=obstacles)
    assert info["relaxed"] and mask.sum() >= 1 and not (mask & obstacles).any()


def test_non_contrast_organ_has_no_vessel_search(totalseg_ct, totalseg_seg):
    from backend.io import read_image

    ct = read_image(totalseg_ct)
    liver = read_image(totalseg_seg).array == 5
    mask, info = random_tumor(ct.array, liver, tuple(ct.geometry.spacing[::-1]), np.random.default_rng(0), size="medium")
    assert info["phase"] == "non-contrast" and info["vessel_voxels"] == 0
    assert mask.any() and not (mask & ~liver).any()
