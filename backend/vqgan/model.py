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


def _fast_layout(x: torch.Tensor) -> bool:
    """CPU inference runs channels-last (oneDNN's 3D convolutions and transposed convolutions are
    1.3-2x faster in that layout); training and GPU keep PyTorch's default layout."""
    return x.device.type == "cpu" and not torch.is_grad_enabled()


def _group_stats(x: torch.Tensor, groups: int, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """GroupNorm's per-sample, per-group (mean, 1/std) of a channels-last (B, C, D, H, W) tensor, expanded
    to (B, C, 1, 1, 1).

    Two passes over (B, voxels, C) rows (the second forms the squared deviations 64k voxels at a time,
    in cache), each summed in blocks of 1024 voxels first (pairwise-style
    accumulation): float32 error ~1e-7 relative and 2.5x faster than ``var_mean`` in this layout.
    PyTorch's own channels-last GroupNorm kernel uses a one-pass variance: off by up to 5e-2 when the
    activations have a large mean (tested).
    """
    b, c = x.shape[:2]
    rows = x.permute(0, 2, 3, 4, 1).reshape(b, -1, groups, c // groups)  # a view for channels-last memory
    n = rows.shape[1]
    main = n - n % 1024  # whole blocks of 1024 voxels; the rest is summed on its own
    chunk = 64 * 1024  # the squared deviations are formed a cache-sized chunk at a time

    def mean_rows(t, centre=None):  # (B, N, G, c/G) -> (B, 1, G, 1); of (t - centre)^2 when centre is given
        def f(u):
            return u if centre is None else (u - centre).square_()

        blocks = [f(t[:, i : min(i + chunk, main)]).view(b, -1, 1024, *t.shape[2:]).sum(2)
                  for i in range(0, main, chunk)]
        total = torch.cat(blocks, 1).sum(dim=(1, 3), keepdim=True) if blocks else 0.0
        if main < n:
            total = total + f(t[:, main:]).sum(dim=(1, 3), keepdim=True)
        return total / (n * t.shape[3])

    mean = mean_rows(rows)
    var = mean_rows(rows, mean)
    mean = mean.view(b, groups, 1).expand(b, groups, c // groups).reshape(b, c, 1, 1, 1)
    rstd = (var + eps).rsqrt().view(b, groups, 1).expand(b, groups, c // groups).reshape(b, c, 1, 1, 1)
    return mean, rstd


def _is_fast(x: torch.Tensor) -> bool:
    """A channels-last inference tensor (the decoder's CPU fast path)."""
    return x.is_contiguous(memory_format=torch.channels_last_3d) and not x.is_contiguous() and not torch.is_grad_enabled()


def _padded_like(x: torch.Tensor, pad: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """(channels-last buffer of ``x``'s shape grown by ``pad`` (F.pad order), its interior view)."""
    (wl, wr, hl, hr, dl, dr) = pad
    b, c, d, h, w = x.shape
    buf = torch.empty((b, c, d + dl + dr, h + hl + hr, w + wl + wr), dtype=x.dtype, device=x.device,
                      memory_format=torch.channels_last_3d)
    return buf, buf[:, :, dl : dl + d, hl : hl + h, wl : wl + w]


def _replicate_faces(buf: torch.Tensor, pad: tuple[int, ...]) -> torch.Tensor:
    """Fill the border of ``buf`` from its interior as ``F.pad(..., mode="replicate")`` does: axis by axis,
    each face a copy of the nearest interior plane over the full extent of the other axes."""
    for dim, (lo, hi) in zip((4, 3, 2), (pad[0:2], pad[2:4], pad[4:6])):
        n = buf.shape[dim]
        if lo:
            buf.narrow(dim, 0, lo).copy_(buf.narrow(dim, lo, 1).expand_as(buf.narrow(dim, 0, lo)))
        if hi:
            buf.narrow(dim, n - hi, hi).copy_(buf.narrow(dim, n - hi - 1, 1).expand_as(buf.narrow(dim, n - hi, hi)))
    return buf


def _norm_silu(norm: nn.GroupNorm, x: torch.Tensor, pad: tuple[int, ...] | None = None) -> torch.Tensor:
    """SiLU(GroupNorm(x)); channels-last inference input gets accurate statistics from :func:`_group_stats`.

    With ``pad`` (fast path only) the result is written straight into the interior of a replicate-padded
    buffer, which is returned: the same values as ``F.pad(result, pad, mode="replicate")`` without an
    extra activation-sized copy.
    """
    if _is_fast(x):
        mean, rstd = _group_stats(x, norm.num_groups, norm.eps)
        scale = rstd * norm.weight.view(1, -1, 1, 1, 1)
        shift = norm.bias.view(1, -1, 1, 1, 1) - mean * scale
        if pad is None:
            return F.silu(torch.addcmul(shift, x, scale), inplace=True)
        buf, inner = _padded_like(x, pad)
        torch.addcmul(shift, x, scale, out=inner)
        F.silu(inner, inplace=True)
        return _replicate_faces(buf, pad)
    out = _silu(norm(x))
    return out if pad is None else F.pad(out, pad, mode="replicate")


def _norm_silu_conv(norm: nn.GroupNorm, conv: SamePadConv3d, x: torch.Tensor) -> torch.Tensor:
    """``conv(SiLU(GroupNorm(x)))``; on the fast path the padding is written with the activation."""
    if _is_fast(x) and conv.padding_type == "replicate" and any(conv.pad):
        return conv.conv(_norm_silu(norm, x, conv.pad))
    return conv(_norm_silu(norm, x))


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


def _conv_on_box(conv: SamePadConv3d, src: torch.Tensor, src_lo, box, size=None) -> torch.Tensor:
    """``conv(full)[box]`` for a stride-1 :class:`SamePadConv3d` from ``src``, which holds the voxels
    ``[src_lo, src_lo + src.shape)`` of a volume of ``size`` (default: src is the whole volume).

    Replicate padding of the whole volume then slicing equals slicing the needed voxels and
    replicate-padding only where the box's receptive field leaves the volume.
    """
    size = tuple(size or src.shape[2:])
    pads_lr = [(conv.pad[2 * (2 - a)], conv.pad[2 * (2 - a) + 1]) for a in range(3)]  # per axis (left, right)
    take, extra = [], []
    for (lo, hi), (pl, pr), n, off in zip(box, pads_lr, size, src_lo):
        need_lo, need_hi = max(lo - pl, 0), min(hi + pr, n)
        take.append(slice(need_lo - off, need_hi - off))
        extra.append((need_lo - (lo - pl), (hi + pr) - need_hi))
    x = src[(..., *take)]
    pad = [v for lr in extra[::-1] for v in lr]
    if any(pad):
        x = F.pad(x, pad, mode=conv.padding_type)
    return conv.conv(x)


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

    def forward(self, x, out_pad: tuple[int, ...] | None = None):
        """``x + conv2(...)``; with ``out_pad`` (fast path) returned replicate-padded by ``out_pad``."""
        h = _norm_silu_conv(self.norm1, self.conv1, x)
        h = _norm_silu_conv(self.norm2, self.conv2, h)
        if out_pad is not None and _is_fast(h):
            buf, inner = _padded_like(h, out_pad)
            torch.add(x, h, out=inner)
            return _replicate_faces(buf, out_pad)
        if out_pad is None:
            return h.add_(x) if _is_fast(h) else x + h  # h is this block's own fresh tensor
        return F.pad(x + h, out_pad, mode="replicate")


class _GNSiLU(nn.Sequential):
    def __init__(self, channels, groups):
        super().__init__(_norm(channels, groups), nn.SiLU())

    def forward(self, x, out_pad: tuple[int, ...] | None = None):
        return _norm_silu(self[0], x, out_pad)


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

    def forward(self, z, region: tuple[slice, slice, slice] | None = None):
        """(B, 4h, z, x, y) -> (B, 1, Z, X, Y); with ``region`` (three slices of the output) only that box.

        The GroupNorm statistics are global, so everything up to the last normalisation runs on the
        whole volume; the last convolution of the last ResBlock, its skip and ``conv_last`` (about a
        fifth of the work) run on the box plus their 2-voxel receptive field. Equal to slicing the full
        output, to float rounding (tested).
        """
        if _fast_layout(z):
            z = z.contiguous(memory_format=torch.channels_last_3d)
        # every convolution pads its input (replicate); each block hands the next one its output already
        # padded for it (written in place on the CPU fast path, F.pad otherwise)
        last = len(self.conv_blocks) - 1
        h = self.final_block(z, out_pad=self.conv_blocks[0].up.pad)  # (B, 4h, Z/4, X/4, Y/4) + border
        for i, block in enumerate(self.conv_blocks):
            h = block.res1(block.up.convt(h))  # each level doubles the strided axes
            if region is not None and i == last:
                return self._last_on_region(block.res2, h, region)
            h = block.res2(h, out_pad=self.conv_blocks[i + 1].up.pad if i < last else self.conv_last.pad)
        return self.conv_last.conv(h)  # (B, 1, Z, X, Y), no output activation

    def _last_on_region(self, res: ResBlock, x: torch.Tensor, region) -> torch.Tensor:
        size = x.shape[2:]
        box = [(sl.start or 0, size[a] if sl.stop is None else sl.stop) for a, sl in enumerate(region)]
        if any(not 0 <= lo < hi <= n for (lo, hi), n in zip(box, size)):
            raise ValueError(f"decode region {region} is empty or outside the output {tuple(size)}")
        a = _norm_silu(res.norm2, _norm_silu_conv(res.norm1, res.conv1, x))  # whole volume (global statistics)
        box1 = [(max(lo - 1, 0), min(hi + 1, n)) for (lo, hi), n in zip(box, size)]
        skip = x[(..., *(slice(lo, hi) for lo, hi in box1))]
        y = skip + _conv_on_box(res.conv2, a, (0, 0, 0), box1)
        return _conv_on_box(self.conv_last, y, tuple(lo for lo, _ in box1), box, size)


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

    def decode(self, z: torch.Tensor, quantize: bool = True, region=None) -> torch.Tensor:
        """Decode a continuous latent (B, 8, z, x, y). ``quantize=True`` snaps it to the nearest codes
        first (what every synthesis path does); ``False`` decodes it as given. ``region`` (three slices
        of the output volume) decodes only that box (see :meth:`Decoder.forward`)."""
        if quantize:
            return self.decode_indices(self.codebook.lookup(z), region=region)
        return self._decode(z, region)

    def decode_indices(self, indices: torch.Tensor, region=None) -> torch.Tensor:
        """Decode integer code indices (B, z, x, y) -> (B, 1, Z, X, Y) (or only the ``region`` box)."""
        return self._decode(self.codebook.embed(indices), region)

    def _decode(self, codes: torch.Tensor, region=None) -> torch.Tensor:
        return self.decoder(self.post_vq_conv(codes), region=region).contiguous()

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
