"""The bad-input sweep (issue 14) over ``info``, ``synthesize``, ``weights check``, ``train`` and ``evaluate``:
the installed ``difftumor`` command on inputs wrong in every way we know of (docs/bad-inputs.md).

Every case must end with exit status 2, no ``Traceback``, at most two lines on stderr (besides progress)
naming the input (the file or the option), and its folder exactly as it was: the same files with the same
bytes (sha256), nothing new (no result, temp file or cache) wherever the command may have written (``--out``
lies inside it); an evil pickle's marker never appears. ``weights check`` is a report: a broken file there is a
finding (exit 1, named in the table), checked by :func:`test_weights_check_reports_bad_files`. The machinery
is in ``bad_input_sweep.py``; the study commands' cases are in tests/study/test_bad_study_inputs.py.
"""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from bad_input_sweep import (
    MARKER,
    REPO,
    Spec,
    build_kit,
    case_pair,
    cut,
    difftumor,
    evil_torch_file,
    image,
    matplotlib_cache,
    msd_pair,
    phantom,
    registry,
    snapshot,
    sweep_tests,
)

CASES, case = registry()


def synth(ct: Path, seg: Path, out: Path, *extra: str) -> list[str]:
    return ["synthesize", "--ct", str(ct), "--organs", str(seg), "--organ", "liver", *extra, "--out", str(out)]


# ----------------------------------------------------------------------------------------------- info

@case("info-zero-byte")
def _(w, kit):
    p = w / "empty.nii.gz"
    p.write_bytes(b"")
    return Spec(["info", str(p)], (p.name,))


@case("info-truncated-gzip-real-ct")
def _(w, kit):
    p = cut(kit / "real_crop.nii.gz", w / "cut.nii.gz", 0.7)
    return Spec(["info", str(p)], (p.name,))


@case("info-gzip-bad-crc")
def _(w, kit):
    data = bytearray((kit / "real_crop.nii.gz").read_bytes())
    data[-8] ^= 0xFF  # the trailer's CRC no longer matches the data
    p = w / "crc.nii.gz"
    p.write_bytes(bytes(data))
    return Spec(["info", str(p)], (p.name,))


@case("info-truncated-raw-nii")
def _(w, kit):
    full = image(w / "full.nii", phantom()[0])
    p = cut(full, w / "cut.nii", 0.5)
    full.unlink()
    return Spec(["info", str(p)], (p.name,))


@case("info-truncated-mha")
def _(w, kit):
    full = image(w / "full.mha", phantom()[0])
    p = cut(full, w / "cut.mha", 0.5)
    full.unlink()
    return Spec(["info", str(p)], (p.name,))


@case("info-mhd-without-raw")
def _(w, kit):
    p = w / "vol.mhd"
    sitk.WriteImage(sitk.GetImageFromArray(phantom()[0]), str(p))
    for raw in w.glob("vol.*raw"):
        raw.unlink()
    return Spec(["info", str(p)], (p.name, "vol.raw"))


@case("info-truncated-nrrd")
def _(w, kit):
    full = image(w / "full.nrrd", phantom()[0])
    p = cut(full, w / "cut.nrrd", 0.5)
    full.unlink()
    return Spec(["info", str(p)], (p.name,))


@case("info-png-renamed-nii-gz")
def _(w, kit):
    png = w / "slice.png"
    sitk.WriteImage(sitk.GetImageFromArray(np.arange(64, dtype=np.uint8).reshape(8, 8)), str(png))
    p = w / "scan.nii.gz"
    png.rename(p)
    return Spec(["info", str(p)], (p.name,))


@case("info-gzip-of-text")
def _(w, kit):
    p = w / "notes.nii.gz"
    p.write_bytes(gzip.compress(b"patient notes, not an image\n" * 40))
    return Spec(["info", str(p)], (p.name,))


@case("info-2d-image")
def _(w, kit):
    p = image(w / "flat.nii.gz", np.zeros((16, 16), np.int16))
    return Spec(["info", str(p)], (p.name,))


@case("info-4d-image")
def _(w, kit):
    p = w / "four.nii.gz"
    sitk.WriteImage(sitk.Image([6, 6, 4, 3], sitk.sitkInt16), str(p))
    return Spec(["info", str(p)], (p.name,))


