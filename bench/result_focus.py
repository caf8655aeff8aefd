"""What going to the tumour costs on the GUI thread after a synthesis: finding the largest tumour's centre and
radius (``_focus.tumor_focus``) and building its outline (``_focus.outline_paths``), on a 512 x 512 x 300
mask with one 30 mm and one 12 mm tumour at 0.8 x 0.8 x 1.5 mm. No Qt needed.

    python bench/result_focus.py [--repeats 7]

Prints the median and the range of each step in milliseconds.
"""

from __future__ import annotations

import argparse
import statistics
import time
from types import SimpleNamespace

import numpy as np


def _ball(shape, centre_vox, radius_mm, spacing):
    box = tuple(slice(max(0, int(c - radius_mm / s) - 1), int(c + radius_mm / s) + 2)
                for c, s in zip(centre_vox, spacing))
    grid = np.ogrid[box]
    inside = sum(((g - c) * s) ** 2 for g, c, s in zip(grid, centre_vox, spacing)) <= radius_mm**2
    out = np.zeros(shape, bool)
    out[box] = inside
    return out


def main() -> None:
    from difftumor_napari.layers import outline_paths, tumor_focus

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    shape, spacing = (300, 512, 512), (1.5, 0.8, 0.8)
    mask = _ball(shape, (150, 250, 300), 15.0, spacing) | _ball(shape, (100, 200, 150), 6.0, spacing)
    layer = SimpleNamespace(scale=spacing, data_to_world=lambda idx: np.asarray(idx) * np.asarray(spacing))
    for name, step in (("tumor_focus (centre + radius of the largest tumour)", lambda: tumor_focus(mask, layer)),
                       ("outline_paths (marching squares per slice)", lambda: outline_paths(mask))):
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1000)
        print(f"{name}: median {statistics.median(times):.0f} ms (range {min(times):.0f}-{max(times):.0f} ms, "
              f"{args.repeats} runs, mask {shape[0]}x{shape[1]}x{shape[2]})")


if __name__ == "__main__":
    main()
