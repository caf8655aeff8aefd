"""Attention building blocks of the DiffTumor denoiser (:mod:`backend.diffusion.unet`).

Three kinds of attention, all over tensors laid out (B, C, F, H, W) with F the slice ("frame") axis:

* :class:`Attention` - multi-head softmax attention over a token axis, optionally with rotary position
  embedding (Su et al. 2021, "RoFormer") and an additive relative-position bias (Raffel et al. 2020, T5).
  Wrapped by :class:`AlongAxis` it attends along the frames (temporal) or over the pixels of one frame.
* :class:`SpatialLinearAttention` - linear attention per frame (Shen et al. 2021, "Efficient attention").
* :class:`RelativePositionBias` and :class:`RotaryEmbedding` - the position encodings, computed once per
  forward pass by the U-Net and handed to every temporal attention.

Module and parameter names follow the released checkpoints so that their state dicts load strictly.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


class RotaryEmbedding(nn.Module):
    """Rotary position embedding with interleaved pairs and 'lang' frequencies 1/theta^(2i/dim).

    ``freqs`` is a persistent buffer (as in the released files, where one instance is shared by every
    temporal attention and therefore appears once per attention in the state dict).
    """

    def __init__(self, dim: int, theta: float = 10000.0):
        super().__init__()
        if dim % 2:
            raise ValueError(f"rotary dim must be even, got {dim}")
        self.dim = dim
        freqs = 1.0 / (theta ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))
        self.register_buffer("freqs", freqs)

    def cos_sin(self, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) tables of shape (seq_len, dim // 2): one angle per interleaved pair."""
        pos = torch.arange(seq_len, device=self.freqs.device, dtype=self.freqs.dtype)
        angles = pos[:, None] * self.freqs[None, :]  # (n, dim/2)
        return angles.cos(), angles.sin()

    @staticmethod
    def rotate(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate the pairs (t[2i], t[2i+1]) of the first ``2 * cos.shape[-1]`` features of t (..., n, d).

        (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin), written as t * cos' + swap(t) * sin' with the
        tables repeated per pair and the sign folded into sin' (exact: negation does not round), which
        avoids splitting, stacking and re-joining the pairs.
        """
        rot = 2 * cos.shape[-1]
        if t.dtype in (torch.float32, torch.float64):
            # the same products and sums as complex multiplication (x1 + i x2)(c + i s), which runs
            # vectorised and without the pair swap (about 50x faster on CPU; equal to the line below)
            head = t[..., :rot] if t.shape[-1] > rot else t
            z = torch.view_as_complex(head.unflatten(-1, (rot // 2, 2)))
            out = torch.view_as_real(z * torch.complex(cos.to(t.dtype), sin.to(t.dtype))).flatten(-2)
            return torch.cat((out, t[..., rot:]), dim=-1) if t.shape[-1] > rot else out
        cos2 = cos.repeat_interleave(2, dim=-1)  # (n, rot): c0 c0 c1 c1 ...
        sin2 = torch.stack((-sin, sin), dim=-1).flatten(-2)  # (n, rot): -s0 s0 -s1 s1 ...
        head = t[..., :rot] if t.shape[-1] > rot else t
        swapped = head.unflatten(-1, (rot // 2, 2)).flip(-1).flatten(-2)  # x2 x1 x4 x3 ...
        out = head * cos2 + swapped * sin2
        return torch.cat((out, t[..., rot:]), dim=-1) if t.shape[-1] > rot else out


class RelativePositionBias(nn.Module):
    """T5 relative position bias: signed, bucketed distances -> one learned scalar per head."""

    def __init__(self, heads: int = 8, num_buckets: int = 32, max_distance: int = 32):
        super().__init__()
        self.num_buckets = num_buckets
        self.max_distance = max_distance
        self.relative_attention_bias = nn.Embedding(num_buckets, heads)

    @staticmethod
    def bucket(relative_position: torch.Tensor, num_buckets: int, max_distance: int) -> torch.Tensor:
        # half of the buckets per sign; exact below max_exact, log-spaced up to max_distance
        n = -relative_position
        num_buckets //= 2
        ret = (n < 0).long() * num_buckets
        n = n.abs()
        max_exact = num_buckets // 2
        is_small = n < max_exact
        large = max_exact + (
            torch.log(n.float() / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact)
        ).long()
        large = large.clamp(max=num_buckets - 1)
        return ret + torch.where(is_small, n, large)

    def forward(self, n: int) -> torch.Tensor:
        """Bias (heads, n, n) for a sequence of length n."""
        device = self.relative_attention_bias.weight.device
        pos = torch.arange(n, dtype=torch.long, device=device)
        rel = pos[None, :] - pos[:, None]  # (i, j) = key - query
        buckets = self.bucket(rel, self.num_buckets, self.max_distance)
        return rearrange(self.relative_attention_bias(buckets), "i j h -> h i j")


class Attention(nn.Module):
    """Multi-head softmax attention over the second-to-last axis of (..., n, dim)."""

    def __init__(self, dim: int, heads: int = 8, dim_head: int = 32, rotary_emb: RotaryEmbedding | None = None):
        super().__init__()
        self.heads = heads
        self.dim_head = dim_head
        self.scale = dim_head**-0.5
        hidden = heads * dim_head
        self.rotary_emb = rotary_emb
        self.to_qkv = nn.Linear(dim, hidden * 3, bias=False)
        self.to_out = nn.Linear(hidden, dim, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        pos_bias: torch.Tensor | None = None,
        rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        lead, n = x.shape[:-2], x.shape[-2]
        qkv = self.to_qkv(x).reshape(-1, n, 3, self.heads, self.dim_head)  # (B', n, 3, h, d)
        if self.rotary_emb is not None:
            cos, sin = rotary if rotary is not None else self.rotary_emb.cos_sin(n)
        if self.rotary_emb is not None and qkv.dtype == torch.float32 and 2 * cos.shape[-1] == self.dim_head:
            q, k, v = self._rotated_heads(qkv, cos, sin)
        else:
            q, k, v = qkv.permute(2, 0, 3, 1, 4).contiguous().unbind(0)  # each (B', h, n, d)
            q = q * self.scale
            if self.rotary_emb is not None:
                q = RotaryEmbedding.rotate(q, cos, sin)
                k = RotaryEmbedding.rotate(k, cos, sin)
        if x.device.type == "cuda":  # fused kernels win on the GPU (q is already scaled)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=pos_bias, scale=1.0)
        else:
            # softmax(q k^T + bias) v; q is already scaled. Written out rather than through
            # F.scaled_dot_product_attention: on CPU its fused kernel ran 1.5x slower at these shapes (24 frames,
            # 32 features), and with a float bias it scans the mask for -inf rows on every call.
            sim = torch.matmul(q, k.transpose(-1, -2))  # (B', h, n, n)
            if pos_bias is not None:
                sim.add_(pos_bias)
            out = torch.matmul(sim.softmax(dim=-1), v)  # (B', h, n, d)
        out = out.transpose(1, 2).reshape(*lead, n, -1)  # (..., n, h*d)
        return self.to_out(out)

    def _rotated_heads(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """(B', n, 3, h, d) float32 projections -> q (scaled and rotated), k (rotated), v, each (B', h, n, d).

        The rotation of every pair (x1, x2) is the complex product (x1 + i x2)(cos + i sin) (see
        :meth:`RotaryEmbedding.rotate`); here it runs in the same pass that moves q and k to the head-major
        layout, with the 1/sqrt(d) scale folded into q's table, instead of a permuting copy, a scaling pass and
        two rotation passes (~2x less time for this part at 24 frames).
        """
        b, n, _, h, d = qkv.shape
        table = torch.complex(cos.to(qkv.dtype), sin.to(qkv.dtype))  # (n, d/2)
        table = torch.stack((table * self.scale, table))[:, None, None]  # (2, 1, 1, n, d/2): q's row scaled
        pairs = torch.view_as_complex(qkv[:, :, :2].unflatten(-1, (d // 2, 2)))  # (B', n, 2, h, d/2)
        if qkv.requires_grad:  # training: out= does not take part in autograd
            qk = (pairs.permute(2, 0, 3, 1, 4) * table).contiguous()
        else:
            qk = torch.empty((2, b, h, n, d // 2), dtype=pairs.dtype, device=qkv.device)
            torch.mul(pairs.permute(2, 0, 3, 1, 4), table, out=qk)  # rotate while moving to (2, B', h, n, d/2)
        q, k = torch.view_as_real(qk).flatten(-2).unbind(0)  # each (B', h, n, d)
        return q, k, qkv[:, :, 2].transpose(1, 2).contiguous()


# Attention runs over a few thousand tokens at a time: the 768-wide q/k/v of one chunk stays in cache
# instead of streaming tens of megabytes per layer through memory (about twice as fast on CPU at 24^3).
CHUNK_TOKENS = 1024


def _chunked(fn, tokens: torch.Tensor, seq_len: int, norm: nn.Module | None, **kwargs) -> torch.Tensor:
    """Apply ``fn(norm(tokens))`` to (S, seq_len, c) tokens, a block of whole sequences at a time."""
    per = max(1, CHUNK_TOKENS // seq_len)
    outs = [fn(norm.last_dim(t) if norm is not None else t, **kwargs) for t in tokens.split(per, dim=0)]
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)


class AlongAxis(nn.Module):
    """Run ``fn`` on tokens taken along the frames ('temporal') or the pixels of each frame ('spatial').

    Given ``norm`` (a channel LayerNorm, see :class:`backend.diffusion.unet.PreNorm`), it is applied in the
    token layout, where the channels are contiguous.
    """

    takes_norm = True

    def __init__(self, axis: str, fn: nn.Module):
        super().__init__()
        if axis not in ("temporal", "spatial"):
            raise ValueError(f"axis must be 'temporal' or 'spatial', got {axis!r}")
        self.axis = axis
        self.fn = fn

    def forward(self, x: torch.Tensor, norm: nn.Module | None = None, **kwargs) -> torch.Tensor:
        b, c, f, h, w = x.shape
        if self.axis == "temporal":  # one sequence of F frames per pixel
            tokens = rearrange(x, "b c f h w -> (b h w) f c").contiguous()
            out = _chunked(self.fn, tokens, f, norm, **kwargs)
            return rearrange(out, "(b h w) f c -> b c f h w", b=b, h=h, w=w)
        tokens = rearrange(x, "b c f h w -> (b f) (h w) c").contiguous()  # one sequence of H*W pixels per frame
        out = _chunked(self.fn, tokens, h * w, norm, **kwargs)
        return rearrange(out, "(b f) (h w) c -> b c f h w", b=b, h=h, w=w)


class SpatialLinearAttention(nn.Module):
    """Linear attention over the pixels of each frame: q softmax over features, k softmax over positions.

    The projections are 1x1 convolutions (as released); they run as matrix products on (frames, pixels,
    channels) tokens, which is several times faster on CPU than oneDNN's 1x1 convolution into 768 channels.
    """

    takes_norm = True

    def __init__(self, dim: int, heads: int = 8, dim_head: int = 32):
        super().__init__()
        self.heads = heads
        self.dim_head = dim_head
        self.scale = dim_head**-0.5
        hidden = heads * dim_head
        self.to_qkv = nn.Conv2d(dim, hidden * 3, 1, bias=False)
        self.to_out = nn.Conv2d(hidden, dim, 1)

    def attend(self, tokens: torch.Tensor) -> torch.Tensor:
        """(frames, n pixels, c) -> (frames, n, c).

        Per frame and head, out = softmax_d(q) (softmax_n(k)^T v) W_o^T + b: both products are folded into one
        (d, c) matrix per head before q meets it, so q (all heads at once, (n, h*d)) is multiplied once by an
        (h*d, c) matrix; and softmax_n(k)^T v is computed as exp(k - max)^T v divided by the row sums, instead of
        normalising all of k. Same sums, in another order (equal to float32 rounding); ~1.25x faster at 24^3.
        """
        fr, n, _ = tokens.shape
        h, d = self.heads, self.dim_head
        qkv = F.linear(tokens, self.to_qkv.weight.flatten(1)).view(fr, n, 3, h * d)
        q = qkv[:, :, 0].unflatten(-1, (h, d)).softmax(dim=-1)  # (frames, n, h, d): over the features of each pixel
        k, v = qkv[:, :, 1], qkv[:, :, 2]  # (frames, n, h*d)
        e = (k - k.amax(dim=1, keepdim=True)).exp_()  # softmax over the pixels, not yet normalised
        z = e.sum(dim=1).view(fr, h, d, 1)  # (frames, h, d, 1)
        heads = [torch.bmm(e[:, :, i * d:(i + 1) * d].transpose(1, 2), v[:, :, i * d:(i + 1) * d]) for i in range(h)]
        context = torch.stack(heads, dim=1).div_(z)  # (frames, h, d, e) = softmax_n(k)^T v
        w_out = (self.to_out.weight.flatten(1) * self.scale).view(-1, h, d).permute(1, 2, 0)  # (h, e, c)
        fold = torch.matmul(context, w_out).reshape(fr, h * d, -1)  # (frames, h*d, c)
        return torch.baddbmm(self.to_out.bias, q.reshape(fr, n, h * d), fold)

    def forward(self, x: torch.Tensor, norm: nn.Module | None = None) -> torch.Tensor:
        b, c, f, h, w = x.shape
        tokens = rearrange(x, "b c f h w -> (b f) (h w) c").contiguous()
        out = _chunked(self.attend, tokens, h * w, norm)
        return rearrange(out, "(b f) (h w) c -> b c f h w", b=b, h=h, w=w)
