"""The synthesis engine: a healthy CT + organ mask (+ tumour mask) -> CT with a synthetic tumour.

    engine = SynthesisEngine(weights_dir=None, device="auto")
    result = engine.synthesize(ct, organ_mask, tumor_mask=None, organ="liver", seed=0)
    result.ct          # Volume: same geometry and dtype as ``ct``
    result.label       # uint8 (z, y, x): 0 background, 1 organ, 2 tumour
    result.tumor_mask  # bool (z, y, x)
    result.provenance  # dict: method (+ why), weights sha256, seed, stage, steps, sigma, mask params, timings
    result.intermediates  # keep_intermediates=True (diffusion): "masked", "reconstruction", "decoded" in HU

``iter_synthesize`` is the same work as a generator yielding ``(message, done, total)`` and returning
the :class:`SynthesisResult` (for the napari progress bar); :func:`run_sync` drives it.

Methods: ``"diffusion"`` (the release's latent diffusion, needs the weights), ``"model-based"``
(Hu et al. 2023, no weights) and ``"auto"`` = diffusion when the weights for the organ and stage are
found, else model-based — the provenance says which ran and why.

Geometry: the CT is never resampled as a whole. Diffusion works on 96³ model-space crops cut from the
CT (:mod:`backend.synthesis.crops`), one per group of nearby tumour components; the result is written
back only where the blurred mask reaches (the blend support). Every other voxel is bit-identical to
the input; integer CTs stay integer.

Intermediates (``keep_intermediates=True``; costs one extra encode + decode per crop, so off by
default): float32 HU volumes on the CT's own (z, y, x) grid, linearly resampled back from each crop
like the tumour change; voxels outside every crop keep the CT's own value (so they show as a whole CT
in a viewer; compare only inside the crops). Keys and meaning: :data:`INTERMEDIATES`. The model-based
method has none (empty dict).
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np
from scipy import ndimage

from backend.errors import DiffTumorError
from backend.io import Geometry, Volume, check_same_grid, label_map_range
from backend.progress import run_sync
from backend.synthesis import blend, crops, masks
from backend.synthesis.model_based import ModelBasedConfig, cast_like, synthesize_model_based

log = logging.getLogger(__name__)

METHODS = ("auto", "diffusion", "model-based")
STAGE_CHOICES = ("early", "mid_late")
EARLY_MAX_DIAMETER_MM = 20.0  # the release: tumours < 2 cm are "early"
GROUP_EXTENT_MM = 80.0  # tumour components whose union fits in 80 mm share one 96 mm crop
INTERMEDIATES = {
    "masked": "what the encoder sees: the crop windowed to [-175, 250] HU with the tumour at 37.5 HU (0 in [-1, 1])",
    "reconstruction": "decode(quantize(encode(crop))) of the UNMASKED crop by the standalone autoencoder: what the "
                      "autoencoder alone does to this anatomy (blur, lost noise), the baseline for judging 'decoded'",
    "decoded": "the raw decoded diffusion sample before blending (whole crop, not clipped to the window)",
}


@dataclass
class SynthesisResult:
    ct: Volume
    label: np.ndarray  # uint8 (z, y, x): 0 background, 1 organ, 2 tumour
    tumor_mask: np.ndarray  # bool (z, y, x)
    provenance: dict = field(default_factory=dict)
    # keep_intermediates=True, diffusion only: float32 HU (z, y, x) volumes on the CT's grid, the CT's own
    # value outside the crops -- see ``INTERMEDIATES``
    intermediates: dict[str, np.ndarray] = field(default_factory=dict)

    def label_volume(self) -> Volume:
        return Volume(self.label, self.ct.geometry)


# --------------------------------------------------------------------------------------------
# input checks
# --------------------------------------------------------------------------------------------
def check_ct_like(ct: Volume, organ_mask: np.ndarray, name: str = "CT") -> None:
    """Refuse NaN/inf and images whose intensities are not Hounsfield units (e.g. MR)."""
    a = ct.array
    if a.dtype.kind == "f" and not np.all(np.isfinite(a)):
        raise DiffTumorError(f"{name}: contains NaN or infinite values")
    if a.dtype.kind not in "iuf":
        raise DiffTumorError(f"{name}: pixel type {a.dtype} is not a CT intensity type")
    sub = a[:: max(1, a.shape[0] // 32), ::4, ::4]
    labels = label_map_range(a)
    if labels is not None:
        raise DiffTumorError(f"{name}: looks like a label map (few whole values {labels[0]}..{labels[1]}), not a CT")
    p_lo, p_hi = (float(v) for v in np.percentile(sub, [0.5, 99.5]))
    if p_hi - p_lo < 200.0:  # any abdominal CT spans fat (-100) to soft tissue and bone
        raise DiffTumorError(
            f"{name}: does not look like a CT in Hounsfield units (intensities span only {p_lo:.4g}..{p_hi:.4g}); "
            "scaled or normalised data is not supported"
        )
    organ_vals = a[organ_mask]
    organ_med = float(np.median(organ_vals)) if organ_vals.size else float("nan")
    med, lo = float(np.median(sub)), float(sub.min())
    if organ_vals.size and not -200.0 <= organ_med <= 400.0:
        raise DiffTumorError(
            f"{name}: does not look like a CT in Hounsfield units (organ median {organ_med:.0f}, expected -200..400 HU); MR or scaled data is not supported"
        )
    if lo > -500.0 and not -200.0 <= med <= 200.0:
        raise DiffTumorError(
            f"{name}: does not look like a CT in Hounsfield units (no air near -1000 HU, median {med:.0f}); MR or scaled data is not supported"
        )


def _as_mask(m, ct: Volume, name: str) -> np.ndarray:
    if isinstance(m, Volume):
        check_same_grid(ct, m, names=(ct.name if hasattr(ct, "name") and ct.name else "CT", name))
        m = m.array
    m = np.asarray(m)
    if m.shape != ct.array.shape:
        raise DiffTumorError(f"{name}: array shape {m.shape} differs from the CT's {ct.array.shape} (z, y, x)")
    if m.dtype.kind == "f" and not np.all(np.isfinite(m)):
        raise DiffTumorError(f"{name}: contains NaN or infinite values")
    return m != 0


def component_diameters_mm(mask: np.ndarray, spacing_zyx) -> list[float]:
    """Largest diameter (mm) of each connected tumour (26-connected) in ``mask``, largest first."""
    box = _bbox_slices(mask, (0, 0, 0))
    lab, n = ndimage.label(mask[box], structure=np.ones((3, 3, 3), bool))
    return sorted((masks.largest_diameter_mm(lab[sl] == k + 1, spacing_zyx)
                   for k, sl in enumerate(ndimage.find_objects(lab))), reverse=True)


def stage_of_diameter(diameter_mm: float) -> str:
    """The release's stage rule: a tumour under 20 mm is early, anything larger mid/late."""
    return "early" if diameter_mm < EARLY_MAX_DIAMETER_MM else "mid_late"


