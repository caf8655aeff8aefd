"""`difftumor synthesize` and `difftumor weights` end to end (model-based: no weights needed)."""

import json
import os

import numpy as np
import pytest

from backend.cli import main
from backend.cli import synthesize as synth_cli
from backend.io import Geometry, Volume, read_image, write_image


@pytest.fixture(autouse=True)
def _no_user_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "cfg"))
    monkeypatch.delenv("DIFFTUMOR_WEIGHTS", raising=False)


@pytest.fixture(autouse=True)
def _registered(monkeypatch):
    import backend.cli as cli

    for m in ("backend.cli.synthesize", "backend.cli.weights"):
        if m not in cli.COMMAND_MODULES:
            monkeypatch.setattr(cli, "COMMAND_MODULES", cli.COMMAND_MODULES + [m])


def _case(folder, name="case1", seed=0):
    rng = np.random.default_rng(seed)
    a = rng.normal(-1000, 10, (30, 64, 64))
    seg = np.zeros(a.shape, np.uint8)
    seg[5:25, 12:52, 12:52] = 5  # TotalSegmentator liver
    a[seg == 5] = rng.normal(60, 8, (seg == 5).sum())
    g = Geometry((64, 64, 30), (0.9, 0.9, 2.0), (1.0, 2.0, 3.0), (-1, 0, 0, 0, -1, 0, 0, 0, 1))
    folder.mkdir(parents=True, exist_ok=True)
    write_image(Volume(a.astype(np.int16), g), folder / f"{name}.nii.gz")
    (folder.parent / f"{folder.name}_seg").mkdir(exist_ok=True)
    write_image(Volume(seg, g), folder.parent / f"{folder.name}_seg" / f"{name}.nii.gz")
    return folder / f"{name}.nii.gz", folder.parent / f"{folder.name}_seg" / f"{name}.nii.gz"


def test_single_ct_random_and_ellipsoid(tmp_path):
    ct, seg = _case(tmp_path / "cts")
    out = tmp_path / "out"
    assert main(["synthesize", "--ct", str(ct), "--organs", str(seg), "--organ", "liver", "--size", "small",
                 "--count", "2", "--seed", "4", "--out", str(out)]) == 0
    prov = json.loads((out / "provenance.json").read_text(encoding="utf-8"))
    assert prov["method"] == "model-based" and prov["seed"] == 4
    src, res, lab = read_image(ct), read_image(out / "ct.nii.gz"), read_image(out / "label.nii.gz")
    assert res.geometry.matches(src.geometry) and res.array.dtype == np.int16
    assert set(np.unique(lab.array)) == {0, 1, 2}
    out2 = tmp_path / "out2"
    assert main(["synthesize", "--ct", str(ct), "--organs", str(seg), "--organ", "liver", "--center", "32,32,15",
                 "--voxel", "--radii", "6,5,5", "--rotation", "0,0,30", "--out", str(out2)]) == 0
    assert (read_image(out2 / "label.nii.gz").array == 2).sum() > 50


