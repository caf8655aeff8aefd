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
    det = M.tumor_detection(pred, ref, spacing)
    assert (det.tumors, det.detected, det.false_positives) == (3, 2, 2)
    assert det.by_size == {"lt20mm": (1, 1), "20_50mm": (1, 0), "gt50mm": (1, 1)}
    assert M.sensitivity(det.detected, det.tumors) == pytest.approx(2 / 3)


def test_tumor_detection_min_overlap_and_empty_cases():
    ref = _cube()
    pred = np.zeros_like(ref)
    pred[5, 5, 5] = True
    assert M.tumor_detection(pred, ref, (1, 1, 1)).detected == 1
    assert M.tumor_detection(pred, ref, (1, 1, 1), min_overlap_voxels=2).detected == 0
    empty = np.zeros_like(ref)
    det = M.tumor_detection(empty, empty, (1, 1, 1))
    assert (det.tumors, det.detected, det.false_positives) == (0, 0, 0)
    assert math.isnan(M.sensitivity(0, 0))
    det = M.tumor_detection(ref, empty, (1, 1, 1))  # healthy case, one predicted blob
    assert (det.tumors, det.false_positives) == (0, 1)