@case("info-empty-folder")
def _(w, kit):
    (w / "dicom").mkdir()
    return Spec(["info", str(w / "dicom")], ("dicom",))


# ----------------------------------------------------------------------------------------- synthesize

@case("synth-labels-given-as-ct")
def _(w, kit):
    ct, seg = case_pair(w)
    return Spec(synth(seg, seg, w / "out"), (seg.name,))


@case("synth-ct-given-as-labels")
def _(w, kit):
    ct, seg = case_pair(w)
    return Spec(synth(ct, ct, w / "out"), (ct.name, "--organs"))


@case("synth-ct-scaled-to-unit")
def _(w, kit):
    a, s = phantom()
    ct, seg = case_pair(w, ct=((a.astype(np.float32) + 1000) / 2000))
    return Spec(synth(ct, seg, w / "out"), (ct.name,))


@case("synth-ct-mr-like-intensities")
def _(w, kit):
    a, s = phantom()
    mr = np.random.default_rng(1).uniform(0, 3000, a.shape).astype(np.uint16)  # no air at -1000, no HU at all
    ct, seg = case_pair(w, ct=mr)
    return Spec(synth(ct, seg, w / "out"), (ct.name,))


@case("synth-ct-with-nan")
def _(w, kit):
    a = phantom()[0].astype(np.float32)
    a[10, 16, 16:20] = np.nan
    ct, seg = case_pair(w, ct=a)
    return Spec(synth(ct, seg, w / "out"), (ct.name,))


@case("synth-ct-with-inf")
def _(w, kit):
    a = phantom()[0].astype(np.float32)
    a[10, 16, 16] = np.inf
    ct, seg = case_pair(w, ct=a)
    return Spec(synth(ct, seg, w / "out"), (ct.name,))


@case("synth-ct-constant")
def _(w, kit):
    ct, seg = case_pair(w, ct=np.full((20, 32, 32), 40, np.int16))
    return Spec(synth(ct, seg, w / "out"), (ct.name,))


@case("synth-ct-truncated-gzip")
def _(w, kit):
    ct, seg = case_pair(w)
    cut(kit / "real_crop.nii.gz", ct, 0.6)
    return Spec(synth(ct, seg, w / "out"), (ct.name,))


@case("synth-grid-mismatch-size")
def _(w, kit):
    ct, _ = case_pair(w)
    seg = image(w / "small_seg.nii.gz", np.full((20, 30, 32), 5, np.uint8))
    return Spec(synth(ct, seg, w / "out"), (seg.name, ct.name))


@case("synth-grid-mismatch-spacing")
def _(w, kit):
    ct, _ = case_pair(w)
    seg = image(w / "other_seg.nii.gz", phantom()[1], spacing=(1.0, 1.0, 1.0))
    return Spec(synth(ct, seg, w / "out"), (seg.name, ct.name))


@case("synth-organ-absent")
def _(w, kit):
    ct, seg = case_pair(w, seg=np.where(phantom()[1] == 5, 2, 0).astype(np.uint8))  # kidney_right only
    return Spec(synth(ct, seg, w / "out"), ("liver", seg.name))


@case("synth-organs-all-zero")
def _(w, kit):
    ct, seg = case_pair(w, seg=np.zeros((20, 32, 32), np.uint8))
    return Spec(synth(ct, seg, w / "out"), ("liver", seg.name))


@case("synth-tumor-mask-outside-organ")
def _(w, kit):
    ct, seg = case_pair(w)
    m = np.zeros((20, 32, 32), np.uint8)
    m[1:3, 1:3, 1:3] = 1  # in the air, far from the liver
    mask = image(w / "tumor.nii.gz", m)
    return Spec(synth(ct, seg, w / "out", "--tumor-mask", str(mask)), (mask.name,))


@case("synth-tumor-mask-empty")
def _(w, kit):
    ct, seg = case_pair(w)
    mask = image(w / "tumor.nii.gz", np.zeros((20, 32, 32), np.uint8))
    return Spec(synth(ct, seg, w / "out", "--tumor-mask", str(mask)), (mask.name,))


