"""Stage 3 with bad input: config values, missing diffusion weights, labels on another grid, empty labels,
a used output folder, stale predictions and fold files naming missing cases. Each is one line (exit 2)
before anything is written, or a case left out with its reason while the others continue.

Data: tiny synthetic CTs (40 x 40 x 24 voxels at 1.5 mm, a liver-like block with a tumour), written to
tmp_path; tiny U-Net, 32³ crops, 1-2 steps on CPU.
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import numpy as np
import pytest

import backend.cli
import backend.cli.train
from backend.errors import DiffTumorError
from backend.io import Geometry, write_image

TINY_CONFIG = Path(__file__).resolve().parents[2] / "backend" / "configs" / "segmentation_tiny_cpu.yaml"


def cli(argv):
    saved = backend.cli.COMMAND_MODULES, backend.cli.train.STAGE_MODULES
    backend.cli.COMMAND_MODULES = ["backend.cli.train", "backend.cli.evaluate"]
    backend.cli.train.STAGE_MODULES = ["backend.train.segmentation"]
    try:
        return backend.cli.main(argv)
    finally:
        backend.cli.COMMAND_MODULES, backend.cli.train.STAGE_MODULES = saved


def _case(folder: Path, name: str, *, tumour: bool = True, label_grid: Geometry | None = None, empty=False):
    g = Geometry((40, 40, 24), (1.5, 1.5, 1.5), (0.0, 0.0, 0.0))
    rng = np.random.default_rng(len(name))
    ct = rng.normal(-100, 20, (24, 40, 40)).astype(np.int16)
    lab = np.zeros((24, 40, 40), np.uint8)
    lab[4:20, 8:32, 8:32] = 1
    ct[lab == 1] = 60
    if tumour:
        lab[9:15, 14:22, 14:22] = 2
        ct[lab == 2] = 20
    if empty:
        lab[:] = 0
    lg = label_grid or g
    if label_grid is not None:
        lab = np.zeros(lg.size[::-1], np.uint8)
        lab[2:10, 2:10, 2:10] = 1
    write_image(ct, folder / f"{name}.nii.gz", g)
    write_image(lab, folder / f"{name}_label.nii.gz", lg)
    return f"{name}.nii.gz,{name}_label.nii.gz"


@pytest.fixture()
def data(tmp_path):
    """Real-tumour cases r0..r4 (r3's label on another grid, r2's label empty) + a split that validates
    on r2, r3, r4 (fold 0) and trains on r0, r1."""
    d = tmp_path / "data"
    d.mkdir()
    other = Geometry((38, 40, 24), (1.5, 1.5, 1.5), (0.0, 0.0, 0.0))
    lines = [_case(d, "r0"), _case(d, "r1"), _case(d, "r2", empty=True), _case(d, "r3", label_grid=other), _case(d, "r4")]
    (d / "real.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    split = {"k": 2, "seed": 0, "organ": "liver", "healthy": [], "organs": {},
             "folds": [{"fold": 0, "train": ["r0", "r1"], "val": ["r2", "r3", "r4"]},
                       {"fold": 1, "train": ["r2", "r3", "r4"], "val": ["r0", "r1"]}]}
    (d / "split.json").write_text(json.dumps(split), encoding="utf-8")
    return d


def _train_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "segmentation", "--config", str(TINY_CONFIG), f"data.real={data / 'real.txt'}",
            f"data.split_file={data / 'split.json'}", f"out_dir={out}", "roi_size=[32,32,32]", "max_steps=1",
            "val_every=1", "save_every=1", "log_every=1", "val_overlap=0", "data.cache_rate=0",
            "data.foreground_radius=5", *extra]


@pytest.mark.parametrize("override, key", [
    ("roi_size=[32,32]", "roi_size="),
    ("network.name=swinunetr", "network.name=swinunetr"),  # 32-multiples: 48 is not
    ("hu_range=[250,-175]", "hu_range="),
    ("lr=-1", "lr="),
    ("val_overlap=1.5", "val_overlap="),  # used to fail at the first validation, after training
    ("data.pos_neg=[1]", "data.pos_neg="),
    ("data.num_workers=-1", "data.num_workers="),
    ("data.fold=5", "data.fold="),
    ("synthesis.prob=1.5", "synthesis.prob="),
    ("synthesis.stage_probs=[0.5,0.5]", "synthesis.stage_probs="),
    ("data.tumor_values=[1]", "data.organ_values="),  # organ and tumour share a value
    ("synthesis.weights_organ=lungs", "synthesis.weights_organ="),
])
def test_bad_config_values_are_one_line_before_anything_is_written(data, tmp_path, capsys, override, key):
    out = tmp_path / "run"
    args = _train_args(data, out, override)
    if override.startswith("network.name"):
        args[args.index("roi_size=[32,32,32]")] = "roi_size=[48,48,48]"
    assert cli(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"difftumor: error: {key}"), err
    assert not out.exists()


def test_diffusion_synthesis_without_weights_is_refused_before_training(data, tmp_path, capsys, monkeypatch):
    """It used to start training and fail with a traceback in the DataLoader at the first synthetic crop."""
    monkeypatch.delenv("DIFFTUMOR_WEIGHTS", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))  # no user config
    out = tmp_path / "run"
    healthy = data / "healthy.txt"
    healthy.write_text(_case(data, "h0", tumour=False) + "\n", encoding="utf-8")
    args = [a for a in _train_args(data, out, "synthesis.method=diffusion", f"data.healthy={healthy}")
            if not a.startswith("data.split_file")]
    assert cli(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["difftumor: error: synthesis.method=diffusion: no weights folder found (set synthesis.weights_dir=DIR "
                   "or $DIFFTUMOR_WEIGHTS, or run 'difftumor weights fetch'); synthesis.method=model-based needs none"]
    assert not out.exists()
    (tmp_path / "w").mkdir()
    assert cli(args + [f"synthesis.weights_dir={tmp_path / 'w'}"]) == 2
    assert "lacks AutoencoderModel.ckpt, liver_early.pt, liver_noearly.pt" in capsys.readouterr().err
    assert cli(args + ["synthesis.stage_probs=[0,0.5,0.5]", f"synthesis.weights_dir={tmp_path / 'w'}"]) == 2
    assert "lacks AutoencoderModel.ckpt, liver_noearly.pt," in capsys.readouterr().err  # early model not drawn


@pytest.mark.slow
def test_label_on_another_grid_is_left_out_and_empty_labels_are_not_validated(data, tmp_path, caplog):
    """r3's label is on another grid: listed in skipped.csv, the run goes on (it used to stop with a
    ValueError traceback at validation). r2's label is empty: not scored (it used to count as DSC 1 or 0)."""
    out = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="backend.train.segmentation"):
        assert cli(_train_args(data, out)) == 0
    rows = list(csv.DictReader(open(out / "skipped.csv", encoding="utf-8")))
    assert [(r["case"], r["role"]) for r in rows] == [("r3", "validation")]
    assert "grid does not match" in rows[0]["reason"] and "r3_label.nii.gz" in rows[0]["reason"]
    assert "skipped validation case r3" in caplog.text
    assert "validation case r2: label" in caplog.text and "not scored" in caplog.text
    val = list(csv.DictReader(open(out / "val_metrics.csv", encoding="utf-8")))
    assert val[0]["val_cases"] == "1"  # r4


