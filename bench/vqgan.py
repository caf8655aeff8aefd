"""Encode/decode time and peak memory of the official-size VQGAN for one 96^3 crop on CPU.

    python bench/vqgan.py [--repeats 3] [--threads 2] [--json]

Random weights (timing does not depend on them). Peak memory = process max RSS (ru_maxrss) measured
in a fresh subprocess per phase, so encode and decode peaks are separate. Official figures (authors'
code, same CPU setup, from the reference notes): encode 0.21 s, decode 4.5 s, ~4.7 GB peak.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

OFFICIAL = {"encode_s": 0.21, "decode_s": 4.5, "peak_rss_gb": 4.7}


def _phase(phase: str, repeats: int, threads: int) -> dict:
    import resource
    import time

    import torch

    torch.set_num_threads(threads)
    from backend.device import reuse_freed_memory
    torch.manual_seed(0)
    from backend.vqgan import VQGAN

    model = VQGAN().eval()
    x = torch.rand(1, 1, 96, 96, 96) * 2 - 1
    times = []
    with torch.inference_mode(), reuse_freed_memory():  # as the synthesis engine runs its networks on CPU
        z = model.encode(x)
        for _ in range(repeats):
            t = time.perf_counter()
            if phase == "encode":
                model.encode(x)
            else:
                model.decode(z)  # nearest-code lookup + decoder
            times.append(time.perf_counter() - t)
    return {"median_s": statistics.median(times), "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--phase", choices=["encode", "decode"], help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.phase:
        print(json.dumps(_phase(a.phase, a.repeats, a.threads)))
        return
    res = {}
    for phase in ("encode", "decode"):
        out = subprocess.run([sys.executable, __file__, "--phase", phase, "--repeats", str(a.repeats),
                              "--threads", str(a.threads)], capture_output=True, text=True, check=True)
        res[phase] = json.loads(out.stdout.strip().splitlines()[-1])
    summary = {"encode_s": res["encode"]["median_s"], "decode_s": res["decode"]["median_s"],
               "encode_peak_rss_gb": res["encode"]["peak_rss_gb"], "decode_peak_rss_gb": res["decode"]["peak_rss_gb"],
               "threads": a.threads, "repeats": a.repeats, "official": OFFICIAL}
    if a.json:
        print(json.dumps(summary))
        return
    print(f"VQGAN 96^3 crop, CPU, {a.threads} threads, median of {a.repeats}:")
    print(f"  encode  {summary['encode_s']:.2f} s   (official {OFFICIAL['encode_s']} s)   peak RSS {summary['encode_peak_rss_gb']:.2f} GB")
    print(f"  decode  {summary['decode_s']:.2f} s   (official {OFFICIAL['decode_s']} s)   peak RSS {summary['decode_peak_rss_gb']:.2f} GB"
          f"   (official ~{OFFICIAL['peak_rss_gb']} GB)")


if __name__ == "__main__":
    main()
