"""Shared fixtures, built in layers: locations -> files -> loaded objects.

* ``shared_dir`` / ``totalseg_ct`` / ``totalseg_seg``: the real CT in ``../shared/data`` (skipped with a
  reason when the shared folder is absent).
* ``parity_dir``: the official-format parity checkpoints, gunzipped once per machine into a cache
  folder (``DIFFTUMOR_TEST_CACHE`` or ``~/.cache/difftumor-tests``), keyed by the .gz file's size.
"""

from __future__ import annotations

import gzip
import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("DIFFTUMOR_SHARED", REPO.parent / "shared"))

torch_threads = os.environ.get("DIFFTUMOR_TEST_THREADS")
if torch_threads:
    import torch

    torch.set_num_threads(int(torch_threads))


def pytest_collection_modifyitems(config, items):
    import importlib.util

    has_cuda = False
    if importlib.util.find_spec("torch") is not None:
        import torch

        has_cuda = torch.cuda.is_available()
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"shared folder {SHARED} is absent (set DIFFTUMOR_SHARED)")
    return SHARED


@pytest.fixture(scope="session")
def totalseg_ct(shared_dir) -> Path:
    p = shared_dir / "data" / "totalseg_abdomen_3mm" / "example_ct_sm.nii.gz"
    if not p.is_file():
        pytest.skip(f"{p} is absent")
    return p


@pytest.fixture(scope="session")
def totalseg_seg(shared_dir) -> Path:
    p = shared_dir / "data" / "totalseg_abdomen_3mm" / "example_seg.nii.gz"
    if not p.is_file():
        pytest.skip(f"{p} is absent")
    return p


def _cache_dir() -> Path:
    d = Path(os.environ.get("DIFFTUMOR_TEST_CACHE", Path.home() / ".cache" / "difftumor-tests"))
    d.mkdir(parents=True, exist_ok=True)
    return d


@pytest.fixture(scope="session")
def parity_src(shared_dir) -> Path:
    d = shared_dir / "reference" / "parity"
    if not (d / "parity_outputs.pt").is_file():
        pytest.skip(f"parity fixtures are absent from {d}")
    return d


@pytest.fixture(scope="session")
def parity_dir(parity_src) -> Path:
    """A folder holding the unpacked official-format files under their official names, plus the outputs."""
    from backend.io import atomic_write

    out = _cache_dir() / "parity"
    out.mkdir(exist_ok=True)
    for name in ("AutoencoderModel.ckpt", "liver_early.pt", "liver_noearly.pt"):
        gz = parity_src / f"{name}.gz"
        stamp = out / f"{name}.src-size"
        target = out / name
        if target.is_file() and stamp.is_file() and stamp.read_text(encoding="utf-8") == str(gz.stat().st_size):
            continue
        with atomic_write(target) as tmp, gzip.open(gz, "rb") as fin, open(tmp, "wb") as fout:
            shutil.copyfileobj(fin, fout, length=16 << 20)
        stamp.write_text(str(gz.stat().st_size))
    for name in ("parity_outputs.pt", "parity_outputs.json"):
        link = out / name
        if not link.exists():
            link.symlink_to(parity_src / name)
    return out


@pytest.fixture(scope="session")
def parity_outputs(parity_dir) -> dict:
    import torch

    return torch.load(parity_dir / "parity_outputs.pt", map_location="cpu", weights_only=True)


@pytest.fixture
def one_thread():
    """Tiny networks gain nothing from threads, and on a shared 2-core machine a second OpenMP thread waits."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
