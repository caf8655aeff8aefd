"""Model-based tumour synthesis after Hu et al., "Label-Free Liver Tumor Segmentation" (CVPR 2023).

The DiffTumor paper's baseline (its Tables 2 and 7): a hand-designed tumour that needs no weights.
Our own implementation on the CT's own grid, in HU. As Hu et al. do, the tumour **modulates** the
CT — a contrast and a scaled, filtered texture are subtracted from the voxels that are there — so
the scanner's own noise survives inside the tumour (the high-pass noise ratio inside / around stays
near 1 on any CT). Steps:

1. **Mass effect** (tumours of 20 mm and more, ``mass_effect="auto"``): the tissue around the tumour
   is pushed outward first (:mod:`backend.synthesis.mass_effect`); the organ mask moves with it.
2. **Phase** — told from the organ's own median HU (:func:`contrast_phase`): below the organ's
   threshold in :data:`CONTRAST_TABLE` the CT is *non-contrast*, above it *enhanced*.
3. **Contrast** — tumour mean minus the organ's median around the tumour, drawn from the organ's
   range for that phase (:data:`CONTRAST_TABLE`); always hypo-attenuating.
4. **Texture** — Hu et al.'s scaled-up Gaussian noise: white noise on a coarse grid of step
   ``texture_grain_mm``, cubic-interpolated to the CT's grid, smoothed, scaled to ``texture_std_hu``
   (per phase, :data:`TEXTURE_STD_HU`): the tumour's own heterogeneity, on top of the CT's noise.
5. **Structure** — inside the tumour, where the organ-smoothed CT leaves the organ's median by more
   than max(3 std, 20 HU) (a vessel a user-drawn mask crosses), the CT is replaced by the median plus
   the CT's own high-pass noise borrowed from a few voxels away: a tumour replaces the parenchyma, it
   does not let vessels show through, and the grain stays the scanner's.
6. **Edge** — the mask is blurred by the CT's own resolution: per axis ``psf`` voxels (so a 3 mm CT
   gets a 3 mm-scale edge and a 0.7 mm CT a sharp one) in quadrature with the tumour's intrinsic
   transition ``edge_sigma_mm``. The change is confined to the organ and the tumour (no dark halo
   in the fat around a subcapsular tumour) and never touches ``avoid`` (labelled real tumours).
7. **Rim** (off by default, ``rim=True``): a peripheral ring of enhancement ``rim_hu`` just inside
   the edge (the rim enhancement of metastases, or an HCC's capsule).

Contrast ranges (HU, tumour − organ) and where they come from:

============  ===============  ==============  =====================================================
organ         non-contrast     enhanced        phase threshold (organ median) and source
============  ===============  ==============  =====================================================
liver         −40 … −15        −60 … −35       80 HU. Measured (issue 17): four metastases on a real
                                               portal-venous CT, 67–74 HU inside against liver 118,
                                               contrast −44 to −51; a non-contrast CT, tumour
                                               12.6 ± 13.9 against liver 45 ± 15 (−32). Unenhanced
                                               liver is about 55–65 HU, portal-venous 100–130 HU;
                                               most metastases are hypoattenuating in both.
pancreas      −20 … −8         −55 … −25       70 HU. Ductal adenocarcinoma is often nearly
                                               isoattenuating unenhanced and hypoattenuating against
                                               enhancing parenchyma (about 100–130 HU).
kidney        −20 … −8         −90 … −40       70 HU. Unenhanced parenchyma about 30–40 HU; in the
                                               nephrographic/portal phase 150–200 HU, tumours enhance
                                               less.
spleen        −25 … −10        −60 … −30       80 HU. Unenhanced about 45–55 HU, portal-venous
                                               110–130 HU; lesions hypoattenuating.
============  ===============  ==============  =====================================================

The extra texture std (on top of the CT's own noise) is 2–6 HU non-contrast and 4–12 HU enhanced:
the real metastases above have 19–25 HU std in a liver of 22 HU noise (≤ 12 HU of their own), the
non-contrast tumour 13.9 in a liver of 15. An unknown organ (``organ=None``) uses the liver's row.

Everything is drawn from ``rng`` (seeded) and recorded in the returned parameters. Work is done on a
bounding box around the tumour; voxels outside the support (blend + displacement) are bit-identical
to the input; integer CTs stay integer (rounded, clipped to the dtype's range).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
from scipy import ndimage

from backend.synthesis.mass_effect import (
    MassEffectConfig,
    apply_mass_effect,
    equivalent_diameter_mm,
    mass_effect_applies,
)

PHASES = ("non-contrast", "enhanced")


@dataclass(frozen=True)
class ContrastRange:
    """Tumour − organ contrast (HU) per phase, and the organ median (HU) that separates the phases."""

    non_contrast: tuple[float, float]
    enhanced: tuple[float, float]
    phase_threshold_hu: float

    def for_phase(self, phase: str) -> tuple[float, float]:
        return self.enhanced if phase == "enhanced" else self.non_contrast


CONTRAST_TABLE: dict[str, ContrastRange] = {
    "liver": ContrastRange((-40.0, -15.0), (-60.0, -35.0), 80.0),
    "pancreas": ContrastRange((-20.0, -8.0), (-55.0, -25.0), 70.0),
    "kidney": ContrastRange((-20.0, -8.0), (-90.0, -40.0), 70.0),
    "spleen": ContrastRange((-25.0, -10.0), (-60.0, -30.0), 80.0),
}
TEXTURE_STD_HU = {"non-contrast": (2.0, 6.0), "enhanced": (4.0, 12.0)}


def organ_table(organ: str | None) -> tuple[str, ContrastRange]:
    """The :data:`CONTRAST_TABLE` row for ``organ`` (sides of the kidney share one; None -> liver)."""
    key = "liver" if organ is None else ("kidney" if organ.startswith("kidney") else organ)
    if key not in CONTRAST_TABLE:
        raise ValueError(f"organ {organ!r} has no contrast range; known: {', '.join(sorted(CONTRAST_TABLE))}")
    return key, CONTRAST_TABLE[key]


def contrast_phase(ct: np.ndarray, organ: np.ndarray, organ_name: str | None = None,
                   phase: str = "auto") -> tuple[str, float, float]:
    """(phase, organ median HU, threshold HU): "enhanced" when the organ's median exceeds its threshold.

    ``phase`` "non-contrast" or "enhanced" overrides the decision (the median is still reported).
    """
    if phase not in ("auto", *PHASES):
        raise ValueError(f"phase must be one of auto, {', '.join(PHASES)}, got {phase!r}")
    _, row = organ_table(organ_name)
    organ = np.asarray(organ, bool)
    median = float(np.median(np.asarray(ct)[organ])) if organ.any() else float("nan")
    if phase == "auto":
        phase = "enhanced" if np.isfinite(median) and median > row.phase_threshold_hu else "non-contrast"
    return phase, median, row.phase_threshold_hu


@dataclass(frozen=True)
class ModelBasedConfig:
    difference_hu: tuple[float, float] | None = None  # organ median minus tumour mean; None = CONTRAST_TABLE
    texture_std_hu: tuple[float, float] | None = None  # tumour's own heterogeneity; None = TEXTURE_STD_HU
    texture_grain_mm: tuple[float, float] = (3.0, 8.0)  # step of the coarse noise grid = size of the mottling
    edge_psf_voxels: tuple[float, float] = (0.45, 0.7)  # edge blur per axis in voxels: the CT's own resolution
    edge_sigma_mm: tuple[float, float] = (0.3, 0.8)  # the tumour's intrinsic transition, added in quadrature
    organ_context_mm: float = 15.0  # organ voxels within this distance of the tumour give its median HU
    suppress_structure: bool = True  # inside the tumour, replace structure (vessels) by parenchyma + the CT's grain
    rim: bool = False  # rim / capsule enhancement (off by default)
    rim_hu: tuple[float, float] = (15.0, 35.0)  # rim brightness above the tumour interior
    rim_width_mm: tuple[float, float] = (1.5, 3.0)  # rim thickness (Gaussian FWHM-like width)

    def __post_init__(self):
        for name in ("difference_hu", "texture_std_hu", "texture_grain_mm", "edge_psf_voxels", "edge_sigma_mm",
                     "rim_hu", "rim_width_mm"):
            rng = getattr(self, name)
            if rng is None:
                continue
            lo, hi = rng
            if not 0 <= lo <= hi:
                raise ValueError(f"ModelBasedConfig.{name} must be a range 0 <= low <= high, got {(lo, hi)}")
        if self.texture_grain_mm[0] <= 0:
            raise ValueError(f"ModelBasedConfig.texture_grain_mm must be positive, got {self.texture_grain_mm}")


@dataclass
class ModelBasedResult:
    ct: np.ndarray  # new CT, the input's dtype
    support: np.ndarray  # bool: every voxel that may differ from the input (blend + displacement)
    params: dict  # everything drawn or measured, for provenance (JSON-serialisable)
    organ: np.ndarray  # the organ mask after the mass effect (the input's when none was applied)
    labels: list = field(default_factory=list)  # the extra label arrays, warped with the tissue


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


def _robust_std(values: np.ndarray) -> float:
    if values.size == 0:
        return float("nan")
    v = values.astype(np.float64)
    return float(1.4826 * np.median(np.abs(v - np.median(v))))


def hu_texture(shape: Sequence[int], spacing: np.ndarray, grain_mm: float, rng: np.random.Generator) -> np.ndarray:
    """Hu et al.'s texture: Gaussian noise on a grid of step ``grain_mm``, cubic-upsampled, smoothed (unit-free)."""
    coarse_shape = [max(int(np.ceil(n * s / grain_mm)) + 3, 4) for n, s in zip(shape, spacing)]
    coarse = rng.standard_normal(coarse_shape)
    # fine voxel i sits at coarse coordinate 1 + i * s / grain (one coarse cell of margin each side)
    coords = np.meshgrid(*[1.0 + np.arange(n) * s / grain_mm for n, s in zip(shape, spacing)], indexing="ij", sparse=False)
    tex = ndimage.map_coordinates(coarse, coords, order=3, mode="mirror")
    return ndimage.gaussian_filter(tex, sigma=0.6 * grain_mm / spacing, mode="nearest")


