"""Encode/decode time and peak memory of the official-size VQGAN for one 96^3 crop (CPU, or ``--device cuda``).

    python bench/vqgan.py [--repeats 3] [--threads 2] [--device cpu|cuda] [--json]

Random weights (timing does not depend on them). Peak memory = process max RSS (ru_maxrss) measured
in a fresh subprocess per phase, so encode and decode peaks are separate. Official figures (authors'
code, same CPU setup, from the reference notes): encode 0.21 s, decode 4.5 s, ~4.7 GB peak. On a GPU the
times are taken after a synchronisation and the GPU's own peak (``torch.cuda.max_memory_allocated``) is
reported too.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

OFFICIAL = {"encode_s": 0.21, "decode_s": 4.5, "peak_rss_gb": 4.7}


def _phase(phase: str, repeats: int, threads: int, device: str = "cpu") -> dict:
    import resource
    import time

    import torch

    torch.set_num_threads(threads)
    from backend.device import reuse_freed_memory
    torch.manual_seed(0)
    from backend.vqgan import VQGAN

    cuda = device.startswith("cuda")
    model = VQGAN().eval().to(device)
    x = (torch.rand(1, 1, 96, 96, 96) * 2 - 1).to(device)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    times = []
    with torch.inference_mode(), reuse_freed_memory(device):  # as the synthesis engine runs its networks
        z = model.encode(x)
        model.encode(x) if phase == "encode" else model.decode(z)  # warm-up (kernel selection, caches)
        for _ in range(repeats):
            sync()
            t = time.perf_counter()
            if phase == "encode":
                model.encode(x)
            else:
                model.decode(z)  # nearest-code lookup + decoder
            sync()
            times.append(time.perf_counter() - t)
    out = {"median_s": statistics.median(times), "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    if cuda:
        out["peak_gpu_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--phase", choices=["encode", "decode"], help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.phase:
        print(json.dumps(_phase(a.phase, a.repeats, a.threads, a.device)))
        return
    res = {}
    for phase in ("encode", "decode"):
        out = subprocess.run([sys.executable, __file__, "--phase", phase, "--repeats", str(a.repeats),
                              "--threads", str(a.threads), "--device", a.device], capture_output=True, text=True)
        if out.returncode:
            sys.exit(f"bench/vqgan.py: the {phase} phase failed:\n{out.stderr.strip()}")
        res[phase] = json.loads(out.stdout.strip().splitlines()[-1])
    summary = {"encode_s": res["encode"]["median_s"], "decode_s": res["decode"]["median_s"],
               "encode_peak_rss_gb": res["encode"]["peak_rss_gb"], "decode_peak_rss_gb": res["decode"]["peak_rss_gb"],
               "threads": a.threads, "repeats": a.repeats, "device": a.device, "official": OFFICIAL}
    for phase in ("encode", "decode"):
        if "peak_gpu_gb" in res[phase]:
            summary[f"{phase}_peak_gpu_gb"] = res[phase]["peak_gpu_gb"]
    if a.json:
        print(json.dumps(summary))
        return
    where = f"CPU, {a.threads} threads" if a.device == "cpu" else a.device
    print(f"VQGAN 96^3 crop, {where}, median of {a.repeats}:")
    print(f"  encode  {summary['encode_s']:.2f} s   (official {OFFICIAL['encode_s']} s)   peak RSS {summary['encode_peak_rss_gb']:.2f} GB")
    print(f"  decode  {summary['decode_s']:.2f} s   (official {OFFICIAL['decode_s']} s)   peak RSS {summary['decode_peak_rss_gb']:.2f} GB"
          f"   (official ~{OFFICIAL['peak_rss_gb']} GB)")


if __name__ == "__main__":
    main()
