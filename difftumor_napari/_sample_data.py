"""npe2 sample data: the procedural abdominal CT phantom (CT + organ labels).

``backend.phantom`` is imported inside the function, so starting napari stays fast.
"""

from __future__ import annotations

PHANTOM_SEED = 0


def make_phantom_sample(seed: int = PHANTOM_SEED) -> list[tuple]:
    """The abdominal CT phantom as two layers: CT (abdomen window) and its organ labels."""
    from backend.phantom import make_phantom
    from difftumor_napari._reader import volume_to_layer_data

    ct, labels = make_phantom(seed)[:2]  # (ct int16, labels uint8[, ...]) on one LPS grid
    organs = volume_to_layer_data(labels, kind="labels", name="phantom organs")
    organs[1]["opacity"] = 0.35  # keep the anatomy readable under the organ colours
    return [volume_to_layer_data(ct, kind="ct", name="phantom CT"), organs]
