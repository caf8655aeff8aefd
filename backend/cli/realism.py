"""`difftumor realism`: how far synthetic tumours are from real ones (features + a real-vs-synthetic classifier).

    difftumor realism --synthetic out1/ out2/ --real ct.nii.gz,labels.nii.gz --organ liver --out report/

Each ``--real`` / ``--synthetic`` item is a ``difftumor synthesize`` output folder (``ct.nii.gz`` +
``label.nii.gz``) or a ``CT,LABELS`` pair of files; the tumours are the label's tumour voxels (MSD/LiTS
value 2 inside the organ, as ``--organs`` of ``synthesize`` reads them), one per connected component.
Prints the report and writes (each atomically) ``realism.csv`` (one row per tumour), ``realism.json``
(settings, AUC with its CI, per-feature AUCs) and ``realism_embedding.png`` into ``--out``. Without
``--real`` only the per-tumour table (against each tumour's own surroundings) is made. The features and
the classifier: :mod:`backend.realism`, docs/realism.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path

OUTPUTS = ("realism.csv", "realism.json", "realism_embedding.png")
SHOWN = (("contrast_hu", "contrast HU", "{:+.0f}"), ("std_hu", "std", "{:.1f}"), ("noise_ratio", "noise", "{:.2f}"),
         ("edge_gradient_hu_per_mm", "edge HU/mm", "{:.1f}"), ("edge_sharpness_per_mm", "sharp /mm", "{:.2f}"),
         ("diameter_mm", "diam mm", "{:.1f}"), ("sphericity", "spher", "{:.2f}"), ("solidity", "solid", "{:.2f}"),
         ("glcm_homogeneity", "GLCM hom", "{:.2f}"))


def register(sub) -> None:
    p = sub.add_parser(
        "realism", help="compare synthetic tumours with real ones: features, classifier AUC, embedding figure",
        description="Per-tumour features (HU relative to the organ, noise ratio, edge, shape, GLCM texture) of "
        "synthetic and real tumours, and a cross-validated random forest that tries to tell them apart "
        "(AUC 0.5 = indistinguishable).", epilog=__doc__.split("\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--synthetic", nargs="+", required=True, metavar="FOLDER|CT,LABELS",
                   help="synthesize output folders or CT,LABELS file pairs with synthetic tumours")
    p.add_argument("--real", nargs="+", default=[], metavar="FOLDER|CT,LABELS",
                   help="CT,LABELS file pairs (or folders) with real tumours labelled 2 in the organ")
    p.add_argument("--organ", required=True, help="liver, pancreas, kidney, kidney_left, kidney_right or spleen")
    p.add_argument("--out", required=True, help="folder for realism.csv, realism.json, realism_embedding.png")
    p.add_argument("--seed", type=int, default=0, help="seed of the cross-validation split and the forest")
    p.add_argument("--folds", type=int, default=5, help="cross-validation folds (at most the smaller class's size)")
    p.set_defaults(func=handler)


def _pair(item: str, flag: str) -> tuple[Path, Path]:
    from backend.errors import DiffTumorError

    if "," in item:
        ct, lab = (Path(v) for v in item.split(",", 1))
    else:
        folder = Path(item)
        if not folder.is_dir():
            raise DiffTumorError(f"{flag} {item}: not a folder and not a CT,LABELS pair")
        ct, lab = folder / "ct.nii.gz", folder / "label.nii.gz"
    for path in (ct, lab):
        if not path.is_file():
            raise DiffTumorError(f"{flag} {item}: {path} does not exist")
    return ct, lab


def _rows(items, flag: str, organ: str) -> list[dict]:
    from backend.errors import DiffTumorError
    from backend.io import read_image
    from backend.organs import load_organ_and_tumors
    from backend.realism import tumour_features

    rows = []
    for item in items:
        ct_path, lab_path = _pair(item, flag)
        try:
            ct = read_image(ct_path)
            organ_mask, tumours = load_organ_and_tumors(lab_path, organ, reference=ct)
        except DiffTumorError as exc:
            raise DiffTumorError(f"{flag} {item}: {exc}") from None
        if tumours is None or not tumours.any():
            raise DiffTumorError(f"{flag} {item}: {lab_path.name} labels no tumour (value 2) in the {organ}")
        try:
            found = tumour_features(ct.array, tumours, organ_mask | tumours, ct.geometry.spacing[::-1])
        except DiffTumorError as exc:
            raise DiffTumorError(f"{flag} {item}: {exc}") from None
        if not found:
            raise DiffTumorError(f"{flag} {item}: every tumour in {lab_path.name} is under 8 voxels")
        for k, r in enumerate(found, start=1):
            rows.append({"kind": flag.lstrip("-"), "source": str(item), "tumour": k, **r})
    return rows


def _check_replaceable(out: Path) -> None:
    """Only this command's own earlier report may be replaced: a realism.json it wrote marks one."""
    import json

    from backend.errors import DiffTumorError

    taken = [n for n in OUTPUTS if (out / n).exists()]
    if not taken:
        return
    try:
        ours = json.loads((out / "realism.json").read_text(encoding="utf-8")).get("command") == "difftumor realism"
    except (OSError, ValueError, AttributeError):
        ours = False
    if not ours:
        raise DiffTumorError(f"--out {out}: holds {taken[0]}, not written by 'difftumor realism'; choose another folder")


