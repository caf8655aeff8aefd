"""`difftumor train autoencoder`: smoke run on the shared CT, exact resume, bad input."""

from __future__ import annotations

import csv

import pytest
import torch

from backend.checkpoint import load_checkpoint
from backend.cli import main
from backend.errors import DiffTumorError
from backend.train.autoencoder import AutoencoderTrainConfig, train
from backend.train.config import load_config
from backend.vqgan import load_autoencoder

TINY = [
    "device=cpu", "threads=2", "log_every=1", "checkpoint_every=100", "val_every=0", "tensorboard=false",
    "model.n_hiddens=4", "model.num_groups=4", "model.n_codes=64", "model.embedding_dim=8",
    "loss.perceptual_weight=0", "loss.disc_channels=4", "loss.disc_layers=2", "loss.discriminator_iter_start=2",
    "data.crop_size=[16,16,16]", "data.spacing=[3,3,3]", "data.batch_size=1", "data.val_fraction=0", "optim.lr=1e-3",
]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, totalseg_ct):
    d = tmp_path_factory.mktemp("ae_data")
    (d / "ct.nii.gz").symlink_to(totalseg_ct)
    (d / "broken.nii.gz").write_bytes(b"this is not a NIfTI file")  # skipped and counted, not fatal
    return d


def _cfg(data_dir, out, *extra):
    return load_config(AutoencoderTrainConfig, None, [*TINY, f"data.source={data_dir}", f"output_dir={out}", *extra])


@pytest.mark.slow
def test_smoke_and_resume_matches_uninterrupted(data_dir, tmp_path):
    torch.set_num_threads(2)
    full = train(_cfg(data_dir, tmp_path / "a", "max_steps=4", "val_every=4"))
    assert full["step"] == 4 and full["skipped"] == 1
    rows = list(csv.DictReader(open(tmp_path / "a" / "metrics.csv", encoding="utf-8")))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4] and float(rows[0]["d_total"]) == 0.0
    assert full["metrics"]["d_total"] > 0 and "val_psnr_hu" in full["metrics"]  # discriminator active from step 2
    assert list((tmp_path / "a" / "validation").glob("*.png"))
    val_rows = list(csv.DictReader(open(tmp_path / "a" / "val_metrics.csv", encoding="utf-8")))
    assert [r["step"] for r in val_rows] == ["4"] and float(val_rows[0]["val_psnr_hu"]) > 0
    assert -1 <= float(val_rows[0]["val_ssim_hu"]) <= 1  # a 4-step model: SSIM near 0
    # the settings the run trained with, loadable as a config again
    again = load_config(AutoencoderTrainConfig, tmp_path / "a" / "config.yaml")
    assert again == _cfg(data_dir, tmp_path / "a", "max_steps=4", "val_every=4")
    ck_a = load_checkpoint(tmp_path / "a" / "checkpoint_last.pt")
    assert ck_a["step"] == 4 and ck_a["stage"] == "autoencoder" and ck_a["version"]
    model = load_autoencoder(tmp_path / "a" / "checkpoint_last.pt")  # our checkpoints load as models too
    assert model.config.n_hiddens == 4

    train(_cfg(data_dir, tmp_path / "b", "max_steps=2"))
    with pytest.raises(DiffTumorError, match="holds checkpoint_last.pt of an earlier run"):  # no --resume
        train(_cfg(data_dir, tmp_path / "b", "max_steps=4"))
    resumed = train(_cfg(data_dir, tmp_path / "b", "max_steps=4", "val_every=4"), resume="last")
    assert resumed["step"] == 4
    ck_b = load_checkpoint(tmp_path / "b" / "checkpoint_last.pt")
    for part in ("model", "loss_model"):
        for k, v in ck_a[part].items():
            assert torch.equal(v, ck_b[part][k]), f"{part}.{k}"
    rows_b = list(csv.DictReader(open(tmp_path / "b" / "metrics.csv", encoding="utf-8")))
    assert rows_b == rows  # same losses at every step, header written once
    assert list(csv.DictReader(open(tmp_path / "b" / "val_metrics.csv", encoding="utf-8"))) == val_rows


