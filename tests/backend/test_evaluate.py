"""`difftumor evaluate --pred/--label`: pairing, bad input, tables, CSV, figure, JSON."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

import backend.cli
from backend.errors import DiffTumorError
from backend.io import Geometry, write_image
from backend.segmentation.evaluate import EvaluationConfig, label_values, score_case

SPACING = (1.0, 1.0, 2.0)  # (x, y, z)


def main(argv):
    """`difftumor` with only this subcommand registered (independent of the other subcommands)."""
    saved = backend.cli.COMMAND_MODULES
    backend.cli.COMMAND_MODULES = ["backend.cli.evaluate"]
    try:
        return backend.cli.main(argv)
    finally:
        backend.cli.COMMAND_MODULES = saved


def _geom(size=(24, 24, 16), spacing=SPACING) -> Geometry:
    return Geometry(size=size, spacing=spacing, origin=(0.0, 0.0, 0.0), direction=(1, 0, 0, 0, 1, 0, 0, 0, 1))


def _label() -> np.ndarray:
    lab = np.zeros((16, 24, 24), np.uint8)  # (z, y, x)
    lab[2:14, 2:22, 2:22] = 1  # organ
    lab[4:8, 5:12, 5:12] = 2  # tumour A
    lab[9:12, 14:20, 14:20] = 2  # tumour B
    return lab


def _read_csv(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_score_case_restricts_to_organ_and_counts():
    lab = _label()
    pred = lab.copy()
    pred[9:12, 14:20, 14:20] = 1  # miss tumour B
    pred[0, 0, 0:3] = 2  # outside the organ: removed by the restriction
    cfg = EvaluationConfig(organ_label=1)
    row = score_case(pred, lab, (2.0, 1.0, 1.0), cfg)
    assert (row["tumors"], row["detected"], row["false_positives"]) == (2, 1, 0)
    n_a, n_b = 4 * 7 * 7, 3 * 6 * 6
    assert row["dsc"] == pytest.approx(2 * n_a / (2 * n_a + n_b))
    assert row["sensitivity"] == 0.5
    n_organ = int((lab > 0).sum())  # the 3 stray tumour voxels count as organ prediction
    assert row["organ_dsc"] == pytest.approx(2 * n_organ / (2 * n_organ + 3))
    # without an organ label the voxels outside the organ count as a false positive
    row = score_case(pred, lab, (2.0, 1.0, 1.0), EvaluationConfig())
    assert row["false_positives"] == 1


def test_evaluate_cli_writes_tables_and_skips_bad_cases(tmp_path):
    pred_dir, lab_dir, out = tmp_path / "pred", tmp_path / "lab", tmp_path / "out"
    pred_dir.mkdir(), lab_dir.mkdir()
    g = _geom()
    lab = _label()
    write_image(lab, lab_dir / "good.nii.gz", g)
    write_image(lab, pred_dir / "good.nii.gz", g)  # perfect
    partial = lab.copy()
    partial[partial == 2] = 1
    partial[4:8, 5:12, 5:12] = 2
    write_image(lab, lab_dir / "partial.nii.gz", g)
    write_image(partial, pred_dir / "partial.nii.gz", g)
    healthy = np.where(lab == 2, 1, lab).astype(np.uint8)
    write_image(healthy, lab_dir / "healthy.nii.gz", g)
    write_image(healthy, pred_dir / "healthy.nii.gz", g)  # both tumour-free -> DSC 1, NSD 1
    write_image(lab, lab_dir / "grid.nii.gz", g)
    write_image(lab, pred_dir / "grid.nii.gz", _geom(spacing=(1.0, 1.0, 2.5)))  # other grid
    write_image(np.zeros_like(lab), lab_dir / "empty.nii.gz", g)
    write_image(lab, pred_dir / "empty.nii.gz", g)
    write_image(lab, lab_dir / "nopred.nii.gz", g)
    folds = tmp_path / "folds.csv"
    folds.write_text("case_id,fold,organ\ngood,0,liver\npartial,1,liver\nhealthy,1,liver\nghost,0,liver\n", encoding="utf-8")
    before = (lab_dir / "good.nii.gz").read_bytes()

    code = main(["evaluate", "--pred", str(pred_dir), "--label", str(lab_dir), "--organ-label", "1",
                 "--folds", str(folds), "--out", str(out)])
    assert code == 0
    assert (lab_dir / "good.nii.gz").read_bytes() == before  # inputs untouched

    rows = {r["case_id"]: r for r in _read_csv(out / "cases.csv")}
    assert set(rows) == {"good", "partial", "healthy"}
    for col in ("case_id", "dsc", "nsd", "tumors", "detected", "false_positives", "tumors_lt20mm", "detected_gt50mm"):
        assert col in rows["good"]
    assert float(rows["good"]["dsc"]) == 1.0 and float(rows["good"]["nsd"]) == 1.0
    assert (rows["partial"]["tumors"], rows["partial"]["detected"]) == ("2", "1")
    assert 0.0 < float(rows["partial"]["dsc"]) < 1.0
    assert float(rows["healthy"]["dsc"]) == 1.0 and rows["healthy"]["tumors"] == "0"
    assert rows["partial"]["fold"] == "1" and rows["good"]["organ"] == "liver"

    skipped = {r["case_id"]: r["reason"] for r in _read_csv(out / "skipped.csv")}
    assert set(skipped) == {"grid", "empty", "nopred", "ghost"}
    assert "grid does not match" in skipped["grid"]
    assert "label is empty" in skipped["empty"]
    assert "no prediction file" in skipped["nopred"]
    assert "fold file" in skipped["ghost"]

    summary = _read_csv(out / "summary.csv")
    assert [(s["organ"], s["fold"]) for s in summary] == [("liver", "0"), ("liver", "1"), ("liver", "all")]
    overall = summary[-1]
    assert int(overall["cases"]) == 3 and float(overall["sensitivity"]) == pytest.approx(3 / 4)
    md = (out / "summary.md").read_text(encoding="utf-8")
    assert "| liver | all | 3 |" in md and "4 case(s) skipped" in md
    meta = json.loads((out / "evaluation.json").read_text(encoding="utf-8"))
    assert "surface" in meta["definitions"]["nsd"] and meta["settings"]["tolerance_mm"] == 2.0
    assert (out / "summary.png").read_bytes()[:4] == b"\x89PNG"


def test_evaluate_single_files_and_errors(tmp_path, capsys):
    g = _geom()
    write_image(_label(), tmp_path / "a_label.nii.gz", g)
    write_image(_label(), tmp_path / "a_pred.nii.gz", g)
    out = tmp_path / "out"
    assert main(["evaluate", "--pred", str(tmp_path / "a_pred.nii.gz"), "--label", str(tmp_path / "a_label.nii.gz"),
                 "--tolerance-mm", "1", "--out", str(out)]) == 0
    (row,) = _read_csv(out / "cases.csv")
    assert row["case_id"] == "a_label" and float(row["dsc"]) == 1.0
    # missing inputs and bad values: one line, exit code 2
    assert main(["evaluate", "--pred", str(tmp_path / "nope"), "--label", str(tmp_path), "--out", str(out)]) == 2
    assert main(["evaluate", "--label", str(tmp_path), "--out", str(out)]) == 2
    assert main(["evaluate", "--pred", str(tmp_path / "a_pred.nii.gz"), "--label", str(tmp_path / "a_label.nii.gz"),
                 "--tolerance-mm", "-1", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("difftumor: error: ") for line in err)
    with pytest.raises(DiffTumorError, match="equals --tumor-label"):
        EvaluationConfig(organ_label=2)


@pytest.mark.parametrize(
    "array, reason",
    [
        (np.array([0.0, 0.25, 1.0]), "non-integer values"),  # probability map
        (np.array([-1024, 40, 300], np.int16), "negative values"),  # CT in HU
        (np.array([0.0, np.nan]), "non-finite values"),
        (np.array([0, 70000], np.uint32), "values up to 70000"),
        (np.arange(300, dtype=np.uint16), "300 distinct values"),  # CT stored with an offset
    ],
)
def test_label_values_refuses_non_label_maps(array, reason):
    with pytest.raises(DiffTumorError, match=f"^p.nii.gz: not a label map: {reason}"):
        label_values(array, "p.nii.gz")


def test_label_values_accepts_integer_floats_and_bools():
    assert label_values(np.array([0.0, 2.0, 2.0, 1.0], np.float32), "x").tolist() == [0, 1, 2]
    assert label_values(np.array([False, True]), "x").tolist() == [0, 1]


def test_evaluate_refuses_tumor_or_organ_value_absent_from_every_label(tmp_path, capsys):
    pred_dir, lab_dir, out = tmp_path / "pred", tmp_path / "lab", tmp_path / "out"
    pred_dir.mkdir(), lab_dir.mkdir()
    for name in ("a", "b"):
        write_image(_label(), lab_dir / f"{name}.nii.gz", _geom())
        write_image(_label(), pred_dir / f"{name}.nii.gz", _geom())
    base = ["evaluate", "--pred", str(pred_dir), "--label", str(lab_dir), "--out", str(out)]
    assert main(base + ["--tumor-label", "9"]) == 2  # was scored as DSC 100 (empty vs empty everywhere)
    assert main(base + ["--organ-label", "7"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "difftumor: error: --tumor-label 9: occurs in none of the 2 label file(s) (their values: 0, 1, 2); "
        "pass --allow-empty-labels if every case is tumour-free",
        "difftumor: error: --organ-label 7: occurs in none of the 2 label file(s) (their values: 0, 1, 2)",
    ]
    assert not out.exists()
    # an all tumour-free set is accepted when asked for
    for name in ("a", "b"):
        write_image(np.where(_label() == 2, 1, _label()).astype(np.uint8), lab_dir / f"{name}.nii.gz", _geom())
    assert main(base + ["--organ-label", "1"]) == 2
    assert main(base + ["--organ-label", "1", "--allow-empty-labels"]) == 0
    assert [r["tumors"] for r in _read_csv(out / "cases.csv")] == ["0", "0"]


def test_evaluate_skips_predictions_that_are_not_label_maps(tmp_path):
    pred_dir, lab_dir, out = tmp_path / "pred", tmp_path / "lab", tmp_path / "out"
    pred_dir.mkdir(), lab_dir.mkdir()
    g, lab = _geom(), _label()
    for name in ("good", "prob", "ct"):
        write_image(lab, lab_dir / f"{name}.nii.gz", g)
    write_image(lab, pred_dir / "good.nii.gz", g)
    write_image((lab == 2).astype(np.float32) * 0.9 + 0.05, pred_dir / "prob.nii.gz", g)  # tumour probability
    ct = np.where(lab > 0, 2, -1000).astype(np.int16)  # a CT that happens to hold the tumour value
    write_image(ct, pred_dir / "ct.nii.gz", g)
    assert main(["evaluate", "--pred", str(pred_dir), "--label", str(lab_dir), "--out", str(out)]) == 0
    assert [r["case_id"] for r in _read_csv(out / "cases.csv")] == ["good"]
    skipped = {r["case_id"]: r["reason"] for r in _read_csv(out / "skipped.csv")}
    assert "not a label map: non-integer values" in skipped["prob"]
    assert "not a label map: negative values" in skipped["ct"]


def test_evaluate_writes_nothing_when_no_case_can_be_scored(tmp_path, capsys):
    pred_dir, lab_dir, out = tmp_path / "pred", tmp_path / "lab", tmp_path / "out"
    pred_dir.mkdir(), lab_dir.mkdir()
    for name in ("a", "b"):
        write_image(_label(), lab_dir / f"{name}.nii.gz", _geom())
        write_image(_label(), pred_dir / f"{name}.nii.gz", _geom(spacing=(1.0, 1.0, 2.5)))  # other grid
    assert main(["evaluate", "--pred", str(pred_dir), "--label", str(lab_dir), "--out", str(out)]) == 2
    assert not out.exists()
    out.mkdir()
    (out / "notes.txt").write_text("mine", encoding="utf-8")
    assert main(["evaluate", "--pred", str(pred_dir), "--label", str(lab_dir), "--out", str(out)]) == 2
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("difftumor: error: ")]
    assert len(err) == 2
    assert err[0].startswith(f"difftumor: error: {lab_dir}: no case could be scored; a: ")
    assert "grid does not match" in err[0] and "(and 1 more skipped case(s), logged above)" in err[0]


def test_evaluate_refuses_an_out_that_is_a_file_in_one_line(tmp_path, capsys):
    g = _geom()
    write_image(_label(), tmp_path / "a_label.nii.gz", g)
    write_image(_label(), tmp_path / "a_pred.nii.gz", g)
    out = tmp_path / "out.txt"
    out.write_text("mine", encoding="utf-8")
    assert main(["evaluate", "--pred", str(tmp_path / "a_pred.nii.gz"), "--label", str(tmp_path / "a_label.nii.gz"),
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"difftumor: error: --out {out}: is an existing file; give a folder"]
    assert out.read_text(encoding="utf-8") == "mine"
    # a folder below a file cannot be created either
    assert main(["evaluate", "--pred", str(tmp_path / "a_pred.nii.gz"), "--label", str(tmp_path / "a_label.nii.gz"),
                 "--out", str(out / "sub")]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("difftumor: error: --out ") and "is a file, not a folder" in line


def _tiny_checkpoint(path):
    from backend.segmentation.networks import NetworkConfig, build_network
    from backend.train.common import config_to_dict, save_checkpoint

    net_cfg = NetworkConfig(tiny=True, roi_size=(16, 16, 16))
    save_checkpoint(path, stage="segmentation", config={"organ": "liver", "data": {"organ_values": [1], "tumor_values": [2]}},
                    model_config=config_to_dict(net_cfg), organ="liver", model=build_network(net_cfg).state_dict())
    return path


def test_evaluate_model_writes_nothing_when_no_case_can_be_predicted(tmp_path, capsys):
    ckpt = _tiny_checkpoint(tmp_path / "best.pt")
    write_image(np.zeros((16, 24, 24), np.int16), tmp_path / "ct.nii.gz", _geom())
    write_image(_label(), tmp_path / "label.nii.gz", _geom(spacing=(1.0, 1.0, 2.5)))  # not on the CT's grid
    (tmp_path / "list.txt").write_text(f"{tmp_path / 'ct.nii.gz'},{tmp_path / 'label.nii.gz'}\n", encoding="utf-8")
    out = tmp_path / "eval"
    assert main(["evaluate", "--model", str(ckpt), "--data", str(tmp_path / "list.txt"), "--out", str(out)]) == 2
    (line,) = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("difftumor: error: ")]
    assert "no case could be predicted" in line and "grid does not match" in line
    assert not out.exists()
    out.mkdir()  # an existing --out keeps what it held, and gets no empty pred/ and labels/ folders
    (out / "notes.txt").write_text("mine", encoding="utf-8")
    assert main(["evaluate", "--model", str(ckpt), "--data", str(tmp_path / "list.txt"), "--out", str(out)]) == 2
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_evaluate_pred_with_fold_scores_that_fold_only_and_refuses_an_unknown_fold(tmp_path, capsys):
    pred_dir, lab_dir, out = tmp_path / "pred", tmp_path / "lab", tmp_path / "out"
    pred_dir.mkdir(), lab_dir.mkdir()
    for name in ("a", "b", "c"):
        write_image(_label(), lab_dir / f"{name}.nii.gz", _geom())
        write_image(_label() if name != "c" else np.minimum(_label(), 1), pred_dir / f"{name}.nii.gz", _geom())
    folds = tmp_path / "folds.csv"
    folds.write_text("case_id,fold\na,0\nb,1\nc,1\nghost,1\n", encoding="utf-8")
    base = ["evaluate", "--pred", str(pred_dir), "--label", str(lab_dir), "--folds", str(folds)]
    assert main([*base, "--fold", "1", "--out", str(out)]) == 0
    assert [r["case_id"] for r in _read_csv(out / "cases.csv")] == ["b", "c"]  # a is in fold 0
    assert [r["case_id"] for r in _read_csv(out / "skipped.csv")] == ["ghost"]
    summary = _read_csv(out / "summary.csv")
    assert [(s["fold"], s["cases"]) for s in summary] == [("1", "2"), ("all", "2")]
    capsys.readouterr()
    # a fold the file lacks, or --fold without --folds: one line, nothing written
    assert main([*base, "--fold", "7", "--out", str(tmp_path / "o2")]) == 2
    assert main(["evaluate", "--pred", str(pred_dir), "--label", str(lab_dir), "--fold", "1",
                 "--out", str(tmp_path / "o3")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"difftumor: error: {folds}: no fold 7 (folds: 0, 1)",
                   "difftumor: error: --fold 1: needs --folds (the run's splits.json or a case_id,fold CSV)"]
    assert not (tmp_path / "o2").exists() and not (tmp_path / "o3").exists()


def test_evaluate_model_refuses_a_sw_batch_size_below_one(tmp_path, capsys):
    """--sw-batch-size 0 used to end in a 'range() arg 3 must not be zero' traceback after pred/ and labels/
    were created."""
    ckpt = _tiny_checkpoint(tmp_path / "best.pt")
    write_image(np.zeros((16, 24, 24), np.int16), tmp_path / "ct.nii.gz", _geom())
    write_image(_label(), tmp_path / "label.nii.gz", _geom())
    (tmp_path / "list.txt").write_text(f"{tmp_path / 'ct.nii.gz'},{tmp_path / 'label.nii.gz'}\n", encoding="utf-8")
    out = tmp_path / "eval"
    assert main(["evaluate", "--model", str(ckpt), "--data", str(tmp_path / "list.txt"), "--sw-batch-size", "0",
                 "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "difftumor: error: --sw-batch-size: must be a positive integer, got 0"]
    assert not out.exists()


def test_evaluate_model_takes_a_fold_csv_with_fold(tmp_path, capsys):
    """--folds documents 'split JSON from training or CSV case_id,fold'; with --model --fold a CSV used to be
    refused as 'not a split file'."""
    ckpt = _tiny_checkpoint(tmp_path / "best.pt")
    lines = []
    for name in ("a", "b"):
        write_image(np.zeros((16, 24, 24), np.int16), tmp_path / f"{name}.nii.gz", _geom())
        write_image(_label(), tmp_path / f"{name}_label.nii.gz", _geom())
        lines.append(f"{tmp_path / f'{name}.nii.gz'},{tmp_path / f'{name}_label.nii.gz'}")
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    folds = tmp_path / "folds.csv"
    folds.write_text("case_id,fold\na,0\nb,1\nghost,1\n", encoding="utf-8")
    out = tmp_path / "eval"
    base = ["evaluate", "--model", str(ckpt), "--data", str(tmp_path / "list.txt"), "--folds", str(folds)]
    assert main([*base, "--fold", "1", "--overlap", "0", "--out", str(out)]) == 0
    assert [r["case_id"] for r in _read_csv(out / "cases.csv")] == ["b"]
    assert [r["case_id"] for r in _read_csv(out / "skipped.csv")] == ["ghost"]
    assert sorted(p.name for p in (out / "pred").iterdir()) == ["b.nii.gz"]
    capsys.readouterr()
    assert main([*base, "--fold", "4", "--out", str(tmp_path / "o2")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"difftumor: error: {folds}: no fold 4 (folds: 0, 1)"]
    assert not (tmp_path / "o2").exists()


# ------------------------------------------------------------------- output folder ownership
def _model_case(tmp_path, names=("a",)):
    ckpt = _tiny_checkpoint(tmp_path / "best.pt")
    lines = []
    for name in names:
        write_image(np.zeros((16, 24, 24), np.int16), tmp_path / f"{name}.nii.gz", _geom())
        write_image(_label(), tmp_path / f"{name}_label.nii.gz", _geom())
        lines.append(f"{tmp_path / f'{name}.nii.gz'},{tmp_path / f'{name}_label.nii.gz'}")
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return ["evaluate", "--model", str(ckpt), "--data", str(tmp_path / "list.txt"), "--overlap", "0"]


def _tree(folder):
    import hashlib

    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("where", ["labels/mine.nii.gz", "pred/notes.txt", "cases.csv", "pred/a.nii.gz"])
def test_evaluate_model_never_deletes_or_replaces_a_file_it_did_not_write(tmp_path, capsys, where):
    """Defect 1 of issue 14: a user's file in --out/labels was removed as 'stale'. Now any file in the way that the
    folder's manifest does not list (unchanged) is a one-line refusal, and nothing is written."""
    base = _model_case(tmp_path)
    out = tmp_path / "eval"
    (out / where).parent.mkdir(parents=True)
    (out / where).write_bytes(b"the user's own file")
    before = _tree(out)
    assert main([*base, "--out", str(out)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"difftumor: error: {out / where}: ") and "not written by" in line
    assert _tree(out) == before


def test_evaluate_model_replaces_and_removes_only_its_own_files(tmp_path, capsys):
    base = _model_case(tmp_path, names=("a", "b"))
    out = tmp_path / "eval"
    assert main([*base, "--out", str(out)]) == 0
    manifest = json.loads((out / ".difftumor-evaluate.json").read_text(encoding="utf-8"))
    assert {"pred/a.nii.gz", "labels/b.nii.gz", "cases.csv", "evaluation.json"} <= set(manifest["files"])
    # a second run on case a alone: b's files of the first run are removed, a's replaced, all listed
    (tmp_path / "list.txt").write_text((tmp_path / "list.txt").read_text(encoding="utf-8").splitlines()[0] + "\n",
                                       encoding="utf-8")
    assert main([*base, "--out", str(out)]) == 0
    assert sorted(p.name for p in (out / "pred").iterdir()) == ["a.nii.gz"]
    assert sorted(p.name for p in (out / "labels").iterdir()) == ["a.nii.gz"]
    # a file of ours the user changed is theirs now: refused, kept
    (out / "pred" / "a.nii.gz").write_bytes(b"edited")
    capsys.readouterr()
    assert main([*base, "--out", str(out)]) == 2
    assert "not written by" in capsys.readouterr().err
    assert (out / "pred" / "a.nii.gz").read_bytes() == b"edited"


def test_evaluate_refuses_report_files_it_did_not_write(tmp_path, capsys):
    pred_dir, lab_dir, out = tmp_path / "pred", tmp_path / "lab", tmp_path / "out"
    pred_dir.mkdir(), lab_dir.mkdir(), out.mkdir()
    write_image(_label(), lab_dir / "a.nii.gz", _geom())
    write_image(_label(), pred_dir / "a.nii.gz", _geom())
    (out / "summary.md").write_text("my notes", encoding="utf-8")
    argv = ["evaluate", "--pred", str(pred_dir), "--label", str(lab_dir), "--out", str(out)]
    assert main(argv) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"difftumor: error: {out / 'summary.md'}: not written by difftumor evaluate (not in {out / '.difftumor-evaluate.json'}"
        ", or changed since); move it away or choose another --out"]
    assert [p.name for p in out.iterdir()] == ["summary.md"]
    (out / "summary.md").unlink()
    assert main(argv) == 0
    assert main(argv) == 0  # its own files are replaced on a second run