@case("synth-center-outside-image")
def _(w, kit):
    ct, seg = case_pair(w)
    return Spec(synth(ct, seg, w / "out", "--center", "0,0,900", "--radii", "5,5,5"), ("--center",))


@case("synth-count-negative")
def _(w, kit):
    ct, seg = case_pair(w)
    return Spec(synth(ct, seg, w / "out", "--count", "-3"), ("--count",))


@case("synth-count-zero")
def _(w, kit):
    ct, seg = case_pair(w)
    return Spec(synth(ct, seg, w / "out", "--count", "0"), ("--count",))


@case("synth-count-huge")
def _(w, kit):
    ct, seg = case_pair(w)
    return Spec(synth(ct, seg, w / "out", "--size", "small", "--count", "10000"), ("--count", "the liver is"))


@case("synth-count-not-a-number")
def _(w, kit):
    ct, seg = case_pair(w)
    return Spec(synth(ct, seg, w / "out", "--count", "three"), ("--count",))


@case("synth-radii-negative")
def _(w, kit):
    ct, seg = case_pair(w)
    return Spec(synth(ct, seg, w / "out", "--center", "16,16,10", "--voxel", "--radii", "5,-5,5"), ("--radii",))


@case("synth-radii-nan")
def _(w, kit):
    ct, seg = case_pair(w)
    return Spec(synth(ct, seg, w / "out", "--center", "16,16,10", "--voxel", "--radii", "5,nan,5"), ("--radii",))


@case("synth-center-inf")
def _(w, kit):
    ct, seg = case_pair(w)
    return Spec(synth(ct, seg, w / "out", "--center", "inf,16,10", "--voxel", "--radii", "5,5,5"), ("--center",))


@case("synth-radii-two-values")
def _(w, kit):
    ct, seg = case_pair(w)
    return Spec(synth(ct, seg, w / "out", "--center", "16,16,10", "--voxel", "--radii", "5,5"), ("--radii",))


@case("synth-irregularity-above-one")
def _(w, kit):
    ct, seg = case_pair(w)
    return Spec(synth(ct, seg, w / "out", "--center", "16,16,10", "--voxel", "--radii", "5,5,5",
                      "--irregularity", "2"), ("--irregularity",))


@case("synth-sigma-negative")
def _(w, kit):
    ct, seg = case_pair(w)
    return Spec(synth(ct, seg, w / "out", "--sigma", "-1"), ("--sigma",))


@case("synth-ddim-steps-zero")
def _(w, kit):
    ct, seg = case_pair(w)
    return Spec(synth(ct, seg, w / "out", "--ddim-steps", "0"), ("--ddim-steps",))


@case("synth-organ-label-negative")
def _(w, kit):
    ct, seg = case_pair(w)
    return Spec(synth(ct, seg, w / "out", "--organ-label", "-5"), ("--organ-label", seg.name))


@case("synth-organ-label-absent")
def _(w, kit):
    ct, seg = case_pair(w)
    return Spec(synth(ct, seg, w / "out", "--organ-label", "9"), ("--organ-label", "9", seg.name))


@case("synth-shard-out-of-range")
def _(w, kit):
    case_pair(w / "cts", "a")
    return Spec(["synthesize", "--ct", str(w / "cts"), "--organs", str(w / "cts"), "--organ", "liver",
                 "--shard", "3/2", "--out", str(w / "out")], ("--shard",))


@case("synth-n-zero")
def _(w, kit):
    case_pair(w / "cts", "a")
    return Spec(["synthesize", "--ct", str(w / "cts"), "--organs", str(w / "cts"), "--organ", "liver",
                 "--n", "0", "--out", str(w / "out")], ("--n",))


@case("synth-out-is-the-ct-folder-overwrite")
def _(w, kit):
    a, s = phantom()
    ct = image(w / "data" / "ct.nii.gz", a)  # the name synthesize writes
    seg = image(w / "data" / "label.nii.gz", s)
    return Spec(synth(ct, seg, w / "data", "--overwrite"), ("--out", str(w / "data")))


@case("synth-out-is-a-file")
def _(w, kit):
    ct, seg = case_pair(w)
    (w / "notes.txt").write_text("mine\n")
    return Spec(synth(ct, seg, w / "notes.txt"), ("notes.txt",))


