"""Label-map facts (organs present, MSD-style map) are computed once per array, not on every layer event."""

from __future__ import annotations

import numpy as np


def test_organ_detection_runs_once_per_label_array(monkeypatch):
    from napari.components import ViewerModel

    from difftumor_napari import layers
    from difftumor_napari import placement as pl

    calls = []
    real = pl.organs_in_labels
    monkeypatch.setattr(pl, "organs_in_labels", lambda data: calls.append(1) or real(data))
    viewer = ViewerModel()
    seg = np.zeros((8, 10, 12), np.uint8)
    seg[2:5, 2:6, 2:6] = 5  # TotalSegmentator liver
    organs = viewer.add_labels(seg, name="organs")
    viewer.add_image(np.zeros((8, 10, 12), np.int16), name="ct")
    for _ in range(5):  # what three widgets' choice boxes do on each layer added or removed
        assert layers.organ_label_layers(viewer)[0] is organs
    assert len(calls) == 1
    assert layers.label_facts(organs).organs == ("liver",)
    organs.data[0, 0, 0] = 1  # spleen, painted in place: the paint event says so
    organs.events.paint(value=[])
    assert set(layers.label_facts(organs).organs) == {"liver", "spleen"}
    assert len(calls) == 2
    msd = np.zeros((8, 10, 12), np.uint8)
    msd[2:5, 2:6, 2:6] = 1
    msd[3, 3, 3] = 2
    organs.data = msd  # a new array
    facts = layers.label_facts(organs)
    assert facts.single_organ and facts.has_tumour and len(calls) == 3
