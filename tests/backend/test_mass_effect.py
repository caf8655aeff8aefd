"""Mass effect: the organ boundary moves outward, tissue near the tumour changes, nothing beyond the support."""

import numpy as np
import pytest
from scipy import ndimage

from backend.synthesis.mass_effect import (
    MassEffectConfig,
    apply_mass_effect,
    equivalent_diameter_mm,
    mass_effect_applies,
    warp_crop,
)


def _sphere(shape, centre, radius_vox):
    idx = np.indices(shape)
    return sum((i - c) ** 2 for i, c in zip(idx, centre)) <= radius_vox**2


@pytest.fixture(scope="module")
def slab():
    """1 mm grid: an organ (60 HU) below a planar boundary at y = 60 with fat (-100 HU) above, a 30 mm
    tumour whose surface is 5 mm below the boundary, and a labelled bright vessel (id 7) beside it."""
    rng = np.random.default_rng(0)
    shape = (70, 110, 90)  # (z, y, x)
    organ = np.zeros(shape, bool)
    organ[:, :60, :] = True
    ct = np.where(organ, 60.0, -100.0) + rng.normal(0, 8, shape)
    labels = np.where(organ, 5, 0).astype(np.uint8)
    vessel = np.zeros(shape, bool)
    yy, xx = np.mgrid[:shape[1], :shape[2]]
    vessel[:, (yy - 40) ** 2 + (xx - 66) ** 2 <= 9] = True  # a tube along z, 3 mm from the tumour surface
    ct[vessel] = 160 + rng.normal(0, 8, vessel.sum())
    labels[vessel] = 7
    tumor = _sphere(shape, (35, 40, 45), 15)  # top at y = 55: 5 mm below the boundary
    return ct.astype(np.int16), labels, organ, tumor


def _boundary_y(organ_col: np.ndarray) -> float:
    """y of the last organ voxel along a column (the boundary is between it and the next)."""
    return float(np.flatnonzero(organ_col).max()) + 0.5


def test_modes_and_threshold():
    s = (1.0, 1.0, 1.0)
    small, big = _sphere((40, 40, 40), (20, 20, 20), 8), _sphere((40, 40, 40), (20, 20, 20), 12)
    assert equivalent_diameter_mm(big, s) > 20 > equivalent_diameter_mm(small, s)
    assert mass_effect_applies("auto", big, s) and not mass_effect_applies("auto", small, s)
    assert mass_effect_applies("on", small, s) and not mass_effect_applies("off", big, s)
    with pytest.raises(ValueError, match="mass_effect"):
        mass_effect_applies("sometimes", big, s)
    with pytest.raises(ValueError, match="displaced_fraction"):
        MassEffectConfig(displaced_fraction=1.5)


def test_boundary_moves_outward_and_nothing_beyond_the_support(slab):
    ct, labels, organ, tumor = slab
    res = apply_mass_effect(ct, tumor, (1.0, 1.0, 1.0), labels=[labels, organ])
    new_labels, new_organ = res.labels
    # bit-identical outside the support, in the CT and in every label array
    assert np.array_equal(res.ct[~res.support], ct[~res.support])
    assert np.array_equal(new_labels[~res.support], labels[~res.support])
    assert res.support.any() and not res.support.all()
    far = ndimage.distance_transform_edt(~tumor) > res.info["reach_mm"] + 1
    assert not (res.support & far).any()
    # the organ boundary above the tumour bulges outward (label and CT edge agree)
    before, after = _boundary_y(organ[35, :, 45]), _boundary_y(new_organ[35, :, 45])
    shift = after - before
    assert shift >= 2.0, f"boundary moved {shift} mm"
    prof0, prof1 = ct[34:37, 50:70, 44:47].mean(axis=(0, 2)), res.ct[34:37, 50:70, 44:47].mean(axis=(0, 2))
    edge0 = np.interp(-20, -prof0, np.arange(20))  # 50 % crossing (60 -> -100 HU), sub-voxel
    edge1 = np.interp(-20, -prof1, np.arange(20))
    assert edge1 - edge0 >= 1.5  # 2.0 mm measured (the field predicts 2.4 mm before the taper's averaging)
    # and the push decays: a column 30 mm to the side moves much less
    side = _boundary_y(new_organ[35, :, 80]) - _boundary_y(organ[35, :, 80])
    assert side < shift
    assert res.info["min_jacobian"] >= 0.2


def test_tissue_changes_within_10_mm_and_labels_move_with_it(slab):
    ct, labels, organ, tumor = slab
    res = apply_mass_effect(ct, tumor, (1.0, 1.0, 1.0), labels=[labels])
    dist = ndimage.distance_transform_edt(~tumor)
    shell = ~tumor & (dist <= 10)
    assert np.abs(res.ct.astype(float) - ct)[shell].mean() >= 5
    moved_vessel = res.labels[0] == 7
    yx0 = np.argwhere(labels[35] == 7).mean(0)
    yx1 = np.argwhere(moved_vessel[35]).mean(0)
    assert yx1[1] - yx0[1] > 1.0  # the vessel beside the tumour is pushed outward (+x)
    # the CT moved with the labels: the bright voxels are where the label now is
    assert res.ct[moved_vessel].mean() > 130 and res.ct[(labels == 7) & ~moved_vessel].mean() < 110


