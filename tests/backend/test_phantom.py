"""backend.phantom: determinism, HU per structure, labels, anatomical sides."""

from __future__ import annotations

import numpy as np
import pytest

from backend.io import read_image
from backend.organs import ORGAN_TOTALSEG_IDS, load_organ_mask
from backend.phantom import DEFAULT_SHAPE, PHANTOM_LABELS, make_phantom, save_phantom


@pytest.fixture(scope="module")
def phantom():
    return make_phantom(0)


def _centroid(labels: np.ndarray, ids) -> np.ndarray:
    """Centroid (z, y, x) index of the voxels carrying any of ``ids``."""
    return np.argwhere(np.isin(labels, ids)).mean(axis=0)


def test_types_and_geometry(phantom):
    ct, labels = phantom
    assert ct.dtype == np.int16 and labels.dtype == np.uint8
    assert ct.shape == DEFAULT_SHAPE and ct.geometry == labels.geometry
    assert ct.geometry.direction == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)  # LPS
    assert set(np.unique(labels.array).tolist()) - {0} <= set(PHANTOM_LABELS)


def test_deterministic_from_seed():
    a = make_phantom(7, shape=(24, 64, 64), spacing=(5.0, 5.0, 6.0))
    b = make_phantom(7, shape=(24, 64, 64), spacing=(5.0, 5.0, 6.0))
    c = make_phantom(8, shape=(24, 64, 64), spacing=(5.0, 5.0, 6.0))
    np.testing.assert_array_equal(a[0].array, b[0].array)
    np.testing.assert_array_equal(a[1].array, b[1].array)
    assert not np.array_equal(a[0].array, c[0].array)
    assert not np.array_equal(a[1].array, c[1].array)


def test_all_project_organs_and_vessels_present(phantom):
    _, labels = phantom
    for organ in ("liver", "pancreas", "kidney_left", "kidney_right", "spleen"):
        assert load_organ_mask(labels, organ).sum() > 1000, organ
    for name in ("aorta", "inferior_vena_cava", "vertebrae_L1", "stomach", "gallbladder"):
        lid = {v: k for k, v in PHANTOM_LABELS.items()}[name]
        assert (labels.array == lid).sum() > 100, name
    ribs = [i for i, n in PHANTOM_LABELS.items() if n.startswith("rib_")]
    assert np.isin(labels.array, ribs).sum() > 500


@pytest.mark.parametrize(
    "ids, lo, hi",
    [
        ((5,), 95, 120),  # liver, portal venous
        ((1,), 100, 125),  # spleen
        ((2, 3), 135, 180),  # kidneys (cortex + medulla)
        ((7,), 80, 115),  # pancreas
        ((52,), 150, 190),  # aorta
        ((63,), 105, 140),  # IVC
        ((31,), 200, 700),  # vertebra L1
    ],
)
def test_hu_medians(phantom, ids, lo, hi):
    ct, labels = phantom
    core = np.isin(labels.array, ids)
    med = float(np.median(ct.array[core]))
    assert lo <= med <= hi, (ids, med)


def test_air_fat_and_noise(phantom):
    ct, labels = phantom
    hu = ct.array.astype(np.float32)
    assert np.median(hu[:, :, :3]) < -950  # air outside the body at the left/right edges
    # subcutaneous fat in front of the abdomen: midline, between skin and muscle
    column = hu[:, :, hu.shape[2] // 2]
    body_rows = np.argwhere(np.median(column, axis=0) > -500).ravel()
    front = column[:, body_rows[0] + 4 : body_rows[0] + 9]
    assert -140 < np.median(front) < -60
    # CT-like noise inside a homogeneous organ (eroded liver, away from vessels)
    from scipy import ndimage

    liver = ndimage.binary_erosion(labels.array == 5, iterations=3)
    resid = hu - ndimage.uniform_filter(hu, size=5)
    assert 6 < resid[liver].std() < 20


def test_anatomical_sides(phantom):
    _, labels = phantom
    lab = labels.array
    liver, spleen = _centroid(lab, ORGAN_TOTALSEG_IDS["liver"]), _centroid(lab, ORGAN_TOTALSEG_IDS["spleen"])
    kid_r, kid_l = _centroid(lab, (2,)), _centroid(lab, (3,))
    spine, aorta, panc = _centroid(lab, (30, 31, 32)), _centroid(lab, (52,)), _centroid(lab, (7,))
    # LPS identity: x index grows toward the patient's left, y toward posterior, z superior
    assert liver[2] < spine[2] < spleen[2]
    assert kid_r[2] < spine[2] < kid_l[2]
    assert kid_r[0] < kid_l[0]  # right kidney lower (the liver sits above it)
    assert aorta[2] > spine[2]  # aorta left of the midline
    assert aorta[1] < spine[1] and panc[1] < spine[1]  # anterior to the spine
    assert kid_l[1] > panc[1]  # kidneys are retroperitoneal, behind the pancreas


def test_save_phantom(tmp_path):
    ct_path, seg_path = save_phantom(tmp_path, seed=1, shape=(24, 64, 64), spacing=(5.0, 5.0, 6.0))
    ct = read_image(ct_path)
    assert ct.dtype == np.int16
    assert load_organ_mask(seg_path, "kidney", reference=ct).sum() > 0
