"""Qt-free inspection metrics, failure flags and the review log, on hand-made volumes."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
from scipy import ndimage

from backend.errors import DiffTumorError
from difftumor_napari import inspection as ins


def _ball(shape, centre, radii_vox):
    zz, yy, xx = np.ogrid[: shape[0], : shape[1], : shape[2]]
    r = ((zz - centre[0]) / radii_vox[0]) ** 2 + ((yy - centre[1]) / radii_vox[1]) ** 2 + ((xx - centre[2]) / radii_vox[2]) ** 2
    return r <= 1.0


@pytest.fixture
def scene():
    """48^3 at 1 mm: organ ball r=20 at 60 HU, tumour ball r=6 at 20 HU, noise std 10."""
    rng = np.random.default_rng(0)
    shape = (48, 48, 48)
    organ = _ball(shape, (24, 24, 24), (20, 20, 20))
    tumor = _ball(shape, (24, 24, 24), (6, 6, 6))
    ct = np.full(shape, -100.0)
    ct[organ] = 60.0
    ct[tumor] = 20.0
    ct += rng.normal(0, 10, shape)
    return ct, tumor, organ


def test_region_means_rim_and_contrast(scene):
    ct, tumor, organ = scene
    m = ins.tumor_metrics(ct, tumor, organ, (1, 1, 1))
    assert m["mean_hu"] == pytest.approx(20, abs=2)
    assert m["std_hu"] == pytest.approx(10, abs=1.5)
    assert m["organ_mean_hu"] == pytest.approx(60, abs=1)
    assert m["rim_mean_hu"] == pytest.approx(60, abs=2)
    assert m["contrast_hu"] == pytest.approx(-40, abs=3)
    assert m["noise_similarity"] > 0.85


def test_rim_is_a_3mm_shell_in_physical_units():
    tumor = _ball((40, 40, 40), (20, 20, 20), (4, 4, 4))
    rim = ins.rim_mask(tumor, (1, 1, 1), 3.0)
    d = ndimage.distance_transform_edt(~tumor)
    assert not (rim & tumor).any()
    assert d[rim].max() <= 3.0 and rim[d <= 3.0].all() == (~tumor[d <= 3.0]).all()
    # twice the spacing along x -> the shell is thinner in voxels along x
    rim2 = ins.rim_mask(tumor, (1, 1, 2), 3.0)
    assert rim2.sum() < rim.sum()


def test_shape_metrics_sphere_vs_strip_vs_sickle():
    sphere = ins.shape_metrics(_ball((40, 40, 40), (20, 20, 20), (10, 10, 10)), (1, 1, 1))
    assert sphere["sphericity"] > 0.85 and sphere["elongation"] < 1.1 and sphere["solidity"] > 0.9
    assert sphere["equivalent_diameter_mm"] == pytest.approx(20, rel=0.03)
    strip = np.zeros((40, 40, 40), bool)
    strip[18:21, 5:35, 19:21] = True  # 3 x 30 x 2 voxels
    s = ins.shape_metrics(strip, (1, 1, 1))
    assert s["elongation"] > 5 and s["sphericity"] < 0.6
    flags = ins.failure_flags({**s, "inplane_spacing_mm": 1.0})
    assert "sickle_or_strip_shape" in flags
    # sickle: a thick crescent (ball minus a shifted ball) is far from convex
    sickle = _ball((40, 40, 40), (20, 20, 20), (12, 12, 12)) & ~_ball((40, 40, 40), (20, 20, 26), (12, 12, 12))
    c = ins.shape_metrics(sickle, (1, 1, 1))
    assert c["solidity"] < 0.7
    assert "sickle_or_strip_shape" in ins.failure_flags({**c, "inplane_spacing_mm": 1.0})
    assert "sickle_or_strip_shape" not in ins.failure_flags({**sphere, "inplane_spacing_mm": 1.0})


def test_sphericity_uses_spacing():
    # an ellipsoid in voxels that is a sphere in mm
    mask = _ball((60, 40, 40), (30, 20, 20), (20, 10, 10))
    m = ins.shape_metrics(mask, (0.5, 1, 1))
    assert m["sphericity"] > 0.85 and m["elongation"] < 1.1


def test_edge_width_separates_step_from_blurred_edge(scene):
    _, tumor, organ = scene
    clean = np.where(organ, 60.0, -100.0)
    clean[tumor] = 20.0
    step = ins.tumor_metrics(clean, tumor, organ, (1, 1, 1))
    soft_ct = np.where(organ, 60.0, -100.0)
    soft_ct = soft_ct - 40.0 * np.clip(ndimage.gaussian_filter(tumor.astype(float), 2.0), 0, 1)
    soft = ins.tumor_metrics(soft_ct, tumor, organ, (1, 1, 1))
    assert step["edge_width_mm"] <= 2.5
    assert soft["edge_width_mm"] > 4.0
    assert step["edge_gradient_hu_per_mm"] > soft["edge_gradient_hu_per_mm"]
    assert "too_sharp_edge" in ins.failure_flags(step)
    assert "too_sharp_edge" not in ins.failure_flags(soft)


def test_density_flags_fat_and_fluid():
    base = {"inplane_spacing_mm": 1.0}
    assert "fat_density" in ins.failure_flags({**base, "mean_hu": -60, "organ_mean_hu": 110})
    assert "fluid_density" in ins.failure_flags({**base, "mean_hu": 8, "organ_mean_hu": 110})
    # a hypodense lesion in a non-contrast CT (organ 50 HU) is not flagged as fluid
    assert "fluid_density" not in ins.failure_flags({**base, "mean_hu": 8, "organ_mean_hu": 50})
    assert ins.failure_flags({**base, "mean_hu": 60, "organ_mean_hu": 110}) == {}


def test_noise_mismatch_flag(scene):
    ct, tumor, organ = scene
    smooth = ct.copy()
    smooth[tumor] = ndimage.gaussian_filter(ct, 2.0)[tumor]  # a too-smooth (denoised) tumour
    m = ins.tumor_metrics(smooth, tumor, organ, (1, 1, 1))
    assert m["noise_ratio"] < 0.5
    assert "noise_mismatch" in ins.failure_flags(m)
    assert "noise_mismatch" not in ins.failure_flags(ins.tumor_metrics(ct, tumor, organ, (1, 1, 1)))


def test_no_mass_effect_needs_large_tumour_and_unchanged_surroundings():
    rng = np.random.default_rng(1)
    shape = (64, 64, 64)
    organ = _ball(shape, (32, 32, 32), (30, 30, 30))
    tumor = _ball(shape, (32, 32, 32), (12, 12, 12))  # 24 mm
    before = np.where(organ, 60.0, -100.0) + rng.normal(0, 10, shape)
    after = before.copy()
    after[tumor] = 20 + rng.normal(0, 10, int(tumor.sum()))
    m = ins.tumor_metrics(after, tumor, organ, (1, 1, 1), original_ct=before)
    assert m["shell_change_hu"] == pytest.approx(0.0)
    assert "no_mass_effect" in ins.failure_flags(m)
    # surrounding tissue displaced (here: shifted by 3 voxels) -> no flag
    pushed = np.roll(before, 3, axis=2)
    pushed[tumor] = after[tumor]
    m2 = ins.tumor_metrics(pushed, tumor, organ, (1, 1, 1), original_ct=before)
    assert "no_mass_effect" not in ins.failure_flags(m2)
    # a small tumour is not expected to push anything
    small = _ball(shape, (32, 32, 32), (4, 4, 4))
    m3 = ins.tumor_metrics(after, small, organ, (1, 1, 1), original_ct=after)
    assert "no_mass_effect" not in ins.failure_flags(m3)
    # without the original CT the flag is not evaluated
    assert "shell_change_hu" not in ins.tumor_metrics(after, tumor, organ, (1, 1, 1))


def test_bad_inputs_raise_one_line_errors(scene):
    ct, tumor, organ = scene
    with pytest.raises(DiffTumorError, match="empty"):
        ins.tumor_metrics(ct, np.zeros_like(tumor), organ, (1, 1, 1))
    with pytest.raises(DiffTumorError, match="shape"):
        ins.tumor_metrics(ct, tumor[:-1], organ, (1, 1, 1))
    with pytest.raises(ValueError):
        ins.Review(case="c", tumor="t", failures=("made_up",))


def test_review_log_grows_across_sessions_with_one_header(tmp_path):
    log = tmp_path / "reviews.csv"
    ins.append_review(log, ins.Review("case1", "tumor 1", "dr a", "model-based", "3", ("too_sharp_edge",), ("noise_mismatch",),
                                      "edge\nlooks cut"))
    ins.append_review(log, ins.Review("case1", "tumor 2", "dr b", failures=()), timestamp="2024-01-01T00:00:00")
    text = log.read_text(encoding="utf-8")
    assert text.count("timestamp,case") == 1
    rows = ins.read_reviews(log)
    assert len(rows) == 2
    assert rows[0]["too_sharp_edge"] == "1" and rows[0]["noise_mismatch"] == "0"
    assert rows[0]["auto_flags"] == "noise_mismatch" and rows[0]["note"] == "edge looks cut"
    assert rows[1]["timestamp"] == "2024-01-01T00:00:00"
    other = tmp_path / "other.csv"
    other.write_text("a,b\n1,2\n", encoding="utf-8")
    with pytest.raises(DiffTumorError, match="header differs"):
        ins.append_review(other, ins.Review("c", "t"))
    assert other.read_text(encoding="utf-8") == "a,b\n1,2\n"
    with pytest.raises(DiffTumorError, match="does not exist"):
        ins.append_review(tmp_path / "nope" / "r.csv", ins.Review("c", "t"))
    with open(log, newline="") as fh:
        assert tuple(next(csv.reader(fh))) == ins.REVIEW_COLUMNS


def test_metric_rows_formats_everything(scene):
    ct, tumor, organ = scene
    rows = dict(ins.metric_rows(ins.tumor_metrics(ct, tumor, organ, (1, 1, 1))))
    assert "Tumour mean ± std (HU)" in rows and "±" in rows["Tumour mean ± std (HU)"]
    assert math.isfinite(float(rows["Sphericity"]))


def test_sharp_edge_reference_is_a_bare_step_on_the_same_grid():
    """On a coarse 3 mm grid a blurred tumour is not 'too sharp' (the old 2 x spacing rule flagged every
    tumour there); a bare step still is, and the reason quotes the step's own measured width."""
    spacing = (3.0, 3.0, 3.0)
    organ = np.zeros((40, 40, 40), bool)
    organ[4:36, 4:36, 4:36] = True
    tumor = _ball(organ.shape, (20, 20, 20), (4, 4, 4))  # 24 mm
    step_ct = np.where(organ, 60.0, -100.0)
    step_ct[tumor] = 20.0
    blurred = np.where(organ, 60.0, -100.0) - 40.0 * np.clip(ndimage.gaussian_filter(tumor.astype(float), 0.9), 0, 1)
    step = ins.tumor_metrics(step_ct, tumor, organ, spacing)
    soft = ins.tumor_metrics(blurred, tumor, organ, spacing)
    assert 0 < step["edge_width_step_mm"] < 2 * spacing[0]
    assert step["edge_width_mm"] == pytest.approx(step["edge_width_step_mm"], abs=0.5)
    assert "too_sharp_edge" in ins.failure_flags(step)
    assert "bare step on this grid" in ins.failure_flags(step)["too_sharp_edge"]
    assert 1.25 * soft["edge_width_step_mm"] < soft["edge_width_mm"] < 2.5 * spacing[0]  # the old rule flagged this
    assert "too_sharp_edge" not in ins.failure_flags(soft)


