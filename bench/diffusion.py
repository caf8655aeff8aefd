"""Stage-2 timings (CPU, or ``--device cuda``) at the released size: one Unet3D forward, a full early sample (T = 4 ancestral),
a full DDIM-50 sample (T = 200) and the opt-in DPM-Solver++ sample (15 steps), latent 8 x 24^3, random weights
(timing does not depend on them).

    python bench/diffusion.py [--threads 2] [--repeats 5] [--ddim-repeats 1] [--dpm-steps 15] [--device cpu|cuda]
                              [--clock wall|cpu] [--json]

The U-Net line also gives its own rate and floor: its floating-point operations (counted by
``torch.utils.flop_counter`` on the module) over the call's median seconds, and over the float32 rate this machine
reaches in the same sitting on the decoder's dominant convolution (bench/synthesis.py ``conv_gflops``); the ratio
seconds / floor is what stays comparable between sittings and machines. ``--clock cpu`` times everything (the conv
rate included) in process CPU seconds instead of wall seconds: on a machine loaded by others, with ``--threads 1``,
the time a process waits for a core then counts in neither, so the ratio hardly moves with the neighbours' load.
The operation count is that of the implementation that runs (the linear attention's folded output projection
does fewer operations than the release's formulation: 13.05 against 13.43 GFLOP).

Prints medians next to the official code's figures on the same class of machine (2 CPU cores).
The official end-to-end figures (early tumour 6.4 s, mid tumour 19.7 s) also include the VQGAN encode /
decode (about 4.5 s), which this script does not run.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

OFFICIAL = {"unet_forward_s": 0.25, "early_end_to_end_s": 6.4, "mid_end_to_end_s": 19.7}


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def _median(fn, repeats: int, sync=lambda: None, clock=time.perf_counter) -> float | None:
    """Median seconds of ``repeats`` calls after one warm-up (allocator, oneDNN/cuDNN kernel choice);
    ``sync`` waits for the device before each clock reading. None when ``repeats`` is 0."""
    if repeats < 1:
        return None
    fn()
    times = []
    for _ in range(repeats):
        sync()
        t0 = clock()
        fn()
        sync()
        times.append(clock() - t0)
    return statistics.median(times)


def _bench_synthesis():
    """bench/synthesis.py as a module, for its ``conv_gflops`` (one definition of the conv rate)."""
    spec = importlib.util.spec_from_file_location("bench_synthesis", Path(__file__).with_name("synthesis.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5, help="timed runs of the forward / early sample")
    ap.add_argument("--ddim-repeats", type=int, default=1, help="timed DDIM-50 samples (0 skips them)")
    ap.add_argument("--dpm-steps", type=int, default=15, help="steps of the DPM-Solver++ sample (0 skips it)")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    ap.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                    help="wall seconds (default) or process CPU seconds (loaded machines; use with --threads 1)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)

    from backend.diffusion.ddim import DDIMScheduler
    from backend.diffusion.ddpm import DDPMScheduler
    from backend.diffusion.dpm_solver import DPMSolverMultistepScheduler
    from backend.diffusion.inferer import DiffusionInferer
    from backend.diffusion.unet import Unet3D

    torch.set_num_threads(args.threads)
    from backend.device import reuse_freed_memory
    torch.manual_seed(0)
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    clock = CLOCKS[args.clock]
    unet = Unet3D().eval().to(dev)
    x = torch.randn(1, 8, 24, 24, 24, device=dev)
    cond = torch.randn(1, 9, 24, 24, 24, device=dev)
    t = torch.tensor([2], device=dev)
    early = DiffusionInferer(DDPMScheduler(4).to(dev))
    ddim = DiffusionInferer(DDIMScheduler(200, num_inference_steps=50).to(dev))
    dpm = DiffusionInferer(DPMSolverMultistepScheduler(200, num_inference_steps=max(1, args.dpm_steps)).to(dev))
    g = torch.Generator(device=dev)
    with torch.inference_mode(), reuse_freed_memory(dev):  # as the synthesis engine runs its networks
        res = {
            "unet_forward_s": _median(lambda: unet(x, t, cond), args.repeats, sync, clock),
            "early_sample_T4_s": _median(lambda: early.sample(unet, cond, generator=g.manual_seed(0)), args.repeats, sync, clock),
            "ddim50_sample_s": _median(lambda: ddim.sample(unet, cond, generator=g.manual_seed(0)), args.ddim_repeats, sync, clock),
            "dpm_sample_s": _median(lambda: dpm.sample(unet, cond, generator=g.manual_seed(0)),
                                    args.ddim_repeats if args.dpm_steps else 0, sync, clock),
        }
        with FlopCounterMode(display=False) as fc:
            unet(x, t, cond)
        unet_gflop = fc.get_total_flops() / 1e9
    rate = _bench_synthesis().conv_gflops(args.device, clock=clock)
    res.update(unet_gflop=round(unet_gflop, 2), unet_gflops=round(unet_gflop / res["unet_forward_s"], 1),
               conv_gflops=round(rate, 1), unet_floor_s=round(unet_gflop / rate, 4),
               unet_floor_ratio=round(res["unet_forward_s"] * rate / unet_gflop, 2), dpm_steps=args.dpm_steps,
               clock=args.clock)
    res.update(threads=args.threads, device=str(dev), torch=torch.__version__,
               cpu=platform.processor() or platform.machine(), official=OFFICIAL)
    if dev.type == "cuda":
        res["gpu"] = torch.cuda.get_device_name(dev)
        res["peak_gpu_gb"] = torch.cuda.max_memory_allocated(dev) / 2**30
    if args.json:
        print(json.dumps(res))
        return 0
    where = f"CPU, {args.threads} threads" if dev.type == "cpu" else res["gpu"]
    print(f"{where}, torch {torch.__version__}, medians" + (" of process CPU seconds" if args.clock == "cpu" else ""))
    print(f"  U-Net forward (8x24^3)        {res['unet_forward_s']:7.3f} s   official {OFFICIAL['unet_forward_s']:.2f} s; "
          f"{res['unet_gflop']:.2f} GFLOP at {res['unet_gflops']:.0f} GFLOP/s = {res['unet_floor_ratio']:.2f}x its floor "
          f"{res['unet_floor_s']:.3f} s (conv rate {res['conv_gflops']:.0f} GFLOP/s this sitting)")
    print(f"  early sample, T=4 ancestral   {res['early_sample_T4_s']:7.3f} s   (official end to end incl. VQGAN "
          f"{OFFICIAL['early_end_to_end_s']} s)")
    if res["ddim50_sample_s"] is not None:
        print(f"  DDIM-50 sample, T=200         {res['ddim50_sample_s']:7.3f} s   (official end to end incl. VQGAN "
              f"{OFFICIAL['mid_end_to_end_s']} s)")
    if res["dpm_sample_s"] is not None:
        print(f"  DPM-Solver++ {args.dpm_steps:2d}, T=200       {res['dpm_sample_s']:7.3f} s   (opt-in; "
              f"{res['dpm_sample_s'] / res['unet_floor_s'] / args.dpm_steps:.2f}x the floor of its {args.dpm_steps} calls)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