@pytest.mark.slow
def test_resume_with_new_milestones_follows_the_new_lr_schedule(data_dir, tmp_path):
    """The restored MultiStepLR used to keep the old milestones, so a changed schedule was ignored."""
    torch.set_num_threads(2)
    train(_cfg(data_dir, tmp_path, "max_steps=2"))
    train(_cfg(data_dir, tmp_path, "max_steps=4", "optim.milestones=[3]", "optim.gamma=0.5"), resume="last")
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv", encoding="utf-8")))
    assert [float(r["lr"]) for r in rows] == [1e-3, 1e-3, 5e-4, 5e-4]  # as a fresh run with milestone 3 has
    ck = load_checkpoint(tmp_path / "checkpoint_last.pt")
    assert all(dict(s["milestones"]) == {3: 1} for s in ck["schedulers"])


def test_bad_inputs(tmp_path, data_dir):
    with pytest.raises(DiffTumorError, match=r"data.crop_size \(30, 32, 32\).*divisible"):
        train(_cfg(data_dir, tmp_path / "o", "data.crop_size=[30,32,32]", "data.spacing=[1,1,1]"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DiffTumorError, match="no CT images found"):
        train(_cfg(empty, tmp_path / "o"))
    only_bad = tmp_path / "bad"
    only_bad.mkdir()
    (only_bad / "x.nii.gz").write_bytes(b"junk")
    with pytest.raises(DiffTumorError, match="none of the 1 training images could be read"):
        train(_cfg(only_bad, tmp_path / "o", "max_steps=1"))
    assert not (tmp_path / "o").exists()  # nothing trained: no empty run folder
    with pytest.raises(DiffTumorError, match=r"^data\.batch_size=0: must be a positive integer$"):
        train(_cfg(data_dir, tmp_path / "o", "data.batch_size=0"))
    with pytest.raises(DiffTumorError, match=r"^max_steps=-1: must be a positive integer$"):
        train(_cfg(data_dir, tmp_path / "o", "max_steps=-1"))
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("overrides, expected", [
    (("model.n_hiddens=8", "model.num_groups=8"),
     "model.n_hiddens: checkpoint 4, config 8; model.num_groups: checkpoint 4, config 8"),
    (("loss.disc_channels=8", "loss.disc_layers=3"),
     "loss.disc_channels: checkpoint 4, config 8; loss.disc_layers: checkpoint 2, config 3"),
])
def test_resume_with_other_settings_is_one_line(data_dir, tmp_path, overrides, expected):
    """A changed model key, or discriminator (loss.disc_channels/disc_layers), used to end in load_state_dict's
    size-mismatch traceback."""
    train(_cfg(data_dir, tmp_path, "max_steps=1"))
    with pytest.raises(DiffTumorError) as err:
        train(_cfg(data_dir, tmp_path, "max_steps=2", *overrides), resume="last")
    assert str(err.value).startswith(f"{tmp_path / 'checkpoint_last.pt'}: ")
    assert expected in str(err.value)


def test_init_from_another_stage_checkpoint_is_one_line(data_dir, tmp_path):
    """init_from= a diffusion (or segmentation) checkpoint used to end in a VQGANConfig TypeError traceback."""
    from backend.checkpoint import save_checkpoint

    other = save_checkpoint(tmp_path / "diffusion.pt", stage="diffusion", config={}, model_config={"dim": 8}, step=1,
                            model={})
    with pytest.raises(DiffTumorError, match=r"diffusion\.pt: is a diffusion training checkpoint, not an autoencoder"):
        train(_cfg(data_dir, tmp_path / "run", "max_steps=1", f"init_from={other}"))
    assert not (tmp_path / "run").exists()


def test_cli_reports_config_errors(tmp_path, capsys):
    assert main(["train", "autoencoder", "model.n_hiddenz=4"]) == 2
    assert "unknown key 'model.n_hiddenz'" in capsys.readouterr().err
    assert main(["train", "autoencoder", "--resume", str(tmp_path / "none.pt"), f"output_dir={tmp_path}",
                 f"data.source={tmp_path}"]) == 2