def test_organ_statistics_leave_out_labelled_tumours():
    """Defect 8: with MSD/LiTS labels the organ numbers included the real tumours (108 ± 30 HU against 118 ± 22
    for clean liver, contrast -11 instead of about -27 HU)."""
    rng = np.random.default_rng(1)
    shape = (48, 48, 48)
    organ = _ball(shape, (24, 24, 24), (21, 21, 21))
    synthetic = _ball(shape, (24, 14, 24), (5, 5, 5))
    real = _ball(shape, (24, 33, 24), (8, 8, 8))  # a labelled metastasis in the same liver
    ct = np.full(shape, -100.0)
    ct[organ] = 118.0
    ct[real] = 40.0
    ct[synthetic] = 91.0
    ct += rng.normal(0, 8, shape)
    m = ins.tumor_metrics(ct, synthetic, organ, (1, 1, 1), existing_tumor=real)
    assert m["organ_mean_hu"] == pytest.approx(118, abs=1)
    assert m["organ_std_hu"] < 10
    assert m["contrast_hu"] == pytest.approx(-27, abs=2)
    polluted = ins.tumor_metrics(ct, synthetic, organ, (1, 1, 1))  # what happens without the real tumours
    assert polluted["organ_mean_hu"] < 116 and polluted["contrast_hu"] > -24


def test_rim_is_clipped_to_the_organ():
    """Defect 8: the 3 mm rim reached out of the organ (fat, air): a rim std of 170 HU at the liver's edge."""
    rng = np.random.default_rng(2)
    shape = (40, 40, 40)
    organ = np.zeros(shape, bool)
    organ[4:36, 4:36, 4:22] = True  # the organ ends at x = 21; beyond it, fat
    tumor = _ball(shape, (20, 20, 18), (4, 4, 4)) & organ  # touching the organ's edge
    ct = np.where(organ, 110.0, -100.0)
    ct[tumor] = 80.0
    ct += rng.normal(0, 8, shape)
    m = ins.tumor_metrics(ct, tumor, organ, (1, 1, 1))
    assert m["rim_mean_hu"] == pytest.approx(110, abs=2) and m["rim_std_hu"] < 10
    m_no_organ = ins.tumor_metrics(ct, tumor, None, (1, 1, 1))  # without an organ the rim is the whole shell
    assert m_no_organ["rim_std_hu"] > 50
