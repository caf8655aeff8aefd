"""Model-based synthesis (Hu et al. 2023): hypo-attenuation, phase, noise kept, support, dtype, determinism."""

import time

import numpy as np
import pytest
from scipy import ndimage

from backend.synthesis.masks import ellipsoid_box
from backend.synthesis.model_based import (
    CONTRAST_TABLE,
    ModelBasedConfig,
    contrast_phase,
    model_based_tumor,
    synthesize_model_based,
)


def _scene(dtype=np.int16, organ_hu=60.0, noise=10.0):
    rng = np.random.default_rng(3)
    ct = rng.normal(-900, 20, (60, 512, 512))
    organ = np.zeros(ct.shape, bool)
    organ[10:50, 150:350, 150:350] = True
    ct[organ] = rng.normal(organ_hu, noise, organ.sum())
    tumor = np.zeros(ct.shape, bool)
    tumor[25:35, 240:260, 240:260] = ellipsoid_box((5, 5, 5))[:10, :20, :20]
    return ct.astype(dtype), organ, tumor


def _sphere(shape, centre, radius_vox):
    idx = np.indices(shape)
    return sum((i - c) ** 2 for i, c in zip(idx, centre)) <= radius_vox**2


@pytest.mark.parametrize("dtype", [np.int16, np.float32])
def test_model_based_hypo_support_dtype(dtype):
    ct, organ, tumor = _scene(dtype)
    out, sup, params = synthesize_model_based(ct, (2.0, 0.8, 0.8), organ, tumor, rng=np.random.default_rng(1))
    assert out.dtype == ct.dtype and out.shape == ct.shape
    assert np.array_equal(out[~sup], ct[~sup])
    assert sup[tumor].all()
    drop = float(ct[tumor].astype(float).mean() - out[tumor].astype(float).mean())
    assert 0.8 * params["difference_hu"] < drop < 1.2 * params["difference_hu"] + 3
    lo, hi = params["difference_range_hu"]
    assert lo <= params["difference_hu"] <= hi
    assert params["phase"] == "non-contrast" and (lo, hi) == (15.0, 40.0)  # the liver row, organ at 60 HU


def test_model_based_same_seed_same_output_and_fast():
    ct, organ, tumor = _scene()
    a = synthesize_model_based(ct, (2.0, 0.8, 0.8), organ, tumor, rng=np.random.default_rng(7))[0]
    t = time.perf_counter()
    b = synthesize_model_based(ct, (2.0, 0.8, 0.8), organ, tumor, rng=np.random.default_rng(7))[0]
    elapsed = time.perf_counter() - t
    c = synthesize_model_based(ct, (2.0, 0.8, 0.8), organ, tumor, rng=np.random.default_rng(8))[0]
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert elapsed < 2.0  # typically ~0.2 s (full-array copy and organ median included); generous for a loaded box


def test_model_based_int_clipped_to_dtype_range():
    ct, organ, tumor = _scene(np.int16)
    ct[:] = np.iinfo(np.int16).min
    out, _, _ = synthesize_model_based(ct, (1, 1, 1), organ, tumor, rng=np.random.default_rng(0), difference_hu=60)
    assert out.min() == np.iinfo(np.int16).min


def test_config_checked():
    with pytest.raises(ValueError, match="difference_hu"):
        ModelBasedConfig(difference_hu=(50, 10))
    with pytest.raises(ValueError, match="phase"):
        contrast_phase(np.zeros((2, 2, 2)), np.ones((2, 2, 2), bool), "liver", "arterial")
    with pytest.raises(ValueError, match="organ"):
        contrast_phase(np.zeros((2, 2, 2)), np.ones((2, 2, 2), bool), "lung")


@pytest.mark.parametrize("organ, organ_hu, phase", [("liver", 50, "non-contrast"), ("liver", 115, "enhanced"),
                                                    ("kidney_left", 35, "non-contrast"), ("kidney", 170, "enhanced"),
                                                    ("pancreas", 110, "enhanced"), ("spleen", 45, "non-contrast")])
def test_phase_told_from_the_organ_and_contrast_drawn_from_its_row(organ, organ_hu, phase):
    ct, mask, tumor = _scene(np.int16, organ_hu=organ_hu)
    out, _, p = synthesize_model_based(ct, (2.0, 0.8, 0.8), mask, tumor, rng=np.random.default_rng(2), organ=organ)
    row = CONTRAST_TABLE["kidney" if organ.startswith("kidney") else organ]
    lo, hi = row.for_phase(phase)
    assert p["phase"] == phase and p["phase_source"] == "auto"
    assert lo <= p["contrast_hu"] <= hi
    measured = float(out[tumor].mean() - ct[tumor].mean())
    assert abs(measured - p["contrast_hu"]) < 0.2 * abs(p["contrast_hu"]) + 3


def test_phase_override_and_every_draw_recorded():
    ct, organ, tumor = _scene(np.int16, organ_hu=50)
    _, _, p = synthesize_model_based(ct, (2.0, 0.8, 0.8), organ, tumor, rng=np.random.default_rng(2), phase="enhanced")
    assert p["phase"] == "enhanced" and p["phase_source"] == "given"
    assert -60 <= p["contrast_hu"] <= -35
    for key in ("difference_hu", "texture_std_hu", "texture_grain_mm", "edge_psf_voxels", "edge_sigma_mm",
                "edge_blur_mm_per_axis", "organ_median_hu", "organ_local_median_hu", "rim", "mass_effect", "config"):
        assert key in p
    import json

    json.dumps(p)  # provenance must be serialisable