def edge_weight(tumor: np.ndarray, sigma_vox: np.ndarray, truncate: float = 4.0) -> np.ndarray:
    """Tumour weight in [0, 1]: ``Φ(−d)`` with ``d`` the signed distance to the mask's surface in units of
    the per-axis edge blur (the profile a Gaussian PSF makes of a large smooth object's edge). Unlike a
    blurred 0/1 mask it reaches 1 inside a tumour only a few voxels wide, so small tumours keep their
    contrast; it is exactly 0 beyond ``truncate`` blur widths."""
    from scipy.special import ndtr

    pad = int(np.ceil(truncate / np.min(sigma_vox))) + 1
    tp = np.pad(tumor, pad)
    unit = 1.0 / np.asarray(sigma_vox, dtype=np.float64)  # one voxel in blur widths, per axis
    d_out = ndimage.distance_transform_edt(~tp, sampling=unit)
    d_in = ndimage.distance_transform_edt(tp, sampling=unit)
    half = 0.5 * float(unit.min())  # the surface lies half a voxel beyond the outermost voxel centres
    d = np.where(tp, half - d_in, d_out - half)
    w = np.where(d >= truncate, 0.0, ndtr(-d))
    return w[tuple(slice(pad, pad + n) for n in tumor.shape)]


def _draw(rng: np.random.Generator, cfg: ModelBasedConfig, phase: str, row: ContrastRange) -> dict:
    """All random draws in a fixed order (options never shift the stream)."""
    lo, hi = row.for_phase(phase)
    diff_range = cfg.difference_hu if cfg.difference_hu is not None else (-hi, -lo)
    tex_range = cfg.texture_std_hu if cfg.texture_std_hu is not None else TEXTURE_STD_HU[phase]
    return {
        "difference_hu": float(rng.uniform(*diff_range)),
        "texture_std_hu": float(rng.uniform(*tex_range)),
        "texture_grain_mm": float(rng.uniform(*cfg.texture_grain_mm)),
        "edge_psf_voxels": float(rng.uniform(*cfg.edge_psf_voxels)),
        "edge_sigma_mm": float(rng.uniform(*cfg.edge_sigma_mm)),
        "rim_hu": float(rng.uniform(*cfg.rim_hu)),
        "rim_width_mm": float(rng.uniform(*cfg.rim_width_mm)),
        "difference_range_hu": [float(v) for v in diff_range],
        "texture_std_range_hu": [float(v) for v in tex_range],
    }


