"""Axial crops (W400/L40) of model-based tumours with and without mass effect on the shared CT -> docs/img/.

    python bench/realism_figures.py [--out docs/img]

Writes realism_mass_effect.png (unmodified CT | mass effect off | on | on − off, a 30 mm tumour 5 mm below the
liver surface, organ contour from each output's label) and realism_default_medium.png (the default
``difftumor synthesize --method model-based --size medium`` tumour: unmodified | synthetic | difference, plus
2x zoomed crops). The shared CT has no real tumour to put beside them.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "totalseg_abdomen_3mm"


def _window(a):
    return np.clip((np.asarray(a, np.float64) - (40 - 200)) / 400.0, 0, 1)


def _axial(a, z):
    # array (z, y, x) with direction diag(-1, -1, 1): flip both in-plane axes for the radiological view
    # (patient's right on the image's left, anterior up)
    return np.asarray(a)[z, ::-1, ::-1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="docs/img")
    ap.add_argument("--shared", default=str(SHARED))
    args = ap.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from scipy import ndimage

    from backend.io import read_image
    from backend.organs import load_organ_mask
    from backend.synthesis.engine import SynthesisEngine
    from backend.synthesis.request import Ellipsoid, Generated, SynthesisRequest

    ct = read_image(Path(args.shared) / "example_ct_sm.nii.gz")
    liver = load_organ_mask(Path(args.shared) / "example_seg.nii.gz", "liver", reference=ct)
    engine = SynthesisEngine(None, device="cpu")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    # 1) mass effect: a 30 mm tumour whose surface lies 5 mm below the liver's
    depth = ndimage.distance_transform_edt(liver, sampling=ct.geometry.spacing[::-1])
    cand = np.argwhere(np.abs(depth - 20.0) < 1.6)
    z, y, x = cand[np.argmin(np.abs(cand[:, 0] - depth.shape[0] / 2))]
    runs = {m: engine.run(SynthesisRequest(organ="liver", tumor=Ellipsoid((int(x), int(y), int(z)), (15, 15, 15), voxel=True),
                                           method="model-based", seed=0, mass_effect=m), ct, liver) for m in ("off", "on")}
    me = runs["on"].provenance["tumours"][0]["mass_effect"]
    ys, xs = np.argwhere(_axial(runs["on"].tumor_mask, z)).mean(0).astype(int)
    half = 16  # voxels: a 96 mm zoomed crop around the tumour
    box = (slice(max(ys - half, 0), ys + half), slice(max(xs - half, 0), xs + half))
    fig, axes = plt.subplots(2, 4, figsize=(16, 8.6), dpi=110)
    panels = [("unmodified CT", ct.array, liver), ("mass effect off", runs["off"].ct.array, runs["off"].label >= 1),
              (f"mass effect on (surface push {me['surface_push_mm']:.1f} mm)", runs["on"].ct.array, runs["on"].label >= 1)]
    for row, crop in zip(axes, (None, box)):
        for ax, (title, a, organ) in zip(row, panels):
            img, org, ref = _axial(a, z), _axial(organ, z), _axial(liver, z)
            if crop:
                img, org, ref = img[crop], org[crop], ref[crop]
            ax.imshow(_window(img), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            ax.contour(org, levels=[0.5], colors="#ffcc00", linewidths=0.8)
            ax.contour(ref, levels=[0.5], colors="#00aaff", linewidths=0.8, linestyles="dotted")
            ax.set_title(title + (" (zoom)" if crop else ""), fontsize=10)
        d = _axial(runs["on"].ct.array.astype(float) - runs["off"].ct.array, z)
        im = row[3].imshow(d[crop] if crop else d, cmap="coolwarm", vmin=-40, vmax=40, interpolation="nearest")
        row[3].set_title("on − off (HU): the pushed tissue" + (" (zoom)" if crop else ""), fontsize=10)
        fig.colorbar(im, ax=row[3], fraction=0.046)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"Shared non-contrast CT (3 mm), axial slice {z}, W400/L40, 30 mm model-based tumour 5 mm below the "
                 f"liver surface; yellow: output organ label, blue dotted: input liver", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "realism_mass_effect.png")
    plt.close(fig)

    # 2) the default generated medium tumour (mass effect auto)
    r = engine.run(SynthesisRequest(organ="liver", tumor=Generated("medium", 1), method="model-based", seed=0), ct, liver)
    zs = np.flatnonzero(r.tumor_mask.any(axis=(1, 2)))
    zt = int(zs[np.argmax([r.tumor_mask[k].sum() for k in zs])])
    cy, cx = (int(v) for v in np.argwhere(r.tumor_mask[zt]).mean(0))
    fig, axes = plt.subplots(2, 3, figsize=(12, 8.4), dpi=110)
    for row, zoom in zip(axes, (None, 18)):
        for ax, (title, a) in zip(row[:2], (("unmodified CT", ct.array), ("model-based, default", r.ct.array))):
            sl = _axial(a, zt)
            if zoom:
                yy, xx = sl.shape[0] - 1 - cy, sl.shape[1] - 1 - cx
                sl = sl[max(yy - zoom, 0):yy + zoom, max(xx - zoom, 0):xx + zoom]
            ax.imshow(_window(sl), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            ax.set_title(title + (" (zoom)" if zoom else ""), fontsize=10)
        dd = _axial(r.ct.array.astype(float) - ct.array, zt)
        if zoom:
            dd = dd[max(yy - zoom, 0):yy + zoom, max(xx - zoom, 0):xx + zoom]
        im = row[2].imshow(dd, cmap="coolwarm", vmin=-80, vmax=80, interpolation="nearest")
        row[2].set_title("difference (HU)", fontsize=10)
        fig.colorbar(im, ax=row[2], fraction=0.046)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    p = r.provenance["tumours"][0]
    fig.suptitle(f"Default model-based medium tumour (seed 0): contrast {p['params']['contrast_hu']:.0f} HU, "
                 f"{p['params']['phase']}, mass effect {'on' if p['mass_effect']['applied'] else 'off'} "
                 f"({p['mass_effect']['equivalent_diameter_mm']:.0f} mm); W400/L40", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "realism_default_medium.png")
    plt.close(fig)
    print(f"wrote {out / 'realism_mass_effect.png'} and {out / 'realism_default_medium.png'}; surface push "
          f"{me['surface_push_mm']} mm, max displacement {me['max_displacement_mm']} mm")


if __name__ == "__main__":
    main()
