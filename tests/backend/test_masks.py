"""Tumour masks: the release's generator, the user-placed ellipsoid, user-drawn masks."""

import numpy as np
import pytest

from backend.errors import DiffTumorError
from backend.io import Geometry
from backend.synthesis import masks
from backend.synthesis.masks import SIZE_CLASSES, ellipsoid_mask, generate_tumor_mask, validate_tumor_mask


def _organ(shape=(160, 140, 120)):
    """A blobby organ: an ellipsoid of semi-axes ~ (70, 60, 50) at 1 mm."""
    x, y, z = np.ogrid[: shape[0], : shape[1], : shape[2]]
    c = [s // 2 for s in shape]
    return ((x - c[0]) / 70.0) ** 2 + ((y - c[1]) / 60.0) ** 2 + ((z - c[2]) / 50.0) ** 2 <= 1


def test_size_class_table_matches_release():
    assert SIZE_CLASSES["tiny"].semi_axes == (3, 5) and SIZE_CLASSES["small"].semi_axes == (6, 10)
    assert SIZE_CLASSES["medium"].semi_axes == (12, 20) and SIZE_CLASSES["large"].semi_axes == (24, 64)
    assert SIZE_CLASSES["small"].diameter_mm == (12, 20)
    assert [SIZE_CLASSES[n].stage for n in ("tiny", "small", "medium", "large")] == ["early", "early", "mid_late", "mid_late"]


@pytest.mark.parametrize("size", ["tiny", "small", "medium", "large"])
@pytest.mark.parametrize("organ", ["liver", "pancreas"])
def test_generated_tumours_respect_class_and_organ(size, organ):
    org = _organ()
    sc = SIZE_CLASSES[size]
    for seed in range(3):
        mask, params = generate_tumor_mask(org, organ, size=size, rng=seed)
        assert mask.any() and not (mask & ~org).any()
        assert sc.count[0] <= len(params) <= sc.count[1]
        for p in params:
            assert all(sc.semi_axes[0] <= a <= sc.semi_axes[1] for a in p.semi_axes)
            assert sc.sigma[0] <= p.sigma <= sc.sigma[1]
            assert org[p.centre]
        if len(params) == 1:  # one tumour: its extent cannot exceed its (4a, 4b, 4c) box
            ext = np.ptp(np.argwhere(mask), axis=0) + 1
            assert np.all(ext <= 4 * np.asarray(params[0].semi_axes))
            # ellipsoid volume within a factor ~2 (elastic warps and clipping move a little)
            vol = 4 / 3 * np.pi * np.prod(params[0].semi_axes)
            assert mask.sum() <= 2.0 * vol


def test_liver_centres_in_eroded_slices_and_middle_z():
    org = _organ()
    zs = np.flatnonzero(org.any((0, 1)))
    for seed in range(10):
        _, params = generate_tumor_mask(org, "liver", size="tiny", count=1, rng=seed)
        x, y, z = params[0].centre
        assert zs[0] + 0.3 * np.ptp(zs) - 1 <= z <= zs[0] + 0.7 * np.ptp(zs) + 1
        assert org[x - 2 : x + 3, y - 2 : y + 3, z].all()  # survived the 5x5 erosion


def test_kidney_medium_may_leave_organ_half_the_time():
    org = _organ((90, 90, 90))
    org[:] = False
    org[30:60, 30:60, 25:65] = True  # a box-shaped kidney
    clipped = [generate_tumor_mask(org, "kidney", size="medium", rng=s)[1][0].clipped_to_organ for s in range(40)]
    assert 8 < sum(clipped) < 32


def test_same_seed_same_mask():
    org = _organ()
    a, pa = generate_tumor_mask(org, "liver", rng=11)
    b, pb = generate_tumor_mask(org, "liver", rng=11)
    assert np.array_equal(a, b) and [p.to_dict() for p in pa] == [p.to_dict() for p in pb]


def test_organ_absent_or_too_small():
    with pytest.raises(DiffTumorError, match="absent"):
        generate_tumor_mask(np.zeros((20, 20, 20), bool), "liver", size="tiny")
    small = np.zeros((60, 60, 60), bool)
    small[20:30, 20:30, 20:30] = True
    with pytest.raises(DiffTumorError, match="too small for a large tumour"):
        generate_tumor_mask(small, "liver", size="large")


def test_elastic_deform_moves_but_keeps_volume():
    rng = np.random.default_rng(0)
    box = masks.ellipsoid_box((10, 10, 10))
    out = masks.deformed_ellipsoid((10, 10, 10), 3.0, rng)
    assert not np.array_equal(out, box)
    assert 0.6 < out.sum() / box.sum() < 1.5


def test_ellipsoid_on_anisotropic_rotated_grid():
    # 3 mm slices, 0.8 mm in-plane, LPS-flipped direction like the shared CT
    g = Geometry((100, 100, 40), (0.8, 0.8, 3.0), (10.0, -20.0, 5.0), (-1, 0, 0, 0, -1, 0, 0, 0, 1))
    centre_vox = (50, 50, 20)
    world = g.voxel_to_world(centre_vox)
    m = ellipsoid_mask(g, world, (10, 10, 10))
    m_vox = ellipsoid_mask(g, centre_vox, (10, 10, 10), voxel=True)
    assert np.array_equal(m, m_vox)
    vol_ml = m.sum() * g.voxel_volume_ml
    assert abs(vol_ml - 4 / 3 * np.pi * 1.0) < 0.25  # 10 mm radius sphere = 4.19 ml
    z, y, x = np.argwhere(m).T
    assert np.ptp(x) * 0.8 == pytest.approx(20, abs=2) and np.ptp(z) * 3.0 == pytest.approx(18, abs=4)
    # a 90 degree rotation about S swaps the in-plane radii
    a = ellipsoid_mask(g, world, (20, 5, 5))
    b = ellipsoid_mask(g, world, (5, 20, 5), rotation=(0, 0, 90))
    assert (a & b).sum() / (a | b).sum() > 0.9
    irregular = ellipsoid_mask(g, world, (10, 10, 10), irregularity=1.0, rng=3)
    assert not np.array_equal(irregular, m) and 0.5 < irregular.sum() / m.sum() < 2.0
    assert np.array_equal(irregular, ellipsoid_mask(g, world, (10, 10, 10), irregularity=1.0, rng=3))


def test_ellipsoid_bad_arguments():
    g = Geometry((20, 20, 20), (1, 1, 1), (0, 0, 0))
    with pytest.raises(DiffTumorError, match="outside the image"):
        ellipsoid_mask(g, (50, 5, 5), (3, 3, 3))
    with pytest.raises(DiffTumorError, match="radii"):
        ellipsoid_mask(g, (5, 5, 5), (3, -1, 3))
    with pytest.raises(DiffTumorError, match="irregularity"):
        ellipsoid_mask(g, (5, 5, 5), (3, 3, 3), irregularity=2)


def test_validate_user_mask():
    organ = np.zeros((10, 10, 10), bool)
    organ[2:8, 2:8, 2:8] = True
    m = np.zeros((10, 10, 10), np.uint8)
    m[4:6, 4:6, 4:6] = 1
    assert validate_tumor_mask(m, organ).sum() == 8
    with pytest.raises(DiffTumorError, match="empty"):
        validate_tumor_mask(np.zeros_like(m), organ)
    with pytest.raises(DiffTumorError, match="inside the organ"):
        validate_tumor_mask(np.roll(m, 5, axis=0) * 0 + (np.arange(10) == 0)[:, None, None], organ)
    with pytest.raises(DiffTumorError, match="shape"):
        validate_tumor_mask(m[:5], organ)
    with pytest.raises(DiffTumorError, match="NaN"):
        validate_tumor_mask(np.full((10, 10, 10), np.nan), organ)


def test_largest_diameter():
    assert masks.largest_diameter_mm(masks.ellipsoid_box((10, 6, 5))) == pytest.approx(20, abs=1.0)
    assert masks.largest_diameter_mm(masks.ellipsoid_box((4, 4, 4)), (2, 2, 2)) == pytest.approx(16, abs=1.5)


# ------------------------------------------------------------------ how many tumours fit (issue 14, defect 4)
def _box(n=60):
    org = np.zeros((n, n, n), bool)
    org[5:-5, 5:-5, 5:-5] = True
    return org


def test_a_count_beyond_the_organs_volume_is_refused_in_one_line():
    """--size small --count 10000 silently gave one merged 'tumour' over half the organ (provenance: 1 tumour)."""
    org = _box()  # 50 mm cube: 125 ml
    with pytest.raises(DiffTumorError, match=r"^organ mask: the liver is 125 ml \(on the 1 mm grid\); at most 138 small "
                                             r"tumours \(12-20 mm\) fit in that volume \(asked for 10000\)$"):
        generate_tumor_mask(org, "liver", size="small", count=10000, rng=0)


def test_tumours_are_placed_apart_or_refused_with_how_many_fit():
    org = _box()
    mask, params = generate_tumor_mask(org, "liver", size="small", count=3, rng=1)
    from scipy import ndimage

    assert ndimage.label(mask, np.ones((3, 3, 3)))[1] == 3 and len(params) == 3  # three tumours, not one blob
    assert all(p.voxels > 0 for p in params) and sum(p.voxels for p in params) == mask.sum()
    with pytest.raises(DiffTumorError, match=r"^organ mask: the liver is 125 ml \(on the 1 mm grid\); only \d+ small tumours "
                                             r"\(12-20 mm\) could be placed in it apart from each other \(asked for 60\)$"):
        generate_tumor_mask(org, "liver", size="small", count=60, rng=0)


def test_a_large_tumour_at_the_organs_centre_fits_once():
    org = _organ()
    with pytest.raises(DiffTumorError, match=r"a large pancreas tumour is placed at the organ's centre, so only one fits"):
        generate_tumor_mask(org, "pancreas", size="large", count=2, rng=0)


def test_the_releases_random_count_keeps_the_tumours_that_fit_apart():
    """Without an asked-for count (the release's 1-3 draw, used in segmentation training) a tumour that finds no
    room is left out instead of failing the draw."""
    org = np.zeros((40, 40, 40), bool)
    org[10:28, 10:28, 10:28] = True
    counts = [len(generate_tumor_mask(org, "kidney", size="small", rng=s)[1]) for s in range(12)]
    assert min(counts) >= 1 and max(counts) <= 3