def _bbox_slices(mask: np.ndarray, margin: Sequence[int]) -> tuple[slice, ...]:
    nz = np.argwhere(mask)
    lo = np.maximum(nz.min(0) - np.asarray(margin), 0)
    hi = np.minimum(nz.max(0) + 1 + np.asarray(margin), mask.shape)
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))


# --------------------------------------------------------------------------------------------
# tumour components -> crops
# --------------------------------------------------------------------------------------------
def group_components(tumor: np.ndarray, geometry: Geometry, extent_mm: float = GROUP_EXTENT_MM) -> list[np.ndarray]:
    """Split a (z, y, x) tumour mask into groups of components that fit together in one crop.

    Works on the tumour's bounding box only (labelling a whole CT costs ~0.2 s per 10 M voxels).
    """
    if not tumor.any():
        return []
    box = _bbox_slices(tumor, (1, 1, 1))
    offset = [s.start for s in box]
    lab, n = ndimage.label(tumor[box], structure=np.ones((3, 3, 3), bool))
    objs = [tuple(slice(o.start + d, o.stop + d) for o, d in zip(sl, offset)) for sl in ndimage.find_objects(lab)]
    sizes = ndimage.sum_labels(tumor[box], lab, index=np.arange(1, n + 1))
    groups: list[tuple[np.ndarray, np.ndarray, list[int]]] = []  # (world lo, world hi, ids)
    for i in np.argsort(-sizes):
        sl = objs[i]
        corners = np.array([[sl[2].start, sl[1].start, sl[0].start], [sl[2].stop - 1, sl[1].stop - 1, sl[0].stop - 1]], float)
        w = geometry.voxel_to_world(np.array([[x, y, z] for x in corners[:, 0] for y in corners[:, 1] for z in corners[:, 2]]))
        lo, hi = w.min(0), w.max(0)
        for g in groups:
            nlo, nhi = np.minimum(g[0], lo), np.maximum(g[1], hi)
            if np.all(nhi - nlo <= extent_mm):
                g[0][:], g[1][:] = nlo, nhi
                g[2].append(int(i) + 1)
                break
        else:
            groups.append((lo.copy(), hi.copy(), [int(i) + 1]))
    out = []
    for g in groups:
        full = np.zeros(tumor.shape, bool)
        full[box] = np.isin(lab, g[2])
        out.append(full)
    return out


