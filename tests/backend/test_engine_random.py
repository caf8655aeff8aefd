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


def test_engine_generated_mask_model_based_is_realistic_and_diffusion_keeps_the_release_generator(real, tmp_path):
    """Model-based: the realistic shapes of backend.synthesis.shapes; diffusion: the release's generator on the
    same seeded stream."""
    from backend.synthesis.ct_cache import CTEntry
    from backend.synthesis.request import Generated, SynthesisRequest
    from backend.synthesis.shapes import random_tumors

    ct, organ = real
    e = SynthesisEngine(tmp_path, device="cpu")
    r = e.synthesize(ct, organ, organ="liver", size="small", count=1, seed=3)
    assert r.provenance["method"] == "model-based"  # no weights in tmp_path
    mask, infos = random_tumors(ct.array, organ, ct.geometry.spacing[::-1], np.random.default_rng(3), size="small",
                                count=1, organ_name="liver")
    np.testing.assert_array_equal(r.tumor_mask, mask)
    got = r.provenance["mask"]["tumours"]
    assert [t["semi_axes_mm"] for t in got] == [t["semi_axes_mm"] for t in infos]
    assert got[0]["centre_voxel_xyz"] == infos[0]["centre_voxel"][::-1] and "realistic" in r.provenance["mask"]["source"]
    request = SynthesisRequest(organ="liver", tumor=Generated("small", 1), seed=3)
    release, info, stage = e._tumour_mask(request, ct, organ, None, np.random.default_rng(3), CTEntry(False),
                                          "diffusion")
    mask, params = random_tumor_mask(ct, organ, organ="liver", size="small", count=1, seed=np.random.default_rng(3))
    np.testing.assert_array_equal(release, mask)
    assert info["tumours"] == [p.to_dict() for p in params] and stage == "early"


def test_generated_model_based_tumours_avoid_real_tumours_and_each_other(real, tmp_path):
    ct, organ = real
    existing = np.zeros_like(organ)
    z, y, x = np.argwhere(organ)[len(np.argwhere(organ)) // 2]
    existing[z - 2:z + 3, y - 4:y + 5, x - 4:x + 5] = True
    existing &= organ
    r = SynthesisEngine(tmp_path, device="cpu").synthesize(ct, organ, organ="liver", size="small", count=3, seed=1,
                                                           existing_tumor=existing)
    assert r.provenance["mask"]["count_placed"] == 3
    assert not (r.tumor_mask & existing).any()
    from scipy import ndimage

    assert ndimage.label(r.tumor_mask)[1] == 3  # three separate tumours
    assert (r.label[existing] == 2).all()


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
    """Provenance gives each centre's CT-grid index (x, y, z) and world position; the release generator's 1 mm
    model voxel (diffusion) is named as such."""
    from backend.io import read_image
    from backend.organs import load_organ_mask
    from backend.synthesis.ct_cache import CTEntry
    from backend.synthesis.engine import SynthesisEngine
    from backend.synthesis.request import Generated, SynthesisRequest

    ct = read_image(totalseg_ct)
    organ = load_organ_mask(totalseg_seg, "liver", reference=ct)
    e = SynthesisEngine(None, device="cpu")
    r = e.synthesize(ct, organ, organ="liver", size="small", count=2, seed=3, method="model-based")
    request = SynthesisRequest(organ="liver", tumor=Generated("small", 2), seed=3)
    _, released, _ = e._tumour_mask(request, ct, organ, None, np.random.default_rng(3), CTEntry(False), "diffusion")
    for t in released["tumours"]:
        assert "centre" not in t and len(t["centre_model_voxel_xyz"]) == 3
    for t in r.provenance["mask"]["tumours"]:
        x, y, z = t["centre_voxel_xyz"]
        assert 0 <= x < ct.geometry.size[0] and 0 <= y < ct.geometry.size[1] and 0 <= z < ct.geometry.size[2]
        assert r.tumor_mask[max(z - 1, 0):z + 2, max(y - 1, 0):y + 2, max(x - 1, 0):x + 2].any()
        np.testing.assert_allclose(ct.geometry.world_to_voxel(t["centre_world_mm"]), [x, y, z], atol=0.01)