def _table(rows: list[dict]) -> str:
    head = ["kind", "source", "#"] + [h for _, h, _ in SHOWN]
    body = [[r["kind"], Path(r["source"].split(",")[0]).name or r["source"], str(r["tumour"])]
            + [fmt.format(r[k]) if r[k] == r[k] else "-" for k, _, fmt in SHOWN] for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in [head, *body])


def handler(args) -> int:
    import csv
    import io
    import json

    from backend.errors import DiffTumorError
    from backend.io import atomic_write, write_text_atomic
    from backend.organs import parse_organ
    from backend.realism import FEATURES, MIN_PER_CLASS, compare, embedding_png, feature_aucs

    organ = parse_organ(args.organ)
    if args.folds < 2:
        raise DiffTumorError(f"--folds {args.folds}: must be at least 2")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise DiffTumorError(f"--out {out}: is a file; give a folder")
    _check_replaceable(out)
    synthetic = _rows(args.synthetic, "--synthetic", organ)
    real = _rows(args.real, "--real", organ)
    report = None
    few = bool(real) and min(len(real), len(synthetic)) < MIN_PER_CLASS
    if real and not few:
        report = compare(real, synthetic, seed=args.seed, folds=args.folds)
        for r, p in zip(real + synthetic, report["probabilities"]):
            r["p_synthetic"] = p
    rows = real + synthetic
    print(_table(rows))
    if report:
        lo, hi = report["auc_ci95"]
        print(f"\nreal vs synthetic: AUC {report['auc']:.2f} (95% CI {lo:.2f}-{hi:.2f}; 0.5 = indistinguishable), "
              f"{report['n_real']} real / {report['n_synthetic']} synthetic tumours, {report['folds']}-fold CV")
        top = list(report["feature_auc"].items())[:5]
        print("separating most (feature AUC, > 0.5: higher in synthetic): "
              + ", ".join(f"{f} {a:.2f}" for f, a in top))
    elif few:
        top = list(feature_aucs(real, synthetic).items())[:5]
        print(f"\ntoo few tumours for a classifier's AUC: {len(real)} real / {len(synthetic)} synthetic (it needs at "
              f"least {MIN_PER_CLASS} of each); single features (AUC, > 0.5: higher in synthetic): "
              + ", ".join(f"{f} {a:.2f}" for f, a in top))
    else:
        print("\nno --real tumours: the table compares each synthetic tumour with its own surroundings only")
    png = embedding_png(real, synthetic, report["auc"] if report else None)  # before any file is written

    try:
        out.mkdir(parents=True, exist_ok=True)
        cols = ["kind", "source", "tumour", "voxel_zyx", "organ_mean_hu", *FEATURES] + (["p_synthetic"] if report else [])
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
        w.writeheader()
        for r in rows:
            w.writerow({k: (" ".join(map(str, v)) if isinstance(v, list) else v) for k, v in r.items()})
        write_text_atomic(out / "realism.csv", buf.getvalue())
        summary = {"command": "difftumor realism", "organ": organ, "real": list(args.real),
                   "synthetic": list(args.synthetic), "seed": args.seed,
                   "features": list(FEATURES), "n_tumours": {"real": len(real), "synthetic": len(synthetic)}}
        if report:
            summary.update({k: v for k, v in report.items() if k != "probabilities"})
        elif few:
            summary["feature_auc"] = feature_aucs(real, synthetic)
            summary["auc"] = None
            summary["auc_note"] = f"too few tumours for a classifier (needs {MIN_PER_CLASS} of each kind)"
        write_text_atomic(out / "realism.json", json.dumps(summary, indent=1))
        with atomic_write(out / "realism_embedding.png") as tmp:
            Path(tmp).write_bytes(png)
    except OSError as exc:
        raise DiffTumorError(f"--out {out}: cannot write: {exc.strerror or exc}") from None
    print(f"wrote {', '.join(str(out / n) for n in OUTPUTS)}")
    return 0
