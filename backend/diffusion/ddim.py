"""DDIM sampling (Song et al. 2021, "Denoising Diffusion Implicit Models", Eq. 12).

As released for mid/late tumours: 50 steps over the T = 200 model with the "uniform + 1" spacing
(1, 5, ..., 197), eta = 0, no clipping of x0, and the last step returns x_prev (not the x0 estimate).
"""

from __future__ import annotations

from typing import Literal, get_args

import torch

from backend.diffusion.schedule import NoiseScheduler, PredictionType

Spacing = Literal["uniform_plus_one", "uniform"]  # released: arange(0, T, T // S) + 1


def ddim_timesteps(num_train_timesteps: int, num_inference_steps: int, spacing: Spacing = "uniform_plus_one") -> torch.Tensor:
    """Ascending timesteps the network is called with (sampling runs them in reverse)."""
    if spacing not in get_args(Spacing):
        raise ValueError(f"spacing {spacing!r} is not one of {', '.join(get_args(Spacing))}")
    if not 1 <= num_inference_steps <= num_train_timesteps:
        raise ValueError(f"num_inference_steps must be in 1..{num_train_timesteps}, got {num_inference_steps}")
    stride = num_train_timesteps // num_inference_steps
    ts = torch.arange(num_inference_steps, dtype=torch.long) * stride
    if spacing == "uniform_plus_one":
        ts = ts + 1
        if ts[-1] >= num_train_timesteps:
            raise ValueError(
                f"'uniform_plus_one' spacing with {num_inference_steps} of {num_train_timesteps} steps reaches "
                f"t = {int(ts[-1])}; use spacing='uniform'"
            )
    return ts


class DDIMScheduler(NoiseScheduler):
    """Strided DDIM sampler over a T-step cosine schedule."""

    def __init__(
        self,
        num_train_timesteps: int,
        *,
        prediction_type: PredictionType = "epsilon",
        num_inference_steps: int = 50,
        eta: float = 0.0,  # 0: deterministic given x_T (released); 1: DDPM-like variance
        spacing: Spacing = "uniform_plus_one",
        clip_sample: bool = False,  # released: no clipping
    ):
        super().__init__(num_train_timesteps, prediction_type=prediction_type)
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        self.eta = float(eta)
        self.spacing = spacing
        self.clip_sample = bool(clip_sample)
        self.set_timesteps(num_inference_steps)

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        ascending = ddim_timesteps(self.num_train_timesteps, int(num_inference_steps), self.spacing)
        self.num_inference_steps = int(num_inference_steps)
        self._ascending = ascending
        self.timesteps = ascending.flip(0).to(device)  # sampling order, e.g. 197, 193, ..., 1

    def previous_timestep(self, t: int) -> int | None:
        """The selected timestep before t (None for the first one, whose abar_prev is abar[0])."""
        idx = int((self._ascending == int(t)).nonzero()[0])
        return int(self._ascending[idx - 1]) if idx > 0 else None

    def needs_noise(self, t: int) -> bool:
        return self.eta > 0

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int,
        sample: torch.Tensor,
        *,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One DDIM step x_t -> x_prev; returns (x_prev, x0 estimate)."""
        t = int(timestep)
        prev = self.previous_timestep(t)
        abar_t = self.alphas_cumprod[t]
        abar_prev = self.alphas_cumprod[prev if prev is not None else 0]
        # 1. x0 and eps implied by the network output
        if self.prediction_type == "epsilon":
            eps = model_output
            x0 = (sample - torch.sqrt(1.0 - abar_t) * eps) / abar_t.sqrt()
        else:
            x0 = model_output
            eps = (sample - abar_t.sqrt() * x0) / torch.sqrt(1.0 - abar_t)
        if self.clip_sample:
            x0 = x0.clamp(-1.0, 1.0)
        # 2. sigma_t (Eq. 16)
        sigma = self.eta * torch.sqrt((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev))
        # 3. direction pointing to x_t and the update (Eq. 12)
        direction = torch.sqrt(1.0 - abar_prev - sigma**2) * eps
        prev_sample = abar_prev.sqrt() * x0 + direction
        if self.eta > 0:
            prev_sample = prev_sample + sigma * self._noise_like(sample, noise, generator)
        return prev_sample, x0

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, steps={self.num_inference_steps}, eta={self.eta}, spacing={self.spacing!r}"