def test_grain_kept_in_the_displaced_tissue(slab):
    ct, labels, organ, tumor = slab
    res = apply_mass_effect(ct, tumor, (1.0, 1.0, 1.0))
    zone = res.support & ~tumor & organ & (labels != 7) & ndimage.binary_erosion(organ, iterations=3)

    def hp_std(a):
        a = a.astype(np.float32)
        r = (a - ndimage.gaussian_filter(a, 1.0))[zone]
        return 1.4826 * np.median(np.abs(r - np.median(r)))

    assert 0.85 <= hp_std(res.ct) / hp_std(ct) <= 1.15  # linear interpolation alone would give ~0.6


def test_rigid_and_fixed_voxels_do_not_move(slab):
    ct, labels, organ, tumor = slab
    ct = ct.copy()
    bone = np.zeros(ct.shape, bool)
    bone[:, 62:66, 40:50] = True  # a rib just outside the boundary
    ct[bone] = 700
    fixed = np.zeros(ct.shape, bool)
    fixed[30:40, 20:24, 40:50] = True  # a labelled real tumour below
    res = apply_mass_effect(ct, tumor, (1.0, 1.0, 1.0), fixed=fixed)
    assert np.array_equal(res.ct[bone], ct[bone])
    assert np.array_equal(res.ct[fixed], ct[fixed])


def test_on_the_real_ct_a_30mm_liver_tumour(totalseg_ct, totalseg_seg):
    from backend.io import read_image

    ct = read_image(totalseg_ct)
    seg = read_image(totalseg_seg).array
    s = tuple(ct.geometry.spacing[::-1])
    liver = seg == 5
    depth = ndimage.distance_transform_edt(np.pad(liver, 1), sampling=s)[1:-1, 1:-1, 1:-1]
    c = np.argwhere((depth >= 18) & (depth <= 21))[0]
    idx = np.indices(liver.shape)
    tumor = sum(((i - ci) * si) ** 2 for i, ci, si in zip(idx, c, s)) <= 15.5**2
    assert equivalent_diameter_mm(tumor, s) >= 30
    res = apply_mass_effect(ct.array, tumor, s, labels=[seg])
    assert np.array_equal(res.ct[~res.support], ct.array[~res.support])
    assert np.array_equal(res.labels[0][~res.support], seg[~res.support])
    shell = ~tumor & (ndimage.distance_transform_edt(~tumor, sampling=s) <= 10)
    assert np.abs(res.ct.astype(float) - ct.array)[shell].mean() >= 5
    assert res.info["surface_push_mm"] > 4


def test_warp_crop_for_diffusion_01_and_pm1():
    rng = np.random.default_rng(1)
    shape = (96, 96, 96)  # model space crop, 1 mm, (X, Y, Z)
    hu = np.full(shape, 100.0) + rng.normal(0, 10, shape)
    organ = np.zeros(shape, bool)
    organ[:70] = True
    hu[~organ] = -100
    tumor = _sphere(shape, (50, 48, 48), 14)
    from backend.synthesis import blend

    crop01 = blend.hu_to_01(hu).astype(np.float32)
    w01, organ01, sup01, info = warp_crop(crop01, organ, tumor)
    assert info is not None and sup01.any() and w01.dtype == np.float32
    assert np.array_equal(w01[~sup01], crop01[~sup01])
    assert organ01[70:75, 48, 48].any()  # the organ boundary (x = 70) bulged outward
    pm1 = crop01 * 2 - 1
    wpm, _, suppm, _ = warp_crop(pm1, organ, tumor, intensity="pm1")
    assert np.array_equal(suppm, sup01)
    assert np.allclose((wpm + 1) / 2, w01, atol=1e-5)
    same, organ_same, none, no_info = warp_crop(crop01, organ, _sphere(shape, (50, 48, 48), 5))
    assert no_info is None and not none.any() and np.array_equal(same, crop01)
    with pytest.raises(ValueError, match="intensity"):
        warp_crop(crop01, organ, tumor, intensity="raw")


@pytest.mark.slow
def test_diffusion_crop_warped_before_encoding_reaches_the_output(parity_dir, parity_outputs, one_thread):
    """The diffusion path with the parity models: warp the crop, synthesize on it, blend into the warped crop."""
    import torch

    from backend.synthesis import blend
    from backend.synthesis.diffusion_crop import iter_synthesize_crop
    from backend.synthesis.engine import SynthesisEngine, run_sync

    x = parity_outputs["x"][0, 0].numpy()  # (X, Y, Z) in [-1, 1], 1 mm
    tumor = _sphere(x.shape, (48, 48, 48), 15.5)  # 31 mm
    organ = x > -0.2  # soft tissue and brighter, in this window
    warped, warped_organ, support, info = warp_crop(x, organ, tumor, intensity="pm1")
    assert info is not None and info["surface_push_mm"] > 4
    assert np.array_equal(warped[~support], x[~support])
    engine = SynthesisEngine(parity_dir, device="cpu", threads=1)
    models = engine.stage_models("liver", "early")
    mask = tumor.astype(np.float32)
    decoded = run_sync(iter_synthesize_crop(warped, mask, models, device=torch.device("cpu"),
                                            generator=torch.Generator().manual_seed(0)))
    m_blur = blend.blur_mask(mask, 1.0)
    out01 = blend.blend01((warped + 1) / 2, m_blur, decoded)
    x01 = np.clip((x + 1) / 2, 0, 1)
    untouched = ~support & (m_blur == 0)
    assert np.allclose(out01[untouched], x01[untouched], atol=1e-6)
    shell = ~tumor & (ndimage.distance_transform_edt(~tumor) <= 10) & (m_blur == 0)
    change_hu = np.abs(blend.from_01(out01) - blend.from_01(x01))[shell].mean()
    assert change_hu >= 5  # the pushed tissue is in the output, not only in what the model saw