@case("synth-out-read-only-folder")
def _(w, kit):
    if os.geteuid() == 0:
        pytest.skip("runs as root: a read-only folder does not stop root's writes")
    ct, seg = case_pair(w)
    (w / "ro").mkdir()
    (w / "ro").chmod(0o555)
    return Spec(synth(ct, seg, w / "ro" / "out"), ("ro",))


@case("synth-weights-evil-pickle-zip")
def _(w, kit):
    ct, seg = case_pair(w)
    (w / "weights").mkdir()
    shutil.copy(kit / "weights" / "AutoencoderModel.ckpt", w / "weights")
    evil_torch_file(w / "weights" / "liver_early.pt")
    return Spec(synth(ct, seg, w / "out", "--method", "diffusion", "--stage", "early", "--weights", str(w / "weights"),
                      "--device", "cpu"), ("liver_early.pt",))


@case("synth-weights-evil-pickle-legacy-ckpt")
def _(w, kit):
    ct, seg = case_pair(w)
    (w / "weights").mkdir()
    shutil.copy(kit / "weights" / "liver_early.pt", w / "weights")
    evil_torch_file(w / "weights" / "AutoencoderModel.ckpt", zip_format=False)
    return Spec(synth(ct, seg, w / "out", "--method", "diffusion", "--stage", "early", "--weights", str(w / "weights"),
                      "--device", "cpu"), ("AutoencoderModel.ckpt",))


@case("synth-weights-autoencoder-mismatch")
def _(w, kit):
    ct, seg = case_pair(w)
    shutil.copytree(kit / "weights", w / "weights")
    shutil.copy(kit / "other_ae.ckpt", w / "weights" / "AutoencoderModel.ckpt")
    return Spec(synth(ct, seg, w / "out", "--method", "diffusion", "--stage", "early", "--weights", str(w / "weights"),
                      "--device", "cpu"), ("AutoencoderModel.ckpt", "liver_early.pt"))


@case("synth-weights-T-contradicts-name")
def _(w, kit):
    ct, seg = case_pair(w)
    shutil.copytree(kit / "weights", w / "weights")
    shutil.copy(kit / "t4_early.pt", w / "weights" / "liver_noearly.pt")
    return Spec(synth(ct, seg, w / "out", "--method", "diffusion", "--stage", "mid_late", "--weights",
                      str(w / "weights"), "--device", "cpu"), ("liver_noearly.pt",))


@case("synth-weights-ema-not-a-dict")
def _(w, kit):
    import torch

    ct, seg = case_pair(w)
    shutil.copytree(kit / "weights", w / "weights")
    blob = torch.load(w / "weights" / "liver_early.pt", weights_only=True)
    blob["ema"] = [t for t in blob["ema"].values()][:3]  # the tensors without their names
    torch.save(blob, w / "weights" / "liver_early.pt")
    return Spec(synth(ct, seg, w / "out", "--method", "diffusion", "--stage", "early", "--weights", str(w / "weights"),
                      "--device", "cpu"), ("liver_early.pt",), says="its 'ema' entry is a list, not a dict")


@case("synth-out-name-too-long")
def _(w, kit):
    ct, seg = case_pair(w)
    return Spec(synth(ct, seg, w / ("o" * 300)), ("o" * 300,), says="the name is too long")


@case("synth-weights-folder-is-a-file")
def _(w, kit):
    ct, seg = case_pair(w)
    (w / "weights.zip").write_bytes(b"PK\x03\x04")
    return Spec(synth(ct, seg, w / "out", "--method", "diffusion", "--weights", str(w / "weights.zip")),
                ("weights.zip", "--weights"))


# -------------------------------------------------------------------------------------- weights check

@case("weights-check-folder-is-a-file")
def _(w, kit):
    (w / "w.bin").write_bytes(b"x")
    return Spec(["weights", "check", str(w / "w.bin")], ("w.bin",))


@case("weights-check-folder-absent")
def _(w, kit):
    return Spec(["weights", "check", str(w / "nowhere")], ("nowhere",))


# --------------------------------------------------------------------------------------------- train

def _tiny_data(w: Path, n: int = 2) -> Path:
    """A list file of ``n`` MSD-style cases (CT, label with organ 1 and tumour 2)."""
    rows = [",".join(str(p) for p in msd_pair(w / "data", f"c{i}", seed=i)) for i in range(n)]
    (w / "data" / "list.txt").write_text("\n".join(rows) + "\n")
    return w / "data" / "list.txt"


