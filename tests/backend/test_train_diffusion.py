"""Smoke tests of `difftumor train diffusion` on synthetic MSD-layout volumes with a tiny random autoencoder."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from backend.checkpoint import save_checkpoint
from backend.cli import main
from backend.diffusion.inferer import DiffusionInferer
from backend.diffusion.official import load_diffusion
from backend.errors import DiffTumorError
from backend.train.config import load_config
from backend.train.diffusion import DiffusionTrainConfig, train, tumour_components
from backend.vqgan.model import VQGAN, VQGANConfig

TINY = [
    "model.dim=8", "model.dim_mults=[1,2]", "model.attn_heads=2", "model.attn_dim_head=8", "model.rotary_dim=8",
    "data.crop_size=[32,32,32]", "data.rotate90_prob=0.5", "optim.grad_accum=1", "optim.lr=2e-3",
    "optim.ema_start=20", "optim.ema_every=5", "log_every=1", "tensorboard=false", "device=cpu", "threads=1",
]


pytestmark = pytest.mark.usefixtures("one_thread")


def _write(array, path, spacing=(1.0, 1.0, 1.0)):
    img = sitk.GetImageFromArray(array)
    img.SetSpacing(spacing)
    sitk.WriteImage(img, str(path))


@pytest.fixture(scope="module")
def msd(tmp_path_factory):
    """4 cases (z, y, x) = 40^3: liver-like sphere (label 1) with small tumours (label 2); one case has none."""
    root = tmp_path_factory.mktemp("msd")
    (root / "imagesTr").mkdir()
    (root / "labelsTr").mkdir()
    rng = np.random.default_rng(0)
    zz, yy, xx = np.mgrid[:40, :40, :40]
    entries = []
    for i in range(4):
        organ = (zz - 20) ** 2 + (yy - 20) ** 2 + (xx - 20) ** 2 <= 15**2
        label = organ.astype(np.uint8)
        if i < 3:  # tumours of radius 3-4 (< 20 mm): early
            for _ in range(2):
                c = rng.integers(12, 28, size=3)
                r = rng.integers(3, 5)
                label[(zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2 <= r**2] = 2
        ct = np.where(label == 2, 10, np.where(label == 1, 70, -300)).astype(np.int16)
        ct = (ct + rng.normal(0, 15, ct.shape)).astype(np.int16)
        _write(ct, root / "imagesTr" / f"case{i}.nii.gz")
        _write(label, root / "labelsTr" / f"case{i}.nii.gz")
        entries.append({"image": f"./imagesTr/case{i}.nii.gz", "label": f"./labelsTr/case{i}.nii.gz"})
    (root / "dataset.json").write_text(json.dumps({"training": entries}))
    return root / "dataset.json"


@pytest.fixture(scope="module")
def tiny_ae(tmp_path_factory):
    torch.manual_seed(0)
    cfg = VQGANConfig(n_hiddens=8, num_groups=8, downsample=(4, 4, 4), embedding_dim=8, n_codes=64)
    path = tmp_path_factory.mktemp("ae") / "ae.pt"
    save_checkpoint(path, stage="autoencoder", config={}, model_config=cfg.to_dict(), step=0,
                    model=VQGAN(cfg).state_dict())
    return path


def _cfg(tmp_path, msd, ae, *extra):
    return load_config(DiffusionTrainConfig, None,
                       [*TINY, f"data.source={msd}", f"autoencoder={ae}", f"output_dir={tmp_path}", *extra])


def _losses(path):
    with open(path) as f:
        return [float(r["loss"]) for r in csv.DictReader(f)]


def test_stage_split_by_largest_extent():
    mask = np.zeros((40, 40, 40), bool)
    mask[2:6, 2:6, 2:6] = True  # 4 mm
    mask[10:35, 10:14, 10:14] = True  # 25 mm along one axis
    _, comps = tumour_components(mask, (1.0, 1.0, 1.0))
    assert sorted(c["diameter_mm"] for c in comps) == [4.0, 25.0]
    _, comps = tumour_components(mask, (0.5, 0.5, 0.5))
    assert sorted(c["diameter_mm"] for c in comps) == [2.0, 12.5]


def test_loss_falls_and_weights_load_in_released_layout(tmp_path, msd, tiny_ae):
    summary = train(_cfg(tmp_path, msd, tiny_ae, "max_steps=80", "checkpoint_every=1000"))
    assert summary["step"] == 80 and summary["skipped"] == 1  # the tumour-free case is skipped and counted
    losses = _losses(tmp_path / "metrics.csv")
    assert len(losses) == 80
    first, last = np.mean(losses[:15]), np.mean(losses[-15:])
    assert last < 0.85 * first, (first, last)  # observed ~0.8 x after 60 steps, smooth decrease
    ckpt = load_diffusion(tmp_path / "liver_early.pt", timesteps=4, latent_channels=8)
    assert ckpt.vqgan_state is not None and "codebook.embeddings" in ckpt.vqgan_state
    # the same seed gives the same sampled latent
    inferer = DiffusionInferer(ckpt.ddpm_scheduler())
    cond = torch.randn(1, 9, 8, 8, 8)
    with torch.no_grad():
        a = inferer.sample(ckpt.unet, cond, generator=torch.Generator().manual_seed(5))
        b = inferer.sample(ckpt.unet, cond, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and a.shape == (1, 8, 8, 8, 8)


def test_resume_equals_uninterrupted(tmp_path, msd, tiny_ae):
    full = tmp_path / "full"
    part = tmp_path / "part"
    train(_cfg(full, msd, tiny_ae, "max_steps=12", "checkpoint_every=100"))
    train(_cfg(part, msd, tiny_ae, "max_steps=7", "checkpoint_every=100"))
    train(_cfg(part, msd, tiny_ae, "max_steps=12", "checkpoint_every=100"), resume="last")
    a = torch.load(full / "checkpoint_last.pt", weights_only=True)
    b = torch.load(part / "checkpoint_last.pt", weights_only=True)
    for key in ("model", "ema"):
        for k in a[key]:
            assert torch.equal(a[key][k], b[key][k]), (key, k)
    assert _losses(full / "metrics.csv") == _losses(part / "metrics.csv")
    # config.yaml holds the settings of the latest run (the resumed one: max_steps 12)
    assert load_config(DiffusionTrainConfig, part / "config.yaml") == _cfg(part, msd, tiny_ae, "max_steps=12",
                                                                           "checkpoint_every=100")


def test_resume_uses_the_configured_lr(tmp_path, msd, tiny_ae):
    """The restored optimizer used to keep the old lr while metrics.csv logged the new one."""
    train(_cfg(tmp_path, msd, tiny_ae, "max_steps=2", "checkpoint_every=100"))
    train(_cfg(tmp_path, msd, tiny_ae, "max_steps=3", "checkpoint_every=100", "optim.lr=3e-5"), resume="last")
    ck = torch.load(tmp_path / "checkpoint_last.pt", weights_only=True)
    assert [g["lr"] for g in ck["optimizers"][0]["param_groups"]] == [3e-5]


def test_cli_and_bad_inputs(tmp_path, msd, tiny_ae, caplog):
    out = tmp_path / "cli"
    code = main(["train", "diffusion", *TINY, f"data.source={msd}", f"autoencoder={tiny_ae}", f"output_dir={out}",
                 "max_steps=2", "stage=early", "data.organ=pancreas"])
    assert code == 0 and (out / "pancreas_early.pt").is_file()
    # the same command again without --resume would overwrite that run: refused, nothing touched
    before = (out / "checkpoint_last.pt").stat().st_mtime_ns
    with pytest.raises(DiffTumorError, match="holds checkpoint_last.pt of an earlier run; add --resume"):
        train(_cfg(out, msd, tiny_ae, "max_steps=2", "data.organ=pancreas"))
    assert (out / "checkpoint_last.pt").stat().st_mtime_ns == before
    # no mid/late tumour anywhere: one clear line, not preceded by a warning per case (a case without a
    # tumour of the stage is expected: each stage trains on part of a dataset)
    caplog.clear()
    with pytest.raises(DiffTumorError, match="none of the 4 cases has a usable noearly tumour"):
        train(_cfg(tmp_path / "n", msd, tiny_ae, "max_steps=1", "stage=noearly"))
    assert not [r for r in caplog.records if r.levelname == "WARNING" and "skipping" in r.getMessage()]
    assert not (tmp_path / "n").exists()  # no empty run folder is left behind
    # tumours larger than the crop are reported and left out
    with pytest.raises(DiffTumorError, match="usable early tumour"):
        train(_cfg(tmp_path / "big", msd, tiny_ae, "max_steps=1", "data.crop_size=[4,4,4]",
                   "model.dim_mults=[1]"))
    with pytest.raises(DiffTumorError, match="latent has 8 channels"):
        train(_cfg(tmp_path / "c", msd, tiny_ae, "max_steps=1", "model.out_dim=4", "model.channels=9"))
    with pytest.raises(DiffTumorError, match="stage"):
        _cfg(tmp_path, msd, tiny_ae, "stage=late")
    assert main(["train", "diffusion", f"output_dir={tmp_path}", "max_steps=1"]) == 2  # no data.source


def _error(capsys, argv) -> str:
    """Run the CLI, expect exit 2 and return its one error line."""
    capsys.readouterr()  # drop what earlier runs printed
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("difftumor: error: "), err
    return err[0]


def test_resume_refuses_changed_settings_and_another_autoencoder(tmp_path, msd, tiny_ae, capsys, caplog):
    out = tmp_path / "run"
    base = ["train", "diffusion", *TINY, f"data.source={msd}", f"output_dir={out}", "checkpoint_every=100"]
    assert main([*base, f"autoencoder={tiny_ae}", "max_steps=2"]) == 0
    ck_path = out / "checkpoint_last.pt"
    saved = torch.load(ck_path, weights_only=True)
    assert saved["autoencoder"]["path"] == str(tiny_ae.resolve()) and len(saved["autoencoder"]["sha256"]) == 64
    before = ck_path.read_bytes()

    line = _error(capsys, [*base, f"autoencoder={tiny_ae}", "max_steps=4", "model.dim=16", "stage=noearly", "--resume"])
    assert f"{ck_path}: " in line and "model.dim: checkpoint 8, config 16" in line
    assert "T: checkpoint 4, config 200" in line and "stage: checkpoint early, config noearly" in line
    line = _error(capsys, [*base, f"autoencoder={tiny_ae}", "max_steps=4", "data.organ=kidney", "--resume"])
    assert "data.organ: checkpoint liver, config kidney" in line

    torch.manual_seed(1)  # same architecture, other weights: another latent space
    other = tmp_path / "other_ae.pt"
    cfg = VQGANConfig(n_hiddens=8, num_groups=8, downsample=(4, 4, 4), embedding_dim=8, n_codes=64)
    save_checkpoint(other, stage="autoencoder", config={}, model_config=cfg.to_dict(), step=0,
                    model=VQGAN(cfg).state_dict())
    line = _error(capsys, [*base, f"autoencoder={other}", "max_steps=4", "--resume"])
    assert f"autoencoder={other.resolve()}: {ck_path} was trained with another autoencoder, {tiny_ae.resolve()}" in line

    line = _error(capsys, [*base, f"autoencoder={tiny_ae}", "max_steps=2", "--resume"])
    assert "max_steps=2: " in line and "already at step 2; nothing to train" in line
    assert ck_path.read_bytes() == before  # refused runs leave the checkpoint alone

    del saved["autoencoder"]  # a checkpoint written before the record: resumes with one warning
    torch.save(saved, ck_path)
    assert main([*base, f"autoencoder={tiny_ae}", "max_steps=3", "--resume"]) == 0
    assert sum("records no autoencoder" in r.getMessage() for r in caplog.records) == 1


def test_bad_settings_are_one_line_and_create_nothing(tmp_path, msd, tiny_ae, capsys):
    base = ["train", "diffusion", *TINY, f"data.source={msd}", f"autoencoder={tiny_ae}"]
    main([*base, f"output_dir={tmp_path / 'df'}", "max_steps=1"])
    line = _error(capsys, [*base, f"output_dir={tmp_path / 'x'}",
                           f"autoencoder={tmp_path / 'df' / 'checkpoint_last.pt'}"])
    assert "is a diffusion training checkpoint, not an autoencoder" in line
    assert "'lung' is not allowed; allowed: 'liver', 'pancreas', 'kidney'" in _error(capsys, [*base, "data.organ=lung"])
    assert "data.batch_size=0: must be a positive integer" in _error(capsys, [*base, f"output_dir={tmp_path / 'x'}",
                                                                             "data.batch_size=0"])
    assert "max_steps=-1: must be a positive integer" in _error(capsys, [*base, f"output_dir={tmp_path / 'x'}",
                                                                         "max_steps=-1"])
    assert not (tmp_path / "x").exists()
    (tmp_path / "file.txt").write_text("x")
    assert "exists and is not a folder" in _error(capsys, [*base, f"output_dir={tmp_path / 'file.txt'}", "max_steps=1"])


def test_organ_label_absent_from_the_data_is_refused(tmp_path, msd, tiny_ae, capsys):
    """Issue 14 defect 5: data.organ_labels naming a value no label map holds trained silently without an
    organ; it is refused as a wrong tumour label is, in one line naming the label and the files checked."""
    out = tmp_path / "o"
    with pytest.raises(DiffTumorError) as err:
        train(_cfg(out, msd, tiny_ae, "max_steps=1", "data.organ_labels=[9]"))
    line = str(err.value)
    expected = f"{msd}: data.organ_labels=[9]: no label map with a tumour holds the organ (checked 3: "
    assert line.startswith(expected), line
    assert "case0.nii.gz" in line and "the label map holds [0, 1, 2]" in line, line
    assert not out.exists()