def test_the_ct_grain_survives_inside_the_tumour():
    """Modulation, not replacement: the high-pass noise inside equals the organ's (was ~0.2 before)."""
    from difftumor_napari import inspection as ins

    rng = np.random.default_rng(0)
    shape = (40, 120, 120)
    ct = rng.normal(110, 20, shape)
    ct = ndimage.gaussian_filter(ct, (0.4, 0.8, 0.8))
    ct = (ct - 110) * (20 / ct.std()) + 110
    organ = np.ones(shape, bool)
    tumor = _sphere(shape, (20, 60, 60), 12)
    out, _, p = synthesize_model_based(ct.astype(np.int16), (2.0, 1.0, 1.0), organ, tumor, rng=np.random.default_rng(4))
    m = ins.tumor_metrics(out, tumor, organ, (2.0, 1.0, 1.0))
    assert 0.8 <= m["noise_ratio"] <= 1.25
    assert p["phase"] == "enhanced" and -60 <= m["contrast_hu"] <= -30


def test_no_change_outside_organ_and_tumour_nor_in_avoid():
    ct, organ, tumor = _scene(np.int16)
    tumor[25:35, 245:255, 240:248] = True
    organ[:, :, :245] = False  # the tumour reaches out of the organ on one side
    avoid = np.zeros_like(organ)
    avoid[28:32, 248:252, 255:262] = True
    organ_mb = organ | avoid
    out, sup, _ = synthesize_model_based(ct, (2.0, 0.8, 0.8), organ_mb, tumor & organ, rng=np.random.default_rng(1),
                                         avoid=avoid, mass_effect="off")
    assert np.array_equal(out[~organ_mb], ct[~organ_mb])
    assert np.array_equal(out[avoid], ct[avoid])
    assert not (sup & avoid).any()


def test_a_vessel_crossing_the_mask_does_not_show_through():
    rng = np.random.default_rng(5)
    shape = (30, 100, 100)
    ct = rng.normal(110, 12, shape)
    vessel = np.zeros(shape, bool)
    vessel[:, 48:53, 48:53] = True
    ct[vessel] += 70
    organ = np.ones(shape, bool)
    tumor = _sphere(shape, (15, 50, 50), 14)
    out, _, p = synthesize_model_based(ct, (1.0, 1.0, 1.0), organ, tumor, rng=np.random.default_rng(1), mass_effect="off")
    inner = tumor & ~vessel
    assert abs(float(out[tumor & vessel].mean() - out[inner].mean())) < 15  # was +70 before suppression
    off = synthesize_model_based(ct, (1.0, 1.0, 1.0), organ, tumor, rng=np.random.default_rng(1), mass_effect="off",
                                 config=ModelBasedConfig(suppress_structure=False))[0]
    assert float(off[tumor & vessel].mean() - off[inner].mean()) > 50
    assert p["structure_removed_hu"] > 0


def test_small_tumour_on_a_coarse_grid_keeps_its_contrast():
    """The edge weight reaches 1 inside a tumour only ~4 voxels wide (a blurred 0/1 mask would not)."""
    ct, organ, tumor = _scene(np.float32)
    small = _sphere(ct.shape, (30, 250, 250), 2.2)
    out, _, p = synthesize_model_based(ct, (3.0, 3.0, 3.0), organ, small, rng=np.random.default_rng(3))
    drop = float(ct[small].mean() - out[small].mean())
    assert drop > 0.8 * p["difference_hu"]


def test_rim_enhancement_off_by_default_and_brighter_rim_when_on():
    rng = np.random.default_rng(1)
    shape = (40, 100, 100)
    ct = rng.normal(110, 5, shape)
    organ = np.ones(shape, bool)
    tumor = _sphere(shape, (20, 50, 50), 15)
    spacing = (1.0, 1.0, 1.0)
    depth = ndimage.distance_transform_edt(tumor)
    rim_zone, core = tumor & (depth <= 2.5), tumor & (depth > 6)
    res = model_based_tumor(ct, spacing, organ, tumor, rng=np.random.default_rng(2), mass_effect="off")
    on = model_based_tumor(ct, spacing, organ, tumor, rng=np.random.default_rng(2), mass_effect="off", rim=True)
    assert res.params["rim"] is False and on.params["rim"] is True
    gain_off = res.ct[rim_zone].mean() - res.ct[core].mean()
    gain_on = on.ct[rim_zone].mean() - on.ct[core].mean()
    assert gain_on - gain_off > 0.3 * on.params["rim_hu"]


def test_mass_effect_auto_in_the_model_based_path():
    rng = np.random.default_rng(0)
    shape = (50, 90, 90)
    ct = rng.normal(100, 10, shape)
    organ = np.ones(shape, bool)
    big = _sphere(shape, (25, 45, 45), 16)  # 32 mm at 1 mm
    small = _sphere(shape, (25, 45, 45), 7)
    r_big = model_based_tumor(ct, (1, 1, 1), organ, big, rng=np.random.default_rng(1))
    r_small = model_based_tumor(ct, (1, 1, 1), organ, small, rng=np.random.default_rng(1))
    r_off = model_based_tumor(ct, (1, 1, 1), organ, big, rng=np.random.default_rng(1), mass_effect="off")
    assert r_big.params["mass_effect"]["applied"] and not r_small.params["mass_effect"]["applied"]
    assert not r_off.params["mass_effect"]["applied"]
    ring = ~big & ndimage.binary_dilation(big, iterations=8)
    assert np.abs(r_big.ct - ct)[ring].mean() > np.abs(r_off.ct - ct)[ring].mean() + 3
    assert r_big.support.sum() > r_off.support.sum()
    assert np.array_equal(r_big.ct[~r_big.support], ct[~r_big.support])
    with pytest.raises(ValueError, match="mass_effect"):
        model_based_tumor(ct, (1, 1, 1), organ, big, rng=np.random.default_rng(1), mass_effect="yes")