def train_ae(w: Path, *overrides: str, config: Path | None = None) -> list[str]:
    cfg = config or (REPO / "backend" / "configs" / "autoencoder_tiny.yaml")
    return ["train", "autoencoder", "--config", str(cfg), f"output_dir={w / 'run'}", "max_steps=2",
            *overrides]


@case("train-ae-config-not-utf8")
def _(w, kit):
    p = w / "cfg.yaml"
    p.write_bytes("max_steps: 10  # r\xe9glage\n".encode("latin-1"))
    return Spec(train_ae(w, config=p), (p.name,))


@case("train-ae-config-bad-yaml")
def _(w, kit):
    p = w / "cfg.yaml"
    p.write_text("model: {n_hiddens: 8\noptim: [\n")
    return Spec(train_ae(w, config=p), (p.name,))


@case("train-ae-config-python-tag")
def _(w, kit):
    p = w / "cfg.yaml"
    p.write_text(f"max_steps: !!python/object/apply:builtins.open ['{w / MARKER}', 'w']\n")
    return Spec(train_ae(w, config=p), (p.name,))


@case("train-ae-config-unknown-key")
def _(w, kit):
    p = w / "cfg.yaml"
    p.write_text("max_step: 10\n")
    return Spec(train_ae(w, config=p), ("max_step",))


@case("train-ae-config-a-list")
def _(w, kit):
    p = w / "cfg.yaml"
    p.write_text("- max_steps\n- 10\n")
    return Spec(train_ae(w, config=p), (p.name,))


@case("train-ae-config-absent")
def _(w, kit):
    return Spec(train_ae(w, config=w / "missing.yaml"), ("missing.yaml",))


@case("train-ae-lr-negative")
def _(w, kit):
    return Spec(train_ae(w, f"data.source={_tiny_data(w)}", "optim.lr=-1"), ("optim.lr",))


@case("train-ae-lr-nan")
def _(w, kit):
    return Spec(train_ae(w, f"data.source={_tiny_data(w)}", "optim.lr=.nan"), ("optim.lr",))


@case("train-ae-lr-inf")
def _(w, kit):
    return Spec(train_ae(w, f"data.source={_tiny_data(w)}", "optim.lr=inf"), ("optim.lr",))


@case("train-ae-max-steps-zero")
def _(w, kit):
    return Spec(train_ae(w, f"data.source={_tiny_data(w)}", "max_steps=0"), ("max_steps",))


@case("train-ae-max-steps-not-a-number")
def _(w, kit):
    return Spec(train_ae(w, f"data.source={_tiny_data(w)}", "max_steps=ten"), ("max_steps",))


@case("train-ae-crop-size-huge")
def _(w, kit):
    return Spec(train_ae(w, f"data.source={_tiny_data(w)}", "data.crop_size=[100000,100000,100000]"),
                ("crop_size",))


@case("train-ae-data-source-absent")
def _(w, kit):
    return Spec(train_ae(w, f"data.source={w / 'nodata'}"), ("nodata",))


@case("train-ae-data-zero-byte-ct")
def _(w, kit):
    lst = _tiny_data(w, 1)  # the only case (a dataset with one bad file among good ones skips it with a warning)
    first = Path(lst.read_text().split(",")[0])
    first.write_bytes(b"")
    return Spec(train_ae(w, f"data.source={lst}"), (first.name,))


@case("train-ae-data-truncated-ct")
def _(w, kit):
    lst = _tiny_data(w, 1)
    first = Path(lst.read_text().split(",")[0])
    cut(kit / "real_crop.nii.gz", first, 0.5)
    return Spec(train_ae(w, f"data.source={lst}"), (first.name,))


@case("train-ae-output-dir-name-too-long")
def _(w, kit):
    return Spec(train_ae(w, f"data.source={_tiny_data(w)}", f"output_dir={w / ('r' * 300)}"), ("r" * 300,),
                says="the name is too long")


