"""Segmentation metrics on hand-made volumes with known answers, and against MONAI's implementations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from backend.segmentation import metrics as M


def _cube(shape=(20, 20, 20), lo=(5, 5, 5), hi=(15, 15, 15)) -> np.ndarray:
    a = np.zeros(shape, bool)
    a[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = True
    return a


# ----------------------------------------------------------------------------------------- DSC
def test_dice_known_values():
    a = np.zeros((4, 4, 4), bool)
    b = np.zeros((4, 4, 4), bool)
    a[0, 0, :4] = True  # 4 voxels
    b[0, 0, 2:4] = True  # 2 voxels, both inside a
    assert M.dice(a, b) == pytest.approx(2 * 2 / 6)
    assert M.dice(a, a) == 1.0


@pytest.mark.parametrize(
    "pred_empty,ref_empty,expected", [(True, True, 1.0), (True, False, 0.0), (False, True, 0.0)]
)
def test_dice_and_nsd_empty_conventions(pred_empty, ref_empty, expected):
    full = _cube()
    empty = np.zeros_like(full)
    pred = empty if pred_empty else full
    ref = empty if ref_empty else full
    assert M.dice(pred, ref) == expected
    assert M.surface_dice(pred, ref, (1.0, 1.0, 1.0), 2.0) == expected


def test_dice_agrees_with_monai_dicemetric():
    from monai.metrics import DiceMetric

    rng = np.random.default_rng(0)
    pred = rng.random((12, 10, 8)) > 0.6
    ref = rng.random((12, 10, 8)) > 0.5
    ours = M.dice(pred, ref)
    metric = DiceMetric(include_background=True, reduction="none")
    theirs = metric(torch.from_numpy(pred)[None, None].float(), torch.from_numpy(ref)[None, None].float())
    assert ours == pytest.approx(float(theirs.reshape(-1)[0]), abs=1e-6)


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="shape"):
        M.dice(np.zeros((3, 3, 3)), np.zeros((3, 3, 4)))


# ----------------------------------------------------------------------------------------- NSD
def test_nsd_identical_is_one_and_far_apart_is_zero():
    a = _cube((40, 20, 20), (2, 5, 5), (8, 10, 10))
    b = _cube((40, 20, 20), (30, 5, 5), (36, 10, 10))  # 22 voxels away
    assert M.surface_dice(a, a, (1.0, 1.0, 1.0), 2.0) == pytest.approx(1.0)
    assert M.surface_dice(a, b, (1.0, 1.0, 1.0), 2.0) == 0.0


def test_nsd_uses_spacing_in_array_axis_order():
    """A one-voxel shift is 3 mm along axis 0 (spacing 3) but 1 mm along axis 2 (spacing 1):
    at tau = 2 mm the x-shift is fully tolerated, the z-shift is not."""
    spacing = (3.0, 1.0, 1.0)  # (z, y, x)
    ref = _cube((20, 20, 20), (5, 5, 5), (12, 12, 12))
    shift_x = np.roll(ref, 1, axis=2)
    shift_z = np.roll(ref, 1, axis=0)
    assert M.surface_dice(shift_x, ref, spacing, 2.0) == pytest.approx(1.0)
    nsd_z = M.surface_dice(shift_z, ref, spacing, 2.0)
    assert 0.0 < nsd_z < 1.0
    # a tolerance beyond the shift accepts every surface element
    assert M.surface_dice(shift_z, ref, spacing, 3.5) == pytest.approx(1.0)


def test_nsd_matches_monai_reference_with_anisotropic_spacing():
    """Our cropped wrapper equals MONAI's DeepMind-compatible computation on the full volume."""
    from monai.metrics import compute_surface_dice

    rng = np.random.default_rng(1)
    from scipy import ndimage

    ref = ndimage.binary_dilation(rng.random((24, 30, 28)) > 0.995, iterations=3)
    pred = ndimage.binary_dilation(rng.random((24, 30, 28)) > 0.995, iterations=2) | ref
    pred = np.roll(pred, 1, axis=1)
    spacing = (2.5, 0.8, 1.2)
    for tau in (1.0, 2.0, 4.0):
        ours = M.surface_dice(pred, ref, spacing, tau)
        theirs = compute_surface_dice(
            torch.from_numpy(pred)[None, None].float(), torch.from_numpy(ref)[None, None].float(),
            class_thresholds=[tau], include_background=True, spacing=list(spacing), use_subvoxels=True,
        )
        assert ours == pytest.approx(float(theirs.reshape(-1)[0]), abs=1e-6)
        assert 0.0 <= ours <= 1.0


def test_nsd_bad_arguments():
    a = _cube()
    with pytest.raises(ValueError, match="spacing"):
        M.surface_dice(a, a, (1.0, 1.0), 2.0)
    with pytest.raises(ValueError, match="tolerance"):
        M.surface_dice(a, a, (1.0, 1.0, 1.0), -1.0)


# ----------------------------------------------------------------------------------- detection
def test_components_use_26_connectivity():
    a = np.zeros((5, 5, 5), bool)
    a[1, 1, 1] = a[2, 2, 2] = True  # corner neighbours: one component under 26-connectivity
    a[4, 4, 4] = True  # separate
    _, n = M.components(a)
    assert n == 2


def test_largest_diameter_of_a_box():
    box = _cube((30, 30, 30), (0, 0, 0), (10, 4, 2))  # 10 x 4 x 2 voxels
    spacing = (2.0, 1.0, 0.5)  # -> 20 mm x 4 mm x 1 mm
    assert M.largest_diameter_mm(box, spacing) == pytest.approx(math.sqrt(20**2 + 4**2 + 1**2))
    assert M.largest_diameter_mm(np.zeros((3, 3, 3), bool), spacing) == 0.0


