"""Realism numbers of the default model-based tumour, on the shared real CT and on the enhanced phantom.

For each CT and size class, tumours are placed with :func:`backend.synthesis.shapes.random_tumor`
(vessel- and edge-aware) and painted with the defaults of
:func:`backend.synthesis.model_based.model_based_tumor` (mass effect "auto"); Inspection's Qt-free
metrics (``difftumor_napari.inspection``) are measured on the result, against the unmodified CT for
the mass-effect shell. Prints one row per tumour and the median per CT / size, plus Inspection's
automatic flags.

    python bench/realism_model_based.py               # shared CT (../shared/data) + phantom
    python bench/realism_model_based.py --seeds 8 --json
    python bench/realism_model_based.py --figures docs/img   # also render docs/img/realism_*.png
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED = Path(os.environ.get("DIFFTUMOR_SHARED", REPO.parent / "shared"))

COLUMNS = ("mean_hu", "std_hu", "organ_mean_hu", "organ_std_hu", "contrast_hu", "noise_ratio",
           "edge_gradient_hu_per_mm", "edge_width_mm", "edge_width_step_mm", "equivalent_diameter_mm",
           "sphericity", "solidity", "elongation", "shell_change_hu")


def load_cases(which: list[str]):
    """(name, ct array, liver mask, spacing zyx) for the requested CTs."""
    from backend.io import read_image

    cases = []
    if "shared" in which:
        folder = SHARED / "data" / "totalseg_abdomen_3mm"
        ct = read_image(folder / "example_ct_sm.nii.gz")
        seg = read_image(folder / "example_seg.nii.gz")
        cases.append(("shared CT (non-contrast, 3 mm)", ct.array, seg.array == 5, tuple(ct.geometry.spacing[::-1]),
                      ct.geometry))
    if "phantom" in which:
        from backend.phantom import make_phantom

        ct, lab = make_phantom(0)
        cases.append(("phantom (portal-venous-like, 1.75/2.5 mm)", ct.array, lab.array == 5, tuple(ct.geometry.spacing[::-1]),
                      ct.geometry))
    return cases


def synthesize(ct, liver, spacing, size: str, seed: int, **kwargs):
    """(tumour mask, shape info, ModelBasedResult) of the default pipeline for one seed."""
    from backend.synthesis.model_based import model_based_tumor
    from backend.synthesis.shapes import random_tumor

    rng = np.random.default_rng(seed)
    tumor, shape_info = random_tumor(ct, liver, spacing, rng, size=size, organ_name="liver")
    return tumor, shape_info, model_based_tumor(ct, spacing, liver, tumor, rng=rng, organ="liver", **kwargs)


def measure(ct, liver, spacing, size: str, seed: int) -> dict:
    from difftumor_napari import inspection as ins

    tumor, shape_info, res = synthesize(ct, liver, spacing, size, seed)
    m = ins.tumor_metrics(res.ct, tumor, res.organ, spacing, original_ct=ct)
    m0 = ins.tumor_metrics(ct, tumor, liver, spacing)  # the same voxels before: what the estimator gives unmodified
    flags = ins.failure_flags(m)
    row = {k: float(m[k]) for k in COLUMNS if k in m}
    row.update(size=size, seed=seed, flags=sorted(flags), noise_ratio_unmodified=float(m0["noise_ratio"]), phase=res.params["phase"],
               drawn_contrast_hu=res.params["contrast_hu"], mass_effect=res.params["mass_effect"]["applied"],
               lobes=shape_info["lobes"], collisions=shape_info["collision_voxels"])
    return row


WINDOWS = ((150, 30), (400, 50))  # (width, level) HU


def _display(a: np.ndarray, geometry) -> np.ndarray:
    """An axial (y, x) slice shown radiologically: anterior up, the patient's left on the right."""
    d = geometry.direction
    if d[4] < 0:
        a = a[::-1]
    if d[0] < 0:
        a = a[:, ::-1]
    return a


def _imshow(ax, img, spacing, window, title):
    w, lvl = window
    ny, nx = img.shape
    ax.imshow(img, cmap="gray", vmin=lvl - w / 2, vmax=lvl + w / 2, extent=(0, nx * spacing[2], ny * spacing[1], 0),
              interpolation="nearest")
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])


