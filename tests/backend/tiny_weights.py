"""Tiny stage-1 / stage-2 files for weights-folder tests (imported by test modules, not collected)."""

from __future__ import annotations

from pathlib import Path

import torch

AE_NAME = "AutoencoderModel.ckpt"


def autoencoder(path: Path, *, n_codes: int = 16, embedding_dim: int = 8, seed: int = 0):
    """Save a tiny VQGAN as one of our autoencoder checkpoints; returns the model."""
    from backend.train.common import save_checkpoint
    from backend.vqgan.model import VQGAN, VQGANConfig

    cfg = VQGANConfig(n_hiddens=8, num_groups=8, downsample=(4, 4, 4), embedding_dim=embedding_dim, n_codes=n_codes)
    torch.manual_seed(seed)
    vq = VQGAN(cfg).eval()
    save_checkpoint(path, stage="autoencoder", config={}, model_config=cfg.to_dict(), step=0, model=vq.state_dict())
    return vq


def diffusion(path: Path, vqgan=None, *, T: int = 4, stage: str | None = "early", latent: int = 8, seed: int = 0,
              extra: dict | None = None) -> Path:
    """Save a tiny denoiser in the released layout embedding ``vqgan`` (a module, or None for no copy).

    ``stage`` None leaves out our ``difftumor`` record of the stage (a file in the plain release layout).
    """
    from backend.diffusion.ddpm import DDPMScheduler
    from backend.diffusion.official import save_official
    from backend.diffusion.unet import Unet3D, Unet3DConfig

    torch.manual_seed(seed)
    unet = Unet3D(Unet3DConfig(dim=8, dim_mults=(1, 2), attn_heads=2, attn_dim_head=8, rotary_dim=8,
                               channels=2 * latent + 1, out_dim=latent)).eval()
    state = {k: v.detach().clone() for k, v in vqgan.state_dict().items()} if vqgan is not None else None
    meta = {"organ": "liver", **({"stage": stage} if stage else {}), **(extra or {})}
    save_official(path, model=unet, ema=unet, scheduler=DDPMScheduler(T), vqgan_state=state, step=0, extra=meta)
    if stage is None:  # the plain release layout: no difftumor record at all
        blob = torch.load(path, weights_only=True)
        blob.pop("difftumor")
        torch.save(blob, path)
    return path
