"""backend.synthesis.dataset called directly, without the command line (model-based: no weights needed)."""

import json

import numpy as np
import pytest

from backend.errors import DiffTumorError
from backend.io import Geometry, Volume, read_image, write_image
from backend.synthesis import dataset
from backend.synthesis.outputs import RUN_FILE
from backend.synthesis.request import Generated, OptionError, SynthesisRequest


@pytest.fixture(autouse=True)
def _no_user_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "cfg"))
    monkeypatch.delenv("DIFFTUMOR_WEIGHTS", raising=False)


def _case(cts, name, seed=0):
    """A small CT with a TotalSegmentator liver (label 5) in ``cts/`` and its labels in ``cts_seg/``."""
    rng = np.random.default_rng(seed)
    a = rng.normal(-1000, 10, (24, 48, 48))
    seg = np.zeros(a.shape, np.uint8)
    seg[4:20, 8:40, 8:40] = 5
    a[seg == 5] = rng.normal(60, 8, (seg == 5).sum())
    g = Geometry((48, 48, 24), (0.9, 0.9, 2.0), (1.0, 2.0, 3.0), (-1, 0, 0, 0, -1, 0, 0, 0, 1))
    labels = cts.parent / f"{cts.name}_seg"
    cts.mkdir(parents=True, exist_ok=True)
    labels.mkdir(exist_ok=True)
    write_image(Volume(a.astype(np.int16), g), cts / f"{name}.nii.gz")
    write_image(Volume(seg, g), labels / f"{name}.nii.gz")
    return cts / f"{name}.nii.gz", labels / f"{name}.nii.gz"


@pytest.fixture(scope="module")
def engine():
    from backend.synthesis.engine import SynthesisEngine

    return SynthesisEngine(None, device="cpu")


def _request(seed=0):
    return SynthesisRequest(organ="liver", tumor=Generated("tiny", 1), method="model-based", seed=seed)


def test_output_seed_depends_on_seed_case_and_k_only():
    assert dataset.output_seed(0, "c1", 0) == dataset.output_seed(0, "c1", 0)
    seeds = {dataset.output_seed(s, c, k) for s in (0, 1) for c in ("c1", "c2") for k in (0, 1, 1000)}
    assert len(seeds) == 12 and all(0 <= s < 2**32 for s in seeds)


def test_parse_shard_from_text_or_torchrun_environment():
    assert dataset.parse_shard("1/3", {}) == (1, 3)
    assert dataset.parse_shard(None, {}) == (0, 1)
    assert dataset.parse_shard(None, {"RANK": "2", "WORLD_SIZE": "4"}) == (2, 4)
    for bad in ("3/3", "1/0", "-1/2", "a/b", "2"):
        with pytest.raises(OptionError, match=rf"^shard {bad}: expected i/n with 0 <= i < n$") as info:
            dataset.parse_shard(bad, {})
        assert str(info.value.renamed("--shard")) == f"--shard {bad}: expected i/n with 0 <= i < n"