def figures(folder: Path, name: str, ct, liver, spacing, geometry) -> None:
    """Before / after / difference at the tumour's slice (two windows) and a zoomed crop beside the CT."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    tag = "shared" if name.startswith("shared") else "phantom"
    for size, seed in (("medium", 1), ("small", 2)):
        tumor, info, res = synthesize(ct, liver, spacing, size, seed)
        z = int(np.argmax(tumor.sum(axis=(1, 2))))
        before, after = ct[z].astype(np.float64), res.ct[z].astype(np.float64)
        fig, axes = plt.subplots(2, 3, figsize=(12, 8.4), constrained_layout=True)
        for row, window in enumerate(WINDOWS):
            _imshow(axes[row, 0], _display(before, geometry), spacing, window, f"before  W{window[0]}/L{window[1]}")
            _imshow(axes[row, 1], _display(after, geometry), spacing, window, f"after  W{window[0]}/L{window[1]}")
            ax = axes[row, 2]  # the difference, zoomed to 100 mm around the tumour, with the liver outline
            cy, cx = (int(v) for v in np.argwhere(tumor[z]).mean(0).round())
            hy, hx = int(round(50.0 / spacing[1])), int(round(50.0 / spacing[2]))
            ys = slice(max(cy - hy, 0), min(cy + hy, before.shape[0]))
            xs = slice(max(cx - hx, 0), min(cx + hx, before.shape[1]))
            diff = _display((after - before)[ys, xs], geometry)
            ny, nx = diff.shape
            ax.imshow(diff, cmap="RdBu_r", vmin=-60, vmax=60, extent=(0, nx * spacing[2], ny * spacing[1], 0),
                      interpolation="nearest")
            yy, xx = np.mgrid[0:ny, 0:nx]
            X, Y = (xx + 0.5) * spacing[2], (yy + 0.5) * spacing[1]
            ax.contour(X, Y, _display(liver[z][ys, xs].astype(float), geometry), [0.5], colors="black", linewidths=1.0,
                       linestyles="--")
            ax.contour(X, Y, _display(res.organ[z][ys, xs].astype(float), geometry), [0.5], colors="green", linewidths=1.0)
            ax.set_title("after − before (±60 HU, 100 mm)\nliver outline before (dashed) / after (green)", fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
        me = res.params["mass_effect"]
        pushed = f"on, surface push {me['surface_push_mm']:.1f} mm" if me["applied"] else "off"
        fig.suptitle(f"{name}: {size} tumour, seed {seed}, contrast drawn {res.params['contrast_hu']:.0f} HU "
                     f"({res.params['phase']}), mass effect {pushed}", fontsize=10)
        fig.savefig(folder / f"realism_{tag}_{size}.png", dpi=90)
        plt.close(fig)
        if size != "medium":
            continue
        # zoom: the synthetic tumour beside the same place before, and an untouched liver region
        _, cy, cx = (int(v) for v in np.argwhere(tumor[z:z + 1]).mean(0).round())
        half = [int(round(35.0 / spacing[1])), int(round(35.0 / spacing[2]))]

        def crop(a, y, x, half=half):
            y0, x0 = max(y - half[0], 0), max(x - half[1], 0)
            return a[y0:y0 + 2 * half[0], x0:x0 + 2 * half[1]]
        far = np.argwhere(liver[z] & ~np.any(res.support, axis=0))
        fy, fx = far[len(far) // 2] if len(far) else (cy, cx)
        fig, axes = plt.subplots(2, 3, figsize=(11, 7.6), constrained_layout=True)
        for row, window in enumerate(WINDOWS):
            for col, (img, title) in enumerate(((crop(after, cy, cx), "synthetic tumour"), (crop(before, cy, cx), "same place, unmodified"),
                                                (crop(before, fy, fx), "other liver region, unmodified"))):
                _imshow(axes[row, col], _display(img, geometry), spacing, window, f"{title}  W{window[0]}/L{window[1]}")
        fig.suptitle(f"{name}: 70 mm crops at slice {z}", fontsize=10)
        fig.savefig(folder / f"realism_{tag}_zoom.png", dpi=90)
        plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=5, help="tumours per CT and size (default 5)")
    ap.add_argument("--sizes", default="small,medium", help="comma-separated size classes (default small,medium)")
    ap.add_argument("--cases", default="shared,phantom", help="shared and/or phantom")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    ap.add_argument("--figures", metavar="DIR", help="also write realism_*.png screenshots into DIR")
    args = ap.parse_args(argv)
    sizes = args.sizes.split(",")
    results = {}
    for name, ct, liver, spacing, geometry in load_cases(args.cases.split(",")):
        if args.figures:
            figures(Path(args.figures), name, ct, liver, spacing, geometry)
        rows = [measure(ct, liver, spacing, size, seed) for size in sizes for seed in range(args.seeds)]
        results[name] = rows
        if args.json:
            continue
        print(f"\n## {name}: liver {float(np.mean(ct[liver])):.0f} ± {float(np.std(ct[liver])):.0f} HU")
        head = ["size", "seed", "mean±std", "contrast", "noise (unmodified)", "grad HU/mm", "edge mm (step)", "diam mm",
                "spher", "solid", "shell ΔHU", "flags"]
        print(" | ".join(head))
        for r in rows:
            print(" | ".join([r["size"], str(r["seed"]), f"{r['mean_hu']:.0f}±{r['std_hu']:.0f}", f"{r['contrast_hu']:.0f}",
                              f"{r['noise_ratio']:.2f} ({r['noise_ratio_unmodified']:.2f})", f"{r['edge_gradient_hu_per_mm']:.1f}",
                              f"{r['edge_width_mm']:.1f} ({r['edge_width_step_mm']:.1f})", f"{r['equivalent_diameter_mm']:.0f}",
                              f"{r['sphericity']:.2f}", f"{r['solidity']:.2f}", f"{r.get('shell_change_hu', float('nan')):.1f}",
                              ",".join(r["flags"]) or "-"]))
        for size in sizes:
            sel = [r for r in rows if r["size"] == size]
            med = {k: statistics.median(r[k] for r in sel) for k in COLUMNS if k in sel[0]}
            print(f"median {size}: mean {med['mean_hu']:.0f} ± {med['std_hu']:.0f} HU, contrast {med['contrast_hu']:.0f} HU, "
                  f"noise ratio {med['noise_ratio']:.2f}, edge gradient {med['edge_gradient_hu_per_mm']:.1f} HU/mm, "
                  f"edge width {med['edge_width_mm']:.1f} mm (step {med['edge_width_step_mm']:.1f}), "
                  f"sphericity {med['sphericity']:.2f}, solidity {med['solidity']:.2f}, "
                  f"flagged {sum(bool(r['flags']) for r in sel)}/{len(sel)}")
    if args.json:
        print(json.dumps(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