def test_evaluate_prints_false_positives_next_to_sensitivity_and_names_the_rule(tmp_path, capsys):
    """Defect 8: a near-random prediction no longer scores a high sensitivity by default."""
    pred_dir, lab_dir = tmp_path / "pred", tmp_path / "lab"
    pred_dir.mkdir(), lab_dir.mkdir()
    lab = _label()
    noise = (np.random.default_rng(1).random(lab.shape) < 0.01) & (lab > 0)
    write_image(lab, lab_dir / "a.nii.gz", _geom())
    write_image(np.where(noise, 2, np.minimum(lab, 1)).astype(np.uint8), pred_dir / "a.nii.gz", _geom())
    base = ["evaluate", "--pred", str(pred_dir), "--label", str(lab_dir), "--organ-label", "1"]
    results = {}
    for rule in ("overlap", "any-voxel"):
        out = tmp_path / rule
        assert main([*base, "--detection", rule, "--out", str(out)]) == 0
        stdout = capsys.readouterr().out
        (line,) = [ln for ln in stdout.splitlines() if "false positives per case" in ln]
        summary = _read_csv(out / "summary.csv")[0]
        assert list(summary).index("fp_per_case") == list(summary).index("sensitivity") + 1
        assert summary["detection"] == rule
        assert f"detection: {rule}" in line and f"{float(summary['fp_per_case']):.2f} false positives" in line
        assert "| Sens. (%) | FP/case |" in (out / "summary.md").read_text(encoding="utf-8")
        meta = json.loads((out / "evaluation.json").read_text(encoding="utf-8"))
        assert meta["settings"]["detection"] == rule and meta["summary"][0]["fp_per_case"] > 5
        results[rule] = float(summary["sensitivity"])
    assert results == {"overlap": 0.0, "any-voxel": 1.0}
    assert main([*base, "--detection-min-dice", "0", "--out", str(tmp_path / "x")]) == 2
    assert "--detection-min-dice: must be in (0, 1], got 0.0" in capsys.readouterr().err


