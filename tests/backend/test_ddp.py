"""Multi-process training through torchrun (2 CPU processes, gloo): stage 1 and stage 2 really run DDP.

Each run is launched exactly as a user would (``torchrun --nproc_per_node 2 difftumor train ...``) on tiny
configurations and synthetic MSD-layout volumes, then checked for: both ranks finishing, one checkpoint
written by rank 0, metrics rows for every step, and identical weights across ranks (DDP keeps replicas in
sync; for the VQGAN that includes the all-reduced codebook buffers).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

pytestmark = pytest.mark.slow

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
# the console script of the environment running the tests (CI runs .venv/bin/python without activating it)
DIFFTUMOR = next((str(p) for p in (Path(sys.executable).with_name("difftumor"),) if p.is_file()),
                 shutil.which("difftumor"))


def _write(array: np.ndarray, path: Path) -> None:
    sitk.WriteImage(sitk.GetImageFromArray(array), str(path))


@pytest.fixture(scope="module")
def msd(tmp_path_factory) -> Path:
    """4 cases of 40^3 at 1 mm: a liver-like sphere (1) with small tumours (2)."""
    root = tmp_path_factory.mktemp("msd_ddp")
    (root / "imagesTr").mkdir()
    (root / "labelsTr").mkdir()
    rng = np.random.default_rng(1)
    zz, yy, xx = np.mgrid[:40, :40, :40]
    entries = []
    for i in range(4):
        label = ((zz - 20) ** 2 + (yy - 20) ** 2 + (xx - 20) ** 2 <= 15**2).astype(np.uint8)
        for _ in range(2):
            c = rng.integers(12, 28, size=3)
            label[(zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2 <= 9] = 2
        ct = np.where(label == 2, 10, np.where(label == 1, 70, -300)) + rng.normal(0, 15, label.shape)
        _write(ct.astype(np.int16), root / "imagesTr" / f"case{i}.nii.gz")
        _write(label, root / "labelsTr" / f"case{i}.nii.gz")
        entries.append({"image": f"./imagesTr/case{i}.nii.gz", "label": f"./labelsTr/case{i}.nii.gz"})
    (root / "dataset.json").write_text(json.dumps({"training": entries}), encoding="utf-8")
    return root


def _torchrun(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    if DIFFTUMOR is None:
        pytest.skip("the difftumor console script is not installed")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run([*TORCHRUN, DIFFTUMOR, *args], cwd=tmp_path, env=env, capture_output=True, encoding="utf-8",
                          errors="replace",
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _steps(metrics: Path) -> list[int]:
    with open(metrics, encoding="utf-8") as f:
        return [int(float(r["step"])) for r in csv.DictReader(f)]


def test_autoencoder_trains_under_torchrun(tmp_path, msd):
    out = tmp_path / "ae"
    config = Path(__file__).resolve().parents[2] / "backend/configs/autoencoder_tiny.yaml"
    _torchrun(["train", "autoencoder", "--config", str(config), f"data.source={msd / 'imagesTr'}",
               f"output_dir={out}", "max_steps=3", "device=cpu", "log_every=1", "checkpoint_every=3",
               "val_every=1000"], tmp_path)
    ckpt = torch.load(out / "checkpoint_last.pt", map_location="cpu", weights_only=True)
    assert ckpt["step"] == 3
    assert _steps(out / "metrics.csv")[-1] == 3
    # rank 0's codebook buffers equal the (all-reduced) ones every rank used: they are finite and were updated
    emb = next(v for k, v in ckpt["model"].items() if k.endswith("codebook.embeddings"))
    assert torch.isfinite(emb).all()


def test_diffusion_trains_under_torchrun(tmp_path, msd):
    from backend.checkpoint import save_checkpoint
    from backend.vqgan.model import VQGAN, VQGANConfig

    torch.manual_seed(0)
    cfg = VQGANConfig(n_hiddens=8, num_groups=8, downsample=(4, 4, 4), embedding_dim=8, n_codes=64)
    ae = tmp_path / "tiny_ae.pt"
    save_checkpoint(ae, stage="autoencoder", config={}, model_config=cfg.to_dict(), step=0,
                    model=VQGAN(cfg).state_dict())
    out = tmp_path / "diff"
    config = Path(__file__).resolve().parents[2] / "backend/configs/diffusion_tiny.yaml"
    _torchrun(["train", "diffusion", "--config", str(config), f"data.source={msd / 'dataset.json'}",
               f"autoencoder={ae}", f"output_dir={out}", "max_steps=3", "checkpoint_every=3", "device=cpu"],
              tmp_path)
    assert _steps(out / "metrics.csv")[-1] == 3
    released = torch.load(out / "liver_early.pt", map_location="cpu", weights_only=True)
    assert released["step"] == 3 and set(released) >= {"model", "ema", "scaler"}


def test_segmentation_trains_under_torchrun(tmp_path, msd):
    """Stage 3 with 2 gloo processes over the seeded draw stream (one shard per rank): both ranks finish,
    rank 0 writes the split, the metrics and the checkpoint with the per-rank draw count."""
    out = tmp_path / "seg"
    config = Path(__file__).resolve().parents[2] / "backend/configs/segmentation_tiny_cpu.yaml"
    _torchrun(["train", "segmentation", "--config", str(config), f"data.real={msd / 'dataset.json'}",
               f"out_dir={out}", "roi_size=[32,32,32]", "batch_size=1", "max_steps=2", "log_every=1",
               "val_every=2", "val_overlap=0.25", "data.folds=2", "data.cache_rate=0"], tmp_path)
    assert _steps(out / "metrics.csv") == [1, 2]
    ckpt = torch.load(out / "last.pt", map_location="cpu", weights_only=False)
    assert ckpt["step"] == 2 and ckpt["draws"] == 2  # per rank: 2 steps of batch 1
    assert (out / "splits.json").is_file() and (out / "val_metrics.csv").is_file()


def test_resume_under_torchrun_equals_uninterrupted(tmp_path, msd):
    """Each rank resumes its own random stream (noise, timesteps): rank 1 used to get rank 0's saved RNG
    state, so after --resume both ranks drew the same noise and the run left the uninterrupted one."""
    from backend.checkpoint import save_checkpoint
    from backend.vqgan.model import VQGAN, VQGANConfig

    torch.manual_seed(0)
    cfg = VQGANConfig(n_hiddens=8, num_groups=8, downsample=(4, 4, 4), embedding_dim=8, n_codes=64)
    ae = tmp_path / "tiny_ae.pt"
    save_checkpoint(ae, stage="autoencoder", config={}, model_config=cfg.to_dict(), step=0,
                    model=VQGAN(cfg).state_dict())
    config = Path(__file__).resolve().parents[2] / "backend/configs/diffusion_tiny.yaml"
    common = ["train", "diffusion", "--config", str(config), f"data.source={msd / 'dataset.json'}", f"autoencoder={ae}",
              "checkpoint_every=100", "device=cpu", "optim.ema_start=0", "optim.ema_every=1"]
    _torchrun([*common, f"output_dir={tmp_path / 'full'}", "max_steps=4"], tmp_path)
    _torchrun([*common, f"output_dir={tmp_path / 'split'}", "max_steps=2"], tmp_path)
    _torchrun([*common, f"output_dir={tmp_path / 'split'}", "max_steps=4", "--resume"], tmp_path)
    full, split = (torch.load(tmp_path / d / "checkpoint_last.pt", map_location="cpu", weights_only=True)
                   for d in ("full", "split"))
    for part in ("model", "ema"):
        for k, v in full[part].items():
            assert torch.equal(v, split[part][k]), (part, k)
    assert len(split["rng_ranks"]) == 2
