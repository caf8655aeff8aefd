"""The DiffTumor denoiser: a 3D U-Net over the (C, F, H, W) latent with factorised space/slice attention.

Architecture of the released model (official_pipeline.md section 2.1), a video-diffusion U-Net (Ho et al.
2022, "Video Diffusion Models") applied to the 8 x 24^3 latent with the slice axis as "frames":

* every convolution is in-plane ((1, k, k) kernels) and H, W are halved per level while F never is;
* information moves along F only through temporal attention (T5 relative-position bias + rotary);
* per-frame linear attention on every level, full softmax attention over the pixels in the middle;
* ResNet blocks with GroupNorm and FiLM conditioning on a sinusoidal time embedding.

The network knows nothing about noise: it maps ``(x_t, t, cond)`` to a prediction. ``x_t`` and ``cond``
are concatenated on channels (8 + 9 = 17 inputs by default). Names of parameters and buffers equal the
released ``denoise_fn.*`` keys, so :func:`backend.diffusion.official.load_diffusion` loads them strictly.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from backend.diffusion.attention import (
    AlongAxis,
    Attention,
    RelativePositionBias,
    RotaryEmbedding,
    SpatialLinearAttention,
)


def _channels_last(x: torch.Tensor) -> bool:
    return x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d)


def _frames(x: torch.Tensor) -> torch.Tensor:
    """(B, C, F, H, W) -> (B*F, C, H, W): a free view of a channels-last tensor (NHWC frames), else a copy."""
    b, c, f, h, w = x.shape
    if _channels_last(x):
        return x.permute(0, 2, 3, 4, 1).reshape(b * f, h, w, c).permute(0, 3, 1, 2)
    return x.transpose(1, 2).reshape(b * f, c, h, w)


def _unframes(y: torch.Tensor, b: int, channels_last: bool) -> torch.Tensor:
    """(B*F, C', H', W') -> (B, C', F, H', W'), channels-last (a view of NHWC frames) or contiguous."""
    f = y.shape[0] // b
    if channels_last:
        y = y.contiguous(memory_format=torch.channels_last)  # a no-op when the kernel kept NHWC
        return y.permute(0, 2, 3, 1).reshape(b, f, *y.shape[2:], y.shape[1]).permute(0, 4, 1, 2, 3)
    return y.reshape(b, f, *y.shape[1:]).transpose(1, 2).contiguous()


class InPlaneConv3d(nn.Conv3d):
    """A ``Conv3d`` whose kernel spans one frame ((1, k, k)), run as a 2D convolution over every frame.

    Same parameters and names as ``nn.Conv3d`` (so released weights load unchanged) and the same result
    to float rounding; oneDNN's 2D kernels are about twice as fast on CPU as its (1, k, k) 3D path, and twice
    again at 24 channels with channels-last (NHWC) frames, which a channels-last input gives without a copy.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel_size[0] != 1 or self.stride[0] != 1 or self.padding[0] != 0 or self.padding_mode != "zeros":
            return super().forward(x)
        y = F.conv2d(_frames(x), self.weight.squeeze(2), self.bias, self.stride[1:], self.padding[1:],
                     self.dilation[1:], self.groups)
        return _unframes(y, x.shape[0], _channels_last(x))  # (B, C', F, H', W')


class InPlaneConvTranspose3d(nn.ConvTranspose3d):
    """A ``ConvTranspose3d`` with a (1, k, k) kernel and stride (1, s, s), run as a 2D transposed conv per frame."""

    def forward(self, x: torch.Tensor, output_size=None) -> torch.Tensor:
        if (self.kernel_size[0] != 1 or self.stride[0] != 1 or self.padding[0] != 0
                or self.output_padding[0] != 0 or output_size is not None):
            return super().forward(x, output_size)
        y = F.conv_transpose2d(_frames(x), self.weight.squeeze(2), self.bias, self.stride[1:], self.padding[1:],
                               self.output_padding[1:], self.groups, self.dilation[1:])
        return _unframes(y, x.shape[0], _channels_last(x))


