"""Model-based tumour synthesis (Hu et al., "Label-Free Liver Tumor Segmentation", CVPR 2023).

The DiffTumor paper's baseline (its Tables 2 and 7): a hand-designed tumour needing no weights.
Our own implementation of the idea, on the CT's own grid, in HU:

1. **Shape** — the tumour mask (elastic ellipsoid from :mod:`backend.synthesis.masks`, or the user's).
2. **Texture** — white Gaussian noise smoothed by a Gaussian of σ_tex mm (``texture_sigma_mm``),
   normalised to unit std and scaled to ``texture_std_hu`` HU: a blobby, mottled interior.
3. **Intensity** — hypo-attenuating: the tumour's mean is the organ's median HU (around the tumour)
   minus a difference drawn from ``difference_hu``.
4. **Edge** — the 0/1 mask is blurred by a Gaussian of σ_edge mm (``edge_sigma_mm``) and the CT is
   mixed ``ct + m·(tumour − ct)``: no capsule, a soft transition.

Everything runs on a bounding-box crop around the mask (+ the blur's reach), so a small tumour in a
512² CT takes milliseconds. Voxels outside the blend support (where the blurred mask is 0) are
bit-identical to the input; integer CTs stay integer (rounded, clipped to the dtype's range).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
from scipy import ndimage


@dataclass(frozen=True)
class ModelBasedConfig:
    difference_hu: tuple[float, float] = (25.0, 70.0)  # organ median minus tumour mean (hypo-attenuating)
    texture_sigma_mm: tuple[float, float] = (1.0, 2.5)  # smoothing of the noise = grain of the texture
    texture_std_hu: tuple[float, float] = (6.0, 14.0)  # std of the texture inside the tumour
    edge_sigma_mm: tuple[float, float] = (0.6, 1.5)  # edge blur (no capsule)
    organ_context_mm: float = 15.0  # organ voxels within this distance of the tumour give its median HU

    def __post_init__(self):
        for name in ("difference_hu", "texture_sigma_mm", "texture_std_hu", "edge_sigma_mm"):
            lo, hi = getattr(self, name)
            if not 0 <= lo <= hi:
                raise ValueError(f"ModelBasedConfig.{name} must be a range 0 <= low <= high, got {(lo, hi)}")


def _crop_slices(mask: np.ndarray, margin_vox: Sequence[int]) -> tuple[slice, ...]:
    nz = np.argwhere(mask)
    lo = np.maximum(nz.min(0) - np.asarray(margin_vox), 0)
    hi = np.minimum(nz.max(0) + 1 + np.asarray(margin_vox), mask.shape)
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))


def cast_like(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Round and clip to an integer dtype's range; plain cast for floats."""
    dtype = np.dtype(dtype)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return np.clip(np.rint(values), info.min, info.max).astype(dtype)
    return values.astype(dtype)


def synthesize_model_based(
    ct: np.ndarray,
    spacing_zyx: Sequence[float],
    organ_mask: np.ndarray,
    tumor_mask: np.ndarray,
    *,
    rng: np.random.Generator,
    config: ModelBasedConfig = ModelBasedConfig(),
    difference_hu: float | None = None,
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Insert a model-based tumour; returns (new CT array, blend-support mask, drawn parameters).

    ``ct`` (z, y, x) in HU, any dtype; ``spacing_zyx`` per array axis in mm; masks boolean on the
    same grid. ``difference_hu`` fixes the hypo-attenuation instead of drawing it.
    """
    spacing = np.asarray(spacing_zyx, dtype=np.float64)
    tumor_mask = np.asarray(tumor_mask, dtype=bool)
    edge_mm = float(rng.uniform(*config.edge_sigma_mm))
    tex_mm = float(rng.uniform(*config.texture_sigma_mm))
    tex_std = float(rng.uniform(*config.texture_std_hu))
    diff = float(rng.uniform(*config.difference_hu)) if difference_hu is None else float(difference_hu)

    edge_vox = edge_mm / spacing
    reach = np.array([int(4.0 * s + 0.5) for s in edge_vox])  # gaussian_filter's truncate=4 reach
    context = np.ceil(config.organ_context_mm / spacing).astype(int)
    sl = _crop_slices(tumor_mask, np.maximum(reach + 1, context))
    m = tumor_mask[sl].astype(np.float32)
    crop = ct[sl].astype(np.float64)

    organ_local = np.asarray(organ_mask[sl], dtype=bool) & ~tumor_mask[sl]
    if organ_local.sum() >= 50:
        organ_hu = float(np.median(crop[organ_local]))
    elif organ_mask.any():
        organ_hu = float(np.median(ct[np.asarray(organ_mask, dtype=bool)]))
    else:
        organ_hu = float(np.median(crop[tumor_mask[sl]]))

    noise = rng.standard_normal(crop.shape).astype(np.float32)
    tex = ndimage.gaussian_filter(noise, sigma=tuple(tex_mm / spacing), mode="reflect", truncate=4.0)
    inside = m > 0
    tex = (tex - tex[inside].mean()) / max(float(tex[inside].std()), 1e-6)
    tumour_hu = organ_hu - diff + tex_std * tex.astype(np.float64)

    m_blur = ndimage.gaussian_filter(m, sigma=tuple(edge_vox), mode="constant", cval=0.0, truncate=4.0)
    sup = m_blur > 0
    new = crop + m_blur.astype(np.float64) * (tumour_hu - crop)

    out = ct.copy()
    region = out[sl]
    region[sup] = cast_like(new[sup], ct.dtype)
    support_full = np.zeros(ct.shape, dtype=bool)
    support_full[sl] = sup
    params = {
        "organ_median_hu": organ_hu,
        "difference_hu": diff,
        "texture_sigma_mm": tex_mm,
        "texture_std_hu": tex_std,
        "edge_sigma_mm": edge_mm,
        "config": asdict(config),
    }
    return out, support_full, params
