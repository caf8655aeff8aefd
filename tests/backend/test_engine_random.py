"""Public random placement on the CT grid (backend.synthesis.engine.random_tumor_mask / random_tumor_masks)."""

import numpy as np
import pytest

from backend.errors import DiffTumorError
from backend.io import read_image
from backend.organs import load_organ_mask
from backend.synthesis import masks
from backend.synthesis.engine import SynthesisEngine, random_tumor_mask, random_tumor_masks


@pytest.fixture(scope="module")
def real(totalseg_ct, totalseg_seg):
    ct = read_image(totalseg_ct)
    return ct, load_organ_mask(totalseg_seg, "liver", reference=ct)


def test_random_mask_on_ct_grid_seeded_inside_organ(real):
    ct, organ = real
    mask, params = random_tumor_mask(ct, organ, organ="liver", size="medium", count=2, seed=7)
    assert mask.shape == ct.array.shape and mask.dtype == bool and mask.any() and not (mask & ~organ).any()
    assert len(params) == 2 and all(p.size == "medium" and p.centre_world_mm is not None for p in params)
    lo, hi = masks.SIZE_CLASSES["medium"].semi_axes
    assert all(lo <= a <= hi for p in params for a in p.semi_axes)
    again, _ = random_tumor_mask(ct.geometry, organ, organ="liver", size="medium", count=2, seed=7)
    np.testing.assert_array_equal(mask, again)  # a Geometry works as well as the Volume
    other, _ = random_tumor_mask(ct, organ, organ="liver", size="medium", count=2, seed=8)
    assert not np.array_equal(mask, other)


def test_engine_generated_mask_is_the_public_one(real, tmp_path):
    ct, organ = real
    r = SynthesisEngine(tmp_path, device="cpu").synthesize(ct, organ, organ="liver", size="small", count=1, seed=3)
    mask, params = random_tumor_mask(ct, organ, organ="liver", size="small", count=1, seed=np.random.default_rng(3))
    np.testing.assert_array_equal(r.tumor_mask, mask)
    assert r.provenance["mask"]["tumours"] == [p.to_dict() for p in params]


def test_separate_masks_and_bad_input(real):
    ct, organ = real
    shapes, params = random_tumor_masks(ct, organ, organ="liver", size="small", count=3, seed=1)
    assert len(shapes) == len(params) == 3 and all(s.any() and not (s & ~organ).any() for s in shapes)
    with pytest.raises(DiffTumorError, match="at least 1"):
        random_tumor_mask(ct, organ, organ="liver", size="small", count=0, seed=0)
    with pytest.raises(DiffTumorError, match="size class 'huge'"):
        random_tumor_mask(ct, organ, organ="liver", size="huge", seed=0)
    with pytest.raises(DiffTumorError, match="absent"):
        random_tumor_mask(ct, np.zeros_like(organ), organ="liver", seed=0)
    with pytest.raises(DiffTumorError, match="differs from the CT"):
        random_tumor_mask(ct, organ[1:], organ="liver", seed=0)


def test_second_call_on_the_same_ct_uses_the_cache_and_changes_nothing(real, tmp_path):
    ct, organ = real
    kw = dict(organ="liver", size="small", count=1, method="model-based")
    e = SynthesisEngine(tmp_path, device="cpu")
    first = e.synthesize(ct, organ, seed=2, **kw)
    assert e.cache_hits == 0
    second = e.synthesize(ct, organ, seed=9, **kw)
    assert e.cache_hits == 1
    fresh = SynthesisEngine(tmp_path, device="cpu").synthesize(ct, organ, seed=9, **kw)
    np.testing.assert_array_equal(second.ct.array, fresh.ct.array)
    np.testing.assert_array_equal(second.tumor_mask, fresh.tumor_mask)
    assert not np.array_equal(first.tumor_mask, second.tumor_mask)
    # another organ mask or another CT object is a miss (the organ mask is hashed in full)
    smaller = organ.copy()
    smaller[np.argwhere(organ)[0][0]] = False
    e.synthesize(ct, smaller, seed=9, **kw)
    e.synthesize(second.ct, organ, seed=9, **kw)
    assert e.cache_hits == 1
    # bad input on a cached CT is still refused
    with pytest.raises(DiffTumorError, match="absent"):
        e.synthesize(ct, np.zeros_like(organ), seed=9, **kw)


def test_generated_tumour_centres_are_reported_on_the_ct_grid(totalseg_ct, totalseg_seg):
    """Provenance names the generator's 1 mm model voxel as such and gives the CT-grid index beside it."""
    from backend.io import read_image
    from backend.organs import load_organ_mask
    from backend.synthesis.engine import SynthesisEngine

    ct = read_image(totalseg_ct)
    organ = load_organ_mask(totalseg_seg, "liver", reference=ct)
    r = SynthesisEngine(None, device="cpu").synthesize(ct, organ, organ="liver", size="small", count=2, seed=3,
                                                       method="model-based")
    for t in r.provenance["mask"]["tumours"]:
        assert "centre" not in t and len(t["centre_model_voxel_xyz"]) == 3
        x, y, z = t["centre_voxel_xyz"]
        assert 0 <= x < ct.geometry.size[0] and 0 <= y < ct.geometry.size[1] and 0 <= z < ct.geometry.size[2]
        assert r.tumor_mask[max(z - 1, 0):z + 2, max(y - 1, 0):y + 2, max(x - 1, 0):x + 2].any()
