"""The default model-based tumour passes Inspection's checks on a real non-contrast CT and an enhanced phantom.

Inspection's metrics and flags come from its Qt-free module (``difftumor_napari.inspection``), imported
as is: the same numbers a reviewer sees in the Inspection widget.
"""

import numpy as np
import pytest

from backend.synthesis.model_based import model_based_tumor
from backend.synthesis.shapes import random_tumor


@pytest.fixture(scope="module")
def cases(totalseg_ct, totalseg_seg):
    from backend.io import read_image
    from backend.phantom import make_phantom

    ct = read_image(totalseg_ct)
    seg = read_image(totalseg_seg)
    pct, plab = make_phantom(0)
    return {
        "shared": (ct.array, seg.array == 5, tuple(ct.geometry.spacing[::-1])),
        "phantom": (pct.array, plab.array == 5, tuple(pct.geometry.spacing[::-1])),
    }


def _run(case, size, seed, **kwargs):
    from difftumor_napari import inspection as ins

    ct, liver, spacing = case
    rng = np.random.default_rng(seed)
    tumor, _ = random_tumor(ct, liver, spacing, rng, size=size, organ_name="liver")
    res = model_based_tumor(ct, spacing, liver, tumor, rng=rng, organ="liver", **kwargs)
    m = ins.tumor_metrics(res.ct, tumor, res.organ, spacing, original_ct=ct)
    return res, m, ins.failure_flags(m)


# measured contrast (tumour mean - organ mean) allowed per CT: the phase's range, 10 HU wider each side
# (the organ mean Inspection uses is the whole organ's, the drawn contrast is against the local median)
CONTRAST = {"shared": ("non-contrast", -50, -5), "phantom": ("enhanced", -70, -25)}


@pytest.mark.parametrize("name", ["shared", "phantom"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_default_medium_tumour_is_not_flagged_and_keeps_the_grain(cases, name, seed):
    res, m, flags = _run(cases[name], "medium", seed)
    assert flags == {}, flags
    assert 0.8 <= m["noise_ratio"] <= 1.25
    phase, lo, hi = CONTRAST[name]
    assert res.params["phase"] == phase
    assert lo <= m["contrast_hu"] <= hi
    assert m["equivalent_diameter_mm"] >= 20 and res.params["mass_effect"]["applied"]
    assert m["solidity"] < 1.0 or m["sphericity"] < 0.9  # not a perfect ball


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_default_small_tumour_on_the_enhanced_phantom_is_not_flagged(cases, seed):
    res, m, flags = _run(cases["phantom"], "small", seed)
    assert flags == {}, flags
    assert not res.params["mass_effect"]["applied"]


def test_without_mass_effect_inspection_does_flag_a_large_tumour(cases):
    """The flag the default clears is a real check: the same tumour without displacement is flagged."""
    _, m, flags = _run(cases["phantom"], "medium", 0, mass_effect="off")
    assert "no_mass_effect" in flags
