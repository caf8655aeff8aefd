"""Blend: parity with the release's liver blend, support and bit-identity outside it."""

import numpy as np
import pytest

from backend.synthesis import blend


def _crop(t):
    return t[0, 0].numpy()


def test_blend_parity_with_release(parity_outputs):
    x = _crop(parity_outputs["x"])  # (X, Y, Z) in [-1, 1]
    mask = _crop(parity_outputs["tumor_mask"]).astype(np.float32)
    dec_perm = _crop(parity_outputs["early_decoded"])  # (Z, X, Y)
    dec = np.transpose(dec_perm, (1, 2, 0))
    m_blur = blend.blur_mask(mask, 2.0)
    ref_blur = np.transpose(_crop(parity_outputs["mask_blur_perm"]), (1, 2, 0))
    assert np.abs(m_blur - ref_blur).max() <= 1e-6
    out = blend.blend01((x + 1.0) / 2.0, m_blur, dec)
    assert np.abs(out - _crop(parity_outputs["blend_early"])).max() <= 1e-6


def test_blend_hu_equals_release_inside_window_and_keeps_outside():
    rng = np.random.default_rng(0)
    orig = rng.uniform(-175, 250, (20, 20, 20))
    dec = rng.uniform(-1.2, 1.2, orig.shape)
    m = blend.blur_mask(np.pad(np.ones((4, 4, 4)), 8), 1.5)
    ref = blend.from_01(blend.blend01(blend.hu_to_01(orig), m, dec))
    assert np.abs(blend.blend_hu(orig, m, dec) - ref).max() < 1e-3  # float32 rounding of blend01
    bone = np.full(orig.shape, 900.0)
    out = blend.blend_hu(bone, m, dec)
    assert np.array_equal(out[~blend.support(m)], bone[~blend.support(m)])
    assert out.max() > 250.0  # detail outside the window kept, not clipped to 250


@pytest.mark.parametrize("sigma", [0.0, 0.7, 2.0, 3.9])
def test_support_is_truncated_gaussian_reach(sigma):
    mask = np.zeros((40, 40, 40), np.float32)
    mask[18:21, 19:22, 20:23] = 1
    sup = blend.support(blend.blur_mask(mask, sigma))
    r = blend.blur_radius(sigma)
    lo = np.argwhere(sup).min(0)
    hi = np.argwhere(sup).max(0)
    assert tuple(lo) == (18 - r, 19 - r, 20 - r)
    assert tuple(hi) == (20 + r, 21 + r, 22 + r)


def test_uses_blend():
    assert blend.uses_blend("liver") and blend.uses_blend("kidney")
    assert not blend.uses_blend("pancreas") and blend.uses_blend("pancreas", True)
