"""Stage 3 end to end on CPU: toy dataset -> train segmentation (tiny U-Net, synthetic tumours on the
fly) -> evaluate the held-out "real"-tumour cases -> table, CSV, figure. Prints timings.

    python bench/segmentation_e2e.py [--steps 40] [--out /tmp/difftumor_seg_e2e] [--threads 2]

The toy data come from the one real CT in ../shared/data/totalseg_abdomen_3mm (crops/mirrors of
it; "real" tumours inserted with the model-based engine), so the numbers only show that the whole
pipeline runs; they say nothing about segmentation quality.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("DIFFTUMOR_SHARED", REPO.parent / "shared"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--out", type=Path, default=Path("/tmp/difftumor_seg_e2e"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--roi", type=int, default=48)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from backend.cli import main as cli
    from backend.segmentation.toydata import make_toy_dataset

    data = SHARED / "data" / "totalseg_abdomen_3mm"
    t0 = time.perf_counter()
    lists = make_toy_dataset(data / "example_ct_sm.nii.gz", data / "example_seg.nii.gz", args.out / "data",
                             n_healthy=4, n_tumor=6, seed=0, box_mm=120.0)
    t_data = time.perf_counter() - t0
    run = args.out / "run"
    if run.exists():  # a fresh run each time (training refuses to start over an earlier run's last.pt)
        import shutil

        shutil.rmtree(run)
    t0 = time.perf_counter()
    code = cli(["train", "segmentation", "--config", str(REPO / "backend/configs/segmentation_tiny_cpu.yaml"),
                f"data.real={lists['real']}", f"data.healthy={lists['healthy']}", f"out_dir={run}",
                f"max_steps={args.steps}", f"val_every={args.steps}", f"roi_size=[{args.roi},{args.roi},{args.roi}]",
                "data.folds=3", "val_overlap=0.25", f"log_every={max(args.steps // 8, 1)}", "lr=3e-3",
                f"warmup_steps={max(args.steps // 10, 1)}"])
    t_train = time.perf_counter() - t0
    assert code == 0, "training failed"
    t0 = time.perf_counter()
    code = cli(["evaluate", "--model", str(run / "last.pt"), "--data", lists["real"], "--folds",
                str(run / "splits.json"), "--fold", "0", "--overlap", "0.5", "--out", str(args.out / "eval")])
    t_eval = time.perf_counter() - t0
    assert code == 0, "evaluation failed"
    print((run / "metrics.csv").read_text(encoding="utf-8"))
    print(f"toy data {t_data:.1f} s; training {args.steps} steps {t_train:.1f} s "
          f"({t_train / args.steps:.2f} s/step incl. start-up and validation); evaluation {t_eval:.1f} s; "
          f"{torch.get_num_threads()} threads")
    print(f"outputs: {args.out / 'eval'} (cases.csv, summary.md, summary.csv, summary.png, evaluation.json)")


if __name__ == "__main__":
    main()
