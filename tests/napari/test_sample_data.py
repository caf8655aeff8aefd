"""The phantom sample: two layers, abdomen window, organ names, radiological display."""

from __future__ import annotations

import numpy as np


def _centroid(labels: np.ndarray, label_id: int) -> np.ndarray:
    return np.argwhere(labels == label_id).mean(axis=0)  # (z, y, x) display indices


def test_open_sample_in_napari(make_napari_viewer):
    viewer = make_napari_viewer()
    viewer.open_sample("difftumor", "abdominal_ct_phantom")
    assert [ly.name for ly in viewer.layers] == ["phantom CT", "phantom organs"]
    ct, organs = viewer.layers
    assert type(ct).__name__ == "Image" and type(organs).__name__ == "Labels"
    assert ct.data.dtype == np.int16 and tuple(ct.contrast_limits) == (-150, 250)
    assert ct.colormap.name == "gray"
    assert ct.data.shape == organs.data.shape
    np.testing.assert_array_equal(ct.scale, organs.scale)
    np.testing.assert_array_equal(ct.translate, organs.translate)
    names = dict(zip(organs.features["index"], organs.features["organ"]))
    for label_id, name in {1: "spleen", 2: "kidney_right", 3: "kidney_left", 5: "liver", 7: "pancreas"}.items():
        assert names[label_id] == name
    meta = ct.metadata["difftumor"]
    assert meta["kind"] == "ct" and meta["source"] is None and len(meta["geometry"]["size"]) == 3


def test_phantom_displays_radiologically():
    """Axial display: liver on the screen's left, spleen on its right, spine below (posterior) the aorta."""
    from difftumor_napari._sample_data import make_phantom_sample

    (ct, ct_kw, _), (labels, lab_kw, _) = make_phantom_sample()
    liver, spleen = _centroid(labels, 5), _centroid(labels, 1)
    kidney_r, kidney_l = _centroid(labels, 2), _centroid(labels, 3)
    aorta, cord = _centroid(labels, 52), _centroid(labels, 79)
    assert liver[2] < labels.shape[2] / 2 < spleen[2]  # columns: patient's right on the screen's left
    assert kidney_r[2] < kidney_l[2]
    assert aorta[1] < cord[1]  # rows: anterior at the top, posterior below
    # CT-like values inside the liver (portal-venous ~ 100 HU) and air outside the body
    assert 40 < np.median(ct[labels == 5]) < 160
    assert ct[:, 0, 0].max() < -900
