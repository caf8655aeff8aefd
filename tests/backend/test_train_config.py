"""Training configs: bad files and out-of-range numbers are one line (exit 2) before anything is written
(issue 14, defect 6), and every numeric setting of the shipped trainers has a declared range."""

from __future__ import annotations

import dataclasses

import pytest

from backend.cli import main

STAGES = ("autoencoder", "diffusion", "segmentation")


def _run(capsys, argv):
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


@pytest.mark.parametrize("stage", STAGES)
def test_non_utf8_yaml_is_one_line(tmp_path, capsys, stage):
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes("output_dir: caf\xe9\n".encode("latin-1"))
    code, err = _run(capsys, ["train", stage, "--config", str(bad)])
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"difftumor: error: {bad}: not UTF-8 text") and "Traceback" not in err[0]


@pytest.mark.parametrize("value, why", [("-1", "must be > 0"), (".nan", "must be a finite number"),
                                        (".inf", "must be a finite number"), ("0", "must be > 0")])
@pytest.mark.parametrize("stage, key", [("autoencoder", "optim.lr"), ("diffusion", "optim.lr"),
                                        ("segmentation", "lr")])
def test_bad_learning_rate_is_one_line(tmp_path, capsys, stage, key, value, why):
    out = tmp_path / "run"
    code, err = _run(capsys, ["train", stage, f"{key}={value}", f"output_dir={out}" if stage != "segmentation"
                              else f"out_dir={out}"])
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"difftumor: error: {key}=") and err[0].endswith(why), err
    assert not out.exists()


@pytest.mark.parametrize("override, message", [
    ("data.val_fraction=1.5", "data.val_fraction=1.5: must be in [0, 1)"),
    ("optim.gamma=-0.1", "optim.gamma=-0.1: must be > 0"),
    ("data.crop_size=[0,16,16]", "data.crop_size=[0, 16, 16]: each value must be a positive integer, at most 512 "
                                 "(voxels a side; the release uses 96)"),
    ("data.crop_size=[100000,16,16]", "data.crop_size=[100000, 16, 16]: each value must be a positive integer, at "
                                      "most 512 (voxels a side; the release uses 96)"),
    ("data.hu_max=.nan", "data.hu_max=nan: must be a finite number"),
])
def test_autoencoder_ranges(tmp_path, capsys, override, message):
    code, err = _run(capsys, ["train", "autoencoder", override, f"output_dir={tmp_path / 'r'}"])
    assert code == 2 and err == [f"difftumor: error: {message}"]


@pytest.mark.parametrize("override, message", [
    ("optim.ema_decay=1.5", "optim.ema_decay=1.5: must be in [0, 1]"),
    ("data.rotate90_prob=2", "data.rotate90_prob=2.0: must be a probability in [0, 1]"),
    ("early_diameter_mm=-3", "early_diameter_mm=-3.0: must be > 0"),
])
def test_diffusion_ranges(tmp_path, capsys, override, message):
    code, err = _run(capsys, ["train", "diffusion", override, f"output_dir={tmp_path / 'r'}"])
    assert code == 2 and err == [f"difftumor: error: {message}"]


def _numeric_fields(cls, prefix=""):
    import typing

    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            continue  # model configs check themselves
        text = str(tp)
        if tp in (int, float) or any(w in text for w in ("int", "float")):
            yield f"{prefix}{f.name}", f


@pytest.mark.parametrize("stage", STAGES)
def test_every_numeric_setting_has_a_range(stage):
    from backend.train import autoencoder, diffusion, segmentation

    root = {"autoencoder": autoencoder.AutoencoderTrainConfig, "diffusion": diffusion.DiffusionTrainConfig,
            "segmentation": segmentation.SegmentationConfig}[stage]
    import typing

    hints = typing.get_type_hints(root)
    classes = [("", root)] + [(f"{f.name}.", hints[f.name]) for f in dataclasses.fields(root)
                              if dataclasses.is_dataclass(hints[f.name])
                              and hints[f.name].__module__.startswith("backend.train")]
    missing = [key for prefix, cls in classes for key, f in _numeric_fields(cls, prefix) if "range" not in f.metadata]
    assert missing == []


def test_every_shipped_config_is_within_the_ranges():
    from pathlib import Path

    from backend.train import autoencoder, diffusion, segmentation
    from backend.train.config import load_config

    configs = sorted((Path(__file__).resolve().parents[2] / "backend" / "configs").glob("*.yaml"))
    assert len(configs) >= 9
    for path in configs:
        cls = (autoencoder.AutoencoderTrainConfig if path.name.startswith("autoencoder") else
               diffusion.DiffusionTrainConfig if path.name.startswith("diffusion") else segmentation.SegmentationConfig)
        load_config(cls, path)


def test_ranges_hold_for_configs_built_in_code():
    from backend.train.autoencoder import OptimConfig
    from backend.train.config import ConfigRangeError
    from backend.train.segmentation import SegmentationConfig

    with pytest.raises(ConfigRangeError, match=r"^lr=-1: must be > 0$"):
        OptimConfig(lr=-1)
    with pytest.raises(ConfigRangeError, match=r"^val_overlap=1.0: sliding-window overlap must be in \[0, 1\)$"):
        SegmentationConfig(val_overlap=1.0)
    assert OptimConfig(lr=0.5).lr == 0.5
