"""Noise schedule: pure functions for the betas and the derived quantities, plus the scheduler base class.

``cosine_betas`` is the schedule of Nichol & Dhariwal 2021 ("Improved Denoising Diffusion Probabilistic
Models", Eq. 17) as released (s = 0.008, float64, betas clipped to [0, 0.9999]). ``schedule_buffers``
derives the twelve quantities of Ho et al. 2020 under the names the released checkpoints store them.

:class:`NoiseScheduler` holds those buffers (its ``state_dict()`` is exactly the twelve released schedule
entries), implements the forward process ``add_noise`` (q_sample) and the x0 / epsilon conversions.
Concrete reverse processes live in :mod:`backend.diffusion.ddpm` and :mod:`backend.diffusion.ddim`.
"""

from __future__ import annotations

import math
from typing import Literal, get_args

import torch
from torch import nn

PredictionType = Literal["epsilon", "sample"]  # epsilon: noise as released; sample: x0 as in the paper

SCHEDULE_BUFFER_NAMES = (
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
)


def cosine_betas(timesteps: int, s: float = 0.008, max_beta: float = 0.9999) -> torch.Tensor:
    """Cosine-schedule betas (float64, shape (T,)): beta_t = 1 - abar(t+1)/abar(t), clipped to [0, max_beta]."""
    if int(timesteps) != timesteps or timesteps < 1:
        raise ValueError(f"timesteps must be a positive integer, got {timesteps!r}")
    steps = timesteps + 1
    x = torch.linspace(0, timesteps, steps, dtype=torch.float64)
    abar = torch.cos(((x / timesteps) + s) / (1 + s) * math.pi * 0.5) ** 2
    abar = abar / abar[0]
    betas = 1 - (abar[1:] / abar[:-1])
    return torch.clip(betas, 0, max_beta)


def schedule_buffers(betas: torch.Tensor) -> dict[str, torch.Tensor]:
    """The twelve derived float32 tensors (T,), in the released order, computed in float64."""
    betas = betas.to(torch.float64)
    alphas = 1.0 - betas
    abar = torch.cumprod(alphas, dim=0)
    abar_prev = torch.cat((abar.new_ones(1), abar[:-1]))
    # posterior q(x_{t-1} | x_t, x_0), Ho et al. 2020 Eq. 6-7
    post_var = betas * (1.0 - abar_prev) / (1.0 - abar)
    buffers = {
        "betas": betas,
        "alphas_cumprod": abar,
        "alphas_cumprod_prev": abar_prev,
        "sqrt_alphas_cumprod": torch.sqrt(abar),
        "sqrt_one_minus_alphas_cumprod": torch.sqrt(1.0 - abar),
        "log_one_minus_alphas_cumprod": torch.log(1.0 - abar),
        "sqrt_recip_alphas_cumprod": torch.sqrt(1.0 / abar),
        "sqrt_recipm1_alphas_cumprod": torch.sqrt(1.0 / abar - 1),
        "posterior_variance": post_var,
        "posterior_log_variance_clipped": torch.log(post_var.clamp(min=1e-20)),
        "posterior_mean_coef1": betas * torch.sqrt(abar_prev) / (1.0 - abar),
        "posterior_mean_coef2": (1.0 - abar_prev) * torch.sqrt(alphas) / (1.0 - abar),
    }
    return {k: buffers[k].to(torch.float32) for k in SCHEDULE_BUFFER_NAMES}


def timesteps_of(buffers: dict[str, torch.Tensor]) -> int:
    """T of a stored schedule (the length of its ``betas``)."""
    return int(buffers["betas"].shape[0])


def schedule_mismatch(buffers: dict[str, torch.Tensor], *, rtol: float = 1e-5, atol: float = 1e-6) -> str | None:
    """Name the first stored buffer that differs from the recomputed cosine schedule, or None when all agree."""
    missing = [k for k in SCHEDULE_BUFFER_NAMES if k not in buffers]
    if missing:
        return f"missing schedule buffer(s) {', '.join(missing)}"
    expected = schedule_buffers(cosine_betas(timesteps_of(buffers)))
    for name, ref in expected.items():
        got = buffers[name].detach().to("cpu", torch.float32)
        if got.shape != ref.shape:
            return f"{name} has shape {tuple(got.shape)}, expected {tuple(ref.shape)}"
        if not torch.allclose(got, ref, rtol=rtol, atol=atol):
            return f"{name} differs from the cosine schedule (max |diff| {(got - ref).abs().max().item():.3g})"
    return None


