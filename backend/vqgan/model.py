"""3D VQGAN autoencoder (Esser et al., "Taming Transformers", CVPR 2021; 3D variant of VideoGPT as
used by DiffTumor, Chen et al., CVPR 2024, section 3.1).

Parameter and buffer names equal the official ``AutoencoderModel.ckpt`` state dict, so the inference
part (encoder, pre_vq_conv, post_vq_conv, decoder, codebook) loads strictly. Layout of every tensor
the model sees is the official permuted one, (B, C, Z, X, Y) (crop layout ``.permute(0, 1, 4, 2, 3)``).

    x (B,1,Z,X,Y) in [-1,1] --encoder--> (B,4h,Z/4,X/4,Y/4) --pre_vq_conv--> z (B,8,Z/4,X/4,Y/4)
    z --codebook--> indices (B,Z/4,X/4,Y/4) / z_q --post_vq_conv--> (B,4h,...) --decoder--> x_hat

Contract (docs/architecture.md): ``encode``, ``quantize``, ``decode``, ``decode_indices``,
``latent_min_max`` plus MONAI's ``encode_stage_2_inputs`` / ``decode_stage_2_outputs``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from backend.vqgan.codebook import Codebook, QuantizerOutput

PADDING_TYPES = ("replicate", "constant", "reflect", "circular")


@dataclass
class VQGANConfig:
    """Architecture of the VQGAN. Defaults = the official release (STEP1 vq_gan_3d.yaml)."""

    image_channels: int = 1
    n_hiddens: int = 16  # channels after conv_first; doubles at every down level
    downsample: tuple[int, int, int] = (4, 4, 4)  # per-axis factor, powers of two
    embedding_dim: int = 8
    n_codes: int = 16384
    num_groups: int = 32  # GroupNorm groups (32 on 32 channels = per-channel norm)
    norm_type: Literal["group"] = "group"
    padding_type: Literal["replicate", "constant", "reflect", "circular"] = "replicate"  # encoder only
    restart_thres: float = 1.0  # dead-code restart threshold on the EMA count N
    no_random_restart: bool = False
    codebook_chunk: int = 128  # vectors per nearest-code distance chunk (speed and memory, not results)

    def __post_init__(self):
        self.downsample = tuple(int(d) for d in self.downsample)
        if len(self.downsample) != 3 or any(d < 1 or d & (d - 1) for d in self.downsample):
            raise ValueError(f"downsample must be three powers of two, got {self.downsample}")
        if self.norm_type != "group":
            raise ValueError(f"norm_type {self.norm_type!r} is not supported; allowed: 'group'")
        if self.padding_type not in PADDING_TYPES:
            raise ValueError(f"padding_type {self.padding_type!r} is not allowed; allowed: {', '.join(PADDING_TYPES)}")
        if self.n_hiddens * 2 % self.num_groups:
            raise ValueError(f"num_groups {self.num_groups} must divide 2 * n_hiddens ({2 * self.n_hiddens})")

    @property
    def n_levels(self) -> int:
        return max(int(math.log2(d)) for d in self.downsample)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["downsample"] = list(self.downsample)
        return d


# ---------------------------------------------------------------------------------------- blocks
def _silu(x: torch.Tensor) -> torch.Tensor:
    # In place when no graph is recorded (inference): saves one activation-sized buffer per call.
    return F.silu(x, inplace=not torch.is_grad_enabled())


class SamePadConv3d(nn.Module):
    """Explicit "same" padding (total k - s per axis, split ceil/floor) then an unpadded Conv3d."""

    def __init__(self, cin, cout, kernel_size, stride=1, *, bias=True, padding_type="replicate"):
        super().__init__()
        k = (kernel_size,) * 3 if isinstance(kernel_size, int) else tuple(kernel_size)
        s = (stride,) * 3 if isinstance(stride, int) else tuple(stride)
        total = [ki - si for ki, si in zip(k, s)]
        pad = []
        for p in total[::-1]:  # F.pad order: last axis first, (left, right)
            pad += [p // 2 + p % 2, p // 2]
        self.pad = tuple(pad)
        self.padding_type = padding_type
        self.conv = nn.Conv3d(cin, cout, k, stride=s, padding=0, bias=bias)

    def forward(self, x):
        if any(self.pad):
            x = F.pad(x, self.pad, mode=self.padding_type)
        return self.conv(x)


class SamePadConvTranspose3d(nn.Module):
    """Replicate-pad (k - s split ceil/floor), then ConvTranspose3d with padding k - 1: size x stride."""

    def __init__(self, cin, cout, kernel_size=4, stride=2, *, padding_type="replicate"):
        super().__init__()
        k = (kernel_size,) * 3 if isinstance(kernel_size, int) else tuple(kernel_size)
        s = (stride,) * 3 if isinstance(stride, int) else tuple(stride)
        pad = []
        for ki, si in list(zip(k, s))[::-1]:
            p = ki - si
            pad += [p // 2 + p % 2, p // 2]
        self.pad = tuple(pad)
        self.padding_type = padding_type
        self.convt = nn.ConvTranspose3d(cin, cout, k, stride=s, padding=tuple(ki - 1 for ki in k))

    def forward(self, x):
        return self.convt(F.pad(x, self.pad, mode=self.padding_type))


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=1e-6, affine=True)


class ResBlock(nn.Module):
    """GN -> SiLU -> conv3 -> GN -> SiLU -> conv3, plus identity skip (in == out channels)."""

    def __init__(self, channels: int, *, num_groups: int, padding_type: str):
        super().__init__()
        self.norm1 = _norm(channels, num_groups)
        self.conv1 = SamePadConv3d(channels, channels, 3, padding_type=padding_type)
        self.norm2 = _norm(channels, num_groups)
        self.conv2 = SamePadConv3d(channels, channels, 3, padding_type=padding_type)

    def forward(self, x):
        h = self.conv1(_silu(self.norm1(x)))
        h = self.conv2(_silu(self.norm2(h)))
        return x + h


class _GNSiLU(nn.Sequential):
    def __init__(self, channels, groups):
        super().__init__(_norm(channels, groups), nn.SiLU())

    def forward(self, x):
        return _silu(self[0](x))


def _strides(downsample, n_levels):
    """Per-level stride tuples: 2 on every axis whose remaining log2 factor is > 0."""
    remaining = [int(math.log2(d)) for d in downsample]
    out = []
    for _ in range(n_levels):
        out.append(tuple(2 if r > 0 else 1 for r in remaining))
        remaining = [r - 1 for r in remaining]
    return out


class Encoder(nn.Module):
    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        h, g, pt = cfg.n_hiddens, cfg.num_groups, cfg.padding_type
        self.conv_first = SamePadConv3d(cfg.image_channels, h, 3, padding_type=pt)
        self.conv_blocks = nn.ModuleList()
        for i, stride in enumerate(_strides(cfg.downsample, cfg.n_levels)):
            block = nn.Module()
            cin, cout = h * 2**i, h * 2 ** (i + 1)
            block.down = SamePadConv3d(cin, cout, 4, stride=stride, padding_type=pt)
            block.res = ResBlock(cout, num_groups=g, padding_type=pt)
            self.conv_blocks.append(block)
        self.out_channels = h * 2**cfg.n_levels
        self.final_block = _GNSiLU(self.out_channels, g)

    def forward(self, x):
        h = self.conv_first(x)  # (B, h, Z, X, Y)
        for block in self.conv_blocks:
            h = block.res(block.down(h))  # each level halves the strided axes, doubles channels
        return self.final_block(h)  # (B, 4h, Z/4, X/4, Y/4)


class Decoder(nn.Module):
    """Asymmetric decoder: GN+SiLU first, then per level transposed conv + 2 ResBlocks, conv_last.

    Padding is always replicate (the official decoder never receives ``padding_type``).
    """

    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        h, g, n = cfg.n_hiddens, cfg.num_groups, cfg.n_levels
        top = h * 2**n
        self.final_block = _GNSiLU(top, g)  # named "final" in the release, but runs first
        self.conv_blocks = nn.ModuleList()
        strides = _strides(cfg.downsample, n)[::-1]
        for i in range(n):
            cin = top if i == 0 else h * 2 ** (n - i + 1)
            cout = h * 2 ** (n - i)
            block = nn.Module()
            block.up = SamePadConvTranspose3d(cin, cout, 4, stride=strides[i])
            block.res1 = ResBlock(cout, num_groups=g, padding_type="replicate")
            block.res2 = ResBlock(cout, num_groups=g, padding_type="replicate")
            self.conv_blocks.append(block)
        self.conv_last = SamePadConv3d(cout, cfg.image_channels, 3)

    def forward(self, z):
        h = self.final_block(z)  # (B, 4h, Z/4, X/4, Y/4)
        for block in self.conv_blocks:
            h = block.res2(block.res1(block.up(h)))  # each level doubles the strided axes
        return self.conv_last(h)  # (B, 1, Z, X, Y), no output activation


# ------------------------------------------------------------------------------------------ model
class VQGAN(nn.Module):
    """Inference/generator part of the 3D VQGAN (no discriminators, no perceptual network)."""

    def __init__(self, config: VQGANConfig | None = None):
        super().__init__()
        cfg = config or VQGANConfig()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        c = self.encoder.out_channels
        self.pre_vq_conv = SamePadConv3d(c, cfg.embedding_dim, 1, padding_type=cfg.padding_type)
        self.post_vq_conv = SamePadConv3d(cfg.embedding_dim, c, 1)
        self.codebook = Codebook(
            cfg.n_codes,
            cfg.embedding_dim,
            restart_thres=cfg.restart_thres,
            no_random_restart=cfg.no_random_restart,
            chunk=cfg.codebook_chunk,
        )

    @property
    def downsample(self) -> tuple[int, int, int]:
        return self.config.downsample

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Continuous pre-quantisation latent: x (B,1,Z,X,Y) -> z (B, 8, Z/4, X/4, Y/4)."""
        for size, f in zip(x.shape[2:], self.config.downsample):
            if size % f:
                raise ValueError(f"input size {tuple(x.shape[2:])} is not divisible by {self.config.downsample}")
        return self.pre_vq_conv(self.encoder(x))

    def quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(straight-through quantised latent, indices). Updates the codebook in training mode."""
        out = self.codebook(z)
        return out.z_q, out.indices

    def decode(self, z: torch.Tensor, quantize: bool = True) -> torch.Tensor:
        """Decode a continuous latent (B, 8, z, x, y). ``quantize=True`` snaps it to the nearest codes
        first (what every synthesis path does); ``False`` decodes it as given."""
        if quantize:
            return self.decode_indices(self.codebook.lookup(z))
        return self.decoder(self.post_vq_conv(z))

    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Decode integer code indices (B, z, x, y) -> (B, 1, Z, X, Y)."""
        return self.decoder(self.post_vq_conv(self.codebook.embed(indices)))

    def latent_min_max(self) -> tuple[float, float]:
        """Global (min, max) of the codebook embeddings (the diffusion latent normalisation)."""
        e = self.codebook.embeddings
        return float(e.min()), float(e.max())

    # MONAI LatentDiffusionInferer contract
    def encode_stage_2_inputs(self, x: torch.Tensor) -> torch.Tensor:
        return self.encode(x)

    def decode_stage_2_outputs(self, z: torch.Tensor) -> torch.Tensor:
        return self.decode(z, quantize=True)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, QuantizerOutput]:
        """Training forward: (reconstruction, codebook output incl. commitment loss and indices)."""
        z = self.encode(x)
        q = self.codebook(z)
        return self.decoder(self.post_vq_conv(q.z_q)), q


def build_vqgan(**overrides) -> VQGAN:
    """Convenience: ``VQGAN(VQGANConfig(**overrides))``."""
    return VQGAN(VQGANConfig(**overrides))


__all__ = ["VQGAN", "VQGANConfig", "Encoder", "Decoder", "SamePadConv3d", "SamePadConvTranspose3d", "build_vqgan"]