@pytest.mark.parametrize("where", ["pred", "lab", "lab/eval"])
def test_evaluate_refuses_an_out_inside_an_input_folder(tmp_path, capsys, where):
    """Defect 7: --out inside the prediction or label folder was accepted (its files mixed with the inputs)."""
    pred_dir, lab_dir = tmp_path / "pred", tmp_path / "lab"
    pred_dir.mkdir(), lab_dir.mkdir()
    write_image(_label(), lab_dir / "a.nii.gz", _geom())
    write_image(_label(), pred_dir / "a.nii.gz", _geom())
    before = _tree(tmp_path)
    out = tmp_path / where
    assert main(["evaluate", "--pred", str(pred_dir), "--label", str(lab_dir), "--out", str(out)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    folder = pred_dir if where == "pred" else lab_dir
    kind = "prediction" if where == "pred" else "label"
    assert line == (f"difftumor: error: --out {out}: {'is' if out == folder else 'is inside'} the {kind} folder "
                    f"{folder}; choose a folder outside the inputs")
    assert _tree(tmp_path) == before and not (tmp_path / "lab" / "eval").exists()


def test_evaluate_os_errors_are_one_line_naming_the_path(tmp_path, capsys):
    pred_dir, lab_dir = tmp_path / "pred", tmp_path / "lab"
    pred_dir.mkdir(), lab_dir.mkdir()
    write_image(_label(), lab_dir / "a.nii.gz", _geom())
    write_image(_label(), pred_dir / "a.nii.gz", _geom())
    long_out = tmp_path / ("o" * 300)
    assert main(["evaluate", "--pred", str(pred_dir), "--label", str(lab_dir), "--out", str(long_out)]) == 2
    assert capsys.readouterr().err.strip() == f"difftumor: error: {long_out}: the name is too long for the file system"
