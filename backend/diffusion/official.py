"""Reading and writing diffusion checkpoints in the released layout (``{organ}_{early,noearly}.pt``).

A released file is a plain dict ``{"step", "model", "ema", "scaler"}``; ``model``/``ema`` hold 466
entries: the 12 schedule buffers, 300 ``denoise_fn.*`` (the :class:`~backend.diffusion.unet.Unet3D`) and
154 ``vqgan.*`` (a full copy of the autoencoder). The ``ema`` weights are the ones to use. Files written
by ``difftumor train diffusion`` have the same layout plus a ``difftumor`` entry with the model arguments,
so they work wherever the released files do (and the released loader ignores the extra entry).

Loading is safe (``torch.load(weights_only=True)``), CPU-mapped (the released tensors are tagged
``cuda:0``) and strict on the denoiser; every problem is one :class:`DiffTumorError` line.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

import torch

from backend.diffusion.ddim import DDIMScheduler
from backend.diffusion.ddpm import DDPMScheduler
from backend.diffusion.dpm_solver import DPMSolverMultistepScheduler
from backend.diffusion.schedule import SCHEDULE_BUFFER_NAMES, schedule_mismatch, timesteps_of
from backend.diffusion.unet import Unet3D, Unet3DConfig
from backend.errors import DiffTumorError, load_failure_cause
from backend.io import atomic_write

UNET_PREFIX = "denoise_fn."
VQGAN_PREFIX = "vqgan."
VQGAN_KEY_COUNT = 154  # full released VQGAN state dict (inference part + discriminators + LPIPS)
WHAT = "not a DiffTumor diffusion checkpoint"
GIVE = ("give a released {organ}_{early,noearly}.pt ('difftumor weights fetch') or the {organ}_{stage}.pt that "
        "'difftumor train diffusion' writes")


def _keys(mapping: Mapping, n: int = 8) -> str:
    keys = [str(k) for k in mapping]
    return ", ".join(keys[:n]) + (f", ... ({len(keys)} in all)" if len(keys) > n else "") if keys else "none"


class DiffusionCheckpoint(NamedTuple):
    """A loaded diffusion file; unpacks as ``(unet, timesteps, vqgan_state)``."""

    unet: Unet3D  # in eval mode
    timesteps: int  # T: 4 for early tumours, 200 for mid/late in the release
    vqgan_state: dict[str, torch.Tensor] | None  # embedded autoencoder (prefix stripped), None if absent
    schedule: dict[str, torch.Tensor]  # the 12 stored schedule buffers
    step: int | None
    path: Path
    meta: Mapping | None = None  # our ``difftumor`` record (stage, timesteps, autoencoder, unet), None in release files

    def autoencoder(self, reference=None):
        """The VQGAN to decode this model's samples with (released: early tumours use the embedded copy).

        Returns ``reference`` itself when the embedded weights equal it, so only one autoencoder stays in
        memory; otherwise the embedded copy is built. Afterwards drop the raw tensors with
        ``ckpt = ckpt._replace(vqgan_state=None)``.
        """
        if self.vqgan_state is None:
            if reference is None:
                raise DiffTumorError(f"{self.path}: holds no autoencoder; give the standalone AutoencoderModel.ckpt")
            return reference
        if reference is not None and same_state(self.vqgan_state, reference):
            return reference
        from backend.vqgan.official import load_autoencoder

        return load_autoencoder(self.path)

    def ddpm_scheduler(self, **kwargs) -> DDPMScheduler:
        """Ancestral sampler over this model's T steps (released early-tumour sampler)."""
        return DDPMScheduler(self.timesteps, **kwargs)

    def ddim_scheduler(self, num_inference_steps: int = 50, *, eta: float = 0.0, **kwargs) -> DDIMScheduler:
        """DDIM sampler (released mid/late-tumour sampler: 50 steps, eta 0)."""
        return DDIMScheduler(self.timesteps, num_inference_steps=num_inference_steps, eta=eta, **kwargs)

    def dpm_solver_scheduler(self, num_inference_steps: int = 15, **kwargs) -> DPMSolverMultistepScheduler:
        """DPM-Solver++(2M) over this model's schedule: an opt-in fast sampler (not in the release)."""
        return DPMSolverMultistepScheduler(self.timesteps, num_inference_steps=num_inference_steps, **kwargs)