def test_size_bins():
    assert M.size_bin(5.0) == "lt20mm"
    assert M.size_bin(20.0) == "20_50mm"
    assert M.size_bin(49.9) == "20_50mm"
    assert M.size_bin(50.0) == "20_50mm"  # "> 50 mm" starts above 50
    assert M.size_bin(50.01) == "gt50mm"


def test_tumor_detection_counts_by_size_and_false_positives():
    spacing = (1.0, 1.0, 1.0)
    ref = np.zeros((80, 80, 80), bool)
    ref[2:7, 2:7, 2:7] = True  # small: diameter sqrt(75) ~ 8.7 mm, detected
    ref[20:45, 20:30, 20:30] = True  # 25 x 10 x 10 -> ~28.7 mm, missed
    ref[10:70, 50:60, 50:60] = True  # 60 x 10 x 10 -> > 50 mm, detected (one voxel is enough)
    pred = np.zeros_like(ref)
    pred[4:9, 4:9, 4:9] = True  # overlaps the small one
    pred[30, 55, 55] = True  # single voxel inside the large one
    pred[75:78, 2:4, 2:4] = True  # false positive
    pred[2:4, 75:78, 75:78] = True  # false positive
    det = M.tumor_detection(pred, ref, spacing, rule="any-voxel")
    assert (det.tumors, det.detected, det.false_positives) == (3, 2, 2)
    assert det.by_size == {"lt20mm": (1, 1), "20_50mm": (1, 0), "gt50mm": (1, 1)}
    assert M.sensitivity(det.detected, det.tumors) == pytest.approx(2 / 3)
    # overlap rule: the single voxel inside the large tumour (Dice ~ 0.0003) detects nothing and is a false positive
    det = M.tumor_detection(pred, ref, spacing)
    assert (det.tumors, det.detected, det.false_positives) == (3, 1, 3)
    assert det.by_size == {"lt20mm": (1, 1), "20_50mm": (1, 0), "gt50mm": (1, 0)}


def test_tumor_detection_min_overlap_and_empty_cases():
    ref = _cube()
    pred = np.zeros_like(ref)
    pred[5, 5, 5] = True
    assert M.tumor_detection(pred, ref, (1, 1, 1), rule="any-voxel").detected == 1
    assert M.tumor_detection(pred, ref, (1, 1, 1), rule="any-voxel", min_overlap_voxels=2).detected == 0
    empty = np.zeros_like(ref)
    det = M.tumor_detection(empty, empty, (1, 1, 1))
    assert (det.tumors, det.detected, det.false_positives) == (0, 0, 0)
    assert math.isnan(M.sensitivity(0, 0))
    det = M.tumor_detection(ref, empty, (1, 1, 1))  # healthy case, one predicted blob
    assert (det.tumors, det.false_positives) == (0, 1)


def _tumours_in_organ(seed=0):
    """A 64^3 'organ' holding five cubic tumours of 6 to 14 voxels a side."""
    ref = np.zeros((64, 64, 64), bool)
    for (z, y, x), a in zip([(5, 5, 5), (20, 30, 8), (40, 10, 40), (45, 45, 20), (10, 45, 45)], (6, 8, 10, 12, 14)):
        ref[z : z + a, y : y + a, x : x + a] = True
    return ref


def test_near_random_prediction_detects_nothing_under_the_overlap_rule():
    """Issue 14 defect 8: 'one voxel inside' gave a near-random model ~96 % sensitivity."""
    ref = _tumours_in_organ()
    noise = np.random.default_rng(0).random(ref.shape) < 0.02  # ~5,000 specks over the organ
    lenient = M.tumor_detection(noise, ref, (1, 1, 1), rule="any-voxel")
    strict = M.tumor_detection(noise, ref, (1, 1, 1))
    assert lenient.tumors == strict.tumors == 5
    assert lenient.detected == 5  # the lenient rule is fooled
    assert strict.detected == 0
    assert strict.false_positives > 1000 and strict.false_positives >= lenient.false_positives


def test_good_prediction_detects_every_tumour_under_both_rules():
    from scipy import ndimage

    ref = _tumours_in_organ()
    good = np.roll(ndimage.binary_erosion(ref), 1, axis=0)  # a little small and shifted by a voxel
    good[60:62, 60:62, 60:62] = True  # one false positive
    for rule in M.DETECTION_RULES:
        det = M.tumor_detection(good, ref, (1, 1, 1), rule=rule)
        assert (det.tumors, det.detected, det.false_positives) == (5, 5, 1), rule
    # one blob over the whole organ touches every tumour but matches none of them
    blob = np.ones_like(ref)
    det = M.tumor_detection(blob, ref, (1, 1, 1))
    assert (det.detected, det.false_positives) == (0, 1)
    assert M.tumor_detection(blob, ref, (1, 1, 1), rule="any-voxel").detected == 5


def test_component_dice_lists_touching_pairs():
    ref = np.zeros((1, 1, 10), bool)
    ref[0, 0, 0:4] = True
    pred = np.zeros_like(ref)
    pred[0, 0, 2:8] = True
    rl, nr = M.components(ref)
    pl, npred = M.components(pred)
    ref_id, pred_id, dsc = M.component_dice(rl, nr, pl, npred)
    assert ref_id.tolist() == [1] and pred_id.tolist() == [1] and dsc.tolist() == [pytest.approx(2 * 2 / 10)]


def test_tumor_detection_bad_rule():
    with pytest.raises(ValueError, match="rule must be one of overlap, any-voxel"):
        M.tumor_detection(_cube(), _cube(), (1, 1, 1), rule="iou")
