"""Benchmark of the image-file integrity check (issue 14, defect 2): what it costs on a 512 x 512 x 300 CT.

Writes an int16 CT of 512 x 512 x 300 voxels (the shared real CT resampled to it, plus 12 HU of noise so that
it compresses like a real scan: about 95 MB as .nii.gz, 157 MB as .nii) to a temporary folder, then times,
wall and CPU time (all threads of the process; on a shared machine CPU time is the steadier figure), as medians
over ``--repeats`` rounds in which the three take turns, after one untimed round (the file is in the page
cache):

* ``check``: :func:`backend.integrity.check_image_file` alone (for .nii.gz: one streaming inflate with the
  CRC-32/length check; for .nii: a header read and the file size);
* ``sitk``: SimpleITK's read into a numpy array, without the check (what ``read_image`` did before);
* ``read_image``: the whole :func:`backend.io.read_image` (check beside the read in a second thread for
  compressed files, then the array).

    python bench/io_integrity.py               # a table
    python bench/io_integrity.py --json        # one JSON object per format
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED_CT = REPO.parent / "shared" / "data" / "totalseg_abdomen_3mm" / "example_ct_sm.nii.gz"
SIZE = (512, 512, 300)  # (x, y, z)


def make_ct(path: Path) -> None:
    import SimpleITK as sitk

    if SHARED_CT.is_file():
        src = sitk.ReadImage(str(SHARED_CT))
    else:  # a water cylinder in air, if the shared data is absent
        arr = np.full((30, 100, 120), -1000, np.int16)
        yy, xx = np.mgrid[:100, :120]
        arr[:, ((yy - 50) / 45) ** 2 + ((xx - 60) / 55) ** 2 < 1] = 40
        src = sitk.GetImageFromArray(arr)
        src.SetSpacing((3.0, 3.0, 3.0))
    ref = sitk.Image(*SIZE, sitk.sitkInt16)
    ref.SetSpacing([n * s / m for n, s, m in zip(src.GetSize(), src.GetSpacing(), SIZE)])
    ref.SetOrigin(src.GetOrigin())
    ref.SetDirection(src.GetDirection())
    big = sitk.Resample(src, ref, sitk.Transform(), sitk.sitkLinear, -1024.0, sitk.sitkInt16)
    arr = sitk.GetArrayFromImage(big).astype(np.float32)
    arr += np.random.default_rng(0).normal(0.0, 12.0, arr.shape).astype(np.float32)
    out = sitk.GetImageFromArray(np.clip(arr, -1024, 3071).astype(np.int16))
    out.CopyInformation(big)
    sitk.WriteImage(out, str(path), useCompression=path.name.endswith(".gz"))


def timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process, all threads) of one call."""
    w, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w, time.process_time() - c


def measure(ops: dict, repeats: int) -> dict:
    """Median wall and CPU time of each op; the ops take turns in every round (after one untimed round), so a
    change in the machine's load hits all of them alike."""
    for fn in ops.values():
        fn()
    runs = {name: [] for name in ops}
    for _ in range(repeats):
        for name, fn in ops.items():
            runs[name].append(timed(fn))
    return {name: (statistics.median(w for w, _ in r), statistics.median(c for _, c in r)) for name, r in runs.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    import SimpleITK as sitk

    from backend.integrity import check_image_file
    from backend.io import read_image

    def sitk_read(p):
        return sitk.GetArrayFromImage(sitk.ReadImage(str(p)))

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("ct.nii.gz", "ct.nii"):
            path = Path(tmp) / name
            make_ct(path)
            t = measure({"check": lambda p=path: check_image_file(p), "sitk": lambda p=path: sitk_read(p),
                         "read_image": lambda p=path: read_image(p)}, args.repeats)
            results.append({
                "file": name, "mb": round(os.path.getsize(path) / 1e6, 1), "repeats": args.repeats,
                **{f"{k}_wall_ms": round(v[0] * 1e3, 1) for k, v in t.items()},
                **{f"{k}_cpu_ms": round(v[1] * 1e3, 1) for k, v in t.items()},
                "check_pct_of_read_image_cpu": round(100 * t["check"][1] / t["read_image"][1], 2),
                "read_image_vs_sitk_cpu_pct": round(100 * (t["read_image"][1] - t["sitk"][1]) / t["sitk"][1], 1),
                "read_image_vs_sitk_wall_pct": round(100 * (t["read_image"][0] - t["sitk"][0]) / t["sitk"][0], 1),
            })
            path.unlink()
    if args.json:
        for r in results:
            print(json.dumps(r))
        return
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"512x512x300 int16 CT, medians of {args.repeats} interleaved runs, {os.cpu_count()} CPU(s), "
          f"load average {load:.1f} at the end")
    print(f"{'file':<10} {'MB':>6} | {'check':>16} | {'SimpleITK read':>16} | {'read_image':>16} | check/read_image"
          f" | read_image vs SimpleITK   (ms: wall / CPU)")
    for r in results:
        cells = [f"{r[f'{k}_wall_ms']:>7.1f} / {r[f'{k}_cpu_ms']:>7.1f}" for k in ("check", "sitk", "read_image")]
        print(f"{r['file']:<10} {r['mb']:>6} | " + " | ".join(cells) + f" | {r['check_pct_of_read_image_cpu']:>6.2f} % CPU"
              f"    | {r['read_image_vs_sitk_cpu_pct']:+.1f} % CPU, {r['read_image_vs_sitk_wall_pct']:+.1f} % wall")


if __name__ == "__main__":
    main()