# --------------------------------------------------------------------------------------------
# random placement on the CT grid (the release's generator)
# --------------------------------------------------------------------------------------------
def group_crop(geometry: Geometry, group: np.ndarray) -> tuple["crops.Crop", np.ndarray]:
    """The 96 mm model-grid crop the diffusion model paints for a tumour group, and the group's centre (world)."""
    nz = np.argwhere(group)
    centre_idx = (nz.min(0) + nz.max(0)) / 2.0  # (z, y, x)
    centre_world = geometry.voxel_to_world(centre_idx[::-1])
    return crops.crop_around(crops.model_grid(geometry), centre_world), centre_world


def outside_crop(geometry: Geometry, group: np.ndarray) -> np.ndarray:
    """Voxels of ``group`` whose centres lie outside its crop: diffusion cannot paint them."""
    crop, _ = group_crop(geometry, group)
    idx = np.argwhere(group)
    pos = crop.geometry.world_to_voxel(geometry.voxel_to_world(idx[:, ::-1].astype(np.float64)))
    out = np.zeros(group.shape, bool)
    out[tuple(idx.T)] = np.any((pos < -0.5) | (pos > crop.size - 0.5), axis=1)
    return out


def _organ_in_model_space(grid: Geometry, organ_arr: np.ndarray, size: str):
    """The organ's neighbourhood as a 1 mm model-space (X, Y, Z) mask: (mask, model grid, file slices, sub-grid)."""
    reach_mm = max(10.0, 2.0 * masks.SIZE_CLASSES[size].semi_axes[1])  # room for the class's largest tumour
    margin = [int(np.ceil(reach_mm / s)) for s in grid.spacing[::-1]]
    sl = _bbox_slices(organ_arr, margin)
    sub_g = crops.sub_geometry(grid, sl)
    model = crops.model_grid(sub_g)
    organ_m = crops.sample(organ_arr[sl], sub_g, model, nearest=True, extrapolate=True).transpose(2, 1, 0).astype(bool)
    return organ_m, model, sl, sub_g


def _mask_to_file(mask_m: np.ndarray, params, model: Geometry, sl, sub_g: Geometry, full: Geometry, shape) -> np.ndarray:
    back = crops.sample(np.ascontiguousarray(mask_m.transpose(2, 1, 0)), model, sub_g, nearest=True).astype(bool)
    tumor = np.zeros(shape, bool)
    tumor[sl] = back
    if not tumor.any():  # thinner than a slice: keep the voxel nearest each centre
        for p in params:
            k = np.clip(np.rint(full.world_to_voxel(model.voxel_to_world(np.asarray(p.centre, float)))).astype(int),
                        0, np.asarray(full.size) - 1)
            tumor[k[2], k[1], k[0]] = True
    for p in params:  # report centres in world coordinates (LPS mm) and on the CT's grid too
        world = model.voxel_to_world(np.asarray(p.centre, float))
        p.centre_world_mm = tuple(round(float(v), 2) for v in world)
        p.centre_voxel_xyz = tuple(int(v) for v in np.rint(full.world_to_voxel(world)))
    return tumor


def _random_setup(ct, organ_mask, organ: str, size, count, seed):
    from backend.organs import parse_organ

    geometry = ct.geometry if isinstance(ct, Volume) else ct
    organ_arr = np.asarray(organ_mask) != 0
    if organ_arr.shape != tuple(geometry.size[::-1]):
        raise DiffTumorError(f"organ mask: array shape {organ_arr.shape} differs from the CT's {tuple(geometry.size[::-1])} (z, y, x)")
    organ = parse_organ(organ)
    if not organ_arr.any():
        raise DiffTumorError(f"organ mask: the organ '{organ}' is absent (no voxel)")
    if size is not None and size not in masks.SIZE_CLASSES:
        raise DiffTumorError(f"size class '{size}': choose one of {', '.join(masks.SIZE_CLASSES)}")
    if count is not None and int(count) < 1:
        raise DiffTumorError(f"number of tumours: must be at least 1, got {count}")
    rng = masks.as_rng(seed)
    if size is None:
        size = masks.sample_size_class(rng)
    return geometry, organ_arr, organ, size, rng


