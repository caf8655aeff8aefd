"""Benchmark of the synthesis engine (issue 3, item 7): seconds per tumour and peak memory.

Official configuration (VQGAN n_hiddens 16 / 16384 codes, Unet3D dim 24, T = 4 and T = 200 + DDIM 50),
**random weights** written in the released file layout to a temporary folder, a 96³ crop, the
shared real CT (3 mm) when present (else a synthetic one), CPU with ``--threads`` (default 2).

    python bench/synthesis.py            # figures next to the targets
    python bench/synthesis.py --json     # one JSON object: early_s, mid_late_s, second_tumor_s, model_based_s, peak_mb
    python bench/synthesis.py --dpm-steps 15   # also mid_late_dpm_s: mid/late with the opt-in DPM-Solver++ (default 15; 0 skips)

Medians over ``--repeats`` runs (mid/late: ``--repeats-mid``) after one untimed warm-up tumour, each also printed as
a ratio to its floor (below; the second tumour is an early one), which stays comparable between sittings; with
``--device cuda`` the GPU's peak memory is reported too (results come back as arrays, so every timed call
has waited for the GPU). The release takes 6.4 s (early) and
19.7 s (mid/late) with a 4.7 GB peak on this class of machine.

It also prints a **floor** for each stage: the floating-point operations the exact path must do (counted by
``torch.utils.flop_counter`` on the real modules: encode, every U-Net call, the region decode) divided by
the float32 rate this machine reaches on the decoder's own dominant convolution (32 -> 32 channels, 3^3,
96^3, measured here). No float32 implementation built from these kernels can beat it; a target below the
floor needs fewer operations (e.g. Winograd kernels) or lower precision (outside the parity tolerance).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED_CT = REPO.parent / "shared" / "data" / "totalseg_abdomen_3mm"
TARGETS = {"early_s": 1.5, "mid_late_s": 7.0, "second_tumor_s": 1.0, "peak_mb": 1536.0}
OFFICIAL = {"early_s": 6.4, "mid_late_s": 19.7, "peak_mb": 4700.0}


def write_random_weights(folder: Path, seed: int = 0) -> None:
    import torch

    from backend.diffusion.ddpm import DDPMScheduler
    from backend.diffusion.official import save_official
    from backend.diffusion.unet import Unet3D
    from backend.vqgan.model import VQGAN, VQGANConfig

    torch.manual_seed(seed)
    cfg = VQGANConfig()
    ae = VQGAN(cfg)
    torch.save({"model": ae.state_dict(), "model_config": cfg.to_dict()}, folder / "AutoencoderModel.ckpt")
    vq = {k: v for k, v in ae.state_dict().items()}
    for name, T in (("liver_early.pt", 4), ("liver_noearly.pt", 200)):
        unet = Unet3D()
        save_official(folder / name, model=unet, ema=unet, scheduler=DDPMScheduler(T), vqgan_state=vq, step=0)


def load_ct():
    from backend.io import Geometry, Volume, read_image
    from backend.organs import load_organ_mask

    if (SHARED_CT / "example_ct_sm.nii.gz").is_file():
        ct = read_image(SHARED_CT / "example_ct_sm.nii.gz")
        return ct, load_organ_mask(SHARED_CT / "example_seg.nii.gz", "liver", reference=ct), "shared real CT (3 mm)"
    rng = np.random.default_rng(0)
    a = rng.normal(-1000, 10, (60, 256, 256))
    organ = np.zeros(a.shape, bool)
    organ[10:50, 60:200, 60:200] = True
    a[organ] = rng.normal(60, 10, organ.sum())
    g = Geometry((256, 256, 60), (1.0, 1.0, 3.0), (0.0, 0.0, 0.0))
    return Volume(a.astype(np.int16), g), organ, "synthetic CT"


def sphere(ct, organ, k: int, radius_mm: float):
    from backend.synthesis.masks import ellipsoid_mask

    pts = np.argwhere(organ)
    z, y, x = pts[len(pts) // 2 + k * len(pts) // 7]
    return ellipsoid_mask(ct.geometry, (x, y, z), (radius_mm,) * 3, voxel=True) & organ


def conv_gflops(device: str = "cpu", repeats: int = 5, clock=time.perf_counter) -> float:
    """Measured float32 GFLOP/s of the decoder's dominant convolution (32 -> 32, 3^3 on a padded 98^3 input,
    channels-last on the CPU as the decoder runs it); median of ``repeats``, timed with ``clock`` (wall time;
    ``time.process_time`` gives GFLOP per CPU-second, see bench/diffusion.py ``--clock cpu``)."""
    import torch

    conv = torch.nn.Conv3d(32, 32, 3).to(device).eval()
    x = torch.randn(1, 32, 98, 98, 98, device=device)
    if device == "cpu":
        x = x.contiguous(memory_format=torch.channels_last_3d)
    with torch.inference_mode():
        conv(x)
        ts = []
        for _ in range(repeats):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            t = clock()
            conv(x)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            ts.append(clock() - t)
    return 2 * 27 * 32 * 32 * 96**3 / statistics.median(ts) / 1e9


def exact_flops(models, device: str = "cpu") -> dict:
    """Floating-point operations of one tumour on the exact path, per part, counted on the real modules:
    encode (96^3), one U-Net call (24^3 latent), the decode of a 32^3 region (the whole crop up to the last
    GroupNorm, as the exact decode must)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    ae, unet, dec = models.autoencoder, models.unet, models.decoder
    x = torch.zeros(1, 1, 96, 96, 96, device=device)
    out = {}
    with torch.inference_mode():
        with FlopCounterMode(display=False) as fc:
            z = ae.encode(x)
        out["encode"] = fc.get_total_flops()
        c = z.shape[1]
        with FlopCounterMode(display=False) as fc:
            unet(torch.zeros(1, c, *z.shape[2:], device=device), torch.tensor([1], device=device),
                 torch.zeros(1, c + 1, *z.shape[2:], device=device))
        out["unet_call"] = fc.get_total_flops()
        with FlopCounterMode(display=False) as fc:
            dec.decode(z, quantize=True, region=(slice(32, 64),) * 3)
        out["decode"] = fc.get_total_flops()
    return out


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--repeats-mid", type=int, default=1)
    p.add_argument("--dpm-steps", type=int, default=15,
                   help="also time mid/late tumours with the opt-in DPM-Solver++ at this many steps (0 skips it)")
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from backend.synthesis.engine import SynthesisEngine

    ct, organ, what = load_ct()
    with tempfile.TemporaryDirectory() as tmp:
        write_random_weights(Path(tmp))
        engine = SynthesisEngine(tmp, device=args.device, threads=args.threads)
        load_s, _ = timed(lambda: (engine.stage_models("liver", "early"), engine.stage_models("liver", "mid_late")))
        small = sphere(ct, organ, 0, 6.0)
        run = lambda m, st, seed, c=ct: engine.synthesize(c, organ, m, organ="liver", method="diffusion", stage=st, seed=seed, sigma=2.0)
        run(small, "early", 999)  # warm-up, not timed: first-call kernel selection (oneDNN, cuDNN), caches
        early, second, mid, mb, dpm = [], [], [], [], []
        for i in range(args.repeats):
            t, r = timed(lambda i=i: run(small, "early", i))
            early.append(t)
            other = sphere(ct, organ, 2, 6.0)
            t, _ = timed(lambda i=i, other=other, r=r: run(other, "early", i, r.ct))  # a second tumour into the same (now modified) CT
            second.append(t)
            t, _ = timed(lambda i=i: engine.synthesize(ct, organ, small, organ="liver", method="model-based", seed=i))
            mb.append(t)
        for i in range(args.repeats_mid):
            t, _ = timed(lambda i=i: run(sphere(ct, organ, 1, 14.0), "mid_late", i))
            mid.append(t)
            if args.dpm_steps:
                t, _ = timed(lambda i=i: engine.synthesize(ct, organ, sphere(ct, organ, 1, 14.0), organ="liver",
                                                       method="diffusion", stage="mid_late", seed=i, sigma=2.0,
                                                       sampler="dpm++", ddim_steps=args.dpm_steps))
                dpm.append(t)
        flops = exact_flops(engine.stage_models("liver", "early"), args.device)
        steps = {"early": engine.stage_models("liver", "early").steps,
                 "mid_late": engine.stage_models("liver", "mid_late").steps,
                 "mid_late_dpm": args.dpm_steps}
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    rate = conv_gflops(args.device)
    floor = {st: (flops["encode"] + n * flops["unet_call"] + flops["decode"]) / (rate * 1e9) for st, n in steps.items()}
    res = {
        "early_s": round(statistics.median(early), 3),
        "mid_late_s": round(statistics.median(mid), 3),
        "second_tumor_s": round(statistics.median(second), 3),
        "model_based_s": round(statistics.median(mb), 4),
        "peak_mb": round(peak_mb, 1),
        **({"peak_gpu_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1), "gpu": torch.cuda.get_device_name()}
           if str(engine.device).startswith("cuda") else {}),
        "floor_early_s": round(floor["early"], 3),
        "floor_mid_late_s": round(floor["mid_late"], 3),
        # every figure over the floor of the same stage measured in this sitting: comparable across machines
        "early_floor_ratio": round(statistics.median(early) / floor["early"], 2),
        "mid_late_floor_ratio": round(statistics.median(mid) / floor["mid_late"], 2),
        "second_tumor_floor_ratio": round(statistics.median(second) / floor["early"], 2),
        **({"mid_late_dpm_s": round(statistics.median(dpm), 3), "floor_mid_late_dpm_s": round(floor["mid_late_dpm"], 3),
            "mid_late_dpm_floor_ratio": round(statistics.median(dpm) / floor["mid_late_dpm"], 2),
            "dpm_steps": args.dpm_steps} if dpm else {}),
        "conv_gflops": round(rate, 1),
        "gflop": {k: round(v / 1e9, 2) for k, v in flops.items()},
        "load_s": round(load_s, 2),
        "threads": args.threads,
        "device": str(engine.device),
        "input": what,
    }
    if args.json:
        print(json.dumps(res))
        return 0
    print(f"synthesis benchmark — {what}, 96³ crop, official configuration, random weights, "
          f"{args.threads} CPU threads, device {res['device']} (weights load {res['load_s']} s, not counted)")
    for k in ("early_s", "mid_late_s", "mid_late_dpm_s", "second_tumor_s", "model_based_s", "peak_mb", "peak_gpu_mb"):
        if k not in res:
            continue
        tgt = (f"target ≤ {TARGETS[k]:g}" if k in TARGETS else "GPU memory" if k == "peak_gpu_mb" else
               f"opt-in DPM-Solver++ {args.dpm_steps} steps, target ≤ 4" if k == "mid_late_dpm_s" else "target < 1 s")
        off = f", release {OFFICIAL[k]:g}" if k in OFFICIAL else ""
        ratio = {"early_s": "early", "mid_late_s": "mid_late", "second_tumor_s": "second_tumor",
                 "mid_late_dpm_s": "mid_late_dpm"}.get(k)
        ratio = f" = {res[ratio + '_floor_ratio']:.2f}x its floor" if ratio else ""
        print(f"  {k:15s} {res[k]:10.3f}{ratio:20s} ({tgt}{off})")
    g = res["gflop"]
    print(f"floor of the exact float32 path on this machine: early {res['floor_early_s']:.2f} s, mid/late "
          f"{res['floor_mid_late_s']:.2f} s ({g['encode']:.1f} GFLOP encode + {steps['early']} / {steps['mid_late']} x "
          f"{g['unet_call']:.1f} GFLOP U-Net + {g['decode']:.1f} GFLOP decode, at the {res['conv_gflops']:.0f} GFLOP/s "
          f"measured for the decoder's 32-channel 3^3 convolution)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