@case("train-ae-resume-evil-pickle")
def _(w, kit):
    evil = evil_torch_file(w / "checkpoint_last.pt", key="model")
    return Spec(train_ae(w, f"data.source={_tiny_data(w)}") + ["--resume", str(evil)], (evil.name,))


def train_diff(w: Path, *overrides: str) -> list[str]:
    return ["train", "diffusion", "--config", str(REPO / "backend" / "configs" / "diffusion_tiny.yaml"),
            f"output_dir={w / 'run'}", "max_steps=2",
            *overrides]


@case("train-diffusion-autoencoder-evil-pickle")
def _(w, kit):
    evil = evil_torch_file(w / "AutoencoderModel.ckpt", key="state_dict")
    return Spec(train_diff(w, f"data.source={_tiny_data(w)}", f"autoencoder={evil}"), (evil.name,))


@case("train-diffusion-autoencoder-truncated")
def _(w, kit):
    cut(kit / "weights" / "AutoencoderModel.ckpt", w / "AutoencoderModel.ckpt", 0.5)
    return Spec(train_diff(w, f"data.source={_tiny_data(w)}", f"autoencoder={w / 'AutoencoderModel.ckpt'}"),
                ("AutoencoderModel.ckpt",))


@case("train-diffusion-autoencoder-mismatches-model")
def _(w, kit):
    shutil.copy(kit / "weights" / "AutoencoderModel.ckpt", w / "ae.ckpt")
    return Spec(train_diff(w, f"data.source={_tiny_data(w)}", f"autoencoder={w / 'ae.ckpt'}", "model.out_dim=4",
                           "model.channels=9"), ("ae.ckpt", "out_dim"))


@case("train-diffusion-organ-label-absent")
def _(w, kit):
    shutil.copy(kit / "weights" / "AutoencoderModel.ckpt", w / "ae.ckpt")
    return Spec(train_diff(w, f"data.source={_tiny_data(w, 1)}", f"autoencoder={w / 'ae.ckpt'}",
                           "data.organ_labels=[7]"),
                ("organ_labels", "7"))


@case("train-diffusion-batch-size-zero")
def _(w, kit):
    shutil.copy(kit / "weights" / "AutoencoderModel.ckpt", w / "ae.ckpt")
    return Spec(train_diff(w, f"data.source={_tiny_data(w)}", f"autoencoder={w / 'ae.ckpt'}", "data.batch_size=0"),
                ("batch_size",))


def train_seg(w: Path, *overrides: str) -> list[str]:
    return ["train", "segmentation", "--config", str(REPO / "backend" / "configs" / "segmentation_tiny_cpu.yaml"),
            f"out_dir={w / 'run'}", "max_steps=2", *overrides]


@case("train-seg-list-names-missing-file")
def _(w, kit):
    lst = _tiny_data(w)
    lst.write_text(lst.read_text() + f"{w / 'data' / 'ghost.nii.gz'},{w / 'data' / 'ghost_label.nii.gz'}\n")
    return Spec(train_seg(w, f"data.real={lst}"), ("ghost.nii.gz", lst.name))


@case("train-seg-list-not-utf8")
def _(w, kit):
    lst = w / "list.txt"
    lst.write_bytes(b"\xff\xfeim\x00a\x00g\x00e\x00")
    return Spec(train_seg(w, f"data.real={lst}"), (lst.name,))


@case("train-seg-list-empty")
def _(w, kit):
    lst = w / "list.txt"
    lst.write_text("# no cases yet\n")
    return Spec(train_seg(w, f"data.real={lst}"), (lst.name,))


@case("train-seg-fold-out-of-range")
def _(w, kit):
    return Spec(train_seg(w, f"data.real={_tiny_data(w)}", "data.fold=7"), ("fold",))


@case("train-seg-resume-evil-pickle")
def _(w, kit):
    evil = evil_torch_file(w / "last.pt", key="model")
    return Spec(train_seg(w, f"data.real={_tiny_data(w)}") + ["--resume", str(evil)], (evil.name,))


# ------------------------------------------------------------------------------------------ evaluate

def _eval_pair(w: Path) -> tuple[Path, Path]:
    """pred/ and label/ folders with one case each (MSD labels: 1 organ, 2 tumour)."""
    _, lab = msd_pair(w, "case1")
    (w / "pred").mkdir()
    shutil.copy(lab, w / "pred" / "case1.nii.gz")
    return w / "pred", w / "labels"