def _config_from_state(sd: Mapping[str, torch.Tensor], stored: Mapping | None) -> Unet3DConfig:
    """Model arguments: stored ones when the file has them, else inferred from the tensor shapes."""
    if stored:
        return Unet3DConfig(**stored)
    init = sd["init_conv.weight"]  # (dim, channels, 1, k, k)
    dim, channels, kernel = init.shape[0], init.shape[1], init.shape[-1]
    mults = []
    i = 0
    while f"downs.{i}.0.block1.proj.weight" in sd:
        mults.append(sd[f"downs.{i}.0.block1.proj.weight"].shape[0] // dim)
        i += 1
    heads = sd["time_rel_pos_bias.relative_attention_bias.weight"].shape[1]
    buckets = sd["time_rel_pos_bias.relative_attention_bias.weight"].shape[0]
    dim_head = sd["init_temporal_attn.fn.fn.fn.to_qkv.weight"].shape[0] // 3 // heads
    rotary = sd["init_temporal_attn.fn.fn.fn.rotary_emb.freqs"].shape[0] * 2
    return Unet3DConfig(
        dim=dim,
        dim_mults=tuple(mults),
        channels=channels,
        out_dim=sd["final_conv.1.weight"].shape[0],
        attn_heads=heads,
        attn_dim_head=dim_head,
        init_kernel_size=kernel,
        use_sparse_linear_attn="downs.0.2.fn.fn.to_qkv.weight" in sd,
        rel_pos_buckets=buckets,
        rotary_dim=rotary,
    )


def load_diffusion(
    path: str | os.PathLike,
    *,
    use_ema: bool = True,
    timesteps: int | None = None,
    latent_channels: int | None = None,
) -> DiffusionCheckpoint:
    """Load a released-layout diffusion file strictly and safely.

    ``timesteps`` / ``latent_channels``, when given, are what the caller expects (e.g. 4 for an early
    model, 8 for the official autoencoder); a file that disagrees is rejected with one clear line.
    """
    path = Path(path)
    if not path.is_file():
        raise DiffTumorError(f"{path}: diffusion checkpoint not found (no such file); {GIVE}")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is a user error here
        raise DiffTumorError(f"{path}: not a readable diffusion checkpoint ({load_failure_cause(exc)}); download it "
                             "again ('difftumor weights fetch --force') or save it again from its training run") from None
    which = "ema" if use_ema else "model"
    if not isinstance(blob, Mapping):
        raise DiffTumorError(f"{path}: {WHAT}: it holds a {type(blob).__name__}, not a dict of weights; {GIVE}")
    if str(blob.get("format", "")).startswith("difftumor-checkpoint") and blob.get("stage"):
        stage = blob.get("stage")
        instead = ("use the {organ}_{stage}.pt its run wrote next to it" if stage == "diffusion" else GIVE)
        raise DiffTumorError(f"{path}: is a {stage} training checkpoint (what --resume reads), not a diffusion model "
                             f"file; {instead}")
    if not isinstance(blob.get(which), Mapping):
        held = (f"its '{which}' entry is a {type(blob[which]).__name__}, not a dict of named weights" if which in blob
                else f"it has no '{which}' weights (keys found: {_keys(blob)})")
        raise DiffTumorError(f"{path}: {WHAT}: {held}; {GIVE}")
    state: Mapping[str, torch.Tensor] = blob[which]

    schedule = {k: state[k] for k in SCHEDULE_BUFFER_NAMES if k in state}
    problem = schedule_mismatch(schedule)
    if problem:
        raise DiffTumorError(f"{path}: {WHAT}: its noise schedule is not the release's cosine schedule ({problem}), "
                             f"so it cannot be sampled here; {GIVE}")
    T = timesteps_of(schedule)
    if timesteps is not None and T != timesteps:
        raise DiffTumorError(f"{path}: model has T = {T} diffusion steps, expected T = {timesteps} (the release's "
                             "early model has T = 4, its mid/late model T = 200); give the file for the other stage")

    unet_sd = {k[len(UNET_PREFIX):]: v for k, v in state.items() if k.startswith(UNET_PREFIX)}
    vq_sd = {k[len(VQGAN_PREFIX):]: v for k, v in state.items() if k.startswith(VQGAN_PREFIX)}
    other = [k for k in state if k not in schedule and not k.startswith((UNET_PREFIX, VQGAN_PREFIX))]
    if other:
        raise DiffTumorError(f"{path}: {WHAT}: its '{which}' weights hold entries that are neither the denoiser's "
                             f"('{UNET_PREFIX}*'), its autoencoder's ('{VQGAN_PREFIX}*') nor the schedule "
                             f"({', '.join(other[:5])}); {GIVE}")
    if not unet_sd:
        raise DiffTumorError(f"{path}: {WHAT}: its '{which}' weights hold no denoiser (no '{UNET_PREFIX}*' entries; "
                             f"keys found: {_keys(state)}); {GIVE}")
    stored_cfg = blob.get("difftumor", {}).get("unet") if isinstance(blob.get("difftumor"), Mapping) else None
    try:
        cfg = _config_from_state(unet_sd, stored_cfg)
    except (KeyError, ValueError, TypeError) as exc:
        raise DiffTumorError(f"{path}: {WHAT}, or a damaged one: the denoiser's architecture cannot be read from it "
                             f"({type(exc).__name__}: {exc}); {GIVE}") from None
    if latent_channels is not None and (cfg.out_dim != latent_channels or cfg.channels != 2 * latent_channels + 1):
        raise DiffTumorError(
            f"{path}: denoiser has {cfg.channels} input / {cfg.out_dim} output channels, expected "
            f"{2 * latent_channels + 1} / {latent_channels} for a {latent_channels}-channel autoencoder; use it with "
            "the autoencoder it was trained with"
        )
    unet = Unet3D(cfg)
    result = unet.load_state_dict(unet_sd, strict=False)
    if result.missing_keys or result.unexpected_keys:
        bad = (result.missing_keys + result.unexpected_keys)[:3]
        raise DiffTumorError(
            f"{path}: {WHAT}, or a damaged one: its denoiser weights do not fit the 3D U-Net their shapes describe "
            f"({len(result.missing_keys)} missing, {len(result.unexpected_keys)} unexpected, e.g. {', '.join(bad)}); {GIVE}"
        )
    if vq_sd and len(vq_sd) != VQGAN_KEY_COUNT and "codebook.embeddings" not in vq_sd:
        raise DiffTumorError(f"{path}: damaged: its embedded autoencoder copy ('{VQGAN_PREFIX}*') has {len(vq_sd)} "
                             "entries and no codebook; download it again or save it again from its training run")
    step = blob.get("step")
    return DiffusionCheckpoint(
        unet=unet.eval(),
        timesteps=T,
        vqgan_state=vq_sd or None,
        schedule={k: v.clone() for k, v in schedule.items()},
        step=int(step) if isinstance(step, int) else None,
        path=path,
        meta=dict(blob["difftumor"]) if isinstance(blob.get("difftumor"), Mapping) else None,
    )


def same_state(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor] | torch.nn.Module) -> bool:
    """True when ``b`` (a state dict or module) holds exactly the tensors of ``a`` for every key of ``b``.

    Use it to keep one autoencoder in memory when a diffusion file embeds the standalone weights:
    ``same_state(ckpt.vqgan_state, vqgan)`` compares the module's full state dict key by key.
    """
    other = b.state_dict() if isinstance(b, torch.nn.Module) else b
    if not other or any(k not in a for k in other):
        return False
    for k, v in other.items():
        w = a[k]
        if w.shape != v.shape or w.dtype != v.dtype or not torch.equal(w.cpu(), v.detach().cpu()):
            return False
    return True


