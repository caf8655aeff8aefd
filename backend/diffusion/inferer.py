"""The inferer joins network, scheduler and autoencoder (MONAI ``LatentDiffusionInferer`` style).

* Calling :class:`DiffusionInferer` runs the training forward pass (noise a clean latent at random t,
  predict, return the loss); :meth:`DiffusionInferer.sample` / :meth:`iter_sample` run the reverse loop
  with whatever scheduler is given (ancestral DDPM or DDIM).
* :func:`normalize_latent` / :func:`denormalize_latent` map latents with the codebook's global min/max
  (official_pipeline.md section 3.3), :func:`mask_code` / :func:`build_condition` assemble the 9-channel
  condition, and :func:`encode_condition` / :func:`decode_latent` talk to the stage-1 autoencoder.

All tensors here are in the official permuted layout (B, C, Z, X, Y): the slice axis Z is the frame axis.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Literal, get_args

import torch
import torch.nn.functional as F

from backend.diffusion.schedule import NoiseScheduler

LossType = Literal["l1", "l2"]  # released: L1


# --- latent normalisation and condition --------------------------------------------------------------
def normalize_latent(z: torch.Tensor, e_min: float | torch.Tensor, e_max: float | torch.Tensor) -> torch.Tensor:
    """z_norm = 2 (z - min) / (max - min) - 1 with the codebook's global min/max (operation order as released)."""
    return ((z - e_min) / (e_max - e_min)) * 2.0 - 1.0


