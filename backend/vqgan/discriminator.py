"""PatchGAN "NLayer" discriminator (Isola et al., "Image-to-Image Translation with Conditional
Adversarial Networks", CVPR 2017), one class for 2D slices and 3D volumes via ``spatial_dims``.

Layout = the official ``image_discriminator`` / ``video_discriminator``: stages ``model0`` ..
``model{n_layers+1}``, each a Sequential (conv k4 pad 2 [+ BatchNorm] [+ LeakyReLU 0.2]); strides 2
except the last two stages (1). ``forward`` returns ``(logits, [output of every stage])`` so the
feature-matching loss can use the intermediate stages. MONAI's PatchDiscriminator names its layers
differently, so official checkpoints would not load into it; hence this small class.
"""

from __future__ import annotations

import torch
from torch import nn


class NLayerDiscriminator(nn.Module):
    def __init__(self, in_channels: int = 1, channels: int = 64, n_layers: int = 3, *, spatial_dims: int = 2):
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
        if n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {n_layers}")
        conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        norm = nn.BatchNorm2d if spatial_dims == 2 else nn.BatchNorm3d
        self.spatial_dims = spatial_dims
        self.n_stages = n_layers + 2
        stages = [nn.Sequential(conv(in_channels, channels, 4, stride=2, padding=2), nn.LeakyReLU(0.2, True))]
        nf = channels
        for n in range(1, n_layers + 1):
            prev, nf = nf, min(nf * 2, 512)
            stride = 2 if n < n_layers else 1
            stages.append(nn.Sequential(conv(prev, nf, 4, stride=stride, padding=2), norm(nf), nn.LeakyReLU(0.2, True)))
        stages.append(nn.Sequential(conv(nf, 1, 4, stride=1, padding=2)))
        for i, stage in enumerate(stages):
            setattr(self, f"model{i}", stage)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        feats = []
        for i in range(self.n_stages):
            x = getattr(self, f"model{i}")(x)
            feats.append(x)
        return x, feats  # logits (B, 1, *patches), every stage output (last = logits)