def official_state_dict(unet: Unet3D, scheduler, vqgan_state: Mapping[str, torch.Tensor] | None) -> OrderedDict:
    """A released-layout GaussianDiffusion state dict: schedule buffers, ``denoise_fn.*``, ``vqgan.*``."""
    sd: OrderedDict[str, torch.Tensor] = OrderedDict()
    for name in SCHEDULE_BUFFER_NAMES:
        sd[name] = getattr(scheduler, name).detach().cpu().clone()
    for k, v in unet.state_dict().items():
        sd[UNET_PREFIX + k] = v.detach().cpu().clone()
    for k, v in (vqgan_state or {}).items():
        sd[VQGAN_PREFIX + k] = v.detach().cpu().clone()
    return sd


def save_official(
    path: str | os.PathLike,
    *,
    model: Unet3D,
    ema: Unet3D,
    scheduler,
    vqgan_state: Mapping[str, torch.Tensor] | None,
    step: int,
    extra: Mapping | None = None,
) -> Path:
    """Write ``{step, model, ema, scaler, difftumor}`` atomically in the released layout."""
    path = Path(path)
    blob = {
        "step": int(step),
        "model": official_state_dict(model, scheduler, vqgan_state),
        "ema": official_state_dict(ema, scheduler, vqgan_state),
        "scaler": {},
        "difftumor": {"unet": ema.config.to_dict(), "timesteps": scheduler.num_train_timesteps, **(extra or {})},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as tmp:
        torch.save(blob, tmp)
    return path