def _gather(buf: torch.Tensor, t: torch.Tensor, ndim: int) -> torch.Tensor:
    """buf[t] reshaped to (B, 1, ..., 1) for broadcasting against an ndim-dimensional batch."""
    return buf.gather(0, t.to(buf.device).long()).reshape(-1, *([1] * (ndim - 1)))


class NoiseScheduler(nn.Module):
    """Forward process and shared maths of a T-step cosine-schedule diffusion.

    The twelve schedule tensors are persistent buffers named as in the released checkpoints, so
    ``state_dict()`` gives exactly the released top-level schedule entries.
    """

    def __init__(self, num_train_timesteps: int, *, prediction_type: PredictionType = "epsilon"):
        super().__init__()
        if prediction_type not in get_args(PredictionType):
            raise ValueError(
                f"prediction_type {prediction_type!r} is not one of {', '.join(get_args(PredictionType))}"
            )
        self.num_train_timesteps = int(num_train_timesteps)
        self.prediction_type = prediction_type
        for name, value in schedule_buffers(cosine_betas(self.num_train_timesteps)).items():
            self.register_buffer(name, value)
        self.timesteps = torch.arange(self.num_train_timesteps - 1, -1, -1)

    # --- forward process -------------------------------------------------------------------------
    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """q(x_t | x_0) sample: sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps (Ho et al. 2020, Eq. 4)."""
        n = original_samples.ndim
        return (
            _gather(self.sqrt_alphas_cumprod, timesteps, n) * original_samples
            + _gather(self.sqrt_one_minus_alphas_cumprod, timesteps, n) * noise
        )

    def training_target(self, original_samples: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """What the network must predict for this scheduler's ``prediction_type``."""
        return noise if self.prediction_type == "epsilon" else original_samples

    def sample_timesteps(self, batch: int, *, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        """Training timesteps, uniform in {0, ..., T - 1}."""
        gen_device = generator.device if generator is not None else "cpu"
        t = torch.randint(0, self.num_train_timesteps, (batch,), generator=generator, device=gen_device)
        return t.to(device) if device is not None else t

    # --- conversions -----------------------------------------------------------------------------
    def predict_x0_from_eps(self, sample: torch.Tensor, t: int, eps: torch.Tensor) -> torch.Tensor:
        """x0 = sqrt(1/abar_t) x_t - sqrt(1/abar_t - 1) eps (Ho et al. 2020, Eq. 15 rearranged)."""
        return self.sqrt_recip_alphas_cumprod[t] * sample - self.sqrt_recipm1_alphas_cumprod[t] * eps

    def predict_eps_from_x0(self, sample: torch.Tensor, t: int, x0: torch.Tensor) -> torch.Tensor:
        return (self.sqrt_recip_alphas_cumprod[t] * sample - x0) / self.sqrt_recipm1_alphas_cumprod[t]

    def split_prediction(self, model_output: torch.Tensor, t: int, sample: torch.Tensor):
        """(x0, eps) implied by the network output at step t."""
        if self.prediction_type == "epsilon":
            return self.predict_x0_from_eps(sample, t, model_output), model_output
        return model_output, self.predict_eps_from_x0(sample, t, model_output)

    def extra_repr(self) -> str:
        return f"T={self.num_train_timesteps}, prediction_type={self.prediction_type!r}"

    @staticmethod
    def _noise_like(sample: torch.Tensor, noise: torch.Tensor | None, generator: torch.Generator | None):
        if noise is not None:
            if noise.shape != sample.shape:
                raise ValueError(f"noise has shape {tuple(noise.shape)}, expected {tuple(sample.shape)}")
            return noise.to(sample)
        gen_device = generator.device if generator is not None else sample.device
        z = torch.randn(sample.shape, generator=generator, device=gen_device, dtype=sample.dtype)
        return z.to(sample.device)
