"""DPM-Solver++(2M) with N steps against the released DDIM-50, from the same x_T, on the parity weights.

    python bench/sampler_compare.py [--steps 10 15 20] [--spacing logsnr_uniform] [--threads 2] [--json]

Uses shared/reference/parity (liver_noearly.pt, T = 200; its x_T and condition): runs DDIM-50 once,
checks it against the stored reference latent, then DPM-Solver++ for each N and prints the latent
difference to DDIM-50 (max |diff|, RMS, RMS relative to the DDIM latent's RMS) and the seconds of each,
and the RMS distance of every sampler (DDIM-50 included) to a fine 98-step DPM-Solver++ solution of the ODE.
The parity weights are random, not trained: the differences say how closely the two solvers integrate
the same ODE for this network, not how the tumours look.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
PARITY = REPO.parent / "shared" / "reference" / "parity"


def _unpacked(name: str) -> Path:
    """The gunzipped parity file, cached as the tests cache it."""
    cache = Path(os.environ.get("DIFFTUMOR_TEST_CACHE", Path.home() / ".cache" / "difftumor-tests")) / "parity"
    target, gz = cache / name, PARITY / f"{name}.gz"
    stamp = cache / f"{name}.src-size"
    if target.is_file() and stamp.is_file() and stamp.read_text() == str(gz.stat().st_size):
        return target
    from backend.io import atomic_write

    cache.mkdir(parents=True, exist_ok=True)
    with atomic_write(target) as tmp, gzip.open(gz, "rb") as fin, open(tmp, "wb") as fout:
        shutil.copyfileobj(fin, fout, length=16 << 20)
    stamp.write_text(str(gz.stat().st_size))
    return target


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, nargs="+", default=[10, 15, 20])
    ap.add_argument("--spacing", default="logsnr_uniform", help="logsnr_uniform (default), time_quadratic, time_uniform")
    ap.add_argument("--reference-steps", type=int, default=98,
                    help="steps of the fine DPM-Solver++ (time_uniform) run taken as the ODE's solution (0: skip)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    import torch

    from backend.diffusion.inferer import DiffusionInferer
    from backend.diffusion.official import load_diffusion

    torch.set_num_threads(args.threads)
    if not (PARITY / "parity_outputs.pt").is_file():
        print(f"{PARITY}: parity fixtures are absent", file=sys.stderr)
        return 2
    P = torch.load(PARITY / "parity_outputs.pt", map_location="cpu", weights_only=True)
    ck = load_diffusion(_unpacked("liver_noearly.pt"))

    def run(sched):
        t = time.perf_counter()
        with torch.inference_mode():
            z = DiffusionInferer(sched).sample(ck.unet, P["cond"], noise=P["ddim_xT"])
        return z, time.perf_counter() - t

    ddim, ddim_s = run(ck.ddim_scheduler(50))
    ref_err = (ddim - P["ddim_sample_latent"]).abs().max().item()
    rms_ref = ddim.pow(2).mean().sqrt().item()
    fine = run(ck.dpm_solver_scheduler(args.reference_steps, spacing="time_uniform"))[0] if args.reference_steps else None

    def to_fine(z):
        return None if fine is None else (z - fine).pow(2).mean().sqrt().item() / rms_ref

    rows = []
    for n in args.steps:
        z, s = run(ck.dpm_solver_scheduler(n, spacing=args.spacing))
        d = z - ddim
        rows.append({"steps": n, "max_abs": d.abs().max().item(), "rms": d.pow(2).mean().sqrt().item(),
                     "rel_rms": d.pow(2).mean().sqrt().item() / rms_ref, "rel_rms_to_fine": to_fine(z), "seconds": s})
    res = {"ddim50_s": ddim_s, "ddim50_vs_reference_max_abs": ref_err, "ddim50_rms": rms_ref,
           "ddim50_rel_rms_to_fine": to_fine(ddim), "reference_steps": args.reference_steps,
           "spacing": args.spacing, "dpm": rows, "threads": args.threads, "torch": torch.__version__}
    if args.json:
        print(json.dumps(res))
        return 0
    print(f"parity weights (random), liver_noearly T = 200, same x_T; {args.threads} CPU threads, torch {torch.__version__}")
    fine_txt = lambda v: "" if v is None else f"; to the {args.reference_steps}-step solution {100 * v:.1f} %"
    print(f"  DDIM-50 (released)   {ddim_s:6.2f} s   |DDIM-50 - stored reference| max {ref_err:.2e}, latent RMS "
          f"{rms_ref:.3f}{fine_txt(res['ddim50_rel_rms_to_fine'])}")
    for r in rows:
        print(f"  DPM-Solver++ {r['steps']:3d}     {r['seconds']:6.2f} s   vs DDIM-50: max |diff| {r['max_abs']:.4f}, "
              f"RMS {r['rms']:.4f} ({100 * r['rel_rms']:.1f} % of the latent RMS){fine_txt(r['rel_rms_to_fine'])}"
              f"  [{args.spacing}]")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