def random_tumor_mask(ct: Volume | Geometry, organ_mask, *, organ: str, size: str | None = None,
                      count: int | None = None, seed=0) -> tuple[np.ndarray, list[masks.TumorParams]]:
    """Tumours drawn by the release's generator at valid places in the organ, on the CT's own grid.

    ``ct``: the CT Volume (or its Geometry); ``organ_mask``: (z, y, x) on that grid. ``size`` None draws
    the release's training mix and ``count`` None the class's count range; ``seed`` is an int or a
    ``numpy.random.Generator`` (used as is, so a caller's stream continues). The generator runs in
    1 mm model space on the organ's neighbourhood only (one joint draw, as released: one clipping
    decision for all tumours) and is brought back by nearest neighbour; a tumour thinner than a
    voxel keeps the voxel nearest its centre. Returns (bool mask (z, y, x), one
    :class:`~backend.synthesis.masks.TumorParams` per tumour with ``centre_world_mm`` filled in).
    """
    return _random_joint(*_random_setup(ct, organ_mask, organ, size, count, seed), count)


def _random_joint(geometry, organ_arr, organ, size, rng, count, prepared=None):
    organ_m, model, sl, sub_g = prepared(size) if prepared else _organ_in_model_space(geometry, organ_arr, size)
    masks.check_organ_fits(organ_m, size, name=f"organ '{organ}'")
    gap = int(np.ceil(max(geometry.spacing))) + 1  # 1 mm voxels between tumours: still apart on the CT's grid
    mask_m, params = masks.generate_tumor_mask(organ_m, organ, size=size, count=count, rng=rng, gap=gap)
    return _mask_to_file(mask_m, params, model, sl, sub_g, geometry, organ_arr.shape), params


def random_tumor_masks(ct: Volume | Geometry, organ_mask, *, organ: str, size: str | None = None, count: int = 1,
                       seed=0) -> tuple[list[np.ndarray], list[masks.TumorParams]]:
    """Like :func:`random_tumor_mask` but one mask per tumour (one generator draw each, same seeded stream):
    for tools that keep each tumour apart (the napari placement gives each its own label id)."""
    geometry, organ_arr, organ, size, rng = _random_setup(ct, organ_mask, organ, size, count, seed)
    organ_m, model, sl, sub_g = _organ_in_model_space(geometry, organ_arr, size)
    masks.check_organ_fits(organ_m, size, name=f"organ '{organ}'")
    masks.check_count_fits(organ_m, size, int(count), organ_name=organ)  # (separate draws: no placement apart)
    shapes, params = [], []
    for _ in range(int(count)):
        mask_m, ps = masks.generate_tumor_mask(organ_m, organ, size=size, count=1, rng=rng)
        shapes.append(_mask_to_file(mask_m, ps, model, sl, sub_g, geometry, organ_arr.shape))
        params.extend(ps)
    return shapes, params


# --------------------------------------------------------------------------------------------
# per-CT cache: a second tumour in the same CT skips the checks and the organ's model-space mask
# --------------------------------------------------------------------------------------------
CT_CACHE_SIZE = 4  # CTs (x organ masks) remembered per engine


def _ct_key(ct: Volume) -> tuple:
    """Identity + cheap content fingerprint of a CT: object id, shape, dtype, geometry, hash of a strided sample.

    A CT edited in place outside the sampled voxels keeps its key; the cache only holds what a
    wrong hit cannot corrupt much (the CT-likeness check, the organ's model-space mask, which is keyed
    by the full organ-mask hash anyway).
    """
    a = ct.array
    step = max(1, int(round((a.size / 65536) ** (1 / 3))))
    sample = np.ascontiguousarray(a[::step, ::step, ::step])
    return (id(a), a.shape, a.dtype.str, ct.geometry, hashlib.blake2b(sample.tobytes(), digest_size=16).hexdigest())


@dataclass
class _CTEntry:
    checked: bool
    organ_models: dict = field(default_factory=dict)  # reach (mm) -> (organ_m, model grid, slices, sub-grid)

    def organ_model(self, geometry: Geometry, organ_arr: np.ndarray, size: str):
        reach = max(10.0, 2.0 * masks.SIZE_CLASSES[size].semi_axes[1])
        if reach not in self.organ_models:
            prepared = _organ_in_model_space(geometry, organ_arr, size)
            prepared[0].flags.writeable = False  # shared by later calls: nobody may edit it
            self.organ_models[reach] = prepared
        return self.organ_models[reach]


