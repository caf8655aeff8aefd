"""The evaluation figure: DSC / NSD per organ and tumour-wise sensitivity by size (matplotlib Agg)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from backend.io import atomic_write

SIZE_LABELS = {"lt20mm": "<20 mm", "20_50mm": "20–50 mm", "gt50mm": ">50 mm"}


def summary_figure(rows: list[dict], summary: list[dict], path: Path, tolerance_mm: float) -> Path:
    """Two panels: box plots of per-case DSC and NSD per organ; pooled sensitivity per size bin."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    organs = sorted({r["organ"] for r in rows})
    fig = Figure(figsize=(10, 4), dpi=120)
    ax1, ax2 = fig.subplots(1, 2)

    data, labels, positions = [], [], []
    for i, organ in enumerate(organs):
        for j, key in enumerate(("dsc", "nsd")):
            vals = [100 * r[key] for r in rows if r["organ"] == organ and r[key] == r[key]]
            data.append(vals if vals else [np.nan])
            positions.append(3 * i + j)
            labels.append(f"{organ}\n{'DSC' if key == 'dsc' else f'NSD@{tolerance_mm:g}mm'}")
    box = ax1.boxplot(data, positions=positions, widths=0.7, patch_artist=True, showmeans=True)
    for k, patch in enumerate(box["boxes"]):
        patch.set_facecolor("#8fb8de" if k % 2 == 0 else "#f4b183")
    for x, vals in zip(positions, data):
        ax1.scatter(np.full(len(vals), x) + np.linspace(-0.15, 0.15, len(vals)), vals, s=8, c="k", alpha=0.5, zorder=3)
    ax1.set_xticks(positions, labels, fontsize=7)
    ax1.set_ylim(-2, 102)
    ax1.set_ylabel("per case (%)")
    ax1.set_title("Tumour segmentation")

    alls = [s for s in summary if s["fold"] == "all"]
    bins = list(SIZE_LABELS)
    width = 0.8 / max(len(alls), 1)
    for k, s in enumerate(alls):
        sens = [100 * s[f"sensitivity_{b}"] if s[f"sensitivity_{b}"] == s[f"sensitivity_{b}"] else 0.0 for b in bins]
        xs = np.arange(len(bins)) + k * width
        fp = f"{s['fp_per_case']:.2f}" if s["fp_per_case"] == s["fp_per_case"] else "–"
        bars = ax2.bar(xs, sens, width=width, label=f"{s['organ']}: {fp} false positives per case")
        for bar, b in zip(bars, bins):
            n = s[f"tumors_{b}"]
            ax2.annotate(f"n={n}" if n else "no tumours", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                         ha="center", va="bottom", fontsize=7)
    ax2.set_xticks(np.arange(len(bins)) + width * (len(alls) - 1) / 2, [SIZE_LABELS[b] for b in bins])
    ax2.set_ylim(0, 125)  # room for the legend above the bars
    ax2.set_yticks(range(0, 101, 20))
    ax2.set_ylabel("tumour-wise sensitivity (%)")
    ax2.set_title("Detection by tumour diameter")
    if alls:  # false positives beside the sensitivity: 100 % detected means little with many of them
        ax2.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    path = Path(path)
    with atomic_write(path, suffix=".png") as tmp:
        fig.savefig(tmp)
    return path