@dataclass(frozen=True)
class Unet3DConfig:
    """Model arguments; the defaults are the released model (6,018,576 parameters)."""

    dim: int = 24  # base width; also the sinusoidal time-embedding size (time MLP width = 4 * dim)
    dim_mults: tuple[int, ...] = (1, 2, 4, 8)  # width multiplier per level; H, W halve between levels
    channels: int = 17  # input channels = latent (8) + condition (masked-CT latent 8 + mask code 1)
    out_dim: int = 8  # predicted channels = latent channels
    attn_heads: int = 8
    attn_dim_head: int = 32
    init_kernel_size: int = 7  # in-plane kernel of the first convolution
    resnet_groups: int = 8  # GroupNorm groups in every ResNet block
    use_sparse_linear_attn: bool = True  # per-frame linear attention on every level
    rel_pos_buckets: int = 32
    rel_pos_max_distance: int = 32
    rotary_dim: int = 32  # min(32, attn_dim_head) in the release

    def __post_init__(self):
        object.__setattr__(self, "dim_mults", tuple(int(m) for m in self.dim_mults))
        if self.dim < 4 or self.dim % 2:
            raise ValueError(f"dim must be an even number >= 4, got {self.dim}")
        if not self.dim_mults:
            raise ValueError("dim_mults must name at least one level")
        for width in (self.dim, *(self.dim * m for m in self.dim_mults)):
            if width % self.resnet_groups:
                raise ValueError(f"width {width} is not divisible by resnet_groups={self.resnet_groups}")
        if self.rotary_dim > self.attn_dim_head or self.rotary_dim % 2:
            raise ValueError(f"rotary_dim must be even and <= attn_dim_head, got {self.rotary_dim}")
        if self.init_kernel_size % 2 == 0:
            raise ValueError(f"init_kernel_size must be odd, got {self.init_kernel_size}")

    @property
    def latent_channels(self) -> int:
        return self.out_dim

    @property
    def cond_channels(self) -> int:
        return self.channels - self.out_dim

    def to_dict(self) -> dict:
        d = asdict(self)
        d["dim_mults"] = list(self.dim_mults)
        return d


