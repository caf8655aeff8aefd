"""The synthesis engine: a healthy CT + organ mask (+ tumour mask) -> CT with a synthetic tumour.

    engine = SynthesisEngine(weights_dir=None, device="auto")
    request = SynthesisRequest(organ="liver", tumor=Generated("small", 2), seed=0)  # backend.synthesis.request
    result = engine.run(request, ct, organ_mask)
    result.ct          # Volume: same geometry and dtype as ``ct``
    result.label       # uint8 (z, y, x): 0 background, 1 organ, 2 tumour
    result.tumor_mask  # bool (z, y, x)
    result.provenance  # dict: method (+ why), weights sha256, seed, stage, steps, sigma, mask params, timings
    result.unused      # the request's options that had no effect (e.g. ["sigma"] when model-based ran)
    result.intermediates  # keep_intermediates=True (diffusion): "masked", "reconstruction", "decoded" in HU

``iter_run`` is the same work as a generator yielding ``(message, done, total)`` and returning the
:class:`SynthesisResult` (for the napari progress bar); :func:`run_sync` drives it. ``synthesize`` /
``iter_synthesize`` take the request's fields as keywords (``engine.synthesize(ct, organ_mask, organ="liver",
size="small", seed=0)``). The request, the stage rule and the provenance format: docs/synthesis.md.

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
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from backend.errors import DiffTumorError
from backend.io import Geometry, Volume, check_same_grid, label_map_range
from backend.preprocess import hu_to_unit
from backend.progress import run_sync
from backend.synthesis import blend, crops, masks
from backend.synthesis.crops import (  # noqa: F401 - re-exported
    GROUP_EXTENT_MM,
    bbox_slices,
    component_diameters_mm,
    group_components,
    group_crop,
    outside_crop,
)
from backend.synthesis.ct_cache import CT_CACHE_SIZE, CTEntry, ct_key  # noqa: F401 - re-exported
from backend.synthesis.model_based import ModelBasedConfig, cast_like
from backend.synthesis.painting import Painting, mass_effect_summary, paint_model_based, push_tissue
from backend.synthesis.placement import (  # noqa: F401
    _organ_in_model_space,
    _random_joint,
    _random_setup,
    random_tumor_mask,
    random_tumor_masks,
)
from backend.synthesis.request import METHODS, Generated, OptionError, SynthesisRequest, UserMask  # noqa: F401
from backend.synthesis.stage import EARLY_MAX_DIAMETER_MM, Stage, stage_of_diameter  # noqa: F401 - re-exported

log = logging.getLogger(__name__)
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
    # the request's options that had no effect (field names of SynthesisRequest, e.g. ["sigma"]): the method
    # that ran does not read them, or no tumour needed them
    unused: list[str] = field(default_factory=list)

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
            f"{name}: does not look like a CT in Hounsfield units (organ median {organ_med:.0f}, expected -200..400 HU); "
            "MR or scaled data is not supported"
        )
    if lo > -500.0 and not -200.0 <= med <= 200.0:
        raise DiffTumorError(
            f"{name}: does not look like a CT in Hounsfield units (no air near -1000 HU, median {med:.0f}); "
            "MR or scaled data is not supported"
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


# --------------------------------------------------------------------------------------------
# the method: diffusion when the weights are there (no networks loaded to find out)
# --------------------------------------------------------------------------------------------
def planned_stages(tumor: np.ndarray, geometry: Geometry) -> list[Stage]:
    """The stage the engine gives each crop's group of tumours in a given (z, y, x) mask: early when its
    largest tumour is under 20 mm (:func:`backend.synthesis.stage.stage_of_diameter`), before any clipping."""
    spacing_zyx = geometry.spacing[::-1]
    return [stage_of_diameter(max(component_diameters_mm(g, spacing_zyx)))
            for g in group_components(np.asarray(tumor) != 0, geometry)]


def diffusion_available(weights, organ: str, stage: str) -> tuple[bool, str]:
    """(available, reason) for ``stage`` of ``organ`` in ``weights`` (a :class:`backend.weights.WeightsFolder`)."""
    from backend.weights import WEIGHT_ORGANS, weight_organ

    if weight_organ(organ) not in WEIGHT_ORGANS:
        return False, f"no diffusion weights exist for {organ} (released organs: {', '.join(WEIGHT_ORGANS)})"
    if weights.root is None:
        return False, "no weights folder found (--weights, $DIFFTUMOR_WEIGHTS or the user config)"
    miss = weights.missing(organ, stage)
    if miss:
        return False, f"weights folder {weights.root} lacks {', '.join(miss)}"
    return True, f"weights found in {weights.root} ({weights.source})"


def missing_weights(weights, model_organ: str, stages, available=None) -> tuple[Stage, str] | None:
    """The first stage of ``stages`` whose diffusion weights ``weights`` lacks, and why; None when all are there.
    ``available(organ, stage)`` -> (ok, why) replaces the folder lookup (the engine passes its own)."""
    available = available or (lambda organ, stage: diffusion_available(weights, organ, stage))
    for st in sorted({Stage.parse(s) for s in stages}, key=lambda s: s.value):
        ok, why = available(model_organ, st.value)
        if not ok:
            return st, why
    return None


def choose_method(weights, method: str, model_organ: str, stages, available=None) -> tuple[str, str]:
    """(method that runs, why): "model-based" as asked; "diffusion" needs ``model_organ``'s weights for every
    stage in ``stages`` (a user error naming the missing file otherwise); "auto" is diffusion when they are
    all there, else model-based."""
    if method == "model-based":
        return "model-based", "requested"
    available = available or (lambda organ, stage: diffusion_available(weights, organ, stage))
    missing = missing_weights(weights, model_organ, stages, available)
    if missing is None:
        found = available(model_organ, Stage.parse(next(iter(stages), Stage.EARLY)).value)[1]
        return "diffusion", ("requested; " if method == "diffusion" else "auto: ") + found
    if method == "diffusion":
        weights.require(model_organ, missing[0].value)
        raise DiffTumorError(f"diffusion: {missing[1]}")  # pragma: no cover - require() raised already
    return "model-based", "auto: " + missing[1]


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
        self._ct_cache: dict = {}  # (CT fingerprint, organ mask hash) -> CTEntry, least recently used first
        self.cache_hits = 0

    # ---------------------------------------------------------------- weights
    def diffusion_available(self, organ: str, stage: str) -> tuple[bool, str]:
        """(available, reason) for ``stage`` of ``organ``."""
        return diffusion_available(self.weights, organ, stage)

    def _autoencoder(self):
        if self._ae is None:
            from backend.vqgan.official import load_autoencoder
            from backend.weights import AE_NAME

            self._ae = load_autoencoder(self.weights.path(AE_NAME)).to(self.device).eval()
        return self._ae

    def stage_models(self, organ: str, stage: str, ddim_steps: int = 50, sampler: str = "ddim"):
        """Load (once) and return the :class:`~backend.synthesis.diffusion_crop.StageModels` for a stage."""
        from backend.diffusion.official import load_diffusion
        from backend.synthesis.diffusion_crop import StageModels, mid_late_scheduler
        from backend.weights import AE_NAME, diffusion_name, require_fit

        key = (diffusion_name(organ, stage), (ddim_steps, sampler) if stage == "mid_late" else None)
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
            scheduler = mid_late_scheduler(ck, sampler, ddim_steps, diffusion_name(organ, stage))
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
    def run(self, request: SynthesisRequest, ct: Volume, organ_mask, **kwargs) -> SynthesisResult:
        """Synthesize ``request`` into ``ct``; see :meth:`iter_run`."""
        return run_sync(self.iter_run(request, ct, organ_mask, **kwargs))

    def iter_run(self, request: SynthesisRequest, ct: Volume, organ_mask, *, existing_tumor=None,
                 organ_name: str = "organ mask", noise=None) -> Iterator[tuple[str, int, int]]:
        """Generator form of :meth:`run`, yielding ``(message, done, total)``; must not touch Qt.

        * ``request``: what to synthesize (:class:`~backend.synthesis.request.SynthesisRequest`, already checked).
        * ``organ_mask``: (z, y, x) array or Volume on the CT grid (non-zero = organ); ``organ_name`` names it
          in messages.
        * ``existing_tumor``: tumours already in the CT (e.g. label 2 of an MSD/LiTS/KiTS map). They stay
          tumour (2) in the output label, are left out of the organ for placement, blending and the organ's
          statistics, and are never painted over.
        * ``noise``: explicit diffusion noises ``[x_T, z...]`` (tests/parity), used for every crop.

        The engine decides the method (``request.method`` "auto": diffusion when the weights of
        ``request.model_organ`` are there for every stage needed), the stage of each tumour group
        (:func:`backend.synthesis.stage.stage_of`, or the generator's size class, or ``request.stage``) and
        which given options had no effect (``result.unused``); the provenance says all three.
        """
        t_start = time.perf_counter()
        rng = np.random.default_rng(request.seed)
        organ_arr, existing, cached = yield from self._checked_inputs(request, ct, organ_mask, existing_tumor,
                                                                      organ_name)
        # a generated tumour's method is known before it is drawn: diffusion keeps the release's generator,
        # model-based draws realistic shapes away from vessels (backend.synthesis.shapes)
        chosen = self._generated_method(request, rng) if isinstance(request.tumor, Generated) else None
        tumor, mask_info, class_stage = self._tumour_mask(request, ct, organ_arr, existing, rng, cached,
                                                          chosen and chosen[0])
        groups = group_components(tumor, ct.geometry)
        spacing_zyx = ct.geometry.spacing[::-1]
        diameters = [component_diameters_mm(g, spacing_zyx) for g in groups]  # per tumour, not per crop
        stages = [Stage.parse(request.stage or class_stage or stage_of_diameter(max(d))) for d in diameters]
        chosen, reason = chosen or self.choose_method(request.method, request.model_organ, stages)
        log.info("synthesis method: %s (%s)", chosen, reason)
        if chosen == "diffusion":
            self._fit_to_crops(request, ct.geometry, tumor, groups, diameters, mask_info)
        state = Painting(ct.array.copy(), rng, noise,
                         ({k: ct.array.astype(np.float32) for k in INTERMEDIATES}
                          if request.keep_intermediates and chosen == "diffusion" else None),
                         organ=organ_arr.copy(), tumor=np.zeros(tumor.shape, bool), fixed=existing)
        crops_info = yield from self._paint(request, chosen, ct.geometry, groups, stages, diameters, state)
        out, tumor = state.out, state.tumor  # the organ and earlier tumours moved with any mass effect
        label = np.zeros(ct.array.shape, np.uint8)
        label[state.organ] = 1
        if existing is not None:
            out[existing] = ct.array[existing]  # a blend's soft edge never reaches into a real tumour
            label[existing] = 2
            mask_info["existing_tumour_voxels"] = int(existing.sum())
        label[tumor] = 2
        prov = self._provenance(request, chosen, reason, mask_info, crops_info, diameters, t_start)
        yield "done", 1, 1
        return SynthesisResult(Volume(out, ct.geometry, getattr(ct, "path", None)), label, tumor, prov,
                               state.intermediates or {}, request.unused(chosen, stages))

    def synthesize(self, ct: Volume, organ_mask, tumor_mask=None, **kwargs) -> SynthesisResult:
        """Keyword form of :meth:`run` (see :meth:`iter_synthesize`)."""
        return run_sync(self.iter_synthesize(ct, organ_mask, tumor_mask, **kwargs))

    def iter_synthesize(self, ct: Volume, organ_mask, tumor_mask=None, *, organ: str, size: str | None = None,
                        count: int | None = None, tumor_name: str = "tumor mask", organ_name: str = "organ mask",
                        existing_tumor=None, noise=None, **options) -> Iterator[tuple[str, int, int]]:
        """:meth:`iter_run` with the request given as keywords: ``tumor_mask`` (array or Volume; None draws
        tumours with the release's generator, ``size``/``count``), and any other
        :class:`~backend.synthesis.request.SynthesisRequest` field (``method``, ``seed``, ``stage``, ``sigma``,
        ``ddim_steps``, ``pancreas_blend``, ``keep_intermediates``, ``weights_organ``)."""
        tumor = Generated(size, count) if tumor_mask is None else UserMask(tumor_mask, tumor_name)
        request = SynthesisRequest(organ=organ, tumor=tumor, **options)
        return (yield from self.iter_run(request, ct, organ_mask, existing_tumor=existing_tumor,
                                         organ_name=organ_name, noise=noise))

    def choose_method(self, method: str, model_organ: str, stages) -> tuple[str, str]:
        """(method that runs, why); see :func:`choose_method`."""
        return choose_method(self.weights, method, model_organ, stages, self.diffusion_available)

    # ---------------------------------------------------------------- the steps of iter_run
    def _checked_inputs(self, request, ct: Volume, organ_mask, existing_tumor, organ_name: str):
        """(organ mask without the existing tumours, existing tumour mask or None, the CT's cache entry), after the
        checks of the CT and the organ."""
        existing = None
        if existing_tumor is not None:
            existing = _as_mask(existing_tumor, ct, "existing tumour mask")
            organ_mask = _as_mask(organ_mask, ct, organ_name) & ~existing  # the healthy organ
        cached, organ_arr = self._ct_entry(ct, organ_mask, organ_name)
        if not organ_arr.any():
            raise DiffTumorError(f"{organ_name}: the organ '{request.organ}' is absent (no voxel)")
        if not cached.checked:
            check_ct_like(ct, organ_arr, ct.name if ct.name else "CT")
            cached.checked = True
        yield "checked the input", 0, 1
        return organ_arr, existing, cached

    def _generated_method(self, request, rng) -> tuple[str, str]:
        """(method, why) for a generated tumour, from its size class's stage (a ``size`` None is peeked from a
        copy of ``rng``: the release's draw that follows is unchanged)."""
        import copy

        size = request.tumor.size or masks.sample_size_class(copy.deepcopy(rng))
        stage = Stage.parse(request.stage or masks.SIZE_CLASSES[size].stage)
        return self.choose_method(request.method, request.model_organ, [stage])

    def _tumour_mask(self, request, ct: Volume, organ_arr, existing, rng, cached,
                     method: str | None = None) -> tuple[np.ndarray, dict, str | None]:
        """(tumour mask (z, y, x), its provenance entry, the generator's stage or None) from ``request.tumor``;
        a generated one by the release's generator (``method`` "diffusion") or realistic shapes (model-based)."""
        source = request.tumor
        if isinstance(source, Generated) and method == "model-based":
            from backend.synthesis.shapes import random_tumors

            tumor, infos = random_tumors(ct.array, organ_arr, ct.geometry.spacing[::-1], rng, size=source.size,
                                         count=source.count, organ_name=request.organ, avoid=existing,
                                         phase=request.phase or "auto")
            for t in infos:  # the centre as for the release's tumours: an (x, y, z) index and world mm (LPS)
                t["centre_voxel_xyz"] = [int(v) for v in t.pop("centre_voxel")[::-1]]
                t["centre_world_mm"] = [round(float(v), 2) for v in ct.geometry.voxel_to_world(t["centre_voxel_xyz"])]
            info = {"source": "generated (realistic model-based shapes, backend.synthesis.shapes)",
                    "count_requested": source.count, "count_placed": len(infos), "tumours": infos}
            return tumor & ~existing if existing is not None else tumor, info, masks.SIZE_CLASSES[infos[0]["size"]].stage
        if isinstance(source, Generated):
            tumor, params = self._generate(ct, organ_arr, request.organ, source.size, source.count, rng, cached)
            info = {"source": "generated (release generator)", "count_requested": source.count,  # None: the class's range
                    "count_placed": len(params), "tumours": [p.to_dict() for p in params]}
            return tumor & ~existing if existing is not None else tumor, info, masks.SIZE_CLASSES[params[0].size].stage
        if isinstance(source, UserMask):
            raw, entry = _as_mask(source.mask, ct, source.label), source.entry()
        else:  # Ellipsoid
            raw, entry = source.build(ct.geometry, request.seed)
        if existing is not None:
            if raw.any() and not (raw & ~existing).any():
                raise DiffTumorError(f"{source.label}: lies entirely on the tumours already in the organ labels")
            raw = raw & ~existing  # a real tumour is never painted over
        tumor = masks.validate_tumor_mask(raw, organ_arr, name=source.label)
        info = {"source": "user", "voxels": int(tumor.sum()), "volume_ml": float(tumor.sum() * ct.geometry.voxel_volume_ml)}
        info.update(entry)
        return tumor, info, None

    @staticmethod
    def _fit_to_crops(request, geometry: Geometry, tumor, groups, diameters, mask_info: dict) -> None:
        """Every tumour voxel must lie in its 96 mm crop, or it would be labelled but never painted: a given
        mask that does not fit is refused, a generated tumour is cut to its crop (as the release's crops cut it)."""
        spacing_zyx = geometry.spacing[::-1]
        for i, g in enumerate(groups):
            outside = outside_crop(geometry, g)
            if not outside.any():
                continue
            if not isinstance(request.tumor, Generated):
                raise DiffTumorError(
                    f"{request.tumor.label}: a tumour {max(diameters[i]):.0f} mm across does not fit the diffusion "
                    f"model's {crops.CROP} mm crop ({int(outside.sum())} of its {int(g.sum())} voxels would be "
                    f"labelled tumour with the CT unchanged); make it smaller or use method model-based")
            g &= ~outside
            tumor &= ~outside
            mask_info["clipped_to_crop_voxels"] = mask_info.get("clipped_to_crop_voxels", 0) + int(outside.sum())
            diameters[i] = component_diameters_mm(g, spacing_zyx)

    def _paint(self, request, chosen: str, geometry: Geometry, groups, stages, diameters, state: Painting):
        """Paint every tumour group into ``state.out``; yields progress, returns one provenance entry per crop."""
        crops_info, n = [], len(groups)
        for i, (g, st, diam) in enumerate(zip(groups, stages, diameters)):
            t0 = time.perf_counter()
            if chosen == "model-based":
                info = paint_model_based(state, geometry.spacing[::-1], g, request, self.model_based_config)
                yield f"model-based tumour {i + 1}/{n}", i + 1, n
            else:
                pushed = push_tissue(state, geometry.spacing[::-1], g, request.mass_effect_mode("diffusion"))
                sub = self._diffuse_group(state.out, geometry, state.organ, g, organ=request.organ,
                                          model_organ=request.model_organ, stage=st.value,
                                          sigma=request.sigma, rng=state.rng, seed=request.seed, index=i,
                                          ddim_steps=request.steps, sampler=request.sampler_name,
                                          pancreas_blend=request.pancreas_blend,
                                          noise=state.noise, intermediates=state.intermediates)
                while True:
                    try:
                        msg, done, total = next(sub)
                    except StopIteration as stop:
                        state.out, info = stop.value
                        break
                    yield f"tumour {i + 1}/{n}: {msg}", i * total + done, n * total
                state.tumor |= g
                info["mass_effect"] = pushed
            info.update(stage=st.value if chosen == "diffusion" else None,
                        seconds=round(time.perf_counter() - t0, 3), tumours=len(diam),
                        diameter_mm=round(max(diam), 2), diameters_mm=[round(d, 2) for d in diam])
            crops_info.append(info)
        return crops_info

    def _provenance(self, request, chosen: str, reason: str, mask_info: dict, crops_info, diameters, t_start) -> dict:
        from backend import __version__

        sha: dict = {}
        for c in crops_info:
            sha.update(c.get("weights_sha256") or {})
        return {
            "method": chosen,
            "method_reason": reason,
            "organ": request.organ,
            "weights_organ": request.model_organ if chosen == "diffusion" else None,
            "seed": int(request.seed),
            "version": __version__,
            "device": str(self.device),
            "mask": mask_info,
            "n_tumours": int(sum(len(d) for d in diameters)),
            "tumours": crops_info,  # one entry per crop (tumours close together share a crop)
            "mass_effect": mass_effect_summary(request, chosen, crops_info),
            "weights_sha256": sha,  # every weight file used, by name (empty for the model-based method)
            "seconds": round(time.perf_counter() - t_start, 3),
        }

    # ---------------------------------------------------------------- helpers
    def _generate(self, ct: Volume, organ_arr: np.ndarray, organ: str, size, count, rng, cached: CTEntry):
        setup = _random_setup(ct, organ_arr, organ, size, count, rng)
        return _random_joint(*setup, count, prepared=lambda sz: cached.organ_model(ct.geometry, organ_arr, sz))

    def _ct_entry(self, ct: Volume, organ_mask, organ_name: str) -> tuple[CTEntry, np.ndarray]:
        """The per-CT cache entry (checked CT, prepared organ mask) for a repeated call on the same CT."""
        key = ct_key(ct)
        organ_arr = _as_mask(organ_mask, ct, organ_name)
        okey = (key, organ_arr.shape, hashlib.blake2b(np.packbits(organ_arr).tobytes(), digest_size=16).hexdigest())
        entry = self._ct_cache.get(okey)
        if entry is None:
            entry = CTEntry(checked=False)
            self._ct_cache[okey] = entry
            while len(self._ct_cache) > CT_CACHE_SIZE:
                self._ct_cache.pop(next(iter(self._ct_cache)))
        else:
            self._ct_cache[okey] = self._ct_cache.pop(okey)  # most recently used last
            self.cache_hits += 1
        return entry, organ_arr

    def _diffuse_group(self, out, geometry: Geometry, organ_arr, group, *, organ, stage, sigma, rng, seed, index,
                       ddim_steps, pancreas_blend, noise, intermediates=None, model_organ=None, sampler="ddim"):
        import torch

        from backend.device import oom_guard, reuse_freed_memory
        from backend.synthesis.diffusion_crop import iter_synthesize_crop, reconstruct_crop, sampler_label

        t0 = time.perf_counter()
        models = self.stage_models(model_organ or organ, stage, ddim_steps, sampler)
        crop, centre_world = group_crop(geometry, group)
        inside = crop.inside()
        hu = crops.crop_from(out, geometry, crop, nearest=False, pad=blend.HU_LOW - 1000.0)  # float32 (X, Y, Z)
        m = crops.crop_from(group, geometry, crop, nearest=True, pad=0).astype(np.float32)
        if not m.any():
            raise DiffTumorError("tumor mask: a tumour component is thinner than the model's 1 mm grid can hold")
        x = hu_to_unit(hu, "[-1,1]")
        blended = blend.uses_blend(organ, pancreas_blend)
        if blended:
            s = float(sigma) if sigma is not None else blend.draw_sigma(rng)
            m_blur = blend.blur_mask(m, s) * inside
            box = bbox_slices(m_blur > 0, (0, 0, 0))  # only the blend support needs decoded values
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
            "sampler": sampler_label(models),
            "weights_sha256": models.sha256,
            "crop_start_model_xyz": list(crop.start),
            "crop_centre_world_mm": [round(float(v), 2) for v in centre_world],
            "support_voxels": int(sup.sum()),
            "timings_s": {"prepare": round(t_prep - t0, 3), "network": round(t_net - t_prep, 3),
                          "write_back": round(time.perf_counter() - t_net, 3)},
        }
        return out, info
