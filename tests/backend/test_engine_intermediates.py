"""Engine intermediates (keep_intermediates=True): masked input, autoencoder reconstruction, raw decoded sample.

Parity weights (random, official format) on the shared real CT (3 mm, non-identity direction).
"""

import numpy as np
import pytest
import torch

from backend.io import read_image
from backend.organs import load_organ_mask
from backend.preprocess import hu_to_unit
from backend.synthesis import blend, crops
from backend.synthesis.diffusion_crop import reconstruct_crop
from backend.synthesis.engine import INTERMEDIATES, SynthesisEngine


@pytest.fixture(scope="module")
def run(parity_dir, totalseg_ct, totalseg_seg):
    torch.set_num_threads(2)
    ct = read_image(totalseg_ct)
    organ = load_organ_mask(totalseg_seg, "liver", reference=ct)
    engine = SynthesisEngine(parity_dir, device="cpu", threads=2)
    kw = dict(organ="liver", size="small", count=1, seed=4, sigma=0.0, method="diffusion")
    plain = engine.synthesize(ct, organ, **kw)
    kept = engine.synthesize(ct, organ, keep_intermediates=True, **kw)
    return engine, ct, organ, plain, kept


@pytest.mark.slow
def test_intermediates_are_off_by_default_and_change_nothing(run):
    _, ct, _, plain, kept = run
    assert plain.intermediates == {}
    np.testing.assert_array_equal(kept.ct.array, plain.ct.array)
    np.testing.assert_array_equal(kept.tumor_mask, plain.tumor_mask)
    assert set(kept.intermediates) == set(INTERMEDIATES) == {"masked", "reconstruction", "decoded"}
    for v in kept.intermediates.values():
        assert v.shape == ct.array.shape and v.dtype == np.float32 and np.isfinite(v).all()


@pytest.mark.slow
def test_intermediates_sit_on_the_ct_grid_in_hu(run):
    engine, ct, _, _, kept = run
    inter, tumor = kept.intermediates, kept.tumor_mask
    info = kept.provenance["tumours"][0]
    crop = crops.Crop(crops.model_grid(ct.geometry), tuple(info["crop_start_model_xyz"]))
    fp = crops.footprint(crop, ct.geometry)
    outside = np.ones(ct.array.shape, bool)
    outside[fp] = False
    assert outside.any()
    for v in inter.values():  # outside the crop: the CT's own value
        np.testing.assert_array_equal(v[outside], ct.array[outside].astype(np.float32))
    # masked: the windowed CT, tumour at 37.5 HU (0 in [-1, 1])
    from scipy import ndimage

    core = ndimage.binary_erosion(tumor, np.ones((3, 3, 3), bool)) if ndimage.binary_erosion(tumor).any() else tumor
    np.testing.assert_allclose(inter["masked"][core], 37.5, atol=0.05)
    ring = ndimage.binary_dilation(tumor, iterations=3) & ~ndimage.binary_dilation(tumor, iterations=1)
    assert inter["masked"][ring].min() >= blend.HU_LOW - 0.01 and inter["masked"][ring].max() <= blend.HU_HIGH + 0.01
    # sigma 0: inside the tumour the result is the decoded sample clipped to the window (up to resampling)
    dec = np.clip(inter["decoded"][core], blend.HU_LOW, blend.HU_HIGH)
    assert np.abs(kept.ct.array[core] - dec).mean() < 5.0
    # reconstruction: the autoencoder's round trip of the UNMASKED crop, mapped back like the others
    x = hu_to_unit(crops.crop_from(ct.array, ct.geometry, crop, nearest=False, pad=blend.HU_LOW - 1000.0), "[-1,1]")
    rec = reconstruct_crop(x, engine._autoencoder(), device=torch.device("cpu"))
    rec_hu = blend.from_01((rec.astype(np.float64) + 1) / 2).astype(np.float32)
    cover = crops.back_to_file(crop.inside().astype(np.float32), crop, ct.geometry, fp)
    back = crops.back_to_file(rec_hu, crop, ct.geometry, fp)
    ok = cover > 0.5
    np.testing.assert_allclose(inter["reconstruction"][fp][ok], back[ok] / cover[ok], rtol=0, atol=1e-2)
    assert not np.allclose(inter["reconstruction"][core], inter["decoded"][core])


def test_model_based_has_no_intermediates(totalseg_ct, totalseg_seg, tmp_path):
    ct = read_image(totalseg_ct)
    organ = load_organ_mask(totalseg_seg, "liver", reference=ct)
    r = SynthesisEngine(tmp_path, device="cpu").synthesize(ct, organ, organ="liver", size="small", count=1, seed=1,
                                                          keep_intermediates=True)
    assert r.provenance["method"] == "model-based" and r.intermediates == {}
