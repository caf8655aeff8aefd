"""Stage 2: conditional latent diffusion (paper section 3.2; official_pipeline.md sections 2-3).

Network, noise schedule and sampler are separate objects, joined by the inferer::

    from backend.diffusion import load_diffusion, DiffusionInferer, encode_condition, decode_latent

    ckpt = load_diffusion("weights/liver_early.pt", timesteps=4, latent_channels=8)   # ema weights
    cond = encode_condition(vqgan, volume, mask)          # (B,9,24,24,24) from (B,1,Z,X,Y) [-1,1] + {0,1}
    inferer = DiffusionInferer(ckpt.ddpm_scheduler())     # or ckpt.ddim_scheduler(50) for T = 200
    # (opt-in, not released: ckpt.dpm_solver_scheduler(15), DPM-Solver++(2M) in 15 calls)
    z = inferer.sample(ckpt.unet, cond, generator=torch.Generator().manual_seed(0))  # or noise=[x_T, z1, ...]
    decoded = decode_latent(ckpt.autoencoder(vqgan), z)  # de-normalise, re-quantise, decode (B,1,Z,X,Y)

All tensors use the official permuted layout (B, C, Z, X, Y).
"""

from backend.diffusion.ddim import DDIMScheduler, ddim_timesteps
from backend.diffusion.ddpm import DDPMScheduler
from backend.diffusion.dpm_solver import DPMSolverMultistepScheduler, dpm_solver_timesteps
from backend.diffusion.inferer import (
    DiffusionInferer,
    build_condition,
    decode_latent,
    denormalize_latent,
    encode_condition,
    encode_latent,
    mask_code,
    masked_volume,
    normalize_latent,
)
from backend.diffusion.official import DiffusionCheckpoint, load_diffusion, same_state, save_official
from backend.diffusion.schedule import NoiseScheduler, cosine_betas, schedule_buffers
from backend.diffusion.unet import Unet3D, Unet3DConfig

__all__ = [
    "DDIMScheduler",
    "DDPMScheduler",
    "DPMSolverMultistepScheduler",
    "DiffusionCheckpoint",
    "DiffusionInferer",
    "NoiseScheduler",
    "Unet3D",
    "Unet3DConfig",
    "build_condition",
    "cosine_betas",
    "ddim_timesteps",
    "decode_latent",
    "dpm_solver_timesteps",
    "denormalize_latent",
    "encode_condition",
    "encode_latent",
    "load_diffusion",
    "mask_code",
    "masked_volume",
    "normalize_latent",
    "same_state",
    "save_official",
    "schedule_buffers",
]
