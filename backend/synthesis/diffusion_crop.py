"""Diffusion synthesis of one 96³ crop, as released (official_pipeline.md §2.2, §2.3, §3).

Input: a crop in the crop layout (X, Y, Z), values in [-1, 1], and its 0/1 tumour mask. The crop is
permuted to the official layout (1, 1, Z, X, Y); the masked volume (tumour set to 0) is encoded by
the standalone autoencoder, normalised with the codebook's global min/max, and concatenated with the
nearest-resized mask code (9 channels). Then:

* **early** (T = 4 model): ancestral sampling, x̂₀ clamped, decoded (re-quantised) with the VQGAN
  embedded in ``{organ}_early.pt``;
* **mid_late** (T = 200 model): DDIM, 50 steps, η = 0, decoded with the standalone autoencoder; or, opt-in
  (``SynthesisRequest.sampler = "dpm++"``), DPM-Solver++(2M) on the same model (15 steps by default).

Randomness comes from ``noise`` (``[x_T, z_{T-1}, …]`` as in :class:`~backend.diffusion.inferer.DiffusionInferer`)
or a ``torch.Generator``; noise is drawn on the CPU so a seed gives the same tumour on any device.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class StageModels:
    """What one stage needs: encoder AE, denoiser, scheduler, decoder AE (+ file sha256 for provenance)."""

    stage: str
    autoencoder: torch.nn.Module  # encodes the masked crop (standalone AutoencoderModel.ckpt)
    unet: torch.nn.Module
    scheduler: object  # DDPMScheduler (early) or DDIMScheduler (mid_late)
    decoder: torch.nn.Module  # early: the .pt's embedded VQGAN (or the AE when identical); mid_late: the AE
    sha256: dict
    steps: int


SAMPLERS = ("ddim", "dpm++")  # mid/late tumours: the release's DDIM (default) or DPM-Solver++(2M) (opt-in)


def mid_late_scheduler(ck, sampler: str, steps: int, name: str):
    """The sampler of a T-step mid/late model ``ck`` (:class:`~backend.diffusion.official.DiffusionCheckpoint`):
    ``"ddim"`` is the release's DDIM (eta 0), ``"dpm++"`` DPM-Solver++(2M) on the log-SNR grid; ``steps`` out of
    range is an :class:`~backend.synthesis.request.OptionError` naming the file ``name`` and what it allows."""
    from backend.diffusion.dpm_solver import dpm_solver_max_steps
    from backend.synthesis.request import OptionError

    if sampler not in SAMPLERS:
        raise OptionError("sampler", sampler, f"choose one of {', '.join(SAMPLERS)}")
    most = ck.timesteps if sampler == "ddim" else dpm_solver_max_steps(ck.timesteps)  # one step per timestep
    if not 1 <= int(steps) <= most:
        how = "" if sampler == "ddim" else " (DPM-Solver++ calls the network at most once per timestep below the top)"
        raise OptionError("ddim_steps", steps, f"{name} was trained with T = {ck.timesteps} steps; give 1 to {most}"
                          + how, label=None if sampler == "ddim" else "DPM-Solver++ steps")
    if sampler == "ddim":
        return ck.ddim_scheduler(int(steps))
    return ck.dpm_solver_scheduler(int(steps))


def sampler_label(models: StageModels) -> str:
    """How a stage samples, for the provenance: ``DDIM 50 steps, eta 0 (T=200)``."""
    from backend.diffusion.dpm_solver import DPMSolverMultistepScheduler

    sched = models.scheduler
    T = sched.num_train_timesteps
    if models.stage == "early":
        return f"ancestral (T={T})"
    if isinstance(sched, DPMSolverMultistepScheduler):
        return f"DPM-Solver++(2M) {models.steps} steps, {sched.spacing} grid (T={T})"
    return f"DDIM {models.steps} steps, eta 0 (T={T})"


def _draw_noise(shape, n: int, generator: torch.Generator) -> list[torch.Tensor]:
    return [torch.randn(shape, generator=generator, dtype=torch.float32) for _ in range(n)]


def iter_synthesize_crop(
    x_xyz: np.ndarray,
    mask_xyz: np.ndarray,
    models: StageModels,
    *,
    device: torch.device,
    noise=None,
    generator: torch.Generator | None = None,
    region: tuple[slice, slice, slice] | None = None,
) -> Iterator[tuple[str, int, int]]:
    """Yields ``(message, done, total)`` per network step; returns the decoded crop (X, Y, Z) float32.

    With ``region`` (three slices of the crop's X, Y, Z) only that box is decoded and returned (the
    blend support: a fifth of the decoder's work is skipped, same values; see ``Decoder.forward``).
    """
    from backend.diffusion.inferer import DiffusionInferer, decode_latent, encode_condition

    total = models.steps + 2
    with torch.inference_mode():
        vol = torch.from_numpy(np.ascontiguousarray(x_xyz, dtype=np.float32))[None, None].permute(0, 1, 4, 2, 3)
        m = torch.from_numpy(np.ascontiguousarray(mask_xyz, dtype=np.float32))[None, None].permute(0, 1, 4, 2, 3)
        vol, m = vol.to(device), m.to(device)  # (1, 1, Z, X, Y)
        cond = encode_condition(models.autoencoder, vol, m)  # (1, 9, z, x, y)
        yield "encoded", 1, total
        if noise is None:
            lat_shape = (1, cond.shape[1] - 1, *cond.shape[2:])
            n_draws = 1 + (models.steps - 1 if models.stage == "early" else 0)
            noise = _draw_noise(lat_shape, n_draws, generator if generator is not None else torch.Generator().manual_seed(0))
        noise = [n.to(device) for n in (noise if isinstance(noise, (list, tuple)) else list(noise.unbind(0)))]
        inferer = DiffusionInferer(models.scheduler)
        it = inferer.iter_sample(models.unet, cond, noise=noise, generator=None)
        while True:
            try:
                done, _ = next(it)
            except StopIteration as stop:
                latent = stop.value
                break
            yield f"{models.stage} step {done}/{models.steps}", 1 + done, total
        region_zxy = None if region is None else (region[2], region[0], region[1])
        decoded = decode_latent(models.decoder, latent, region=region_zxy)  # (1, 1, Z, X, Y)
        yield "decoded", total, total
        return decoded[0, 0].permute(1, 2, 0).float().cpu().numpy()  # (X, Y, Z)




def reconstruct_crop(x_xyz: np.ndarray, autoencoder: torch.nn.Module, *, device: torch.device) -> np.ndarray:
    """decode(quantize(encode(x))) of a crop (X, Y, Z) in [-1, 1]: the autoencoder's round trip, (X, Y, Z) float32."""
    with torch.inference_mode():
        vol = torch.from_numpy(np.ascontiguousarray(x_xyz, dtype=np.float32))[None, None].permute(0, 1, 4, 2, 3)
        rec = autoencoder.decode(autoencoder.encode(vol.to(device)), quantize=True)  # (1, 1, Z, X, Y)
        return rec[0, 0].permute(1, 2, 0).float().cpu().numpy()


# --------------------------------------------------------------------------------------------
# stage 3: a whole training crop, from a request
# --------------------------------------------------------------------------------------------
def synthesize_training_crop(request, image01: np.ndarray, organ: np.ndarray, *, engine=None, label=None):
    """Stage 3 (on-the-fly synthesis): draw ``request.tumor`` (a :class:`~backend.synthesis.request.Generated`
    size class) inside the organ of a model-space crop and paint it, as the release's training loop does.

    ``image01``: (X, Y, Z) in [0, 1] (HU window [-175, 250], RAS, 1 mm); ``organ``: bool, same shape;
    ``label``: the crop's label map (any integer array, same shape) or None.
    ``request.method`` "model-based" needs no ``engine``; "diffusion" uses the networks of ``engine`` (a
    :class:`~backend.synthesis.engine.SynthesisEngine`, or a function returning one, called only once a tumour
    was drawn) for the
    stage of the size class (tiny/small early, medium/large mid/late; ``request.stage`` overrides it), the
    release's blend (``request.sigma``, default U(0, 4)) or, for the pancreas, the whole crop replaced.
    ``request.mass_effect`` (:meth:`~backend.synthesis.request.SynthesisRequest.mass_effect_mode`: "auto" is on
    for model-based tumours of 20 mm and more, off for diffusion) first pushes the tissue aside
    (:func:`backend.synthesis.mass_effect.warp_crop`); ``label`` moves with it (nearest neighbour).
    Returns ``(new crop (X, Y, Z) float32 in [0, 1], tumour mask, label moved with the tissue or None)``, or
    ``None`` when the crop holds too little organ for a tumour of that size (no tumour this draw).
    """
    from backend.errors import DiffTumorError
    from backend.synthesis import blend
    from backend.synthesis.masks import SIZE_CLASSES, generate_tumor_mask
    from backend.synthesis.stage import Stage

    rng = np.random.default_rng(request.seed)
    size = request.tumor.size
    try:
        tumor, _ = generate_tumor_mask(organ, request.organ, size=size, rng=rng)
    except DiffTumorError:  # the crop holds too little organ for this size: no tumour in this draw
        return None
    if request.method == "model-based":
        from backend.synthesis.model_based import model_based_tumor

        hu = blend.from_01(image01)
        res = model_based_tumor(hu, (1.0, 1.0, 1.0), organ, tumor, rng=rng, organ=request.organ,
                                phase=request.phase or "auto", mass_effect=request.mass_effect_mode("model-based"),
                                labels=[label] if label is not None else [])
        out = np.array(image01, dtype=np.float32, copy=True)
        out[res.support] = blend.hu_to_01(res.ct[res.support])  # voxels outside the support stay bit-identical
        return out, tumor, (res.labels[0] if label is not None else None)
    from backend.progress import run_sync
    from backend.synthesis.mass_effect import warp_crop

    # the warped crop is the model's context and the blend's background; the label (else the organ) moves with it
    image01, moved, _, _ = warp_crop(image01, organ if label is None else label, tumor, intensity="01",
                                     mode=request.mass_effect_mode("diffusion"))
    label = None if label is None else moved
    engine = engine() if callable(engine) else engine
    stage = Stage.parse(request.stage or SIZE_CLASSES[size].stage)
    models = engine.stage_models(request.model_organ, stage.value, request.steps, request.sampler_name)
    m = tumor.astype(np.float32)
    gen = torch.Generator().manual_seed(int(request.seed))
    # the latent U-Net needs x, y multiples of 32 and z of 4 (96^3 in the release); a training crop of
    # another size (e.g. 48^3) is edge-padded for the network, as the release pads crops at the CT's
    # borders, and the decoded crop is cut back to the training crop
    pad = [(0, -n % k) for n, k in zip(image01.shape, (32, 32, 4))]
    decoded = run_sync(iter_synthesize_crop(np.pad(image01 * 2.0 - 1.0, pad, mode="edge"), np.pad(m, pad), models,
                                            device=engine.device, generator=gen))[tuple(slice(0, n) for n in image01.shape)]
    if blend.uses_blend(request.organ, request.pancreas_blend):
        sigma = float(request.sigma) if request.sigma is not None else blend.draw_sigma(rng)
        return blend.blend01(image01, blend.blur_mask(m, sigma), decoded), tumor, label
    return ((decoded + 1.0) / 2.0).astype(np.float32), tumor, label  # pancreas, as released: the whole crop
