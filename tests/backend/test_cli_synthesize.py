"""`difftumor synthesize` and `difftumor weights` end to end (model-based: no weights needed)."""

import json

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
    assert sorted(p.name for p in out.iterdir()) == ["c1_s0", "c1_s1"]
    stamp = (out / "c1_s0" / "ct.nii.gz").stat().st_mtime_ns
    assert main(args) == 0
    assert len(list(out.iterdir())) == 6
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


def test_join_negative_values_rewrites_only_number_lists_after_the_listed_options():
    from backend.cli import join_negative_values

    argv = ["synthesize", "--center", "-60.5,20.0,-310", "--radii", "6,5,4.5", "--rotation", "-30,0,0",
            "--seed", "-5", "--out", "-dir"]
    assert join_negative_values(argv) == ["synthesize", "--center=-60.5,20.0,-310", "--radii", "6,5,4.5",
                                          "--rotation=-30,0,0", "--seed", "-5", "--out", "-dir"]
    assert join_negative_values(["--center=-1,2,3", "--center", "--voxel"]) == ["--center=-1,2,3", "--center", "--voxel"]
    assert join_negative_values(["--", "--center", "-1,2,3"]) == ["--", "--center", "-1,2,3"]


def test_negative_values_may_follow_center_radii_and_rotation(tmp_path, capsys):
    ct, seg = _case(tmp_path / "cts")
    # voxel (32, 32, 15) of the test grid is the world point (-27.8, -26.8, 33.0) mm (LPS)
    base = ["synthesize", "--ct", str(ct), "--organs", str(seg), "--organ", "liver", "--radii", "6,5,5", "--seed", "3"]
    assert main(base + ["--center", "-27.8,-26.8,33", "--rotation", "-30,0,0", "--out", str(tmp_path / "a")]) == 0
    assert main(base + ["--center=-27.8,-26.8,33", "--rotation=-30,0,0", "--out", str(tmp_path / "b")]) == 0
    a, b = (read_image(tmp_path / d / "label.nii.gz").array for d in "ab")
    assert (a == 2).sum() > 50 and np.array_equal(a, b)
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
