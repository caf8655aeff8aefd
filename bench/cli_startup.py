"""Start-up cost of the ``difftumor`` command line: wall time of ``difftumor --help`` and ``difftumor info CT``
(median of N runs, fresh interpreter each), the cumulative import time ``python -X importtime`` reports for
building the parser, and which heavy packages that imports.

    python bench/cli_startup.py [--runs 5] [--ct FILE]
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HEAVY = ("torch", "monai", "qtpy", "PyQt5", "napari", "difftumor_napari")
DEFAULT_CT = Path("/work/shared/data/totalseg_abdomen_3mm/example_ct_sm.nii.gz")


def wall(cmd: list[str], runs: int) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def import_time_us(code: str) -> tuple[int, list[str]]:
    """Total import time (µs, sum of the top-level 'cumulative' entries) and the heavy packages imported."""
    probe = f"{code}\nimport sys\nprint('HEAVY', ','.join(m for m in {HEAVY!r} if m in sys.modules))"
    proc = subprocess.run([sys.executable, "-X", "importtime", "-c", probe], capture_output=True, text=True)
    total = 0
    for line in proc.stderr.splitlines():
        m = re.match(r"import time:\s+\d+ \|\s+(\d+) \| (\S.*)$", line)
        if m and not m.group(2).startswith(" "):
            total += int(m.group(1))
    heavy = next((ln.split(" ", 1)[1].split(",") for ln in proc.stdout.splitlines() if ln.startswith("HEAVY")), [])
    return total, [h for h in heavy if h]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--ct", type=Path, default=DEFAULT_CT)
    args = p.parse_args()
    exe = shutil.which("difftumor") or sys.exit("difftumor is not on PATH")
    us, heavy = import_time_us("from backend.cli import build_parser; build_parser()")
    print(f"build_parser(): import time {us / 1e6:.2f} s (python -X importtime, one run); "
          f"heavy modules: {heavy or 'none'}")
    print(f"difftumor --help: median wall {wall([exe, '--help'], args.runs):.2f} s over {args.runs} runs")
    if args.ct.is_file():
        us, heavy = import_time_us(f"from backend.cli import main; main(['info', {str(args.ct)!r}])")
        print(f"difftumor info CT: import time {us / 1e6:.2f} s; heavy modules: {heavy or 'none'}")
        seconds = wall([exe, "info", str(args.ct)], args.runs)
        print(f"difftumor info CT: median wall {seconds:.2f} s over {args.runs} runs")


if __name__ == "__main__":
    main()
