"""Model-based synthesis (Hu et al. 2023): hypo-attenuation, support, dtype, determinism, speed."""

import time

import numpy as np
import pytest

from backend.synthesis.masks import ellipsoid_box
from backend.synthesis.model_based import ModelBasedConfig, synthesize_model_based


def _scene(dtype=np.int16):
    rng = np.random.default_rng(3)
    ct = rng.normal(-900, 20, (60, 512, 512))
    organ = np.zeros(ct.shape, bool)
    organ[10:50, 150:350, 150:350] = True
    ct[organ] = rng.normal(60, 10, organ.sum())
    tumor = np.zeros(ct.shape, bool)
    tumor[25:35, 240:260, 240:260] = ellipsoid_box((5, 5, 5))[:10, :20, :20]
    return ct.astype(dtype), organ, tumor


@pytest.mark.parametrize("dtype", [np.int16, np.float32])
def test_model_based_hypo_support_dtype(dtype):
    ct, organ, tumor = _scene(dtype)
    out, sup, params = synthesize_model_based(ct, (2.0, 0.8, 0.8), organ, tumor, rng=np.random.default_rng(1))
    assert out.dtype == ct.dtype and out.shape == ct.shape
    assert np.array_equal(out[~sup], ct[~sup])
    assert sup[tumor].all()
    drop = float(ct[tumor].astype(float).mean() - out[tumor].astype(float).mean())
    assert 0.5 * params["difference_hu"] < drop < 1.5 * params["difference_hu"] + 5
    assert ModelBasedConfig().difference_hu[0] <= params["difference_hu"] <= ModelBasedConfig().difference_hu[1]


def test_model_based_same_seed_same_output_and_fast():
    ct, organ, tumor = _scene()
    a = synthesize_model_based(ct, (2.0, 0.8, 0.8), organ, tumor, rng=np.random.default_rng(7))[0]
    t = time.perf_counter()
    b = synthesize_model_based(ct, (2.0, 0.8, 0.8), organ, tumor, rng=np.random.default_rng(7))[0]
    elapsed = time.perf_counter() - t
    c = synthesize_model_based(ct, (2.0, 0.8, 0.8), organ, tumor, rng=np.random.default_rng(8))[0]
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert elapsed < 1.0  # typically ~0.05 s (full-array copy included); generous for a loaded CI box


def test_model_based_int_clipped_to_dtype_range():
    ct, organ, tumor = _scene(np.int16)
    ct[:] = np.iinfo(np.int16).min
    out, _, _ = synthesize_model_based(ct, (1, 1, 1), organ, tumor, rng=np.random.default_rng(0), difference_hu=60)
    assert out.min() == np.iinfo(np.int16).min


def test_config_checked():
    with pytest.raises(ValueError, match="difference_hu"):
        ModelBasedConfig(difference_hu=(50, 10))