# --------------------------------------------------------------------------------------------
# the engine
# --------------------------------------------------------------------------------------------
class SynthesisEngine:
    """Loads weights lazily (once) and synthesizes tumours into CTs in their own geometry."""

    def __init__(self, weights_dir=None, device: str = "auto", *, threads: int | None = None,
                 model_based_config: ModelBasedConfig | None = None):
        from backend.device import resolve_device, setup_cpu_threads
        from backend.weights import WeightsFolder

        self.weights = WeightsFolder.find(weights_dir)
        self.device = resolve_device(device)
        if self.device.type == "cpu":
            setup_cpu_threads(threads)
        self.model_based_config = model_based_config or ModelBasedConfig()
        self._ae = None
        self._stage_models: dict = {}
        self._ct_cache: dict = {}  # (CT fingerprint, organ mask hash) -> _CTEntry, least recently used first
        self.cache_hits = 0

    # ---------------------------------------------------------------- weights
    def diffusion_available(self, organ: str, stage: str) -> tuple[bool, str]:
        """(available, reason) for ``stage`` of ``organ``."""
        from backend.weights import WEIGHT_ORGANS, weight_organ

        if weight_organ(organ) not in WEIGHT_ORGANS:
            return False, f"no diffusion weights exist for {organ} (released organs: {', '.join(WEIGHT_ORGANS)})"
        if self.weights.root is None:
            return False, "no weights folder found (--weights, $DIFFTUMOR_WEIGHTS or the user config)"
        miss = self.weights.missing(organ, stage)
        if miss:
            return False, f"weights folder {self.weights.root} lacks {', '.join(miss)}"
        return True, f"weights found in {self.weights.root} ({self.weights.source})"

    def _autoencoder(self):
        if self._ae is None:
            from backend.vqgan.official import load_autoencoder
            from backend.weights import AE_NAME

            self._ae = load_autoencoder(self.weights.path(AE_NAME)).to(self.device).eval()
        return self._ae

    def stage_models(self, organ: str, stage: str, ddim_steps: int = 50):
        """Load (once) and return the :class:`~backend.synthesis.diffusion_crop.StageModels` for a stage."""
        from backend.diffusion.official import load_diffusion
        from backend.synthesis.diffusion_crop import StageModels
        from backend.weights import AE_NAME, diffusion_name, require_fit

        key = (diffusion_name(organ, stage), ddim_steps if stage == "mid_late" else None)
        if key in self._stage_models:
            return self._stage_models[key]
        paths = self.weights.require(organ, stage)
        ae = self._autoencoder()
        ck = load_diffusion(paths[diffusion_name(organ, stage)])
        require_fit(self.weights.root, diffusion_name(organ, stage), ck, ae, lambda: self.weights.sha256(AE_NAME))
        if stage == "early":
            scheduler = ck.ddpm_scheduler()
            decoder = self._embedded_decoder(ck, ae)
            steps = ck.timesteps
        else:
            if not 1 <= int(ddim_steps) <= ck.timesteps:  # DDIM takes at most one step per training timestep
                raise DiffTumorError(f"--ddim-steps {ddim_steps}: {diffusion_name(organ, stage)} was trained with "
                                     f"T = {ck.timesteps} steps; give 1 to {ck.timesteps}")
            scheduler = ck.ddim_scheduler(ddim_steps)
            decoder, steps = ae, ddim_steps
        sha = {n: self.weights.sha256(n) for n in (AE_NAME, diffusion_name(organ, stage))}
        models = StageModels(stage, ae, ck.unet.to(self.device).eval(), scheduler.to(self.device), decoder, sha, steps)
        self._stage_models[key] = models
        return models

    def _embedded_decoder(self, ck, ae):
        """The early .pt decodes with its own VQGAN copy; reuse the AE object when the tensors are equal."""
        if not ck.vqgan_state:
            return ae
        import torch
        from backend.vqgan.model import VQGAN

        own = ae.state_dict()
        emb = {k: v for k, v in ck.vqgan_state.items() if k in own}
        if all(torch.equal(emb[k].to(own[k].device, own[k].dtype), own[k]) for k in emb if k in own) and len(emb) >= len(own) - 2:
            return ae
        dec = VQGAN(ae.config)
        missing = dec.load_state_dict(emb, strict=False).missing_keys
        if any(not k.startswith("codebook.") for k in missing):
            raise DiffTumorError(f"{ck.path}: its embedded autoencoder copy does not fit the folder's autoencoder "
                                 "architecture; put the autoencoder it was trained with beside it")
        return dec.to(self.device).eval()

    # ---------------------------------------------------------------- main entry points
    def synthesize(self, ct: Volume, organ_mask, tumor_mask=None, **kwargs) -> SynthesisResult:
        return run_sync(self.iter_synthesize(ct, organ_mask, tumor_mask, **kwargs))

    def iter_synthesize(
        self,
        ct: Volume,
        organ_mask,
        tumor_mask=None,
        *,
        organ: str,
        method: str = "auto",
        seed: int = 0,
        stage: str | None = None,
        size: str | None = None,
        count: int | None = None,
        sigma: float | None = None,
        ddim_steps: int = 50,
        pancreas_blend: bool = False,
        noise=None,
        tumor_name: str = "tumor mask",
        organ_name: str = "organ mask",
        keep_intermediates: bool = False,
        weights_organ: str | None = None,
        existing_tumor=None,
    ) -> Iterator[tuple[str, int, int]]:
        """Generator form of :meth:`synthesize`; must not touch Qt. See the module docstring.

        * ``tumor_mask``: (z, y, x) array or Volume on the CT grid (non-zero = tumour); None draws
          tumours with the release's generator (``size``/``count``; None = the release's mix).
        * ``stage``: "early" / "mid_late" overrides the choice from the size (diameter < 20 mm = early).
        * ``sigma``: blend blur in voxels (None: U(0, 4) as released); ``pancreas_blend`` blends the
          pancreas like the other organs instead of replacing the whole crop.
        * ``noise``: explicit diffusion noises ``[x_T, z...]`` (tests/parity), used for every crop.
        * ``keep_intermediates``: fill ``result.intermediates`` (diffusion only; see :data:`INTERMEDIATES`).
        * ``weights_organ``: whose diffusion weights to use (default: ``organ``). The paper's cross-organ
          setting (section 4.2): e.g. ``organ="pancreas", weights_organ="liver"`` paints pancreas tumours
          with the liver model; blending and the tumour generator still follow ``organ``.
        * ``existing_tumor``: tumours already in the CT (e.g. label 2 of an MSD/LiTS/KiTS map). They stay
          tumour (2) in the output label, are left out of the organ for placement, blending and the organ's
          statistics, and are never painted over.
        """
        t_start = time.perf_counter()
        if method not in METHODS:
            raise ValueError(f"method {method!r} is not one of {', '.join(METHODS)}")
        if stage is not None and stage not in STAGE_CHOICES:
            raise DiffTumorError(f"--stage {stage}: choose early or mid_late")
        if size is not None and size not in masks.SIZE_CLASSES:
            raise DiffTumorError(f"--size {size}: choose one of {', '.join(masks.SIZE_CLASSES)}")
        if sigma is not None and not 0.0 <= float(sigma) <= 20.0:
            raise DiffTumorError(f"--sigma {sigma}: the blend blur must lie in [0, 20] voxels")
        from backend.organs import parse_organ

        organ = parse_organ(organ)
        model_organ = parse_organ(weights_organ) if weights_organ else organ
        rng = np.random.default_rng(seed)
        existing = None
        if existing_tumor is not None:
            existing = _as_mask(existing_tumor, ct, "existing tumour mask")
            organ_mask = _as_mask(organ_mask, ct, organ_name) & ~existing  # the healthy organ
        cached, organ_arr = self._ct_entry(ct, organ_mask, organ_name)
        if not organ_arr.any():
            raise DiffTumorError(f"{organ_name}: the organ '{organ}' is absent (no voxel)")
        if not cached.checked:
            check_ct_like(ct, organ_arr, ct.name if ct.name else "CT")
            cached.checked = True
        yield "checked the input", 0, 1

        # ---- tumour mask (file space)
        mask_info: dict
        class_stage = None
        if tumor_mask is None:
            tumor, params = self._generate(ct, organ_arr, organ, size, count, rng, cached)
            class_stage = masks.SIZE_CLASSES[params[0].size].stage
            mask_info = {"source": "generated (release generator)", "count_requested": count,  # None: the class's range
                         "count_placed": len(params), "tumours": [p.to_dict() for p in params]}
        else:
            raw = _as_mask(tumor_mask, ct, tumor_name)
            if existing is not None:
                if raw.any() and not (raw & ~existing).any():
                    raise DiffTumorError(f"{tumor_name}: lies entirely on the tumours already in the organ labels")
                raw = raw & ~existing  # a real tumour is never painted over
            tumor = masks.validate_tumor_mask(raw, organ_arr, name=tumor_name)
            mask_info = {"source": "user", "voxels": int(tumor.sum()),
                         "volume_ml": float(tumor.sum() * ct.geometry.voxel_volume_ml)}
        if existing is not None:
            tumor = tumor & ~existing  # (generated tumours already avoid them: the organ excludes them)
        spacing_zyx = ct.geometry.spacing[::-1]
        groups = group_components(tumor, ct.geometry)
        diameters = [component_diameters_mm(g, spacing_zyx) for g in groups]  # per tumour, not per crop

        # ---- method
        stages = [stage or class_stage or stage_of_diameter(max(d)) for d in diameters]
        if method == "model-based":
            chosen, reason = "model-based", "requested"
        else:
            avail = [self.diffusion_available(model_organ, s) for s in sorted(set(stages))]
            if all(a for a, _ in avail):
                chosen, reason = "diffusion", ("requested; " if method == "diffusion" else "auto: ") + avail[0][1]
            elif method == "diffusion":
                self.weights.require(model_organ, next(s for s, (a, _) in zip(sorted(set(stages)), avail) if not a))
                raise DiffTumorError(f"diffusion: {next(r for a, r in avail if not a)}")  # pragma: no cover
            else:
                chosen, reason = "model-based", "auto: " + next(r for a, r in avail if not a)
        log.info("synthesis method: %s (%s)", chosen, reason)

        if chosen == "diffusion":  # every tumour voxel must lie in its 96 mm crop, or it is labelled but never painted
            for i, g in enumerate(groups):
                outside = outside_crop(ct.geometry, g)
                if not outside.any():
                    continue
                if tumor_mask is not None:
                    raise DiffTumorError(
                        f"{tumor_name}: a tumour {max(diameters[i]):.0f} mm across does not fit the diffusion model's "
                        f"{crops.CROP} mm crop ({int(outside.sum())} of its {int(g.sum())} voxels would be labelled "
                        f"tumour with the CT unchanged); make it smaller or use method model-based")
                g &= ~outside  # a generated large tumour is cut to its crop, as the release's crops cut it
                tumor &= ~outside
                mask_info["clipped_to_crop_voxels"] = mask_info.get("clipped_to_crop_voxels", 0) + int(outside.sum())
                diameters[i] = component_diameters_mm(g, spacing_zyx)

        out = ct.array.copy()
        inter = ({k: ct.array.astype(np.float32) for k in INTERMEDIATES}
                 if keep_intermediates and chosen == "diffusion" else None)
        crops_info = []
        n = len(groups)
        for i, (g, st, diam) in enumerate(zip(groups, stages, diameters)):
            t0 = time.perf_counter()
            if chosen == "model-based":
                out, _, params = synthesize_model_based(out, spacing_zyx, organ_arr, g, rng=rng, config=self.model_based_config)
                info = {"params": params}
                yield f"model-based tumour {i + 1}/{n}", i + 1, n
            else:
                sub = self._diffuse_group(out, ct.geometry, organ_arr, g, organ=organ, model_organ=model_organ,
                                          stage=st, sigma=sigma, rng=rng,
                                          seed=seed, index=i, ddim_steps=ddim_steps, pancreas_blend=pancreas_blend,
                                          noise=noise, intermediates=inter)
                info = None
                while True:
                    try:
                        msg, done, total = next(sub)
                        yield f"tumour {i + 1}/{n}: {msg}", i * total + done, n * total
                    except StopIteration as stop:
                        out, info = stop.value
                        break
            info.update(stage=st if chosen == "diffusion" else None, seconds=round(time.perf_counter() - t0, 3),
                        tumours=len(diam), diameter_mm=round(max(diam), 2), diameters_mm=[round(d, 2) for d in diam])
            crops_info.append(info)

        label = np.zeros(ct.array.shape, np.uint8)
        label[organ_arr] = 1
        if existing is not None:
            out[existing] = ct.array[existing]  # a blend's soft edge never reaches into a real tumour
            label[existing] = 2
            mask_info["existing_tumour_voxels"] = int(existing.sum())
        label[tumor] = 2
        from backend import __version__

        prov = {
            "method": chosen,
            "method_reason": reason,
            "organ": organ,
            "weights_organ": model_organ if chosen == "diffusion" else None,
            "seed": int(seed),
            "version": __version__,
            "device": str(self.device),
            "mask": mask_info,
            "n_tumours": int(sum(len(d) for d in diameters)),
            "tumours": crops_info,  # one entry per crop (tumours close together share a crop)
            "seconds": round(time.perf_counter() - t_start, 3),
        }
        yield "done", 1, 1
        return SynthesisResult(Volume(out, ct.geometry, getattr(ct, "path", None)), label, tumor, prov, inter or {})

    # ---------------------------------------------------------------- helpers
    def _generate(self, ct: Volume, organ_arr: np.ndarray, organ: str, size, count, rng, cached: "_CTEntry"):
        setup = _random_setup(ct, organ_arr, organ, size, count, rng)
        return _random_joint(*setup, count, prepared=lambda sz: cached.organ_model(ct.geometry, organ_arr, sz))

    def _ct_entry(self, ct: Volume, organ_mask, organ_name: str) -> tuple["_CTEntry", np.ndarray]:
        """The per-CT cache entry (checked CT, prepared organ mask) for a repeated call on the same CT."""
        key = _ct_key(ct)
        organ_arr = _as_mask(organ_mask, ct, organ_name)
        okey = (key, organ_arr.shape, hashlib.blake2b(np.packbits(organ_arr).tobytes(), digest_size=16).hexdigest())
        entry = self._ct_cache.get(okey)
        if entry is None:
            entry = _CTEntry(checked=False)
            self._ct_cache[okey] = entry
            while len(self._ct_cache) > CT_CACHE_SIZE:
                self._ct_cache.pop(next(iter(self._ct_cache)))
        else:
            self._ct_cache[okey] = self._ct_cache.pop(okey)  # most recently used last
            self.cache_hits += 1
        return entry, organ_arr

    def _diffuse_group(self, out, geometry: Geometry, organ_arr, group, *, organ, stage, sigma, rng, seed, index,
                       ddim_steps, pancreas_blend, noise, intermediates=None, model_organ=None):
        import torch

        from backend.device import oom_guard, reuse_freed_memory
        from backend.synthesis.diffusion_crop import iter_synthesize_crop, reconstruct_crop

        t0 = time.perf_counter()
        models = self.stage_models(model_organ or organ, stage, ddim_steps)
        crop, centre_world = group_crop(geometry, group)
        inside = crop.inside()
        hu = crops.crop_from(out, geometry, crop, nearest=False, pad=blend.HU_LOW - 1000.0)  # float32 (X, Y, Z)
        m = crops.crop_from(group, geometry, crop, nearest=True, pad=0).astype(np.float32)
        if not m.any():
            raise DiffTumorError("tumor mask: a tumour component is thinner than the model's 1 mm grid can hold")
        x = blend.hu_to_pm1(hu)
        blended = blend.uses_blend(organ, pancreas_blend)
        if blended:
            s = float(sigma) if sigma is not None else blend.draw_sigma(rng)
            m_blur = blend.blur_mask(m, s) * inside
            box = _bbox_slices(m_blur > 0, (0, 0, 0))  # only the blend support needs decoded values
        else:  # pancreas as released: the whole crop becomes (decoded + 1)/2
            s = None
            m_blur = inside.astype(np.float32)
            box = None
        region = box if intermediates is None else None  # the inspector shows the whole decoded crop
        t_prep = time.perf_counter()
        gen = torch.Generator().manual_seed(int(seed) * 1000 + index)
        with oom_guard("synthesis", self.device), reuse_freed_memory(self.device):
            decoded = yield from iter_synthesize_crop(x, m, models, device=self.device, noise=noise, generator=gen,
                                                      region=region)
            recon = reconstruct_crop(x, models.autoencoder, device=self.device) if intermediates is not None else None
        t_net = time.perf_counter()

        delta = np.zeros(hu.shape, np.float32)
        if blended:
            dec_box = decoded if region is not None else decoded[box]
            new_hu = blend.blend_hu(hu[box], m_blur[box], dec_box)
            delta[box] = np.where(m_blur[box] > 0, new_hu - hu[box].astype(np.float64), 0.0)
        else:
            new_hu = blend.pancreas_as_released_hu(decoded)
            delta[...] = np.where(m_blur > 0, new_hu - hu.astype(np.float64), 0.0)

        # back onto the CT grid: only where the (linearly sampled) blurred mask is > 0
        fp = crops.footprint(crop, geometry)
        d_file = crops.back_to_file(delta, crop, geometry, fp)
        w_file = crops.back_to_file(m_blur.astype(np.float32), crop, geometry, fp)
        region = out[fp]
        sup = w_file > 0
        region[sup] = cast_like(region[sup].astype(np.float64) + d_file[sup], out.dtype)
        if intermediates is not None:
            pm1 = {"masked": x * (1.0 - m), "reconstruction": recon, "decoded": decoded}
            cover = crops.back_to_file(inside.astype(np.float32), crop, geometry, fp)
            ok = cover > 0.5  # CT voxels whose interpolation stencil lies (mostly) inside the crop
            for key, vals in pm1.items():
                hu_vals = blend.from_01((vals.astype(np.float64) + 1.0) / 2.0).astype(np.float32)
                back = crops.back_to_file(hu_vals, crop, geometry, fp)
                intermediates[key][fp][ok] = back[ok] / cover[ok]  # renormalised at the crop's edge
        info = {
            "sigma": s,
            "steps": models.steps,
            "timesteps": int(models.scheduler.num_train_timesteps),  # T of the model that ran
            "sampler": (f"ancestral (T={models.scheduler.num_train_timesteps})" if stage == "early" else
                        f"DDIM {models.steps} steps, eta 0 (T={models.scheduler.num_train_timesteps})"),
            "weights_sha256": models.sha256,
            "crop_start_model_xyz": list(crop.start),
            "crop_centre_world_mm": [round(float(v), 2) for v in centre_world],
            "support_voxels": int(sup.sum()),
            "timings_s": {"prepare": round(t_prep - t0, 3), "network": round(t_net - t_prep, 3),
                          "write_back": round(time.perf_counter() - t_net, 3)},
        }
        return out, info
