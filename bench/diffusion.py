"""Stage-2 timings (CPU, or ``--device cuda``) at the released size: one Unet3D forward, a full early sample (T = 4 ancestral)
and a full DDIM-50 sample (T = 200), latent 8 x 24^3, random weights (timing does not depend on them).

    python bench/diffusion.py [--threads 2] [--repeats 5] [--ddim-repeats 1] [--device cpu|cuda] [--json]

Prints medians next to the official code's figures on the same class of machine (2 CPU cores).
The official end-to-end figures (early tumour 6.4 s, mid tumour 19.7 s) also include the VQGAN encode /
decode (about 4.5 s), which this script does not run.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

OFFICIAL = {"unet_forward_s": 0.25, "early_end_to_end_s": 6.4, "mid_end_to_end_s": 19.7}


def _median(fn, repeats: int, sync=lambda: None) -> float | None:
    """Median seconds of ``repeats`` calls after one warm-up (allocator, oneDNN/cuDNN kernel choice);
    ``sync`` waits for the device before each clock reading. None when ``repeats`` is 0."""
    if repeats < 1:
        return None
    fn()
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5, help="timed runs of the forward / early sample")
    ap.add_argument("--ddim-repeats", type=int, default=1, help="timed DDIM-50 samples (0 skips them)")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)

    from backend.diffusion.ddim import DDIMScheduler
    from backend.diffusion.ddpm import DDPMScheduler
    from backend.diffusion.inferer import DiffusionInferer
    from backend.diffusion.unet import Unet3D

    torch.set_num_threads(args.threads)
    from backend.device import reuse_freed_memory
    torch.manual_seed(0)
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    unet = Unet3D().eval().to(dev)
    x = torch.randn(1, 8, 24, 24, 24, device=dev)
    cond = torch.randn(1, 9, 24, 24, 24, device=dev)
    t = torch.tensor([2], device=dev)
    early = DiffusionInferer(DDPMScheduler(4).to(dev))
    ddim = DiffusionInferer(DDIMScheduler(200, num_inference_steps=50).to(dev))
    g = torch.Generator(device=dev)
    with torch.inference_mode(), reuse_freed_memory(dev):  # as the synthesis engine runs its networks
        res = {
            "unet_forward_s": _median(lambda: unet(x, t, cond), args.repeats, sync),
            "early_sample_T4_s": _median(lambda: early.sample(unet, cond, generator=g.manual_seed(0)), args.repeats, sync),
            "ddim50_sample_s": _median(lambda: ddim.sample(unet, cond, generator=g.manual_seed(0)), args.ddim_repeats, sync),
        }
    res.update(threads=args.threads, device=str(dev), torch=torch.__version__,
               cpu=platform.processor() or platform.machine(), official=OFFICIAL)
    if dev.type == "cuda":
        res["gpu"] = torch.cuda.get_device_name(dev)
        res["peak_gpu_gb"] = torch.cuda.max_memory_allocated(dev) / 2**30
    if args.json:
        print(json.dumps(res))
        return 0
    where = f"CPU, {args.threads} threads" if dev.type == "cpu" else res["gpu"]
    print(f"{where}, torch {torch.__version__}, medians")
    print(f"  U-Net forward (8x24^3)        {res['unet_forward_s']:7.3f} s   official {OFFICIAL['unet_forward_s']:.2f} s")
    print(f"  early sample, T=4 ancestral   {res['early_sample_T4_s']:7.3f} s   (official end to end incl. VQGAN "
          f"{OFFICIAL['early_end_to_end_s']} s)")
    if res["ddim50_sample_s"] is not None:
        print(f"  DDIM-50 sample, T=200         {res['ddim50_sample_s']:7.3f} s   (official end to end incl. VQGAN "
              f"{OFFICIAL['mid_end_to_end_s']} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
