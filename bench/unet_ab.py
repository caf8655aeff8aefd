"""The U-Net of this checkout against the U-Net of another git revision, interleaved in one process.

    python bench/unet_ab.py [--against main] [--threads 1] [--rounds 11] [--clock cpu|wall] [--json]

Loads ``backend/diffusion/unet.py`` and ``attention.py`` of ``--against`` (``git show REV:path``) as separate
modules, gives both networks the same random weights (released size, 8 x 24^3 latent) and times one forward of
each in turn, ``--rounds`` times: neighbours' load then falls on both alike, so the ratio this/other is what to
quote on a shared machine (CPU seconds with one thread are steadier still). Prints both medians, the ratio and
the largest output difference relative to the output's largest value.
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _load_revision(rev: str, folder: Path):
    """backend/diffusion/{attention,unet}.py of ``rev`` as modules ``ab_attention`` / ``ab_unet``."""
    for name in ("attention", "unet"):
        text = subprocess.run(["git", "-C", str(REPO), "show", f"{rev}:backend/diffusion/{name}.py"], check=True,
                              capture_output=True, text=True).stdout
        text = text.replace("from backend.diffusion.attention import", "from ab_attention import")
        (folder / f"ab_{name}.py").write_text(text)
    sys.path.insert(0, str(folder))
    return importlib.import_module("ab_unet")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--against", default="main", help="git revision to compare with (default main)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=11)
    ap.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from backend.diffusion.unet import Unet3D

    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    with tempfile.TemporaryDirectory() as tmp:
        other_mod = _load_revision(args.against, Path(tmp))
        torch.manual_seed(0)
        this = Unet3D().eval()
        for p in this.parameters():  # non-zero everywhere (some released blocks start at zero)
            p.data.normal_(0, 0.05)
        other = other_mod.Unet3D().eval()
        other.load_state_dict(this.state_dict())
        x, cond, t = torch.randn(1, 8, 24, 24, 24), torch.randn(1, 9, 24, 24, 24), torch.tensor([101])
        times = {"this": [], "other": []}
        with torch.inference_mode():
            ref, out = other(x, t, cond), this(x, t, cond)  # also the warm-up
            for _ in range(args.rounds):
                for name, net in (("other", other), ("this", this)):
                    t0 = clock()
                    net(x, t, cond)
                    times[name].append(clock() - t0)
    res = {"this_s": round(statistics.median(times["this"]), 4), "other_s": round(statistics.median(times["other"]), 4),
           "against": args.against, "threads": args.threads, "clock": args.clock, "rounds": args.rounds,
           "max_rel_diff": float(f"{((out - ref).abs().max() / ref.abs().max()).item():.2e}")}
    res["ratio"] = round(res["this_s"] / res["other_s"], 3)
    if args.json:
        print(json.dumps(res))
        return 0
    unit = "CPU s" if args.clock == "cpu" else "s"
    print(f"U-Net forward, {args.threads} thread(s), medians of {args.rounds} interleaved rounds ({args.clock} clock)")
    print(f"  this checkout  {res['this_s']:.4f} {unit}")
    print(f"  {args.against:13s}  {res['other_s']:.4f} {unit}")
    print(f"  ratio {res['ratio']:.3f}; largest output difference {res['max_rel_diff']:.1e} of the output's range")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