@case("eval-pred-truncated")
def _(w, kit):
    pred, label = _eval_pair(w)
    cut(label / "case1.nii.gz", pred / "case1.nii.gz", 0.5)
    return Spec(["evaluate", "--pred", str(pred), "--label", str(label), "--out", str(w / "eval")], ("case1.nii.gz",))


@case("eval-label-zero-byte")
def _(w, kit):
    pred, label = _eval_pair(w)
    (label / "case1.nii.gz").write_bytes(b"")
    return Spec(["evaluate", "--pred", str(pred), "--label", str(label), "--out", str(w / "eval")], ("case1.nii.gz",))


@case("eval-grid-mismatch")
def _(w, kit):
    pred, label = _eval_pair(w)
    image(pred / "case1.nii.gz", np.zeros((20, 32, 30), np.uint8))
    return Spec(["evaluate", "--pred", str(pred), "--label", str(label), "--out", str(w / "eval")], ("case1",))


@case("eval-ct-given-as-prediction")
def _(w, kit):
    pred, label = _eval_pair(w)
    image(pred / "case1.nii.gz", phantom()[0])
    return Spec(["evaluate", "--pred", str(pred), "--label", str(label), "--out", str(w / "eval")],
                ("case1", str(pred)))


@case("eval-no-pairs")
def _(w, kit):
    pred, label = _eval_pair(w)
    (pred / "case1.nii.gz").unlink()
    return Spec(["evaluate", "--pred", str(pred), "--label", str(label), "--out", str(w / "eval")],
                (str(pred), str(label), "--pred"))


@case("eval-out-inside-label-folder")
def _(w, kit):
    pred, label = _eval_pair(w)
    return Spec(["evaluate", "--pred", str(pred), "--label", str(label), "--out", str(label / "eval")], ("--out",))


@case("eval-out-holds-a-user-file")
def _(w, kit):
    pred, label = _eval_pair(w)
    (w / "eval").mkdir()
    (w / "eval" / "cases.csv").write_text("my own notes, not an earlier evaluation\n")
    return Spec(["evaluate", "--pred", str(pred), "--label", str(label), "--out", str(w / "eval")], ("cases.csv",))


@case("eval-out-name-too-long")
def _(w, kit):
    pred, label = _eval_pair(w)
    return Spec(["evaluate", "--pred", str(pred), "--label", str(label), "--out", str(w / ("e" * 300))], ("e" * 300,),
                says="too long")


@case("eval-tolerance-negative")
def _(w, kit):
    pred, label = _eval_pair(w)
    return Spec(["evaluate", "--pred", str(pred), "--label", str(label), "--tolerance-mm", "-2",
                 "--out", str(w / "eval")], ("--tolerance-mm",))


@case("eval-tolerance-nan")
def _(w, kit):
    pred, label = _eval_pair(w)
    return Spec(["evaluate", "--pred", str(pred), "--label", str(label), "--tolerance-mm", "nan",
                 "--out", str(w / "eval")], ("--tolerance-mm",))


@case("eval-min-dice-above-one")
def _(w, kit):
    pred, label = _eval_pair(w)
    return Spec(["evaluate", "--pred", str(pred), "--label", str(label), "--detection-min-dice", "1.5",
                 "--out", str(w / "eval")], ("--detection-min-dice",))


@case("eval-tumor-label-absent")
def _(w, kit):
    pred, label = _eval_pair(w)
    return Spec(["evaluate", "--pred", str(pred), "--label", str(label), "--tumor-label", "9",
                 "--out", str(w / "eval")], ("--tumor-label",))


@case("eval-folds-csv-broken")
def _(w, kit):
    pred, label = _eval_pair(w)
    (w / "folds.csv").write_text("case,which\ncase1,zero\n")
    return Spec(["evaluate", "--pred", str(pred), "--label", str(label), "--folds", str(w / "folds.csv"),
                 "--out", str(w / "eval")], ("folds.csv",))


@case("eval-model-evil-pickle")
def _(w, kit):
    evil = evil_torch_file(w / "best.pt", key="model")
    _tiny_data(w)
    return Spec(["evaluate", "--model", str(evil), "--data", str(w / "data" / "list.txt"), "--device", "cpu",
                 "--out", str(w / "eval")], (evil.name,))