def test_errors_are_one_line_and_write_nothing(tmp_path, capsys):
    ct, seg = _case(tmp_path / "cts")
    out = tmp_path / "out"
    code = main(["synthesize", "--ct", str(ct), "--organs", str(seg), "--organ", "pancreas", "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "pancreas" in err
    assert not out.exists()
    code = main(["synthesize", "--ct", str(ct), "--organs", str(seg), "--organ", "liver", "--center", "0,0,500",
                 "--radii", "5,5,5", "--out", str(out)])
    assert code == 2 and "outside the image" in capsys.readouterr().err and not out.exists()


def test_weights_organ_option(tmp_path, capsys):
    ct, seg = _case(tmp_path / "cts")
    out = tmp_path / "out"
    code = main(["synthesize", "--ct", str(ct), "--organs", str(seg), "--organ", "liver", "--weights-organ", "brain",
                 "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "brain" in err and not out.exists()
    # an empty weights folder: auto falls back to model-based and names the other organ's missing file
    (tmp_path / "w").mkdir()
    assert main(["synthesize", "--ct", str(ct), "--organs", str(seg), "--organ", "liver", "--weights-organ",
                 "pancreas", "--weights", str(tmp_path / "w"), "--size", "tiny", "--count", "1",
                 "--out", str(out)]) == 0
    prov = json.loads((out / "provenance.json").read_text(encoding="utf-8"))
    assert prov["method"] == "model-based" and "pancreas" in prov["method_reason"] and prov["weights_organ"] is None


def test_dataset_mode_resumable_and_sharded(tmp_path):
    for i in range(3):
        _case(tmp_path / "cts", f"c{i}", seed=i)
    out = tmp_path / "aug"
    args = ["synthesize", "--ct", str(tmp_path / "cts"), "--organs", str(tmp_path / "cts_seg"), "--organ", "liver",
            "--size", "tiny", "--n", "2", "--out", str(out)]
    assert main(args + ["--shard", "1/2"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["c1_s0", "c1_s1", synth_cli.RUN_FILE]
    stamp = (out / "c1_s0" / "ct.nii.gz").stat().st_mtime_ns
    assert main(args) == 0
    assert len([p for p in out.iterdir() if p.is_dir()]) == 6
    assert (out / "c1_s0" / "ct.nii.gz").stat().st_mtime_ns == stamp  # finished outputs skipped


def test_shard_from_torchrun_env(monkeypatch):
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert synth_cli.parse_shard(None) == (2, 4)
    assert synth_cli.parse_shard("1/3") == (1, 3)


def test_weights_check_cli(tmp_path, capsys):
    (tmp_path / "liver_early.pt").write_bytes(b"junk")
    assert main(["weights", "check", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "MISSING  AutoencoderModel.ckpt" in out and "BROKEN" in out
    assert main(["weights", "check", str(tmp_path), "--no-load", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["files"]
    assert [r["name"] for r in rows if r["present"]] == ["liver_early.pt"]


@pytest.mark.slow
def test_keep_intermediates_writes_them_next_to_the_ct(tmp_path, parity_dir, totalseg_ct, totalseg_seg):
    import torch

    torch.set_num_threads(2)
    out = tmp_path / "out"
    assert main(["synthesize", "--ct", str(totalseg_ct), "--organs", str(totalseg_seg), "--organ", "liver",
                 "--size", "small", "--count", "1", "--method", "diffusion", "--weights", str(parity_dir),
                 "--device", "cpu", "--seed", "2", "--keep-intermediates", "--out", str(out)]) == 0
    ct = read_image(totalseg_ct)
    prov = json.loads((out / "provenance.json").read_text(encoding="utf-8"))
    assert set(prov["intermediates"]) == {"masked.nii.gz", "reconstruction.nii.gz", "decoded.nii.gz"}
    for name in prov["intermediates"]:
        v = read_image(out / name)
        assert v.geometry.matches(ct.geometry) and v.array.dtype == np.float32
    assert np.any(read_image(out / "decoded.nii.gz").array != ct.array)


def test_keep_intermediates_model_based_writes_none(tmp_path):
    ct, seg = _case(tmp_path / "cts")
    out = tmp_path / "out"
    assert main(["synthesize", "--ct", str(ct), "--organs", str(seg), "--organ", "liver", "--size", "small",
                 "--count", "1", "--keep-intermediates", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["ct.nii.gz", "label.nii.gz", "provenance.json"]
    assert json.loads((out / "provenance.json").read_text(encoding="utf-8"))["intermediates"] == {}


# --------------------------------------------------------------------------------------------
# command-line values, conflicts and one-line errors
# --------------------------------------------------------------------------------------------
def _run(tmp_path, *extra, out="out", ct=None, seg=None):
    if ct is None:
        ct, seg = _case(tmp_path / "cts")
    return main(["synthesize", "--ct", str(ct), "--organs", str(seg), "--organ", "liver", *extra,
                 "--out", str(tmp_path / out)])


def _prov(folder):
    return json.loads((folder / "provenance.json").read_text(encoding="utf-8"))


def test_join_negative_values_rewrites_only_number_lists_after_the_listed_options():
    from backend.cli import join_negative_values

    argv = ["synthesize", "--center", "-60.5,20.0,-310", "--radii", "6,5,4.5", "--rotation", "-30,0,0",
            "--seed", "-5", "--out", "-dir"]
    assert join_negative_values(argv) == ["synthesize", "--center=-60.5,20.0,-310", "--radii", "6,5,4.5",
                                          "--rotation=-30,0,0", "--seed", "-5", "--out", "-dir"]
    assert join_negative_values(["--center=-1,2,3", "--center", "--voxel"]) == ["--center=-1,2,3", "--center", "--voxel"]
    assert join_negative_values(["--", "--center", "-1,2,3"]) == ["--", "--center", "-1,2,3"]
    # an abbreviation argparse accepts is joined too (it used to end in "expected one argument")
    assert join_negative_values(["--cent", "-1,2,3", "--rot", "-30,0,0"]) == ["--cent=-1,2,3", "--rot=-30,0,0"]
    assert join_negative_values(["--c", "-1,2,3"]) == ["--c", "-1,2,3"]  # too short to mean --center


def test_negative_values_may_follow_center_radii_and_rotation(tmp_path, capsys):
    ct, seg = _case(tmp_path / "cts")
    # voxel (32, 32, 15) of the test grid is the world point (-27.8, -26.8, 33.0) mm (LPS)
    base = ["synthesize", "--ct", str(ct), "--organs", str(seg), "--organ", "liver", "--radii", "6,5,5", "--seed", "3"]
    assert main(base + ["--center", "-27.8,-26.8,33", "--rotation", "-30,0,0", "--out", str(tmp_path / "a")]) == 0
    assert main(base + ["--center=-27.8,-26.8,33", "--rotation=-30,0,0", "--out", str(tmp_path / "b")]) == 0
    assert main(base + ["--cent", "-27.8,-26.8,33", "--rot", "-30,0,0", "--out", str(tmp_path / "d")]) == 0
    a, b, d = (read_image(tmp_path / x / "label.nii.gz").array for x in "abd")
    assert (a == 2).sum() > 50 and np.array_equal(a, b) and np.array_equal(a, d)
    capsys.readouterr()
    assert main(base[:-4] + ["--center", "-27.8,-26.8,33", "--radii", "-6,5,5", "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "radii" in err[0] and "usage" not in err[0]  # a value error, not argparse's usage dump


@pytest.mark.parametrize("seed", ["-5", "1.5", "x", str(2**32)])
def test_seed_must_be_a_whole_number_from_zero(tmp_path, capsys, seed):
    ct, seg = _case(tmp_path / "cts")
    assert main(["synthesize", "--ct", str(ct), "--organs", str(seg), "--organ", "liver", "--size", "tiny",
                 "--seed", seed, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"difftumor: error: --seed {seed}: must be a whole number from 0 to 4294967295"]
    assert not (tmp_path / "out").exists()


def test_help_explains_seed_and_lps(capsys):
    with pytest.raises(SystemExit):
        main(["synthesize", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "default 0: identical runs give identical tumours" in text
    assert "LPS" in text and "3D Slicer shows RAS" in text


def test_ellipsoid_parameters_organ_label_and_absolute_inputs_in_provenance(tmp_path, monkeypatch):
    ct, seg = _case(tmp_path / "cts")
    monkeypatch.chdir(tmp_path)  # relative inputs are recorded as absolute paths
    assert main(["synthesize", "--ct", "cts/case1.nii.gz", "--organs", "cts_seg/case1.nii.gz", "--organ", "liver",
                 "--organ-label", "5", "--center", "-27.8,-26.8,33", "--radii", "6,5,5", "--rotation", "-30,0,0",
                 "--irregularity", "0.2", "--seed", "3", "--out", "out"]) == 0
    prov = _prov(tmp_path / "out")
    ell = prov["mask"]["ellipsoid"]
    assert prov["mask"]["source"] == "ellipsoid" and prov["organ_label"] == 5
    assert ell["centre_world_mm_lps"] == [-27.8, -26.8, 33.0] and ell["centre_voxel_xyz"] == [32.0, 32.0, 15.0]
    assert ell["radii_mm"] == [6.0, 5.0, 5.0] and ell["rotation_deg_xyz"] == [-30.0, 0.0, 0.0]
    assert ell["irregularity"] == 0.2 and ell["irregularity_seed"] == 3
    assert prov["inputs"] == {"ct": str(ct), "organs": str(seg), "tumor_mask": None}


def test_tumor_mask_file_is_recorded_as_a_mask_file(tmp_path):
    ct, seg = _case(tmp_path / "cts")
    vol = read_image(seg)
    m = np.zeros(vol.array.shape, np.uint8)
    m[14:17, 30:34, 30:34] = 1
    write_image(Volume(m, vol.geometry), tmp_path / "m.nii.gz")
    assert _run(tmp_path, "--tumor-mask", str(tmp_path / "m.nii.gz"), ct=ct, seg=seg) == 0
    mask = _prov(tmp_path / "out")["mask"]
    assert mask["source"] == "mask file" and mask["file"] == str(tmp_path / "m.nii.gz") and "ellipsoid" not in mask


@pytest.mark.parametrize("extra, text", [
    (["--radii", "-6,5,5", "--center", "32,32,15", "--voxel"], "--radii -6,5,5: the ellipsoid's semi-axes must be > 0"),
    (["--size", "large", "--count", "3", "--center", "32,32,15", "--voxel", "--radii", "6,5,5"], "--size with --center"),
    (["--count", "2", "--tumor-mask", "m.nii.gz"], "--count with --tumor-mask"),
    (["--n", "3"], "--n 3: only for dataset mode"),
    (["--shard", "1/4"], "--shard 1/4: only for dataset mode"),
    (["--rotation", "0,0,30"], "--rotation: only used for an ellipsoid"),
    (["--voxel"], "--voxel: only used for an ellipsoid"),
    (["--irregularity", "0.5"], "--irregularity: only used for an ellipsoid"),
])
def test_bad_or_conflicting_options_are_one_line_and_write_nothing(tmp_path, capsys, extra, text):
    (tmp_path / "m.nii.gz").write_bytes(b"")
    assert _run(tmp_path, *[str(tmp_path / e) if e == "m.nii.gz" else e for e in extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and text in err[0], err
    assert not (tmp_path / "out").exists()


def test_error_texts_name_the_option_and_plain_numbers(tmp_path, capsys):
    ct, seg = _case(tmp_path / "cts")
    assert _run(tmp_path, "--center", "0,0,500", "--radii", "5,5,5", ct=ct, seg=seg) == 2
    err = capsys.readouterr().err
    assert "--center 0,0,500: lies outside the image" in err and "64 x 64 x 30 voxels" in err and "np." not in err
    assert _run(tmp_path, "--size", "tiny", ct=ct, seg=tmp_path / "nope.nii.gz") == 2
    assert f"--organs {tmp_path / 'nope.nii.gz'}: no such file" in capsys.readouterr().err
    vol = read_image(seg)  # a label map with no organ at all: named as --organs, said in words
    write_image(Volume(np.zeros(vol.array.shape, np.uint8), vol.geometry), tmp_path / "zeros.nii.gz")
    assert _run(tmp_path, "--size", "tiny", ct=ct, seg=tmp_path / "zeros.nii.gz") == 2
    assert (f"--organs {tmp_path / 'zeros.nii.gz'}: the label map is empty (every voxel 0), so it holds no 'liver'"
            in capsys.readouterr().err)
    assert _run(tmp_path, "--center", "32,32,15", "--voxel", "--radii", "60,60,60", ct=ct, seg=seg) == 2
    err = capsys.readouterr().err
    assert "ellipsoid (--center 32,32,15 --radii 60,60,60): only" in err and "tumor mask" not in err
    (tmp_path / "empty").mkdir()
    assert _run(tmp_path, "--n", "1", ct=tmp_path / "empty", seg=tmp_path / "cts_seg") == 2
    err = capsys.readouterr().err
    assert f"--ct {tmp_path / 'empty'}: no CT files found" in err and ".nii.gz" in err and "DICOM series" not in err
    assert not (tmp_path / "out").exists()


def test_diffusion_only_options_warn_once_when_model_based_runs(tmp_path, caplog):
    import logging

    ct, seg = _case(tmp_path / "cts")
    with caplog.at_level(logging.INFO):
        assert _run(tmp_path, "--size", "tiny", "--count", "1", ct=ct, seg=seg) == 0
        assert not [r for r in caplog.records if r.levelno == logging.WARNING]
        assert _run(tmp_path, "--size", "tiny", "--count", "1", "--sigma", "4", "--stage", "early", "--ddim-steps", "7",
                    out="out2", ct=ct, seg=seg) == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and warnings[0].startswith("--sigma, --stage, --ddim-steps had no effect: the model-based")


def test_unused_options_after_diffusion_name_only_what_that_output_ignored():
    from backend.synthesis.request import SynthesisRequest
    from backend.synthesis.stage import Stage

    request = SynthesisRequest(organ="liver", sigma=2.0, ddim_steps=20, pancreas_blend=True)
    assert request.unused("diffusion", [Stage.EARLY]) == ["ddim_steps", "pancreas_blend"]
    pancreas = SynthesisRequest(organ="pancreas", sigma=2.0, ddim_steps=20, pancreas_blend=True)
    assert pancreas.unused("diffusion", [Stage.MID_LATE]) == []
    released = SynthesisRequest(organ="pancreas", sigma=2.0, ddim_steps=20)  # the crop is replaced: no blend blur
    assert released.unused("diffusion", ["mid_late"]) == ["sigma"]
    assert released.unused("model-based", []) == ["sigma", "ddim_steps"]


# --------------------------------------------------------------------------------------------
# output folders: existing files, read-only places, failures half-way
# --------------------------------------------------------------------------------------------
def test_out_that_is_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "afile").write_text("keep", encoding="utf-8")
    assert _run(tmp_path, "--size", "tiny", out="afile") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--out" in err[0] and "is an existing file" in err[0]
    assert (tmp_path / "afile").read_text(encoding="utf-8") == "keep"


@pytest.mark.parametrize("dataset", [False, True])
def test_read_only_out_is_one_line_and_writes_nothing(tmp_path, capsys, dataset):
    ct, seg = _case(tmp_path / "cts")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("chmod does not stop this user (root) from writing")
        extra = ["--n", "1"] if dataset else []
        code = main(["synthesize", "--ct", str(ct.parent if dataset else ct), "--organs", str(seg.parent if dataset else seg),
                     "--organ", "liver", "--size", "tiny", *extra, "--out", str(ro / "case")])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and f"--out {ro / 'case'}: cannot write here" in err[0], err
        assert not any(ro.iterdir())
    finally:
        ro.chmod(0o700)


def test_failed_write_is_one_line_and_removes_the_partial_output(tmp_path, capsys, monkeypatch):
    import backend.io

    real = backend.io.write_image

    def failing(data, path, *a, **k):
        if str(path).endswith("label.nii.gz"):
            raise PermissionError(13, "Permission denied", str(path))
        return real(data, path, *a, **k)

    monkeypatch.setattr(backend.io, "write_image", failing)
    assert _run(tmp_path, "--size", "tiny", out="new/case") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "label.nii.gz: permission denied" in err[0] and err[0].startswith("difftumor: error: --out")
    assert not (tmp_path / "new").exists()  # the written ct.nii.gz and the folders made for it are gone


def test_single_out_that_is_not_empty_needs_overwrite(tmp_path, capsys):
    ct, seg = _case(tmp_path / "cts")
    assert _run(tmp_path, "--size", "tiny", "--seed", "1", ct=ct, seg=seg) == 0
    before = (tmp_path / "out" / "ct.nii.gz").read_bytes()
    assert _run(tmp_path, "--size", "small", "--seed", "2", ct=ct, seg=seg) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "folder is not empty" in err[0] and "--overwrite" in err[0]
    assert (tmp_path / "out" / "ct.nii.gz").read_bytes() == before and _prov(tmp_path / "out")["seed"] == 1
    assert _run(tmp_path, "--size", "small", "--seed", "2", "--overwrite", ct=ct, seg=seg) == 0
    assert _prov(tmp_path / "out")["seed"] == 2
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "notes.txt").write_text("mine", encoding="utf-8")
    assert _run(tmp_path, "--size", "tiny", out="notes", ct=ct, seg=seg) == 2
    assert sorted(p.name for p in (tmp_path / "notes").iterdir()) == ["notes.txt"]


def test_overwrite_never_replaces_an_input(tmp_path, capsys):
    ct, seg = _case(tmp_path / "cts")
    assert _run(tmp_path, "--size", "tiny", ct=ct, seg=seg) == 0
    before = (tmp_path / "out" / "ct.nii.gz").read_bytes()
    code = main(["synthesize", "--ct", str(tmp_path / "out" / "ct.nii.gz"), "--organs", str(tmp_path / "out" / "label.nii.gz"),
                 "--organ", "liver", "--organ-label", "1", "--size", "tiny", "--overwrite", "--out", str(tmp_path / "out")])
    assert code == 2 and "is one of the files --out" in capsys.readouterr().err
    assert (tmp_path / "out" / "ct.nii.gz").read_bytes() == before


def _dataset(tmp_path, cases=2):
    for i in range(cases):
        _case(tmp_path / "cts", f"c{i}", seed=i)
    return ["synthesize", "--ct", str(tmp_path / "cts"), "--organs", str(tmp_path / "cts_seg"), "--organ", "liver",
            "--size", "tiny", "--n", "2", "--out", str(tmp_path / "aug")]


def test_dataset_refuses_to_resume_with_other_settings(tmp_path, capsys):
    args = _dataset(tmp_path)
    assert main(args) == 0
    settings = json.loads((tmp_path / "aug" / synth_cli.RUN_FILE).read_text(encoding="utf-8"))["settings"]
    assert settings["organ"] == "liver" and settings["n"] == 2 and settings["seed"] == 0
    before = (tmp_path / "aug" / "c0_s0" / "ct.nii.gz").read_bytes()
    capsys.readouterr()
    assert main(args + ["--seed", "99"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "made with --seed 0, but this run has --seed 99" in err[0] and "--overwrite" in err[0]
    assert (tmp_path / "aug" / "c0_s0" / "ct.nii.gz").read_bytes() == before
    assert main(args + ["--seed", "99", "--overwrite"]) == 0  # every output redone with the new settings
    assert all(_prov(tmp_path / "aug" / f"c{i}_s{k}")["seed"] == synth_cli.output_seed(99, f"c{i}", k)
               for i in range(2) for k in range(2))
    assert main(args + ["--seed", "99"]) == 0  # and the run file now holds them


def test_dataset_out_with_foreign_files_is_refused(tmp_path, capsys):
    args = _dataset(tmp_path, cases=1)
    (tmp_path / "aug").mkdir()
    (tmp_path / "aug" / "notes.txt").write_text("mine", encoding="utf-8")
    assert main(args) == 2
    assert f"holds no {synth_cli.RUN_FILE}" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "aug").iterdir()) == ["notes.txt"]


def test_dataset_labels_missing_or_not_a_folder_name_the_organs_option(tmp_path, capsys):
    args = _dataset(tmp_path)
    (tmp_path / "cts_seg" / "c1.nii.gz").unlink()
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"difftumor: error: --organs {tmp_path / 'cts_seg'}: no label file or case folder for c1.nii.gz"
    args[args.index("--organs") + 1] = str(tmp_path / "cts_seg" / "c0.nii.gz")
    assert main(args) == 2
    assert "--organs " in capsys.readouterr().err and not (tmp_path / "aug").exists()


def test_dataset_resume_redoes_outputs_missing_a_file_and_says_what_it_skipped(tmp_path, caplog):
    import logging

    args = _dataset(tmp_path)
    assert main(args) == 0
    (tmp_path / "aug" / "c1_s0" / "label.nii.gz").unlink()
    stamp = (tmp_path / "aug" / "c0_s0" / "ct.nii.gz").stat().st_mtime_ns
    with caplog.at_level(logging.INFO):
        assert main(args) == 0
    assert (tmp_path / "aug" / "c1_s0" / "label.nii.gz").is_file()
    assert (tmp_path / "aug" / "c0_s0" / "ct.nii.gz").stat().st_mtime_ns == stamp
    assert "3 of 4 outputs already done" in caplog.text


def test_dataset_logs_the_method_once(tmp_path, caplog):
    import logging

    with caplog.at_level(logging.INFO):
        assert main(_dataset(tmp_path)) == 0
    assert sum(r.getMessage().startswith("synthesis method:") for r in caplog.records) == 1


def test_dataset_interrupt_says_how_to_resume_and_leaves_no_half_output(tmp_path, capsys, caplog, monkeypatch):
    import logging

    import backend.io

    args = _dataset(tmp_path)
    real = backend.io.write_image
    calls = []

    def interrupted(data, path, *a, **k):
        calls.append(path)
        if len(calls) == 4:  # the second output's label
            raise KeyboardInterrupt
        return real(data, path, *a, **k)

    monkeypatch.setattr(backend.io, "write_image", interrupted)
    with caplog.at_level(logging.INFO):
        assert main(args) == 130
    assert "re-run the same command to resume" in caplog.text
    assert sorted(p.name for p in (tmp_path / "aug").iterdir()) == ["c0_s0", synth_cli.RUN_FILE]
    monkeypatch.setattr(backend.io, "write_image", real)
    assert main(args) == 0 and len([p for p in (tmp_path / "aug").iterdir() if p.is_dir()]) == 4


def test_msd_label_tumours_survive_and_tumours_are_counted(tmp_path, caplog):
    """An MSD-style map (1 organ, 2 tumour) as --organs: its tumour stays 2 in label.nii.gz, the CT there is
    untouched, and the log counts tumours (not crops)."""
    import logging

    ct, seg = _case(tmp_path / "cts")
    labels = read_image(seg)
    msd = np.where(labels.array > 0, 1, 0).astype(np.uint8)
    msd[12:16, 28:36, 28:36] = 2
    msd_path = tmp_path / "msd.nii.gz"
    write_image(Volume(msd, labels.geometry), msd_path)
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO):
        assert main(["synthesize", "--ct", str(ct), "--organs", str(msd_path), "--organ", "liver", "--size", "tiny",
                     "--count", "2", "--seed", "3", "--out", str(out)]) == 0
    lab, res, src = read_image(out / "label.nii.gz").array, read_image(out / "ct.nii.gz").array, read_image(ct).array
    real = msd == 2
    assert (lab[real] == 2).all() and np.array_equal(res[real], src[real])
    prov = json.loads((out / "provenance.json").read_text(encoding="utf-8"))
    assert prov["mask"]["existing_tumour_voxels"] == int(real.sum())
    assert any(f"{prov['n_tumours']} tumour(s) by" in r.getMessage() for r in caplog.records)


def test_dataset_killed_while_writing_leaves_no_visible_half_output_and_resume_cleans_up(tmp_path):
    """SIGKILL in the middle of an output: only a hidden staging folder remains (no output folder with some of
    its files, no temporary inside a finished one); the re-run removes it and completes every output."""
    import signal
    import subprocess
    import sys

    args = _dataset(tmp_path)
    script = (
        "import os, signal, sys\n"
        "import backend.io\n"
        "from backend.cli import main\n"
        "real = backend.io.write_image\n"
        "calls = []\n"
        "def dying(data, path, *a, **k):\n"
        "    calls.append(path)\n"
        "    if len(calls) == 4:  # the second output's label: its ct is written, the label half-way\n"
        "        open(path, 'wb').write(b'half')\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return real(data, path, *a, **k)\n"
        "backend.io.write_image = dying\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "cfg")}
    env.pop("DIFFTUMOR_WEIGHTS", None)
    proc = subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode(errors="replace")
    aug = tmp_path / "aug"
    assert sorted(p.name for p in aug.iterdir() if not p.name.startswith(".")) == ["c0_s0", synth_cli.RUN_FILE]
    assert sorted(p.name for p in (aug / "c0_s0").iterdir()) == sorted(synth_cli.OUTPUT_FILES)
    assert main(args) == 0
    assert sorted(p.name for p in aug.iterdir()) == ["c0_s0", "c0_s1", "c1_s0", "c1_s1", synth_cli.RUN_FILE]
    for d in ("c0_s0", "c0_s1", "c1_s0", "c1_s1"):
        assert sorted(p.name for p in (aug / d).iterdir()) == sorted(synth_cli.OUTPUT_FILES)
        assert read_image(aug / d / "label.nii.gz").array.max() == 2


def test_dataset_shard_starting_while_another_writes_the_run_file_is_not_refused(tmp_path):
    """Two shards started together: one sees the folder the other just made, holding only the run file's
    temporary; it must not take that for a foreign folder."""
    args = _dataset(tmp_path)
    aug = tmp_path / "aug"
    aug.mkdir()
    (aug / f".{synth_cli.RUN_FILE}.4242.0123abcd.tmp").write_text("{", encoding="utf-8")
    assert main(args + ["--shard", "1/2"]) == 0
    assert (aug / "c1_s1" / "provenance.json").is_file() and not (aug / "c0_s0").exists()


def test_dataset_of_case_folders_abdomenatlas_layout(tmp_path):
    """AbdomenAtlas / TotalSegmentator datasets: <case>/ct.nii.gz next to <case>/segmentations/<organ>.nii.gz,
    with --ct and --organs the same folder; hidden files (macOS '._' copies) are not cases."""
    root = tmp_path / "atlas"
    for i in range(2):
        ct, seg = _case(tmp_path / "flat", f"c{i}", seed=i)
        (root / f"BDMAP_{i}" / "segmentations").mkdir(parents=True)
        os.replace(ct, root / f"BDMAP_{i}" / "ct.nii.gz")
        labels = read_image(seg)
        write_image(Volume((labels.array == 5).astype(np.uint8), labels.geometry),
                    root / f"BDMAP_{i}" / "segmentations" / "liver.nii.gz")
    (root / "._BDMAP_0.nii.gz").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    out = tmp_path / "aug"
    assert main(["synthesize", "--ct", str(root), "--organs", str(root), "--organ", "liver", "--size", "tiny",
                 "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["BDMAP_0_s0", "BDMAP_1_s0", synth_cli.RUN_FILE]
    prov = _prov(out / "BDMAP_1_s0")
    assert prov["inputs"]["ct"] == str(root / "BDMAP_1" / "ct.nii.gz")
    assert read_image(out / "BDMAP_1_s0" / "ct.nii.gz").geometry.matches(read_image(root / "BDMAP_1" / "ct.nii.gz").geometry)


def test_torchrun_rank_uses_its_local_gpu(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert synth_cli.rank_device("auto", sharded_by_flag=False) == "cuda:1"
    assert synth_cli.rank_device("cuda", sharded_by_flag=False) == "cuda:1"
    assert synth_cli.rank_device("cpu", sharded_by_flag=False) == "cpu"
    assert synth_cli.rank_device("cuda:0", sharded_by_flag=False) == "cuda:0"
    assert synth_cli.rank_device("auto", sharded_by_flag=True) == "auto"  # --shard given: the user picks
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert synth_cli.rank_device("auto", sharded_by_flag=False) == "auto"


def test_dataset_seed_of_a_case_does_not_depend_on_the_other_cases(tmp_path):
    """A case's tumours come from --seed, its name and k: the same whether or not other CTs share its folder
    (they used to shift with the case's position in the folder)."""
    args = _dataset(tmp_path)
    assert main(args) == 0
    alone = tmp_path / "alone"
    alone.mkdir()
    (alone / "c1.nii.gz").symlink_to(tmp_path / "cts" / "c1.nii.gz")
    args_alone = list(args)
    args_alone[args_alone.index("--ct") + 1] = str(alone)
    args_alone[args_alone.index("--out") + 1] = str(tmp_path / "aug_alone")
    assert main(args_alone) == 0
    for k in (0, 1):
        both, one = tmp_path / "aug" / f"c1_s{k}", tmp_path / "aug_alone" / f"c1_s{k}"
        assert _prov(both)["seed"] == _prov(one)["seed"] == synth_cli.output_seed(0, "c1", k)
        assert np.array_equal(read_image(both / "ct.nii.gz").array, read_image(one / "ct.nii.gz").array)
    seeds = {_prov(tmp_path / "aug" / f"c{i}_s{k}")["seed"] for i in (0, 1) for k in (0, 1)}
    assert len(seeds) == 4


def test_more_ddim_steps_than_the_model_has_timesteps_is_one_line(tmp_path, capsys, parity_dir, totalseg_ct,
                                                                   totalseg_seg):
    """--ddim-steps 500 with the T = 200 mid/late model was a ValueError traceback (exit 1)."""
    out = tmp_path / "out"
    assert main(["synthesize", "--ct", str(totalseg_ct), "--organs", str(totalseg_seg), "--organ", "liver",
                 "--center", "81,58,19", "--voxel", "--radii", "9,9,9", "--stage", "mid_late", "--ddim-steps", "500",
                 "--method", "diffusion", "--weights", str(parity_dir), "--device", "cpu", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "difftumor: error: --ddim-steps 500: liver_noearly.pt was trained with T = 200 steps; give 1 to 200"
    assert not out.exists()


@pytest.mark.parametrize("which", ["ct", "organs"])
def test_dataset_out_that_is_an_input_folder_is_refused(tmp_path, capsys, which):
    """--out cts/ --overwrite wrote cts/<case>_s0/ct.nii.gz, which the same command's resume then read as a
    new case (and failed: no labels for it)."""
    ct, seg = _case(tmp_path / "cts")
    folder = ct.parent if which == "ct" else seg.parent
    before = sorted(p.name for p in folder.iterdir())
    assert main(["synthesize", "--ct", str(ct.parent), "--organs", str(seg.parent), "--organ", "liver",
                 "--overwrite", "--out", str(folder) + "/"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"is the --{which} folder" in err
    assert sorted(p.name for p in folder.iterdir()) == before


def test_mass_effect_and_phase_flags(tmp_path, capsys, totalseg_ct, totalseg_seg):
    """--mass-effect reaches the request (one line in the flag's words for a bad value) and the provenance; the
    label written moves with the CT."""
    assert _run(tmp_path, "--mass-effect", "sometimes", out="bad") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["difftumor: error: --mass-effect sometimes: choose auto (model-based tumours of 20 mm and more), "
                   "on (every tumour, both methods) or off"]
    assert not (tmp_path / "bad").exists()
    assert _run(tmp_path, "--phase", "arterial", out="bad") == 2
    assert capsys.readouterr().err.strip() == "difftumor: error: --phase arterial: choose auto, non-contrast or enhanced"
    args = ["synthesize", "--ct", str(totalseg_ct), "--organs", str(totalseg_seg), "--organ", "liver", "--center",
            "94,35,15", "--voxel", "--radii", "15,15,15", "--method", "model-based", "--phase", "non-contrast"]
    assert main([*args, "--mass-effect", "on", "--out", str(tmp_path / "on")]) == 0
    assert main([*args, "--mass-effect", "off", "--out", str(tmp_path / "off")]) == 0
    on, off = _prov(tmp_path / "on"), _prov(tmp_path / "off")
    assert on["settings"]["mass_effect"] == "on" and on["mass_effect"]["groups_applied"] == 1
    assert off["settings"]["mass_effect"] == "off" and off["mass_effect"]["groups_applied"] == 0
    assert on["tumours"][0]["params"]["phase_source"] == "given"
    lab_on, lab_off = (read_image(tmp_path / d / "label.nii.gz").array for d in ("on", "off"))
    ct_on, ct_off = (read_image(tmp_path / d / "ct.nii.gz").array for d in ("on", "off"))
    assert np.array_equal(lab_on == 2, lab_off == 2)  # the same tumour
    grown = (lab_on == 1) & (lab_off == 0)  # organ label pushed into what was outside the organ ...
    assert grown.any() and ct_on[grown].mean() > ct_off[grown].mean() + 30  # ... where the CT now shows organ
