"""Post-processing blend of a decoded crop into the original crop (official_pipeline.md §3.6).

* liver / kidney (and spleen here): the 0/1 tumour mask is Gaussian-blurred (σ ~ U(0, 4) voxels as
  released, or fixed by the user; scipy ``gaussian_filter``, mode reflect, truncate 4, applied in the
  official permuted layout (Z, X, Y)); the result is
  ``clamp((1 − m)·clamp(orig01) + m·clamp((decoded + 1)/2), 0, 1)``.
* pancreas as released: no blend, the whole crop becomes ``(decoded + 1)/2`` (not clamped);
  ``pancreas_blend=True`` blends it like the others.

The **blend support** is where the blurred mask is > 0 (the reach of the truncated Gaussian).
Everything outside it must stay bit-identical to the input CT, so the engine writes back only the
support region, in HU, with :func:`blend_hu` (identical to the release for voxels inside the HU
window; for voxels outside the window — bone, air — it adds the same change instead of clipping
the voxel to the window).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

HU_LOW, HU_HIGH = -175.0, 250.0  # the release's HU window
BLEND_ORGANS = ("liver", "kidney", "kidney_left", "kidney_right", "spleen")
MAX_SIGMA = 4.0  # the release draws sigma ~ U(0, 4)


def draw_sigma(rng: np.random.Generator) -> float:
    """The release's random blur: σ ~ Uniform(0, 4) voxels."""
    return float(rng.uniform(0.0, MAX_SIGMA))


def blur_radius(sigma: float) -> int:
    """Half-width (voxels) of scipy's truncated Gaussian (truncate 4): int(4σ + 0.5)."""
    return int(4.0 * float(sigma) + 0.5) if sigma > 0 else 0


def blur_mask(mask_xyz: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian-blurred 0/1 mask (float32, crop layout (X, Y, Z)), filtered in the permuted layout.

    Matches the release bit-for-bit up to float rounding: float32 array permuted to (Z, X, Y),
    ``gaussian_filter(sigma, mode="reflect", truncate=4.0)``, permuted back.
    """
    m = np.ascontiguousarray(np.transpose(np.asarray(mask_xyz, dtype=np.float32), (2, 0, 1)))  # (Z, X, Y)
    if sigma > 0:
        m = ndimage.gaussian_filter(m, sigma=float(sigma), mode="reflect", truncate=4.0)
    return np.transpose(m, (1, 2, 0))  # (X, Y, Z)


def blend01(orig01: np.ndarray, m_blur: np.ndarray, decoded: np.ndarray) -> np.ndarray:
    """The release's liver/kidney formula on [0, 1] crops; ``decoded`` is the VQGAN output in [-1, 1]-ish."""
    o = np.clip(orig01, 0.0, 1.0)
    d = np.clip((decoded + 1.0) / 2.0, 0.0, 1.0)
    return np.clip((1.0 - m_blur) * o + m_blur * d, 0.0, 1.0).astype(np.float32)


def support(m_blur: np.ndarray) -> np.ndarray:
    """Voxels the blend may change."""
    return m_blur > 0


def hu_to_01(hu: np.ndarray) -> np.ndarray:
    return (np.clip(hu, HU_LOW, HU_HIGH) - HU_LOW) / (HU_HIGH - HU_LOW)


def from_01(v01: np.ndarray) -> np.ndarray:
    return np.asarray(v01, dtype=np.float64) * (HU_HIGH - HU_LOW) + HU_LOW


def blend_hu(orig_hu: np.ndarray, m_blur: np.ndarray, decoded: np.ndarray) -> np.ndarray:
    """Blend in HU (float64): ``orig + m·(dec_HU − clip(orig))``.

    For ``orig`` inside the HU window this equals ``from_01(blend01(...))`` exactly in real
    arithmetic; outside the window the original detail is kept and only the tumour change added.
    """
    orig = np.asarray(orig_hu, dtype=np.float64)
    dec_hu = from_01(np.clip((np.asarray(decoded, dtype=np.float64) + 1.0) / 2.0, 0.0, 1.0))
    return orig + np.asarray(m_blur, dtype=np.float64) * (dec_hu - np.clip(orig, HU_LOW, HU_HIGH))


def pancreas_as_released_hu(decoded: np.ndarray) -> np.ndarray:
    """The release's pancreas output in HU: the whole crop becomes (decoded + 1)/2 (not clamped)."""
    return from_01((np.asarray(decoded, dtype=np.float64) + 1.0) / 2.0)


def uses_blend(organ: str, pancreas_blend: bool = False) -> bool:
    return organ in BLEND_ORGANS or (organ == "pancreas" and pancreas_blend)