def denormalize_latent(z_norm: torch.Tensor, e_min: float | torch.Tensor, e_max: float | torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`normalize_latent`."""
    return (((z_norm + 1.0) / 2.0) * (e_max - e_min)) + e_min


def mask_code(mask: torch.Tensor, latent_size: Sequence[int]) -> torch.Tensor:
    """Tumour mask (B, 1, Z, X, Y) in {0, 1} -> code 2m - 1 nearest-resized to the latent grid."""
    code = mask.float() * 2.0 - 1.0
    return F.interpolate(code, size=tuple(int(s) for s in latent_size), mode="nearest")


def build_condition(masked_latent_norm: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """cond = concat(normalised latent of the masked volume (B, 8, ...), mask code (B, 1, ...)) on channels.

    ``mask`` is the full-resolution {0, 1} tumour mask (B, 1, Z, X, Y) or already on the latent grid.
    """
    if mask.ndim != 5 or mask.shape[1] != 1:
        raise ValueError(f"mask must be (B, 1, Z, X, Y), got {tuple(mask.shape)}")
    code = mask_code(mask, masked_latent_norm.shape[2:]).to(masked_latent_norm)
    return torch.cat((masked_latent_norm, code), dim=1)


def masked_volume(volume: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """volume x (1 - mask): the tumour region set to 0 (mid-grey in [-1, 1])."""
    return volume * (1 - mask.to(volume.dtype))


@torch.no_grad()
def encode_condition(autoencoder, volume: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Condition from a volume in [-1, 1] and a {0, 1} tumour mask, both (B, 1, Z, X, Y).

    ``autoencoder`` follows the stage-1 contract: ``encode(x)`` (continuous latent) and ``latent_min_max()``.
    """
    e_min, e_max = autoencoder.latent_min_max()
    z = autoencoder.encode(masked_volume(volume, mask))
    return build_condition(normalize_latent(z, e_min, e_max), mask)


@torch.no_grad()
def encode_latent(autoencoder, volume: torch.Tensor) -> torch.Tensor:
    """Normalised continuous latent of a volume (the diffusion's x0 during training)."""
    e_min, e_max = autoencoder.latent_min_max()
    return normalize_latent(autoencoder.encode(volume), e_min, e_max)


@torch.no_grad()
def decode_latent(autoencoder, z_norm: torch.Tensor, region=None) -> torch.Tensor:
    """De-normalise a sampled latent and decode it re-quantised to the codebook (as released);
    ``region`` (three slices of the output) decodes only that box."""
    e_min, e_max = autoencoder.latent_min_max()
    z = denormalize_latent(z_norm, e_min, e_max)
    if region is None:
        return autoencoder.decode(z, quantize=True)
    return autoencoder.decode(z, quantize=True, region=region)


# --- the inferer ---------------------------------------------------------------------------------------
def _loss(pred: torch.Tensor, target: torch.Tensor, kind: LossType) -> torch.Tensor:
    return F.l1_loss(pred, target) if kind == "l1" else F.mse_loss(pred, target)


class DiffusionInferer:
    """Training forward pass and reverse sampling for a conditional denoiser ``network(x_t, t, cond)``."""

    def __init__(self, scheduler: NoiseScheduler, *, loss: LossType = "l1"):
        if loss not in get_args(LossType):
            raise ValueError(f"loss {loss!r} is not one of {', '.join(get_args(LossType))}")
        self.scheduler = scheduler
        self.loss = loss

    def __call__(
        self,
        network: Callable,
        x0: torch.Tensor,
        cond: torch.Tensor,
        *,
        noise: torch.Tensor | None = None,
        timesteps: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """Noise ``x0`` at random t, predict, and return {"loss", "prediction", "target", "timesteps"}."""
        if timesteps is None:
            timesteps = self.scheduler.sample_timesteps(x0.shape[0], generator=generator, device=x0.device)
        if noise is None:
            noise = NoiseScheduler._noise_like(x0, None, generator)
        x_t = self.scheduler.add_noise(x0, noise, timesteps)
        prediction = network(x_t, timesteps, cond)
        target = self.scheduler.training_target(x0, noise)
        return {
            "loss": _loss(prediction, target, self.loss),
            "prediction": prediction,
            "target": target,
            "timesteps": timesteps,
        }

    def iter_sample(
        self,
        network: Callable,
        cond: torch.Tensor,
        *,
        latent_channels: int | None = None,
        noise: torch.Tensor | Sequence[torch.Tensor] | None = None,
        generator: torch.Generator | None = None,
        scheduler: NoiseScheduler | None = None,
    ) -> Iterator[tuple[int, int]]:
        """Reverse loop as a generator: yields ``(done, total)`` after each step, returns the latent x_0.

        Randomness: ``noise`` = x_T, or a sequence/stacked tensor ``[x_T, z_1, z_2, ...]`` whose i-th
        extra entry is the noise of the i-th step that adds noise (ancestral: steps t = T-1 .. 1;
        DDIM with eta = 0 needs x_T only). Missing draws come from ``generator``.
        """
        sched = scheduler or self.scheduler
        noises = _as_noise_list(noise)
        channels = latent_channels or getattr(getattr(network, "config", None), "out_dim", None) or 8
        shape = (cond.shape[0], channels, *cond.shape[2:])
        if noises:
            x = noises[0].to(cond)
            if tuple(x.shape) != shape:
                raise ValueError(f"x_T has shape {tuple(x.shape)}, expected {shape}")
        else:
            x = NoiseScheduler._noise_like(torch.empty(shape, dtype=cond.dtype, device=cond.device), None, generator)
        timesteps = [int(t) for t in sched.timesteps]
        used = 1
        for i, t in enumerate(timesteps):
            t_batch = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
            model_output = network(x, t_batch, cond)
            z = None
            if sched.needs_noise(t):
                if used < len(noises):
                    z = noises[used]
                elif noises and generator is None:
                    raise ValueError(f"explicit noise list has {len(noises)} entries; step t={t} needs entry {used}")
                used += 1
            x, _ = sched.step(model_output, t, x, noise=z, generator=generator)
            yield i + 1, len(timesteps)
        return x

    def sample(self, network: Callable, cond: torch.Tensor, **kwargs) -> torch.Tensor:
        """Run :meth:`iter_sample` to the end and return the sampled (normalised) latent."""
        from backend.progress import run_sync

        return run_sync(self.iter_sample(network, cond, **kwargs))


def _as_noise_list(noise) -> list[torch.Tensor]:
    if noise is None:
        return []
    if isinstance(noise, torch.Tensor):
        return [noise] if noise.ndim == 5 else list(noise.unbind(0))
    return list(noise)
