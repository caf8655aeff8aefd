"""The U-Net's attention blocks at the released level-0 shape (24 channels, 8 x 24^3 latent, 13,824 tokens), each
variant timed in the same sitting, interleaved, against the plain formulation it replaces.

    python bench/unet_attention.py [--threads 2] [--repeats 15] [--device cpu|cuda] [--json]

* temporal attention (24 frames per pixel, 8 heads x 32, rotary + T5 bias): ``plain`` = permuting copy, scale, two
  rotations, matmul, bias, softmax, matmul (the formulation before issue 19); ``current`` =
  :class:`backend.diffusion.attention.Attention` (rotation fused into the head-major copy, scale folded, bias in place);
  ``sdpa`` = the same q, k, v through ``F.scaled_dot_product_attention`` (what ``current`` uses on CUDA);
* per-frame linear attention (576 pixels): ``plain`` = softmax(q) (softmax(k)^T v), then the output projection;
  ``current`` = :class:`backend.diffusion.attention.SpatialLinearAttention` (output projection folded into the context).

Prints medians (ms), each variant's largest difference to ``plain`` relative to its output's largest value, and the
ratio current / plain; ratios from one sitting are what stay comparable on these shared machines.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F


def plain_temporal(att, x, pos_bias, rotary):
    from backend.diffusion.attention import RotaryEmbedding

    n = x.shape[-2]
    q, k, v = att.to_qkv(x).reshape(-1, n, 3, att.heads, att.dim_head).permute(2, 0, 3, 1, 4).contiguous().unbind(0)
    q = RotaryEmbedding.rotate(q * att.scale, *rotary)
    k = RotaryEmbedding.rotate(k, *rotary)
    sim = torch.matmul(q, k.transpose(-1, -2)) + pos_bias
    out = torch.matmul(sim.softmax(dim=-1), v)
    return att.to_out(out.transpose(1, 2).reshape(x.shape[0], n, -1))


def sdpa_temporal(att, x, pos_bias, rotary):
    n = x.shape[-2]
    q, k, v = att._rotated_heads(att.to_qkv(x).reshape(-1, n, 3, att.heads, att.dim_head), *rotary)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=pos_bias, scale=1.0)
    return att.to_out(out.transpose(1, 2).reshape(x.shape[0], n, -1))


def plain_linear(lin, tokens):
    fr, n, _ = tokens.shape
    qkv = F.linear(tokens, lin.to_qkv.weight.flatten(1)).view(fr, n, 3, lin.heads, lin.dim_head)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).contiguous().unbind(0)
    q = q.softmax(dim=-1) * lin.scale
    k = k.softmax(dim=-2)
    out = torch.matmul(q, torch.matmul(k.transpose(-1, -2), v)).transpose(1, 2).reshape(fr, n, -1)
    return F.linear(out, lin.to_out.weight.flatten(1), lin.to_out.bias)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from backend.diffusion.unet import Unet3D

    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    torch.manual_seed(0)
    unet = Unet3D().eval().to(dev)
    for p in unet.parameters():  # non-zero everywhere (some released blocks start at zero)
        p.data.normal_(0, 0.1)
    att = unet.init_temporal_attn.fn.fn.fn  # Residual -> PreNorm -> AlongAxis -> Attention (24 channels)
    lin = unet.downs[0][2].fn.fn  # Residual -> PreNorm -> SpatialLinearAttention
    temporal = torch.randn(24 * 24, 24, 24, device=dev)  # (pixels, frames, channels): one chunk set of level 0
    frames = torch.randn(24, 24 * 24, 24, device=dev)  # (frames, pixels, channels)
    kw = {"pos_bias": unet.time_rel_pos_bias(24), "rotary": unet.rotary.cos_sin(24)}

    def chunks(fn, t, per):
        return torch.cat([fn(c) for c in t.split(per)])

    cases = {
        ("temporal", "plain"): lambda: chunks(lambda c: plain_temporal(att, c, **kw), temporal, 42),
        ("temporal", "current"): lambda: chunks(lambda c: att(c, **kw), temporal, 42),
        ("temporal", "sdpa"): lambda: chunks(lambda c: sdpa_temporal(att, c, **kw), temporal, 42),
        ("linear", "plain"): lambda: chunks(lambda c: plain_linear(lin, c), frames, 1),
        ("linear", "current"): lambda: chunks(lin.attend, frames, 1),
    }
    times = {key: [] for key in cases}
    with torch.inference_mode():
        outs = {key: fn() for key, fn in cases.items()}  # warm-up and outputs
        for _ in range(args.repeats):
            for key, fn in cases.items():
                sync()
                t0 = time.perf_counter()
                fn()
                sync()
                times[key].append(time.perf_counter() - t0)
    res = {}
    for (block, variant), ts in times.items():
        ref = outs[block, "plain"]
        res[f"{block}_{variant}_ms"] = round(statistics.median(ts) * 1e3, 2)
        diff = ((outs[block, variant] - ref).abs().max() / ref.abs().max()).item()
        res[f"{block}_{variant}_rel_diff"] = float(f"{diff:.2e}")
    for block in ("temporal", "linear"):
        res[f"{block}_current_over_plain"] = round(res[f"{block}_current_ms"] / res[f"{block}_plain_ms"], 2)
    res["temporal_sdpa_over_current"] = round(res["temporal_sdpa_ms"] / res["temporal_current_ms"], 2)
    res.update(threads=args.threads, device=str(dev), torch=torch.__version__, repeats=args.repeats)
    if args.json:
        print(json.dumps(res))
        return 0
    print(f"U-Net level-0 attention, {dev}, {args.threads} threads, torch {torch.__version__}, "
          f"medians of {args.repeats}")
    for (block, variant) in cases:
        print(f"  {block:8s} {variant:8s} {res[f'{block}_{variant}_ms']:8.2f} ms   rel. diff to plain "
              f"{res[f'{block}_{variant}_rel_diff']:.1e}")
    print(f"  current / plain: temporal {res['temporal_current_over_plain']:.2f}x, linear "
          f"{res['linear_current_over_plain']:.2f}x; sdpa / current (temporal) "
          f"{res['temporal_sdpa_over_current']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
