"""The bad-input sweep (issue 14): the installed ``difftumor`` command, run as a user runs it, on inputs that are
wrong in every way we know of, across every subcommand.

Every case must end with exit status 2, no ``Traceback``, at most two lines on stderr naming the input (the
file or the option), and its folder exactly as it was: the same files with the same bytes (sha256), nothing
new — no result, no temp file, no cache — wherever the command may have written (``--out`` lies inside it).
Evil pickles would create ``PWNED`` when unpickled: it must never appear.

Each case is a builder ``(w, kit) -> Spec`` writing its inputs into its own folder ``w``. The module fixture
builds the selected cases, runs them two or three at a time (each run is mostly Python/torch start-up) and
the parametrised test checks one case's result. ``weights check`` is a report: a broken file there is a
finding (exit 1, named in the table), checked by :func:`test_weights_check_reports_bad_files`.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[2]
MARKER = "PWNED"  # what an evil pickle's payload would create in its case folder


def _difftumor() -> str | None:
    beside = Path(sys.executable).with_name("difftumor")
    return shutil.which("difftumor") or (str(beside) if beside.is_file() else None)


# ---------------------------------------------------------------------------------------------- inputs


def image(path: Path, arr, spacing=(2.0, 2.0, 3.0), origin=(0.0, 0.0, 0.0)) -> Path:
    """Write ``arr`` (z, y, x) with SimpleITK (compressed when the name ends in .gz)."""
    img = sitk.GetImageFromArray(np.asarray(arr))
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path), useCompression=path.name.endswith(".gz"))
    return path


def phantom(seed: int = 0, shape=(20, 32, 32)):
    """A tiny int16 CT (air, a 40 HU body, a 60 HU liver) and its TotalSegmentator label map (liver = 5)."""
    rng = np.random.default_rng(seed)
    ct = rng.normal(-1000, 10, shape)
    seg = np.zeros(shape, np.uint8)
    ct[2:-2, 3:-3, 3:-3] = rng.normal(40, 10, (shape[0] - 4, shape[1] - 6, shape[2] - 6))
    seg[4:16, 8:24, 8:24] = 5
    ct[seg == 5] = rng.normal(60, 8, int((seg == 5).sum()))
    return ct.astype(np.int16), seg


def case_pair(w: Path, name="ct", seed=0, ct=None, seg=None, **kw) -> tuple[Path, Path]:
    a, s = phantom(seed)
    return image(w / f"{name}.nii.gz", a if ct is None else ct, **kw), image(w / f"{name}_seg.nii.gz", s if seg is None else seg, **kw)


def msd_pair(w: Path, name="case", seed=0, tumor=True) -> tuple[Path, Path]:
    """A CT and its MSD-style label (1 organ, 2 tumour), as the diffusion and segmentation trainers read them."""
    a, s = phantom(seed)
    lab = np.where(s == 5, 1, 0).astype(np.uint8)
    if tumor:
        lab[8:11, 14:18, 14:18] = 2
    return image(w / "images" / f"{name}.nii.gz", a), image(w / "labels" / f"{name}.nii.gz", lab)


def cut(src: Path, dst: Path, keep: float = 0.6) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * keep)])
    return dst


def pickle_payload(marker: Path):
    """An object whose unpickling calls ``open(marker, "w")``: the file appears iff the pickle ran code."""

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    return Evil()


def evil_torch_file(path: Path, *, zip_format: bool = True, key: str = "ema") -> Path:
    """A file that looks like weights (a dict with ``key``) and runs code when loaded with weights_only=False."""
    import torch

    blob = {key: {"x": pickle_payload(path.parent / MARKER)}, "step": 1}
    path.parent.mkdir(parents=True, exist_ok=True)
    if zip_format:
        torch.save(blob, path)
    else:  # torch's legacy (pre-1.6, not zip) format, which .ckpt files of that time use
        torch.save(blob, path, _use_new_zipfile_serialization=False)
    return path


@dataclass
class Spec:
    args: list[str]
    names: tuple[str, ...]  # stderr names at least one of these (the input or the option)
    code: int = 2
    says: str = ""  # and says this (where an earlier message was not one a user could act on)


@dataclass
class Result:
    spec: Spec | None = None
    skip: str | None = None
    folder: Path | None = None
    before: dict = field(default_factory=dict)
    after: dict = field(default_factory=dict)
    returncode: int | None = None
    stdout: str = ""
    stderr: str = ""
    seconds: float = 0.0


CASES: dict[str, Callable[[Path, Path], Spec]] = {}


def case(case_id: str):
    def register(build):
        assert case_id not in CASES, case_id
        CASES[case_id] = build
        return build
    return register


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
    return Spec(train_ae(w, f"data.source={_tiny_data(w)}", f"output_dir={w / ('r' * 300)}"), ("r" * 300,), says="the name is too long")


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
    return Spec(["evaluate", "--pred", str(pred), "--label", str(label), "--out", str(w / ("e" * 300))], ("e" * 300,), says="too long")


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


# --------------------------------------------------------------------------------------------- study

def _study_sources(w: Path) -> tuple[Path, Path]:
    for kind in ("real", "syn"):
        for i in range(2):
            image(w / kind / f"{kind}{i}.nii.gz", phantom(i + (kind == "syn") * 10)[0])
    return w / "real", w / "syn"


def study_create(real, syn, out, *extra) -> list[str]:
    return ["study", "create", "--real", str(real), "--synthetic", str(syn), "--out", str(out), *extra]


@case("study-real-folder-empty")
def _(w, kit):
    real, syn = _study_sources(w)
    shutil.rmtree(real)
    real.mkdir()
    return Spec(study_create(real, syn, w / "study"), (str(real), "--real"))


@case("study-synthetic-truncated")
def _(w, kit):
    real, syn = _study_sources(w)
    cut(kit / "real_crop.nii.gz", syn / "syn0.nii.gz", 0.5)
    return Spec(study_create(real, syn, w / "study"), ("syn0.nii.gz",))


@case("study-real-label-map")
def _(w, kit):
    real, syn = _study_sources(w)
    image(real / "real0.nii.gz", phantom()[1])
    return Spec(study_create(real, syn, w / "study"), ("real0.nii.gz",))


@case("study-csv-missing-image-column")
def _(w, kit):
    real, syn = _study_sources(w)
    (w / "real.csv").write_text("path,organ\nreal/real0.nii.gz,liver\n")
    return Spec(study_create(w / "real.csv", syn, w / "study"), ("real.csv",))


@case("study-csv-names-absent-file")
def _(w, kit):
    real, syn = _study_sources(w)
    (w / "real.csv").write_text("image\nreal/real0.nii.gz\nreal/ghost.nii.gz\n")
    return Spec(study_create(w / "real.csv", syn, w / "study"), ("ghost.nii.gz", "real.csv"))


@case("study-spacing-negative")
def _(w, kit):
    real, syn = _study_sources(w)
    return Spec(study_create(real, syn, w / "study", "--spacing", "-1"), ("--spacing",))


@case("study-roi-size-zero")
def _(w, kit):
    real, syn = _study_sources(w)
    return Spec(study_create(real, syn, w / "study", "--roi-size", "0,160,96"), ("--roi-size",))


@case("study-window-reversed")
def _(w, kit):
    real, syn = _study_sources(w)
    return Spec(study_create(real, syn, w / "study", "--window", "240,-160"), ("--window",))


@case("study-readers-empty")
def _(w, kit):
    real, syn = _study_sources(w)
    return Spec(study_create(real, syn, w / "study", "--readers", ","), ("--readers",))


@case("study-out-inside-real-folder")
def _(w, kit):
    real, syn = _study_sources(w)
    return Spec(study_create(real, syn, real / "study"), ("--out", str(real)))


@case("study-out-exists")
def _(w, kit):
    real, syn = _study_sources(w)
    (w / "study").mkdir()
    (w / "study" / "old.txt").write_text("keep me\n")
    return Spec(study_create(real, syn, w / "study"), ("study",))


@case("study-out-name-too-long")
def _(w, kit):
    real, syn = _study_sources(w)
    return Spec(study_create(real, syn, w / ("s" * 300)), ("s" * 300,), says="the name is too long")


@case("study-report-answers-broken")
def _(w, kit):
    (w / "answers.csv").write_bytes(b"\x00\x01garbage\xff")
    (w / "key").mkdir()
    (w / "key" / "key.csv").write_text("case_id,truth,organ\nK1,real,liver\n")
    return Spec(["study", "report", "--answers", str(w / "answers.csv"), "--key", str(w / "key"),
                 "--out", str(w / "report")], ("answers.csv",))


@case("study-report-key-absent")
def _(w, kit):
    (w / "answers.csv").write_text("reader,case_id,answer,confidence,seconds,answered_at\nR1,K1,real,,3.0,2026-01-01\n")
    return Spec(["study", "report", "--answers", str(w / "answers.csv"), "--key", str(w / "nokey"),
                 "--out", str(w / "report")], ("nokey",))


# --------------------------------------------------------------------------------------------- runner


def snapshot(folder: Path) -> dict[str, str]:
    """Every entry under ``folder`` (hidden ones too): files by sha256, folders and links by kind."""
    out = {}
    for root, dirs, files in os.walk(folder):
        for d in dirs:
            out[os.path.relpath(os.path.join(root, d), folder)] = "folder"
        for f in files:
            p = os.path.join(root, f)
            rel = os.path.relpath(p, folder)
            if os.path.islink(p):
                out[rel] = "link -> " + os.readlink(p)
            else:
                with open(p, "rb") as fh:
                    out[rel] = hashlib.sha256(fh.read()).hexdigest()
    return out


def _build_kit(kit: Path) -> Path:
    """Files several cases copy: a crop of the shared real CT (realistic gzip content to cut short), and tiny
    weights (tests/backend/tiny_weights.py): a matching folder, a second autoencoder, a T = 4 model."""
    sys.path.insert(0, str(Path(__file__).parent))
    import tiny_weights as tw

    kit.mkdir(parents=True, exist_ok=True)
    shared = REPO.parent / "shared" / "data" / "totalseg_abdomen_3mm" / "example_ct_sm.nii.gz"
    shared = Path(os.environ.get("DIFFTUMOR_SHARED", REPO.parent / "shared")) / shared.relative_to(REPO.parent / "shared")
    if shared.is_file():
        real = sitk.ReadImage(str(shared))[20:100, 20:90, 5:25]  # x, y, z: a crop keeps the case fast
        sitk.WriteImage(real, str(kit / "real_crop.nii.gz"), useCompression=True)
    else:  # no shared data: a noisy phantom compresses like a CT well enough to be cut short
        image(kit / "real_crop.nii.gz", np.random.default_rng(3).normal(0, 300, (20, 70, 80)).astype(np.int16))
    (kit / "weights").mkdir()
    vq = tw.autoencoder(kit / "weights" / tw.AE_NAME)
    tw.diffusion(kit / "weights" / "liver_early.pt", vq, T=4, stage="early")
    tw.diffusion(kit / "weights" / "liver_noearly.pt", vq, T=200, stage="noearly")
    tw.autoencoder(kit / "other_ae.ckpt", n_codes=32, seed=1)
    tw.diffusion(kit / "t4_early.pt", vq, T=4, stage="early")
    return kit


def _run_one(exe: str, res: Result, home: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DIFFTUMOR_WEIGHTS")}
    env.update(PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
               XDG_CONFIG_HOME=str(home / "config"), XDG_CACHE_HOME=str(home / "cache"), HOME=str(home),
               OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", MPLBACKEND="Agg")
    env.pop("DIFFTUMOR_TEST_THREADS", None)
    start = time.perf_counter()
    try:
        proc = subprocess.run([exe, *res.spec.args], cwd=res.folder, env=env, capture_output=True, text=True,
                              errors="replace", timeout=240)
        res.returncode, res.stdout, res.stderr = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as exc:
        res.returncode, res.stderr = -1, f"timed out after {exc.timeout} s"
    res.seconds = time.perf_counter() - start
    res.after = snapshot(res.folder)


@pytest.fixture(scope="module")
def sweep(request, tmp_path_factory) -> dict[str, Result]:
    exe = _difftumor()
    if exe is None:
        pytest.skip("the difftumor console script is not installed (pip install -e .)")
    selected = [item.callspec.params["case_id"] for item in request.session.items
                if item.module is request.module and getattr(item, "originalname", "") == "test_bad_input"]
    root = tmp_path_factory.mktemp("sweep")
    kit = _build_kit(root / "kit")
    (root / "home").mkdir()
    results: dict[str, Result] = {}
    for cid in selected:
        w = root / "cases" / cid
        w.mkdir(parents=True)
        res = results[cid] = Result(folder=w)
        try:
            res.spec = CASES[cid](w, kit)
        except pytest.skip.Exception as exc:
            res.skip = str(exc)
            continue
        res.before = snapshot(w)
    todo = [r for r in results.values() if r.spec is not None]
    with ThreadPoolExecutor(max_workers=int(os.environ.get("DIFFTUMOR_SWEEP_JOBS", "3"))) as pool:
        list(pool.map(lambda r: _run_one(exe, r, root / "home"), todo))
    if os.environ.get("DIFFTUMOR_SWEEP_LOG"):
        with open(os.environ["DIFFTUMOR_SWEEP_LOG"], "w", encoding="utf-8") as log:
            for cid, r in results.items():
                log.write(f"{cid:45s} {r.returncode} {r.seconds:6.1f}s {r.skip or r.stderr.strip()[:300]!r}\n")
    return results


def _diff(before: dict, after: dict) -> str:
    new = sorted(set(after) - set(before))
    gone = sorted(set(before) - set(after))
    changed = sorted(k for k in set(before) & set(after) if before[k] != after[k])
    return f"new {new}, removed {gone}, changed {changed}"


def _is_progress(line: str) -> bool:
    """Progress a long command reports before it meets the problem (log INFO lines, progress bars): not part of
    the error, so not counted against its two lines."""
    return not line.strip() or line.startswith("INFO: ") or re.search(r"\d+%\|", line) is not None


@pytest.mark.parametrize("case_id", list(CASES))
def test_bad_input(sweep, case_id):
    res = sweep[case_id]
    if res.skip:
        pytest.skip(res.skip)
    shown = f"difftumor {' '.join(res.spec.args)}\n--- exit {res.returncode}\n--- stderr\n{res.stderr}\n--- stdout\n{res.stdout[-2000:]}"
    assert not (res.folder / MARKER).exists(), "an evil pickle/YAML ran its payload\n" + shown
    assert res.returncode == res.spec.code, shown
    assert "Traceback" not in res.stdout + res.stderr, shown
    lines = [line for line in res.stderr.splitlines() if not _is_progress(line)]
    assert 1 <= len(lines) <= 2, shown
    assert any(name in res.stderr for name in res.spec.names), f"stderr names none of {res.spec.names}\n" + shown
    assert res.spec.says in res.stderr, shown
    assert res.after == res.before, _diff(res.before, res.after) + "\n" + shown


def test_the_sweep_has_enough_distinct_inputs():
    assert len(CASES) >= 40
    for prefix in ("info", "synth", "weights", "train-ae", "train-diffusion", "train-seg", "eval", "study-report",
                   "study-"):
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
           "OMP_NUM_THREADS": "1"}
    return subprocess.run([exe, "weights", "check", str(folder)], env=env, capture_output=True, text=True, timeout=240)


def test_weights_check_reports_bad_files(tmp_path):
    """``weights check`` is a report: evil, mismatched and mislabelled files are findings (exit 1), each named in
    the table with a one-line reason; nothing runs, nothing is written into the folder."""
    exe = _difftumor()
    if exe is None:
        pytest.skip("the difftumor console script is not installed (pip install -e .)")
    kit = _build_kit(tmp_path / "kit")
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