@pytest.mark.slow
def test_fresh_run_into_a_used_out_dir_is_refused_and_keeps_its_checkpoint(data, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli(_train_args(data, out)) == 0
    before = (out / "last.pt").read_bytes()
    capsys.readouterr()
    assert cli(_train_args(data, out, "max_steps=2")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds last.pt of an earlier run; add --resume" in err[0]
    assert (out / "last.pt").read_bytes() == before
    assert [r["step"] for r in csv.DictReader(open(out / "metrics.csv", encoding="utf-8"))] == ["1"]


@pytest.mark.slow
def test_evaluate_model_lists_unpredictable_cases_and_drops_stale_predictions(data, tmp_path):
    out = tmp_path / "run"
    assert cli(_train_args(data, out, "val_every=0")) == 0
    ev = tmp_path / "eval"
    base = ["evaluate", "--model", str(out / "last.pt"), "--data", str(data / "real.txt"), "--folds",
            str(data / "split.json"), "--overlap", "0", "--allow-empty-labels", "--out", str(ev)]
    split = json.loads((data / "split.json").read_text(encoding="utf-8"))
    split["folds"][0]["val"].append("r9")  # a case the data do not have
    (data / "split.json").write_text(json.dumps(split), encoding="utf-8")
    assert cli(base + ["--fold", "0"]) == 0
    skipped = {r["case_id"]: r["reason"] for r in csv.DictReader(open(ev / "skipped.csv", encoding="utf-8"))}
    assert set(skipped) == {"r3", "r9"}  # r3: its label is on another grid; it used to vanish without a trace
    assert "grid does not match" in skipped["r3"] and "has no case of that name" in skipped["r9"]
    assert [r["case_id"] for r in csv.DictReader(open(ev / "cases.csv", encoding="utf-8"))] == ["r2", "r4"]
    # the same --out for fold 1: fold 0's predictions are not scored again
    assert cli(base + ["--fold", "1"]) == 0
    cases = list(csv.DictReader(open(ev / "cases.csv", encoding="utf-8")))
    assert [(r["case_id"], r["fold"]) for r in cases] == [("r0", "1"), ("r1", "1")]
    assert sorted(p.name for p in (ev / "pred").iterdir()) == ["r0.nii.gz", "r1.nii.gz"]
    summary = (ev / "summary.md").read_text(encoding="utf-8")
    assert "NSD: normalised surface Dice at tolerance tau = 2 mm" in summary
    assert "kept only inside the reference organ (label 1 or tumour)" in summary


def test_user_error_finds_the_message_behind_monai_and_worker_wrapping():
    from backend.train.segmentation import user_error

    try:
        try:
            raise DiffTumorError("x.nii.gz: cannot read")
        except DiffTumorError as inner:
            raise RuntimeError("applying transform <LoadVolumed>") from inner
    except RuntimeError as exc:
        assert user_error(exc) == "x.nii.gz: cannot read"
    worker = DiffTumorError("Caught DiffTumorError in DataLoader worker process 0.\nOriginal Traceback (most recent "
                            "call last):\n  File ...\nbackend.errors.DiffTumorError: training case r1: x: cannot read\n")
    assert user_error(worker) == "training case r1: x: cannot read"
    assert user_error(ValueError("a bug")) is None


def test_resume_with_another_fold_or_training_set_is_refused(data, tmp_path, capsys):
    """A fold-0 run resumed with data.fold=1 used to go on silently: it then trained on fold 0's validation
    cases, validated on others and kept comparing best.pt across the two folds."""
    from backend.segmentation.networks import NetworkConfig, build_network
    from backend.train.common import config_to_dict, load_config, save_checkpoint
    from backend.train.segmentation import SegmentationConfig

    out = tmp_path / "run"
    args = _train_args(data, out, "max_steps=3")
    cfg = load_config(SegmentationConfig, TINY_CONFIG, [a for a in args[4:]])
    cfg.network = NetworkConfig(**{**cfg.network.__dict__, "roi_size": tuple(cfg.roi_size)})
    save_checkpoint(out / "last.pt", stage="segmentation", config=config_to_dict(cfg),
                    model_config=config_to_dict(cfg.network), organ=cfg.organ, step=1,
                    model=build_network(cfg.network).state_dict())
    before = (out / "last.pt").read_bytes()
    assert cli(args + ["data.fold=1", "--resume"]) == 2
    assert cli(args + ["data.use_real_for_training=false", "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith(f"difftumor: error: {out / 'last.pt'}: --resume needs") for line in err)
    assert "data.fold: checkpoint 0, config 1" in err[0]
    assert "data.use_real_for_training: checkpoint True, config False" in err[1]
    assert (out / "last.pt").read_bytes() == before and sorted(p.name for p in out.iterdir()) == ["last.pt"]