class SinusoidalPosEmb(nn.Module):
    """Transformer sinusoidal embedding of the (integer) timestep: [sin(t w_i), cos(t w_i)]."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.dim // 2
        freqs = torch.exp(torch.arange(half, device=t.device) * -(math.log(10000) / (half - 1)))
        args = t.float()[:, None] * freqs[None, :]
        return torch.cat((args.sin(), args.cos()), dim=-1)  # (B, dim)


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channel axis of (B, C, F, H, W) with a gain and no bias."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.gamma = nn.Parameter(torch.ones(1, dim, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        var, mean = torch.var_mean(x, dim=1, unbiased=False, keepdim=True)
        return (x - mean) * (var + self.eps).rsqrt() * self.gamma

    def last_dim(self, t: torch.Tensor) -> torch.Tensor:
        """The same normalisation for tokens (..., C) with the channels last."""
        return F.layer_norm(t, (t.shape[-1],), self.gamma.view(-1), None, self.eps)


class PreNorm(nn.Module):
    def __init__(self, dim: int, fn: nn.Module):
        super().__init__()
        self.fn = fn
        self.norm = ChannelLayerNorm(dim)

    def forward(self, x, **kwargs):
        if getattr(self.fn, "takes_norm", False):  # normalises in its own (token) layout
            return self.fn(x, norm=self.norm, **kwargs)
        return self.fn(self.norm(x), **kwargs)


class Residual(nn.Module):
    def __init__(self, fn: nn.Module):
        super().__init__()
        self.fn = fn

    def forward(self, x, **kwargs):
        return self.fn(x, **kwargs) + x


class Block(nn.Module):
    """In-plane conv -> GroupNorm -> optional FiLM x(1 + scale) + shift -> SiLU."""

    def __init__(self, dim: int, dim_out: int, groups: int):
        super().__init__()
        self.proj = InPlaneConv3d(dim, dim_out, (1, 3, 3), padding=(0, 1, 1))
        self.norm = nn.GroupNorm(groups, dim_out)
        self.act = nn.SiLU()

    def forward(self, x, scale_shift=None):
        x = self.norm(self.proj(x))
        if scale_shift is not None:
            scale, shift = scale_shift
            x = x * (scale + 1) + shift
        return self.act(x)


class ResnetBlock(nn.Module):
    def __init__(self, dim: int, dim_out: int, *, time_emb_dim: int | None, groups: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.SiLU(), nn.Linear(time_emb_dim, dim_out * 2)) if time_emb_dim else None
        self.block1 = Block(dim, dim_out, groups)
        self.block2 = Block(dim_out, dim_out, groups)
        self.res_conv = InPlaneConv3d(dim, dim_out, 1) if dim != dim_out else nn.Identity()

    def forward(self, x, time_emb=None):
        scale_shift = None
        if self.mlp is not None and time_emb is not None:
            film = rearrange(self.mlp(time_emb), "b c -> b c 1 1 1")
            scale_shift = film.chunk(2, dim=1)
        h = self.block2(self.block1(x, scale_shift))
        return h + self.res_conv(x)


class Unet3D(nn.Module):
    """Denoiser ``(x_t (B, out_dim, F, H, W), t (B,), cond (B, channels - out_dim, F, H, W)) -> (B, out_dim, ...)``.

    H and W must be divisible by 2^(levels - 1) (24 -> 12 -> 6 -> 3 for the release).
    """

    def __init__(self, config: Unet3DConfig | None = None):
        super().__init__()
        cfg = config or Unet3DConfig()
        self.config = cfg
        dim, heads, dim_head = cfg.dim, cfg.attn_heads, cfg.attn_dim_head
        time_dim = dim * 4

        # ONE rotary instance shared by all temporal attentions: its `freqs` appears under each of them in the
        # state dict (10 keys, as released) and nowhere at the top level (plain attribute, not a submodule)
        rotary = RotaryEmbedding(min(cfg.rotary_dim, dim_head))
        object.__setattr__(self, "rotary", rotary)

        def temporal(d):
            return Residual(PreNorm(d, AlongAxis("temporal", Attention(d, heads, dim_head, rotary_emb=rotary))))

        self.time_rel_pos_bias = RelativePositionBias(heads, cfg.rel_pos_buckets, cfg.rel_pos_max_distance)
        pad = cfg.init_kernel_size // 2
        self.init_conv = InPlaneConv3d(cfg.channels, dim, (1, cfg.init_kernel_size, cfg.init_kernel_size), padding=(0, pad, pad))
        self.init_temporal_attn = temporal(dim)
        self.time_mlp = nn.Sequential(
            SinusoidalPosEmb(dim), nn.Linear(dim, time_dim), nn.GELU(), nn.Linear(time_dim, time_dim)
        )

        dims = [dim, *(dim * m for m in cfg.dim_mults)]
        in_out = list(zip(dims[:-1], dims[1:]))
        n_levels = len(in_out)

        def resnet(a, b, t=time_dim):
            return ResnetBlock(a, b, time_emb_dim=t, groups=cfg.resnet_groups)

        def spatial_linear(d):
            if not cfg.use_sparse_linear_attn:
                return nn.Identity()
            return Residual(PreNorm(d, SpatialLinearAttention(d, heads, dim_head)))

        self.downs = nn.ModuleList()
        for i, (d_in, d_out) in enumerate(in_out):
            last = i == n_levels - 1
            down = nn.Identity() if last else InPlaneConv3d(d_out, d_out, (1, 4, 4), (1, 2, 2), (0, 1, 1))
            self.downs.append(
                nn.ModuleList([resnet(d_in, d_out), resnet(d_out, d_out), spatial_linear(d_out), temporal(d_out), down])
            )

        mid = dims[-1]
        self.mid_block1 = resnet(mid, mid)
        self.mid_spatial_attn = Residual(PreNorm(mid, AlongAxis("spatial", Attention(mid, heads, dim_head))))
        self.mid_temporal_attn = temporal(mid)
        self.mid_block2 = resnet(mid, mid)

        self.ups = nn.ModuleList()
        for i, (d_in, d_out) in enumerate(reversed(in_out)):
            last = i == n_levels - 1
            up = nn.Identity() if last else InPlaneConvTranspose3d(d_in, d_in, (1, 4, 4), (1, 2, 2), (0, 1, 1))
            self.ups.append(
                nn.ModuleList([resnet(d_out * 2, d_in), resnet(d_in, d_in), spatial_linear(d_in), temporal(d_in), up])
            )

        self.final_conv = nn.Sequential(resnet(dim * 2, dim, t=None), InPlaneConv3d(dim, cfg.out_dim, 1))

    @property
    def levels(self) -> int:
        return len(self.config.dim_mults)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        if cond is not None:
            x = torch.cat((x, cond), dim=1)  # (B, channels, F, H, W)
        if x.shape[1] != self.config.channels:
            raise ValueError(f"Unet3D expects {self.config.channels} input channels (x_t + cond), got {x.shape[1]}")
        step = 2 ** (self.levels - 1)
        if x.shape[-1] % step or x.shape[-2] % step:
            raise ValueError(f"Unet3D: in-plane size {tuple(x.shape[-2:])} must be divisible by {step}")
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        frames = x.shape[2]
        if x.device.type == "cpu":  # the whole network runs channels-last on CPU: NHWC convolutions, free
            x = x.contiguous(memory_format=torch.channels_last_3d)  # per-frame tokens (measured: bench/diffusion.py)
        # position encodings along the frame axis, once per forward
        attn_kw = {"pos_bias": self.time_rel_pos_bias(frames).to(x.dtype), "rotary": self.rotary.cos_sin(frames)}

        x = self.init_conv(x)
        r = x.clone()
        x = self.init_temporal_attn(x, **attn_kw)
        temb = self.time_mlp(t)  # (B, 4 dim)

        skips = []
        for block1, block2, spatial_attn, temporal_attn, downsample in self.downs:
            x = block1(x, temb)
            x = block2(x, temb)
            x = spatial_attn(x)
            x = temporal_attn(x, **attn_kw)
            skips.append(x)
            x = downsample(x)

        x = self.mid_block1(x, temb)
        x = self.mid_spatial_attn(x)
        x = self.mid_temporal_attn(x, **attn_kw)
        x = self.mid_block2(x, temb)

        for block1, block2, spatial_attn, temporal_attn, upsample in self.ups:
            x = torch.cat((x, skips.pop()), dim=1)
            x = block1(x, temb)
            x = block2(x, temb)
            x = spatial_attn(x)
            x = temporal_attn(x, **attn_kw)
            x = upsample(x)

        x = torch.cat((x, r), dim=1)
        return self.final_conv(x).contiguous()  # (B, out_dim, F, H, W) in the default layout
