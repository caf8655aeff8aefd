"""Ancestral DDPM sampling (Ho et al. 2020, "Denoising Diffusion Probabilistic Models", Algorithm 2).

As released for early tumours (T = 4): every step predicts x0 from the network output, clips it to
[-1, 1], forms the posterior mean and adds noise at every step except t = 0.
"""

from __future__ import annotations

import torch

from backend.diffusion.schedule import NoiseScheduler, PredictionType


class DDPMScheduler(NoiseScheduler):
    """T-step ancestral sampler; ``timesteps`` runs T-1, ..., 0 (every training step is visited)."""

    def __init__(
        self,
        num_train_timesteps: int,
        *,
        prediction_type: PredictionType = "epsilon",
        clip_sample: bool = True,  # clamp x0 to [-1, 1] (released behaviour; latents are normalised to it)
    ):
        super().__init__(num_train_timesteps, prediction_type=prediction_type)
        self.clip_sample = bool(clip_sample)

    def set_timesteps(self, num_inference_steps: int | None = None, device=None) -> None:
        """Ancestral sampling visits all T steps; ``num_inference_steps`` must be None or T."""
        if num_inference_steps not in (None, self.num_train_timesteps):
            raise ValueError(
                f"DDPMScheduler samples all {self.num_train_timesteps} steps, got num_inference_steps="
                f"{num_inference_steps}; use DDIMScheduler for fewer steps"
            )
        self.timesteps = torch.arange(self.num_train_timesteps - 1, -1, -1, device=device)

    def needs_noise(self, t: int) -> bool:
        """Whether ``step`` at timestep t adds fresh noise."""
        return int(t) > 0

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int,
        sample: torch.Tensor,
        *,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One reverse step x_t -> x_{t-1}; returns (x_{t-1}, x0 estimate).

        ``noise`` (the z of Algorithm 2) is used when given, otherwise drawn from ``generator``.
        """
        t = int(timestep)
        # 1. x0 estimate from the network output (Eq. 15)
        x0, _ = self.split_prediction(model_output, t, sample)
        # 2. clip to the data range
        if self.clip_sample:
            x0 = x0.clamp(-1.0, 1.0)
        # 3. posterior mean mu_t(x_t, x0) (Eq. 7)
        mean = self.posterior_mean_coef1[t] * x0 + self.posterior_mean_coef2[t] * sample
        # 4. x_{t-1} = mu + sigma_t z, no noise at t = 0 (Algorithm 2, line 4)
        if not self.needs_noise(t):
            return mean, x0
        z = self._noise_like(sample, noise, generator)
        return mean + torch.exp(0.5 * self.posterior_log_variance_clipped[t]) * z, x0
