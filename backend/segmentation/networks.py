"""Segmentation backbones of the paper, by name: U-Net, nnU-Net (MONAI DynUNet) and SwinUNETR.

All take crops (B, 1, X, Y, Z) in model space (RAS, 1 mm, HU window -> [0, 1]) and return logits
(B, 3, X, Y, Z) for background / organ / tumour. Sizes follow the authors' release (appendix E.2):
U-Net channels 16/32/64/128/256 with stride 2 and 2 residual units; SwinUNETR feature size 48,
patch 2, depths 2/2/2/2, heads 3/6/12/24, window 7, the v2 variant (residual conv blocks before
each Swin stage, Hatamizadeh et al. 2022 / He et al. 2023); DynUNet configured as nnU-Net would
plan a 96³ isotropic patch (3×3×3 kernels, 5 stride-2 levels, filters 32..320).

``tiny=True`` gives ~8-channel versions for tests and CPU smoke runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

import torch.nn as nn

NetworkName = Literal["unet", "nnunet", "swinunetr"]
ALIASES = {"dynunet": "nnunet", "swin_unetr": "swinunetr", "swin_unetrv2": "swinunetr", "swinunetr_v2": "swinunetr"}


@dataclass
class NetworkConfig:
    name: str = "unet"  # unet | nnunet (DynUNet) | swinunetr
    in_channels: int = 1
    out_channels: int = 3  # background, organ, tumour
    roi_size: tuple[int, int, int] = (96, 96, 96)  # crop size; SwinUNETR needs multiples of 32
    tiny: bool = False  # ~8 channels, for tests and CPU smoke runs
    unet_channels: tuple[int, ...] = (16, 32, 64, 128, 256)
    unet_res_units: int = 2
    swin_feature_size: int = 48  # 'base' in the release; must be a multiple of 12
    swin_v2: bool = True  # the release trains SwinUNETR_v2
    dropout: float = 0.0
    extra: dict = field(default_factory=dict)  # passed through to the MONAI constructor

    def __post_init__(self):
        self.name = ALIASES.get(str(self.name).lower(), str(self.name).lower())
        if self.name not in get_args(NetworkName):
            raise ValueError(f"network name {self.name!r} is not one of {', '.join(get_args(NetworkName))}")
        self.roi_size = tuple(int(s) for s in self.roi_size)
        self.unet_channels = tuple(int(c) for c in self.unet_channels)
        if len(self.roi_size) != 3:
            raise ValueError(f"roi_size must have 3 entries, got {self.roi_size}")
        if self.name == "swinunetr":
            if any(s % 32 for s in self.roi_size):
                raise ValueError(f"swinunetr needs roi_size multiples of 32, got {self.roi_size}")
            if self.swin_feature_size % 12:
                raise ValueError(f"swin_feature_size must be a multiple of 12, got {self.swin_feature_size}")


def _nnunet_plan(roi_size: tuple[int, ...], tiny: bool):
    """Kernels/strides nnU-Net would choose for an isotropic patch: halve while the size stays >= 4 (max 5x)."""
    kernels, strides, sizes = [[3, 3, 3]], [[1, 1, 1]], list(roi_size)
    max_levels = 2 if tiny else 5
    while len(strides) <= max_levels and all(s >= 8 and s % 2 == 0 for s in sizes):
        sizes = [s // 2 for s in sizes]
        kernels.append([3, 3, 3])
        strides.append([2, 2, 2])
    base = (4, 8, 16, 32, 32, 32) if tiny else (32, 64, 128, 256, 320, 320)
    return kernels, strides, list(base[: len(strides)])


def build_network(cfg: NetworkConfig | None = None, **overrides) -> nn.Module:
    """The MONAI network named by ``cfg.name`` (keyword overrides update the config)."""
    cfg = cfg or NetworkConfig()
    if overrides:
        cfg = NetworkConfig(**{**cfg.__dict__, **overrides})
    if cfg.name == "unet":
        from monai.networks.nets import UNet

        channels = (4, 8, 16) if cfg.tiny else cfg.unet_channels
        return UNet(
            spatial_dims=3, in_channels=cfg.in_channels, out_channels=cfg.out_channels, channels=channels,
            strides=(2,) * (len(channels) - 1), num_res_units=1 if cfg.tiny else cfg.unet_res_units,
            dropout=cfg.dropout, **cfg.extra,
        )
    if cfg.name == "nnunet":
        from monai.networks.nets import DynUNet

        kernels, strides, filters = _nnunet_plan(cfg.roi_size, cfg.tiny)
        return DynUNet(
            spatial_dims=3, in_channels=cfg.in_channels, out_channels=cfg.out_channels, kernel_size=kernels,
            strides=strides, upsample_kernel_size=strides[1:], filters=filters, norm_name="instance",
            deep_supervision=False, res_block=False, dropout=cfg.dropout or None, **cfg.extra,
        )
    from monai.networks.nets import SwinUNETR

    return SwinUNETR(
        in_channels=cfg.in_channels, out_channels=cfg.out_channels,
        feature_size=12 if cfg.tiny else cfg.swin_feature_size, depths=(1, 1, 1, 1) if cfg.tiny else (2, 2, 2, 2),
        num_heads=(3, 6, 12, 24), patch_size=2, window_size=7, drop_rate=cfg.dropout, use_v2=cfg.swin_v2,
        spatial_dims=3, **cfg.extra,
    )


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