@case("eval-model-is-a-diffusion-file")
def _(w, kit):
    shutil.copy(kit / "weights" / "liver_early.pt", w / "liver_early.pt")
    _tiny_data(w)
    return Spec(["evaluate", "--model", str(w / "liver_early.pt"), "--data", str(w / "data" / "list.txt"),
                 "--device", "cpu", "--out", str(w / "eval")], ("liver_early.pt",))


@case("eval-overlap-one")
def _(w, kit):
    _tiny_data(w)
    shutil.copy(kit / "weights" / "liver_early.pt", w / "m.pt")
    return Spec(["evaluate", "--model", str(w / "m.pt"), "--data", str(w / "data" / "list.txt"), "--overlap", "1",
                 "--out", str(w / "eval")], ("--overlap",))


sweep, test_bad_input = sweep_tests(CASES)


def test_the_sweep_has_enough_distinct_inputs():
    assert len(CASES) >= 40
    for prefix in ("info-", "synth-", "weights-", "train-ae-", "train-diffusion-", "train-seg-", "eval-"):
        assert any(cid.startswith(prefix) for cid in CASES), prefix


def test_evil_payloads_are_live(tmp_path):
    """The payloads are real: loading them the unsafe way does create the marker (so the sweep can fail)."""
    import torch
    import yaml

    for zip_format in (True, False):
        d = tmp_path / f"zip{zip_format}"
        p = evil_torch_file(d / "x.pt", zip_format=zip_format)
        torch.load(p, weights_only=False)
        assert (d / MARKER).is_file()
    yaml_dir = tmp_path / "yaml"
    yaml_dir.mkdir()
    yaml.unsafe_load(f"max_steps: !!python/object/apply:builtins.open ['{yaml_dir / MARKER}', 'w']\n")
    assert (yaml_dir / MARKER).is_file()


def _weights_check(exe: str, folder: Path, home: Path) -> subprocess.CompletedProcess:
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("DIFFTUMOR_WEIGHTS")},
           "PYTHONPATH": str(REPO), "XDG_CONFIG_HOME": str(home / "config"), "XDG_CACHE_HOME": str(home / "cache"),
           "OMP_NUM_THREADS": "1", "MPLCONFIGDIR": matplotlib_cache()}
    return subprocess.run([exe, "weights", "check", str(folder)], env=env, capture_output=True, text=True, timeout=240)


def test_weights_check_reports_bad_files(tmp_path):
    """``weights check`` is a report: evil, mismatched and mislabelled files are findings (exit 1), each named in
    the table with a one-line reason; nothing runs, nothing is written into the folder."""
    exe = difftumor()
    if exe is None:
        pytest.skip("the difftumor console script is not installed (pip install -e .)")
    kit = build_kit(tmp_path / "kit")
    folders = {}
    f = folders["evil"] = tmp_path / "evil"
    shutil.copytree(kit / "weights", f)
    evil_torch_file(f / "liver_early.pt")
    evil_torch_file(f / "liver_noearly.pt", zip_format=False)
    f = folders["mismatch"] = tmp_path / "mismatch"
    shutil.copytree(kit / "weights", f)
    shutil.copy(kit / "other_ae.ckpt", f / "AutoencoderModel.ckpt")
    f = folders["T"] = tmp_path / "T"
    shutil.copytree(kit / "weights", f)
    shutil.copy(kit / "t4_early.pt", f / "liver_noearly.pt")
    for kind, folder in folders.items():
        before = snapshot(folder)
        proc = _weights_check(exe, folder, tmp_path / "home")
        shown = f"{kind}: exit {proc.returncode}\n{proc.stderr}\n{proc.stdout}"
        assert proc.returncode == 1, shown
        assert "Traceback" not in proc.stdout + proc.stderr, shown
        assert not (folder / MARKER).exists(), shown
        assert snapshot(folder) == before, shown
        bad = [line for line in proc.stdout.splitlines() if "BROKEN" in line or "INCOMPATIBLE" in line]
        assert bad, shown
        assert "liver" in proc.stdout and "ready for: nothing" in proc.stdout or kind != "evil", shown