def test_rank_device_follows_local_rank_only_under_torchrun(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    env = {"WORLD_SIZE": "4", "LOCAL_RANK": "3"}
    assert dataset.rank_device("auto", sharded_by_flag=False, env=env) == "cuda:1"
    assert dataset.rank_device("cpu", sharded_by_flag=False, env=env) == "cpu"
    assert dataset.rank_device("auto", sharded_by_flag=True, env=env) == "auto"
    assert dataset.rank_device("auto", sharded_by_flag=False, env={"WORLD_SIZE": "1", "LOCAL_RANK": "0"}) == "auto"


def test_dataset_folder_and_cases(tmp_path):
    _case(tmp_path / "cts", "b")
    _case(tmp_path / "cts", "a")
    assert dataset.is_dataset_folder(tmp_path / "cts")
    assert not dataset.is_dataset_folder(tmp_path / "cts" / "a.nii.gz")
    (tmp_path / "dicom").mkdir()
    (tmp_path / "dicom" / "IM0001").write_bytes(b"x")
    assert not dataset.is_dataset_folder(tmp_path / "dicom")
    cases = dataset.dataset_cases(tmp_path / "cts", tmp_path / "cts_seg")
    assert [(c, ct.name, lab) for c, ct, lab in cases] == [
        ("a", "a.nii.gz", tmp_path / "cts_seg" / "a.nii.gz"), ("b", "b.nii.gz", tmp_path / "cts_seg" / "b.nii.gz")]
    with pytest.raises(dataset.InputError, match=r"^organ labels .*nowhere") as info:
        dataset.dataset_cases(tmp_path / "cts", tmp_path / "nowhere")
    assert info.value.option == "organs" and str(info.value.renamed("--organs")).startswith("--organs ")


def test_input_checks_name_the_input(tmp_path):
    ct, seg = _case(tmp_path / "cts", "a")
    dataset.check_inputs_exist({"ct": ct, "organs": seg, "tumor_mask": None})
    with pytest.raises(OptionError, match=r"^tumour mask .*m\.nrrd: no such file or folder$"):
        dataset.check_inputs_exist({"ct": ct, "tumor_mask": tmp_path / "m.nrrd"})
    (tmp_path / "empty").mkdir()
    with pytest.raises(OptionError, match=r"^CT .*empty: no CT files found in this folder \(accepted: "):
        dataset.check_single_ct(tmp_path / "empty", {"n": None})
    with pytest.raises(OptionError, match=r"^n 2: only for dataset mode \(CT a folder of CT files\); CT .* is a "
                                          r"single CT$"):
        dataset.check_single_ct(ct, {"n": 2, "shard": None})
    dataset.check_single_ct(ct, {"n": None, "shard": None})


def test_synthesize_case_writes_one_output_with_its_settings(tmp_path, engine):
    ct, seg = _case(tmp_path / "cts", "a")
    request = _request(seed=4)
    settings = dataset.run_settings(request, engine, ct=ct, organs=seg, organ_label=None)
    assert settings["ct"] == str(ct.resolve()) and settings["n"] == 1 and settings["seed"] == 4
    result = dataset.synthesize_case(engine, request, ct, seg, tmp_path / "out", settings=settings)
    prov = json.loads((tmp_path / "out" / "provenance.json").read_text(encoding="utf-8"))
    assert prov["settings"] == settings and prov["seed"] == 4 and prov["inputs"]["organs"] == str(seg.resolve())
    assert result.provenance["settings"] == settings and result.provenance["inputs"] == prov["inputs"]
    assert prov["files"] == {"ct": "ct.nii.gz", "label": "label.nii.gz"}
    assert set(np.unique(read_image(tmp_path / "out" / "label.nii.gz").array)) == {0, 1, 2}
    (tmp_path / "bad.nii.gz").write_bytes(b"not an image")
    with pytest.raises(dataset.InputError, match=r"^CT .*bad\.nii\.gz") as info:
        dataset.synthesize_case(engine, request, tmp_path / "bad.nii.gz", seg, tmp_path / "out2", settings=settings)
    assert str(info.value.renamed("--ct")).startswith(f"--ct {tmp_path / 'bad.nii.gz'}")
    assert not (tmp_path / "out2").exists()


def test_dataset_plan_resumes_and_shards(tmp_path, engine):
    for i in range(3):
        _case(tmp_path / "cts", f"c{i}", seed=i)
    request = _request(seed=9)
    settings = dataset.run_settings(request, engine, ct=tmp_path / "cts", organs=tmp_path / "cts_seg", n=2)
    out = tmp_path / "aug"
    plan = dataset.plan_dataset(tmp_path / "cts", tmp_path / "cts_seg", out, settings, n=2, shard="1/2")
    assert (plan.rank, plan.world, plan.n_cases, plan.skipped) == (1, 2, 3, 0)
    assert [(o.case, o.k, o.folder.name) for o in plan.todo] == [("c1", 0, "c1_s0"), ("c1", 1, "c1_s1")]
    assert json.loads((out / RUN_FILE).read_text(encoding="utf-8"))["settings"] == settings
    runs = list(dataset.iter_dataset(engine, request, plan, settings=settings))
    assert [(o.folder.name, e) for o, _, e in runs] == [("c1_s0", None), ("c1_s1", None)]
    for o, result, _ in runs:
        assert result.provenance["seed"] == dataset.output_seed(9, "c1", o.k)
    plan = dataset.plan_dataset(tmp_path / "cts", tmp_path / "cts_seg", out, settings, n=2, env={})
    assert len(plan.outputs) == 6 and plan.skipped == 2 and {o.case for o in plan.todo} == {"c0", "c2"}
    # another run's settings in the folder: refused, in the front end's words
    with pytest.raises(OptionError, match=r"^--out .*aug: holds results made with --seed 9, but this run has "
                                          r"--seed 10"):
        dataset.plan_dataset(tmp_path / "cts", tmp_path / "cts_seg", out, {**settings, "seed": 10}, n=2, env={},
                             names=lambda o: "--" + o)


def test_a_failed_output_is_yielded_and_the_run_goes_on(tmp_path, engine):
    for i in range(2):
        _case(tmp_path / "cts", f"c{i}", seed=i)
    (tmp_path / "cts_seg" / "c0.nii.gz").write_bytes(b"broken")
    request = _request()
    settings = dataset.run_settings(request, engine, ct=tmp_path / "cts", organs=tmp_path / "cts_seg")
    plan = dataset.plan_dataset(tmp_path / "cts", tmp_path / "cts_seg", tmp_path / "aug", settings, env={})
    runs = list(dataset.iter_dataset(engine, request, plan, settings=settings))
    assert [o.case for o, _, _ in runs] == ["c0", "c1"]
    (_, failed, error), (_, ok, none) = runs
    assert failed is None and isinstance(error, DiffTumorError) and str(error).startswith("organ labels ")
    assert ok is not None and none is None and (tmp_path / "aug" / "c1_s0" / "provenance.json").is_file()
    assert not (tmp_path / "aug" / "c0_s0").exists()
