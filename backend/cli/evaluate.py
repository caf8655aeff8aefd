"""`difftumor evaluate`: score predictions (or run a trained model first) -> tables, CSV, figure."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

log = logging.getLogger(__name__)

EPILOG = """\
examples:
  difftumor evaluate --pred preds/ --label labels/ --organ-label 1 --tumor-label 2 --out eval/
  difftumor evaluate --model runs/liver/best.pt --data data/liver_list.txt --folds runs/liver/splits.json \\
      --fold 0 --overlap 0.75 --out eval/

outputs: cases.csv (case_id,organ,fold,dsc,nsd,tumors,detected,false_positives,sensitivity, size bins,...),
summary.md / summary.csv (mean ± std per organ and fold; sensitivity with false positives per case),
summary.png, skipped.csv, evaluation.json (settings and metric definitions, NSD included), and
.difftumor-evaluate.json (the files this command wrote in --out: only those, unchanged, are ever
replaced or removed; any other file in the way is refused).

detection (docs/evaluation.md): by default a tumour is detected when a predicted connected component
overlaps it with Dice >= 0.1; --detection any-voxel counts one predicted voxel inside it.
"""


def register(sub) -> None:
    p = sub.add_parser(
        "evaluate",
        help="score tumour segmentations: DSC, NSD, tumour-wise sensitivity by size, false positives",
        description="Score prediction files against labels (paired by file name), or run a trained "
        "segmentation checkpoint with sliding-window inference and score its predictions.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = p.add_argument_group("what to score (either --pred + --label, or --model + --data)")
    src.add_argument("--pred", type=Path, help="prediction file or folder of label maps (whole numbers >= 0; "
                     "probability maps and CTs are skipped; label values: see --pred-tumor-label)")
    src.add_argument("--label", type=Path, help="reference label file or folder (paired with --pred by file name)")
    src.add_argument("--model", type=Path, help="segmentation checkpoint from `difftumor train segmentation`")
    src.add_argument("--data", help="dataset for --model: folder, list file, MSD dataset.json or AbdomenAtlas tree")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--tumor-label", type=int, default=2, help="tumour value in the labels (default 2)")
    p.add_argument("--organ-label", type=int, default=None,
                   help="organ value in the labels; tumour predictions are then kept inside the organ (organ + tumour)")
    p.add_argument("--pred-tumor-label", type=int, default=None, help="tumour value in the predictions (default: --tumor-label)")
    p.add_argument("--pred-organ-label", type=int, default=None, help="organ value in the predictions (default: --organ-label)")
    p.add_argument("--organ-masks", type=Path, default=None,
                   help="organ mask file/folder (non-zero = organ, e.g. pseudo-labels) to restrict tumour predictions to")
    p.add_argument("--organ", default=None, help="organ name for the tables (default: from the checkpoint, else 'tumor')")
    p.add_argument("--tolerance-mm", type=float, default=2.0, help="NSD tolerance in mm (default 2)")
    p.add_argument("--detection", choices=("overlap", "any-voxel"), default="overlap",
                   help="tumour-wise detection rule: 'overlap' (default) = some predicted component has Dice >= "
                   "--detection-min-dice with the tumour; 'any-voxel' = one predicted voxel inside it (lenient: read "
                   "it with the false positives per case)")
    p.add_argument("--detection-min-dice", type=float, default=0.1,
                   help="Dice a predicted component needs with a tumour to detect it (--detection overlap; default 0.1)")
    p.add_argument("--folds", type=Path, default=None,
                   help="split JSON from training or CSV case_id,fold[,organ]: adds a fold column and per-fold rows")
    p.add_argument("--allow-empty-labels", action="store_true",
                   help="score all-zero labels as tumour-free cases, and accept label files in which --tumor-label "
                   "never occurs (an all tumour-free set); without it that is an error")
    inf = p.add_argument_group("inference (--model)")
    inf.add_argument("--fold", type=int, default=None,
                     help="with --folds: score only that fold's validation cases (--model: predicts only them)")
    inf.add_argument("--overlap", type=float, default=0.75, help="sliding-window overlap (paper 0.75; release validates with 0.5)")
    inf.add_argument("--sw-batch-size", type=int, default=2, help="windows per forward pass")
    inf.add_argument("--device", default="auto", help="auto, cuda, mps or cpu")
    p.set_defaults(func=handler)


def check_out_outside_inputs(args) -> None:
    """``--out`` must not be (inside) a folder evaluate reads: its files would mix with the inputs (and, inside the
    prediction or label folder, a later run would pair them as cases)."""
    from backend.errors import DiffTumorError

    out = Path(args.out).resolve()
    inputs = [("prediction", args.pred), ("label", args.label), ("organ-mask", args.organ_masks)]
    if args.model is not None and args.data is not None:
        inputs.append(("dataset", Path(args.data)))
    for what, folder in inputs:
        if folder is None or not Path(folder).is_dir():
            continue
        folder = Path(folder).resolve()
        if out == folder or folder in out.parents:
            where = "is" if out == folder else "is inside"
            raise DiffTumorError(f"--out {args.out}: {where} the {what} folder {folder}; choose a folder outside the inputs")


def handler(args) -> int:
    from backend.errors import DiffTumorError
    from backend.io import check_path_name, os_error_message

    check_path_name(args.out)
    try:
        return _evaluate(args)
    except OSError as exc:  # e.g. a name the file system refuses, no space left: one line naming the path
        raise DiffTumorError(os_error_message(exc, args.out)) from None


def _evaluate(args) -> int:
    from backend.cli.synthesize import check_out_writable
    from backend.errors import DiffTumorError
    from backend.progress import run_with_bar
    from backend.segmentation.evaluate import EvaluationConfig, evaluate_files

    # before any case is read or predicted: a file or unwritable place as --out would otherwise fail
    # with a traceback after all the work
    check_out_writable(Path(args.out))
    check_out_outside_inputs(args)
    if args.model is not None:
        if args.pred is not None or args.data is None:
            raise DiffTumorError("--model: give it with --data (and without --pred)")
        from backend.segmentation.inference import predict_dataset

        pred_dir, label_dir, meta = run_with_bar(
            predict_dataset(
                args.model, args.data, Path(args.out), folds=args.folds, fold=args.fold,
                overlap=args.overlap, sw_batch_size=args.sw_batch_size, device=args.device,
            ),
            "predict", unit="case",
        )
        pre_skipped = meta["skipped"]
        if not any(pred_dir.glob("*.nii.gz")):
            # nothing to score: leave none of the folders this run created (pred/, labels/, --out) behind empty
            for folder in sorted(meta["created"], key=lambda p: len(p.parts), reverse=True):
                if folder.is_dir() and not any(folder.iterdir()):
                    folder.rmdir()
            first = f"; {pre_skipped[0][0]}: {pre_skipped[0][1]}" if pre_skipped else ""
            raise DiffTumorError(f"{args.data}: no case could be predicted{first}")
        args.pred, args.label = pred_dir, label_dir
        args.organ = args.organ or meta.get("organ")
        if args.organ_label is None:
            args.organ_label = 1  # trained models predict 0 background, 1 organ, 2 tumour
    elif args.pred is None or args.label is None:
        raise DiffTumorError("evaluate: give --pred and --label (or --model and --data)")
    else:
        pre_skipped = []

    cfg = EvaluationConfig(
        tumor_label=args.tumor_label, organ_label=args.organ_label, pred_tumor_label=args.pred_tumor_label,
        pred_organ_label=args.pred_organ_label, tolerance_mm=args.tolerance_mm, organ=args.organ or "tumor",
        allow_empty_labels=args.allow_empty_labels, detection=args.detection,
        detection_min_dice=args.detection_min_dice,
    )
    rows, skipped, summary = run_with_bar(
        evaluate_files(args.pred, args.label, args.out, cfg, folds=args.folds, organ_masks=args.organ_masks,
                       fold=args.fold, skipped=pre_skipped),
        "score", unit="case",
    )
    table = (Path(args.out) / "summary.md").read_text(encoding="utf-8").split("\n\n", 1)[0]
    print(table)  # the metric definitions follow it in summary.md and evaluation.json
    rule = cfg.detection + (f", component Dice >= {cfg.detection_min_dice:g}" if cfg.detection == "overlap" else "")
    for s in summary:
        if s["fold"] == "all" and s["tumors"]:
            print(f"{s['organ']}: tumour-wise sensitivity {100 * s['sensitivity']:.1f} % ({s['tumors']} tumours) at "
                  f"{s['fp_per_case']:.2f} false positives per case (detection: {rule})")
    print(f"{len(rows)} case(s) scored, {len(skipped)} skipped; results in {args.out}")
    return 0