def _paint(ct, spacing, organ, tumor, avoid, rng, cfg, organ_name, phase, difference_hu, rim):
    """Modulate the CT inside the tumour; returns (new CT, support, params)."""
    s = spacing
    ph, organ_median, threshold = contrast_phase(ct, organ & ~tumor, organ_name, phase)
    key, row = organ_table(organ_name)
    p = _draw(rng, cfg, ph, row)
    if difference_hu is not None:
        p["difference_hu"] = float(difference_hu)
    sigma_edge_mm = np.sqrt((p["edge_psf_voxels"] * s) ** 2 + p["edge_sigma_mm"] ** 2)
    sigma_edge_vox = sigma_edge_mm / s
    reach = np.array([int(4.0 * v + 0.5) for v in sigma_edge_vox])  # gaussian_filter's truncate=4 reach
    context = np.ceil(cfg.organ_context_mm / s).astype(int)
    sl = _crop_slices(tumor, np.maximum(reach + 1, context))
    t = tumor[sl]
    crop = ct[sl].astype(np.float64)
    org = organ[sl]
    organ_local = org & ~t & ~avoid[sl]
    if organ_local.sum() >= 50:
        organ_hu = float(np.median(crop[organ_local]))
    elif np.isfinite(organ_median):
        organ_hu = organ_median
    else:
        organ_hu = float(np.median(crop[t]))

    # organ-only smoothing (normalised convolution): fat beyond a subcapsular tumour is no "structure"
    inside_org = (org | t).astype(np.float64)
    weight = ndimage.gaussian_filter(inside_org, sigma=1.0, mode="nearest")
    low = ndimage.gaussian_filter(crop * inside_org, sigma=1.0, mode="nearest") / np.maximum(weight, 1e-6)
    ref = organ_local if organ_local.sum() >= 50 else t
    low_std = _robust_std(low[ref])
    noise_std = _robust_std((crop - low)[ref])

    grain = max(p["texture_grain_mm"], 3.0 * float(s.max()))  # a texture finer than 3 voxels would just be more noise
    tex = hu_texture(crop.shape, s, grain, rng)
    tex = (tex - tex[t].mean()) / max(float(tex[t].std()), 1e-6)
    change = -p["difference_hu"] + p["texture_std_hu"] * tex

    structure_hu, structure_voxels = 0.0, 0
    if cfg.suppress_structure:
        # structure = where the organ-smoothed CT leaves the organ's median by more than max(3 std, 20 HU);
        # there (one voxel wider, softly) the CT is replaced by the median plus the CT's own high-pass
        # noise borrowed from a few voxels away, so a crossing vessel vanishes and the grain stays
        struct = np.abs(low - organ_hu) > max(3.0 * low_std, 20.0)
        struct = ndimage.binary_dilation(struct) & (org | t)
        if (struct & t).any():
            hp = crop - ndimage.gaussian_filter(crop, sigma=1.0, mode="nearest")
            borrowed = np.clip(np.roll(hp, (3, 5, 7)[: hp.ndim], axis=tuple(range(hp.ndim))), -3 * noise_std, 3 * noise_std)
            w_s = np.clip(ndimage.gaussian_filter(struct.astype(np.float64), 0.7), 0.0, 1.0) * struct
            w_s = np.maximum(w_s, struct * 0.999)
            removed = w_s * (crop - (organ_hu + borrowed))
            change = change - removed
            structure_hu = float(np.abs(removed[t]).mean())
            structure_voxels = int((struct & t).sum())
    use_rim = cfg.rim if rim is None else bool(rim)
    if use_rim:
        depth = ndimage.distance_transform_edt(t, sampling=s) - 0.5 * float(s.min())  # mm inside the surface
        w = p["rim_width_mm"]
        change = change + p["rim_hu"] * np.exp(-0.5 * ((depth - 0.5 * w) / (0.5 * w)) ** 2) * (depth >= -0.5 * float(s.min()))

    m = edge_weight(t, sigma_edge_vox)
    m *= (org | t) & ~avoid[sl]  # no halo outside the organ, never into a labelled real tumour
    sup = m > 0
    new = crop + m * change

    out = ct.copy()
    region = out[sl]
    region[sup] = cast_like(new[sup], ct.dtype)
    support = np.zeros(ct.shape, dtype=bool)
    support[sl] = sup
    params = {
        "organ": organ_name,
        "contrast_table": key,
        "phase": ph,
        "phase_source": "auto" if phase == "auto" else "given",
        "organ_median_hu": organ_median,
        "phase_threshold_hu": threshold,
        "organ_local_median_hu": organ_hu,
        "organ_noise_std_hu": noise_std,
        "difference_hu": p["difference_hu"],
        "difference_range_hu": p["difference_range_hu"],
        "contrast_hu": -p["difference_hu"],
        "texture_std_hu": p["texture_std_hu"],
        "texture_std_range_hu": p["texture_std_range_hu"],
        "texture_grain_mm": p["texture_grain_mm"],
        "texture_grain_used_mm": grain,
        "edge_psf_voxels": p["edge_psf_voxels"],
        "edge_sigma_mm": p["edge_sigma_mm"],
        "edge_blur_mm_per_axis": [float(v) for v in sigma_edge_mm],
        "structure_removed_hu": structure_hu,
        "structure_voxels": structure_voxels,
        "rim": use_rim,
        "rim_hu": p["rim_hu"] if use_rim else 0.0,
        "rim_width_mm": p["rim_width_mm"] if use_rim else 0.0,
        "config": asdict(cfg),
    }
    return out, support, params


