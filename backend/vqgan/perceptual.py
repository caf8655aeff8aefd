"""LPIPS perceptual distance (Zhang et al., "The Unreasonable Effectiveness of Deep Features as a
Perceptual Metric", CVPR 2018) on a VGG16 backbone written here (torchvision is not a dependency),
applied to 2D slices from all three planes of a volume ("2.5D").

Names equal the official ``perceptual_model.*`` keys: ``scaling_layer.{shift,scale}``,
``net.slice{1..5}.<torchvision layer index>``, ``lin{0..4}.model.1.weight``. Weights come from files the
user names: a torchvision-format VGG16 state dict (``features.<i>.weight``/``bias``; ImageNet weights,
e.g. ``vgg16-397923af.pth``) and the LPIPS linear layers (``vgg.pth``, keys ``lin<k>.model.1.weight``).
Without them the loss is switched OFF with a warning: random features are never used.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch
from torch import nn

from backend.errors import DiffTumorError

# torchvision VGG16 "features": numbers are conv widths, "M" a 2x2 max pool.
VGG16_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
# LPIPS taps: relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 -> layer index ranges [start, stop)
SLICES = ((0, 4), (4, 9), (9, 16), (16, 23), (23, 30))
CHANNELS = (64, 128, 256, 512, 512)


def _vgg16_layers() -> list[nn.Module]:
    layers, cin = [], 3
    for v in VGG16_LAYOUT:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(cin, v, 3, padding=1), nn.ReLU(inplace=False)]
            cin = v
    return layers


class VGG16Slices(nn.Module):
    def __init__(self):
        super().__init__()
        layers = _vgg16_layers()
        for k, (a, b) in enumerate(SLICES, 1):
            s = nn.Sequential()
            for i in range(a, b):
                s.add_module(str(i), layers[i])
            setattr(self, f"slice{k}", s)
        self.requires_grad_(False)

    def forward(self, x):
        feats = []
        for k in range(1, 6):
            x = getattr(self, f"slice{k}")(x)
            feats.append(x)
        return feats


class ScalingLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))

    def forward(self, x):  # (B, 1|3, H, W) in [-1, 1] -> (B, 3, H, W)
        return (x - self.shift) / self.scale


class NetLinLayer(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(channels, 1, 1, bias=False))


def _unit(x, eps=1e-10):
    return x / (x.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)


class LPIPS(nn.Module):
    """LPIPS distance between image batches (B, 1|3, H, W) in [-1, 1] -> (B,) (frozen, eval)."""

    def __init__(self):
        super().__init__()
        self.scaling_layer = ScalingLayer()
        self.net = VGG16Slices()
        for k, c in enumerate(CHANNELS):
            setattr(self, f"lin{k}", NetLinLayer(c))
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):  # always eval (dropout off), like the reference
        return super().train(False)

    def load_weights(self, vgg_path, lin_path) -> None:
        """Load a torchvision VGG16 state dict file and the LPIPS linear-layer file (both required)."""
        vgg = _read_state(vgg_path)
        mapped = {}
        for k, v in vgg.items():
            parts = k.split(".")
            if parts[0] == "features" and len(parts) == 3:
                idx = int(parts[1])
                for s, (a, b) in enumerate(SLICES, 1):
                    if a <= idx < b:
                        mapped[f"slice{s}.{idx}.{parts[2]}"] = v
            elif k.startswith("slice"):
                mapped[k] = v
        self._load_part(self.net, mapped, vgg_path)
        lin = _read_state(lin_path)
        lin = {k: v for k, v in lin.items() if k.startswith("lin")}
        self._load_part(self, {**{k: v for k, v in self.state_dict().items() if not k.startswith("lin")}, **lin}, lin_path)

    @staticmethod
    def _load_part(module, sd, path):
        expected = module.state_dict()
        missing = [k for k in expected if k not in sd]
        bad = [k for k in expected if k in sd and tuple(sd[k].shape) != tuple(expected[k].shape)]
        if missing or bad:
            first = (missing or bad)[0]
            raise DiffTumorError(f"{path}: not the expected LPIPS/VGG16 weights ({len(missing)} missing, {len(bad)} "
                                 f"misshapen tensors; first: '{first}')")
        module.load_state_dict({k: sd[k] for k in expected})

    def forward(self, a, b):
        fa, fb = self.net(self.scaling_layer(a)), self.net(self.scaling_layer(b))
        total = 0
        for k, (x, y) in enumerate(zip(fa, fb)):
            d = (_unit(x) - _unit(y)) ** 2
            total = total + getattr(self, f"lin{k}").model(d).mean(dim=(2, 3))
        return total.flatten()


def _read_state(path) -> dict:
    from backend.vqgan.official import safe_load

    obj = safe_load(Path(path))
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise DiffTumorError(f"{path}: expected a state dict of tensors")
    return {k: v for k, v in obj.items() if torch.is_tensor(v)}


def build_lpips(vgg_weights=None, lpips_weights=None) -> LPIPS | None:
    """LPIPS with weights from the two named files, or None (and a warning) when either is missing."""
    if vgg_weights and lpips_weights:
        model = LPIPS()
        model.load_weights(vgg_weights, lpips_weights)
        return model
    msg = ("perceptual loss is OFF: no VGG16 and LPIPS weight files were given "
           "(set loss.vgg_weights and loss.lpips_weights to enable it; random features are never used)")
    warnings.warn(msg, stacklevel=2)
    logging.getLogger(__name__).warning(msg)
    return None


def perceptual_2p5d(lpips: LPIPS, fake_slices, real_slices) -> torch.Tensor:
    """Sum over planes of the batch-mean LPIPS between matching (B, 1, H, W) slices (official STEP1)."""
    return sum(lpips(f, r).mean() for f, r in zip(fake_slices, real_slices))
