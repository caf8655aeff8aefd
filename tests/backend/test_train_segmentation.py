"""`difftumor train segmentation` smoke run + resume, then `difftumor evaluate --model` on held-out cases.

Data: a tiny dataset built from the real TotalSegmentator CT (crops / mirrors; "real" tumours made
with the model-based engine), written to tmp_path. Tiny U-Net, 32³ crops, 2 + 1 steps on CPU.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
import yaml

import backend.cli
import backend.cli.train
from backend.errors import DiffTumorError

TINY_CONFIG = Path(__file__).resolve().parents[2] / "backend" / "configs" / "segmentation_tiny_cpu.yaml"


def cli(argv, modules=("backend.cli.train", "backend.cli.evaluate")):
    """`difftumor` with only the train group (segmentation stage) and evaluate registered."""
    saved = backend.cli.COMMAND_MODULES, backend.cli.train.STAGE_MODULES
    backend.cli.COMMAND_MODULES = list(modules)
    backend.cli.train.STAGE_MODULES = ["backend.train.segmentation"]
    try:
        return backend.cli.main(argv)
    finally:
        backend.cli.COMMAND_MODULES, backend.cli.train.STAGE_MODULES = saved


@pytest.fixture(scope="module")
def toy(tmp_path_factory, totalseg_ct, totalseg_seg):
    from backend.segmentation.toydata import make_toy_dataset

    out = tmp_path_factory.mktemp("toy")
    return make_toy_dataset(totalseg_ct, totalseg_seg, out, n_healthy=2, n_tumor=2, seed=0, box_mm=90.0)


@pytest.mark.slow
def test_train_resume_and_evaluate_end_to_end(toy, tmp_path):
    run = tmp_path / "run"
    common = ["--config", str(TINY_CONFIG), f"data.real={toy['real']}",
              f"data.healthy={toy['healthy']}", f"out_dir={run}", "roi_size=[32,32,32]", "max_steps=2",
              "val_every=2", "val_overlap=0.25", "synthesis.prob=1.0", "data.cache_rate=0"]
    assert cli(["train", "segmentation", *common]) == 0
    for name in ("config.yaml", "splits.json", "last.pt", "best.pt", "metrics.csv", "val_metrics.csv"):
        assert (run / name).is_file(), name
    splits = json.loads((run / "splits.json").read_text(encoding="utf-8"))
    assert splits["k"] == 2 and len(splits["folds"][0]["val"]) == 1
    assert set(splits["healthy"]) <= set(splits["folds"][0]["train"])  # healthy CTs always train
    rows = list(csv.DictReader(open(run / "metrics.csv", encoding="utf-8")))
    assert [r["step"] for r in rows] == ["2"] and float(rows[0]["synthetic_fraction"]) > 0
    assert yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))["network"]["tiny"] is True

    # resume: continues at step 2 up to 3, appending to the same CSV and reusing the split
    assert cli(["train", "segmentation", *common, "max_steps=3", "log_every=1", "--resume"]) == 0
    rows = list(csv.DictReader(open(run / "metrics.csv", encoding="utf-8")))
    assert [r["step"] for r in rows] == ["2", "3"]
    # evaluate the checkpoint on fold 0's held-out "real" case: predictions on the CT grid, then scores
    out = tmp_path / "eval"
    assert cli(["evaluate", "--model", str(run / "last.pt"), "--data", toy["real"], "--folds",
                str(run / "splits.json"), "--fold", "0", "--overlap", "0.25", "--out", str(out)]) == 0
    cases = list(csv.DictReader(open(out / "cases.csv", encoding="utf-8")))
    assert [c["case_id"] for c in cases] == splits["folds"][0]["val"]
    assert cases[0]["fold"] == "0" and cases[0]["organ"] == "liver" and int(cases[0]["tumors"]) >= 1
    assert 0.0 <= float(cases[0]["dsc"]) <= 1.0 and 0.0 <= float(cases[0]["nsd"]) <= 1.0
    assert (out / "summary.png").is_file() and (out / "summary.md").read_text(encoding="utf-8").count("| liver |") == 2
    assert list(csv.DictReader(open(out / "skipped.csv", encoding="utf-8"))) == []


@pytest.mark.slow
def test_resume_after_a_crash_continues_the_same_data_stream(toy, tmp_path, monkeypatch):
    """A run that crashes after step 3 (last save: step 2) and is resumed ends with the same weights as an
    uninterrupted run: the crops, augmentations and synthetic tumours of steps 3-4 are the same draws."""
    from backend.train import loop as train_loop

    def args(out):
        return ["--config", str(TINY_CONFIG), f"data.real={toy['real']}", f"data.healthy={toy['healthy']}",
                f"out_dir={out}", "roi_size=[32,32,32]", "max_steps=4", "val_every=0", "save_every=1",
                "log_every=1", "synthesis.prob=1.0", "data.cache_rate=0"]

    assert cli(["train", "segmentation", *args(tmp_path / "straight")]) == 0
    write = train_loop.MetricsWriter.write

    def crash_at_step_3(self, step, metrics):
        if step == 3:
            raise RuntimeError("simulated crash")
        return write(self, step, metrics)

    monkeypatch.setattr(train_loop.MetricsWriter, "write", crash_at_step_3)
    with pytest.raises(RuntimeError, match="simulated crash"):
        cli(["train", "segmentation", *args(tmp_path / "crashed")])
    monkeypatch.setattr(train_loop.MetricsWriter, "write", write)
    assert torch.load(tmp_path / "crashed" / "last.pt", map_location="cpu", weights_only=False)["step"] == 2
    assert cli(["train", "segmentation", *args(tmp_path / "crashed"), "--resume"]) == 0
    a, b = (torch.load(tmp_path / r / "last.pt", map_location="cpu", weights_only=False)
            for r in ("crashed", "straight"))
    assert a["step"] == b["step"] == 4 and a["draws"] == b["draws"] == 8
    for k, v in a["model"].items():
        assert torch.allclose(v, b["model"][k], rtol=0, atol=1e-6), k


@pytest.mark.slow
def test_resume_with_a_larger_max_steps_follows_the_new_lr_schedule(toy, tmp_path):
    """`max_steps=6 --resume` after a 4-step run: the LR at every step is the one a fresh 6-step run has
    (the restored scheduler used to keep t_total=4, so the LR was 0 at step 4 and then climbed again)."""
    from monai.optimizers import WarmupCosineSchedule

    args = ["--config", str(TINY_CONFIG), f"data.real={toy['real']}", f"data.healthy={toy['healthy']}",
            f"out_dir={tmp_path}", "roi_size=[32,32,32]", "val_every=0", "log_every=1", "data.cache_rate=0"]
    assert cli(["train", "segmentation", *args, "max_steps=4"]) == 0
    assert cli(["train", "segmentation", *args, "max_steps=6", "--resume"]) == 0
    logged = [float(r["lr"]) for r in csv.DictReader(open(tmp_path / "metrics.csv", encoding="utf-8"))]
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=2e-3)  # the tiny config's lr / warm-up
    fresh = WarmupCosineSchedule(opt, warmup_steps=2, t_total=6)
    expected = []
    for _ in range(6):
        opt.step()
        fresh.step()
        expected.append(fresh.get_last_lr()[0])
    assert logged[4:] == expected[4:]
    assert logged[5] == 0.0 and logged[4] > 0.0
    assert torch.load(tmp_path / "last.pt", map_location="cpu", weights_only=False)["scheduler"]["t_total"] == 6


@pytest.mark.slow
def test_presynthesized_cases_from_difftumor_synthesize_train_but_never_validate(toy, tmp_path, caplog):
    """`difftumor synthesize` output folders are a training source (synthesis off the training step)."""
    import logging

    healthy = Path(toy["healthy"]).parent
    image, label = Path(toy["healthy"]).read_text(encoding="utf-8").splitlines()[0].split(",")
    syn = tmp_path / "syn"
    assert cli(["synthesize", "--ct", str(healthy / image), "--organs", str(healthy / label), "--organ", "liver",
                "--organ-label", "1", "--size", "small", "--method", "model-based", "--seed", "1",
                "--out", str(syn / "healthy_000_s0")], modules=("backend.cli.synthesize",)) == 0
    run = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="backend.train.segmentation"):
        assert cli(["train", "segmentation", "--config", str(TINY_CONFIG), f"data.real={toy['real']}",
                    f"data.presynthesized={syn}", "synthesis.enabled=false", f"out_dir={run}",
                    "roi_size=[32,32,32]", "max_steps=2", "val_every=0"]) == 0
    assert "training on 2 cases (0 healthy), validating on 1" in caplog.text  # 1 real + 1 presynthesized
    splits = json.loads((run / "splits.json").read_text(encoding="utf-8"))
    assert not any(n.startswith("presynthesized/") for f in splits["folds"] for n in f["train"] + f["val"])


def test_bad_training_config_is_one_line(tmp_path, capsys):
    assert cli(["train", "segmentation", f"out_dir={tmp_path}"]) == 2  # no data
    assert cli(["train", "segmentation", f"out_dir={tmp_path}", "network.name=resnet"]) == 2
    assert cli(["train", "segmentation", f"out_dir={tmp_path}", "nonsense=1"]) == 2
    assert cli(["train", "segmentation", f"out_dir={tmp_path}", "--resume"]) == 2  # nothing to resume
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 4 and all(line.startswith("difftumor: error: ") for line in err)


def test_kfold_splits_are_seeded_and_disjoint():
    from backend.segmentation.splits import fold_cases, make_kfold

    real = [f"r{i}" for i in range(11)]
    a = make_kfold(real, ["h0", "h1"], k=5, seed=3, organ="liver")
    b = make_kfold(real, ["h0", "h1"], k=5, seed=3, organ="liver")
    assert a == b and a != make_kfold(real, ["h0", "h1"], k=5, seed=4)
    vals = [set(fold_cases(a, i)[1]) for i in range(5)]
    assert set().union(*vals) == set(real) and sum(len(v) for v in vals) == 11
    train, val = fold_cases(a, 2)
    assert not set(train) & set(val) and {"h0", "h1"} <= set(train)
    with pytest.raises(DiffTumorError, match="unique"):
        make_kfold(["x"], ["x"])
    with pytest.raises(DiffTumorError, match="no fold 7"):
        fold_cases(a, 7)


def test_build_items_reads_atlas_trees_and_list_files(tmp_path):
    import numpy as np

    from backend.io import Geometry, write_image
    from backend.train.config import load_config
    from backend.train.segmentation import SegmentationConfig, build_items

    g = Geometry((8, 8, 8), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    for i in range(2):  # AbdomenAtlas tree of healthy cases
        case = tmp_path / "atlas" / f"BDMAP_{i:08d}"
        (case / "segmentations").mkdir(parents=True)
        write_image(np.zeros((8, 8, 8), np.int16), case / "ct.nii.gz", g)
        write_image(np.ones((8, 8, 8), np.uint8), case / "segmentations" / "liver.nii.gz", g)
    lines = []
    for i in range(3):  # real-tumour cases in a list file
        write_image(np.zeros((8, 8, 8), np.int16), tmp_path / f"r{i}.nii.gz", g)
        write_image(np.full((8, 8, 8), 2, np.uint8), tmp_path / f"r{i}_seg.nii.gz", g)
        lines.append(f"r{i}.nii.gz,r{i}_seg.nii.gz")
    (tmp_path / "real.txt").write_text("\n".join(lines))
    cfg = load_config(SegmentationConfig, None, [f"data.real={tmp_path / 'real.txt'}",
                                                 f"data.healthy={tmp_path / 'atlas'}", "data.folds=3",
                                                 "data.healthy_organ_values=[5]"])
    train, val, splits = build_items(cfg, tmp_path / "run")
    assert len(train) == 4 and len(val) == 1 and (tmp_path / "run" / "splits.json").is_file()
    atlas = [t for t in train if t["healthy"]]
    assert len(atlas) == 2
    assert all(t["label"].endswith("liver.nii.gz") and t["label_values"] == ((1,), ()) for t in atlas)
    real = [t for t in train if not t["healthy"]]
    assert all(t["label_values"] == ((1,), (2,)) for t in real)
    cfg.data.use_real_for_training = False  # synthetic only
    train, val, _ = build_items(cfg, tmp_path / "run")
    assert all(t["healthy"] for t in train) and len(val) == 1
    # `difftumor synthesize --n K` output (<case>_s<k>/ct.nii.gz + label.nii.gz): train-only, never re-synthesized
    for k in range(2):
        case = tmp_path / "syn" / f"BDMAP_00000000_s{k}"
        case.mkdir(parents=True)
        write_image(np.zeros((8, 8, 8), np.int16), case / "ct.nii.gz", g)
        write_image(np.full((8, 8, 8), 2, np.uint8), case / "label.nii.gz", g)
    cfg.data.presynthesized = str(tmp_path / "syn")
    train, val, _ = build_items(cfg, tmp_path / "run")
    syn = [t for t in train if t["name"].startswith("presynthesized/")]
    assert len(syn) == 2 and len(train) == 4 and len(val) == 1
    assert all(t["label"].endswith("label.nii.gz") and t["healthy"] == 0 and t["label_values"] == ((1,), (2,))
               for t in syn)
