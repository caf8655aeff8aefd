"""Stage 2: conditional latent diffusion (denoiser, noise schedule, samplers, official weights)."""