def model_based_tumor(
    ct: np.ndarray,
    spacing_zyx: Sequence[float],
    organ_mask: np.ndarray,
    tumor_mask: np.ndarray,
    *,
    rng: np.random.Generator,
    config: ModelBasedConfig = ModelBasedConfig(),
    difference_hu: float | None = None,
    organ: str | None = None,
    phase: str = "auto",
    mass_effect: str = "auto",
    mass_effect_config: MassEffectConfig = MassEffectConfig(),
    avoid: np.ndarray | None = None,
    rim: bool | None = None,
    labels: Sequence[np.ndarray] = (),
) -> ModelBasedResult:
    """Insert one model-based tumour (see the module docstring); the full result, warped labels included.

    ``ct`` (any layout) in HU, ``spacing_zyx`` mm per array axis, masks boolean on the same grid.
    ``organ`` names the contrast row (None = liver); ``phase`` "auto" | "non-contrast" | "enhanced";
    ``mass_effect`` "auto" (tumours of ``mass_effect_config.min_diameter_mm`` and more) | "on" | "off";
    ``avoid`` voxels never changed nor moved (labelled real tumours); ``labels`` extra arrays (a label
    map) warped with the tissue. ``difference_hu`` fixes organ − tumour instead of drawing it.
    """
    spacing = np.asarray(spacing_zyx, dtype=np.float64)
    tumor = np.asarray(tumor_mask, dtype=bool)
    organ_arr = np.asarray(organ_mask, dtype=bool)
    avoid_arr = np.zeros(tumor.shape, bool) if avoid is None else np.asarray(avoid, bool)
    if not tumor.any():
        raise ValueError("tumor_mask is empty")
    applies = mass_effect_applies(mass_effect, tumor, spacing, mass_effect_config)
    me = {"mode": mass_effect, "applied": applies, "equivalent_diameter_mm": round(equivalent_diameter_mm(tumor, spacing), 2),
          "min_diameter_mm": mass_effect_config.min_diameter_mm}
    base, warped_labels, me_support = ct, list(labels), None
    if applies:
        res = apply_mass_effect(ct, tumor, spacing, labels=[organ_arr, *labels], config=mass_effect_config, fixed=avoid_arr)
        base, organ_arr, warped_labels, me_support = res.ct, res.labels[0], res.labels[1:], res.support
        me.update(res.info)
    out, support, params = _paint(base, spacing, organ_arr, tumor, avoid_arr, rng, config, organ, phase, difference_hu, rim)
    if me_support is not None:
        support |= me_support
    params["mass_effect"] = me
    return ModelBasedResult(out, support, params, organ_arr, warped_labels)


def synthesize_model_based(
    ct: np.ndarray,
    spacing_zyx: Sequence[float],
    organ_mask: np.ndarray,
    tumor_mask: np.ndarray,
    *,
    rng: np.random.Generator,
    config: ModelBasedConfig = ModelBasedConfig(),
    difference_hu: float | None = None,
    organ: str | None = None,
    phase: str = "auto",
    mass_effect: str = "auto",
    mass_effect_config: MassEffectConfig = MassEffectConfig(),
    avoid: np.ndarray | None = None,
    rim: bool | None = None,
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Insert a model-based tumour; returns (new CT array, support mask, drawn parameters).

    The arguments are those of :func:`model_based_tumor`, which also returns the warped organ and labels.
    """
    r = model_based_tumor(ct, spacing_zyx, organ_mask, tumor_mask, rng=rng, config=config, difference_hu=difference_hu,
                          organ=organ, phase=phase, mass_effect=mass_effect, mass_effect_config=mass_effect_config,
                          avoid=avoid, rim=rim)
    return r.ct, r.support, r.params
