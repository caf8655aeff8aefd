"""VQGAN training losses (DiffTumor section 3.1, Eq. 1-4; official STEP1 definitions).

Pieces (each a plain function, tested separately) and one module that owns the trainable parts:

* :func:`l1_recon` -- ``l1_weight`` (4) x mean |x_hat - x|;
* commitment -- computed by the codebook (0.25 x MSE(z, sg(e)));
* :func:`random_plane_slices` -- one random slice per sample along each spatial axis (2.5D);
* perceptual -- LPIPS on the three slice pairs (:mod:`backend.vqgan.perceptual`), x ``perceptual_weight``;
* :func:`hinge_d_loss`, :func:`generator_adv_loss`, :func:`feature_matching`;
* :func:`disc_factor` -- 0 before ``discriminator_iter_start``, 1 afterwards.

:class:`VQGANLoss` holds ``image_discriminator`` (2D, sees axial slices), ``video_discriminator``
(3D) and ``perceptual_model`` under the official key names, so an official checkpoint's extras load
into it (``load_extras``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from backend.vqgan.discriminator import NLayerDiscriminator
from backend.vqgan.perceptual import build_lpips, perceptual_2p5d


@dataclass
class LossConfig:
    l1_weight: float = 4.0
    perceptual_weight: float = 4.0  # ignored (term off) when no VGG/LPIPS weight files are given
    gan_feat_weight: float = 4.0
    image_gan_weight: float = 1.0
    video_gan_weight: float = 1.0
    disc_channels: int = 64
    disc_layers: int = 3
    discriminator_iter_start: int = 10000  # adversarial + feature-matching terms start here
    vgg_weights: str | None = None  # torchvision-format VGG16 state dict file
    lpips_weights: str | None = None  # LPIPS linear layers (vgg.pth)


def l1_recon(x_hat: torch.Tensor, x: torch.Tensor, weight: float = 4.0) -> torch.Tensor:
    return weight * F.l1_loss(x_hat, x)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def generator_adv_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    return -logits_fake.mean()


def feature_matching(fake_feats, real_feats, n_layers: int = 3) -> torch.Tensor:
    """L1 between fake and (detached) real outputs of every stage but the logits, each x 4/(n_layers+1)."""
    w = 4.0 / (n_layers + 1)
    return sum(w * F.l1_loss(f, r.detach()) for f, r in zip(fake_feats[:-1], real_feats[:-1]))


def disc_factor(step: int, start: int) -> float:
    return 1.0 if step >= start else 0.0


def random_plane_slices(*volumes: torch.Tensor, generator: torch.Generator | None = None):
    """For (B, C, D, H, W) volumes: per sample one random index along each of dims 2, 3, 4 (the same
    indices for every volume given). Returns, per volume, a list of three (B, C, ., .) slices."""
    b, _, *sizes = volumes[0].shape
    dev = volumes[0].device
    idx = [torch.randint(0, s, (b,), generator=generator).to(dev) for s in sizes]
    ar = torch.arange(b, device=dev)
    out = []
    for v in volumes:
        out.append([
            v[ar, :, idx[0]],  # (B, C, H, W): plane across dim 2 ("axial" in the permuted layout)
            v.movedim(3, 2)[ar, :, idx[1]],
            v.movedim(4, 2)[ar, :, idx[2]],
        ])
    return out


class VQGANLoss(nn.Module):
    """Trainable loss parts: two PatchGAN discriminators and the (frozen) perceptual network."""

    def __init__(self, cfg: LossConfig, image_channels: int = 1):
        super().__init__()
        self.cfg = cfg
        self.image_discriminator = NLayerDiscriminator(image_channels, cfg.disc_channels, cfg.disc_layers, spatial_dims=2)
        self.video_discriminator = NLayerDiscriminator(image_channels, cfg.disc_channels, cfg.disc_layers, spatial_dims=3)
        self.perceptual_model = build_lpips(cfg.vgg_weights, cfg.lpips_weights) if cfg.perceptual_weight > 0 else None

    def load_extras(self, extras: dict) -> list[str]:
        """Load official ``image_discriminator.*`` / ``video_discriminator.*`` (and ``perceptual_model.*``
        when enabled) tensors; returns the names of the parts loaded."""
        loaded = []
        for name in ("image_discriminator", "video_discriminator", "perceptual_model"):
            part = getattr(self, name)
            sub = {k[len(name) + 1:]: v for k, v in extras.items() if k.startswith(name + ".")}
            if part is not None and sub:
                part.load_state_dict(sub, strict=True)
                loaded.append(name)
        return loaded

    def generator_loss(self, x, x_hat, commitment, step: int, *, generator=None) -> tuple[torch.Tensor, dict]:
        """Total generator loss and its parts. x, x_hat: (B, C, D, H, W) in the permuted layout."""
        c = self.cfg
        recon = l1_recon(x_hat, x, c.l1_weight)
        real_sl, fake_sl = random_plane_slices(x, x_hat, generator=generator)
        if self.perceptual_model is not None:
            perceptual = c.perceptual_weight * perceptual_2p5d(self.perceptual_model, fake_sl, real_sl)
        else:
            perceptual = x.new_zeros(())
        logs = {"recon_l1": recon.detach() / c.l1_weight, "commitment": commitment.detach(), "perceptual": perceptual.detach()}
        factor = disc_factor(step, c.discriminator_iter_start)
        total = recon + commitment + perceptual
        if factor > 0:
            logit_img, feat_img = self.image_discriminator(fake_sl[0])
            logit_vid, feat_vid = self.video_discriminator(x_hat)
            adv = c.image_gan_weight * generator_adv_loss(logit_img) + c.video_gan_weight * generator_adv_loss(logit_vid)
            with torch.no_grad():
                _, real_img = self.image_discriminator(real_sl[0])
                _, real_vid = self.video_discriminator(x)
            fm = c.gan_feat_weight * (
                c.image_gan_weight * feature_matching(feat_img, real_img, c.disc_layers)
                + c.video_gan_weight * feature_matching(feat_vid, real_vid, c.disc_layers)
            )
            total = total + factor * (adv + fm)
            logs.update(g_adv=adv.detach(), feat_match=fm.detach())
        logs["g_total"] = total.detach()
        return total, logs

    def discriminator_loss(self, x, x_hat, step: int, *, generator=None) -> tuple[torch.Tensor, dict]:
        """Hinge loss of both discriminators on real vs detached reconstructions (0 before the start)."""
        c = self.cfg
        factor = disc_factor(step, c.discriminator_iter_start)
        x_hat = x_hat.detach()
        real_sl, fake_sl = random_plane_slices(x, x_hat, generator=generator)
        d_img = hinge_d_loss(self.image_discriminator(real_sl[0])[0], self.image_discriminator(fake_sl[0])[0])
        d_vid = hinge_d_loss(self.video_discriminator(x)[0], self.video_discriminator(x_hat)[0])
        total = factor * (c.image_gan_weight * d_img + c.video_gan_weight * d_vid)
        return total, {"d_image": d_img.detach(), "d_video": d_vid.detach(), "d_total": total.detach()}
