"""The bad-input sweep's machinery (issue 14; imported by tests/*/test_bad_inputs.py, not collected).

A case is a builder ``(w, kit) -> Spec`` writing its inputs into its own folder ``w`` (``kit`` holds files
several cases copy). :func:`run_sweep` builds the cases a session selected, runs the installed ``difftumor``
console script on each (a subprocess, as a user runs it; three at a time: each run is mostly Python/torch
start-up), and snapshots each folder before and after; :func:`check` asserts the promise of
docs/bad-inputs.md. Evil pickles would create ``PWNED`` in their folder when unpickled: it must never appear.
"""

from __future__ import annotations

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


def difftumor() -> str | None:
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
    return (image(w / f"{name}.nii.gz", a if ct is None else ct, **kw),
            image(w / f"{name}_seg.nii.gz", s if seg is None else seg, **kw))


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


Builder = Callable[[Path, Path], Spec]


def registry() -> tuple[dict[str, Builder], Callable]:
    """``(cases, case)``: a test module's table of cases and the decorator ``@case("id")`` that fills it."""
    cases: dict[str, Builder] = {}

    def case(case_id: str):
        def register(build):
            assert case_id not in cases, case_id
            cases[case_id] = build
            return build
        return register
    return cases, case


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


def build_kit(kit: Path) -> Path:
    """Files several cases copy: a crop of the shared real CT (realistic gzip content to cut short), and tiny
    weights (tests/backend/tiny_weights.py): a matching folder, a second autoencoder, a T = 4 model."""
    sys.path.insert(0, str(Path(__file__).parent))
    import tiny_weights as tw

    kit.mkdir(parents=True, exist_ok=True)
    shared = Path(os.environ.get("DIFFTUMOR_SHARED", REPO.parent / "shared"))
    shared = shared / "data" / "totalseg_abdomen_3mm" / "example_ct_sm.nii.gz"
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


def matplotlib_cache() -> str:
    """The user's matplotlib cache: a fresh one (XDG_CACHE_HOME moved) costs each command a font scan."""
    import matplotlib

    return matplotlib.get_cachedir()


def run_one(exe: str, res: Result, home: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DIFFTUMOR_WEIGHTS")}
    env.update(PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
               XDG_CONFIG_HOME=str(home / "config"), XDG_CACHE_HOME=str(home / "cache"),
               OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", MPLBACKEND="Agg", MPLCONFIGDIR=matplotlib_cache())
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


def run_sweep(request, tmp_path_factory, cases: dict[str, Builder]) -> dict[str, Result]:
    """Build the cases of ``request.module`` that this session selected, run them (three at a time), snapshot
    each folder before and after; ``{case id: Result}``."""
    exe = difftumor()
    if exe is None:
        pytest.skip("the difftumor console script is not installed (pip install -e .)")
    selected = [item.callspec.params["case_id"] for item in request.session.items
                if item.module is request.module and getattr(item, "originalname", "") == "test_bad_input"]
    root = tmp_path_factory.mktemp("sweep")
    kit = build_kit(root / "kit")
    (root / "home").mkdir()
    results: dict[str, Result] = {}
    for cid in selected:
        w = root / "cases" / cid
        w.mkdir(parents=True)
        res = results[cid] = Result(folder=w)
        try:
            res.spec = cases[cid](w, kit)
        except pytest.skip.Exception as exc:
            res.skip = str(exc)
            continue
        res.before = snapshot(w)
    todo = [r for r in results.values() if r.spec is not None]
    with ThreadPoolExecutor(max_workers=int(os.environ.get("DIFFTUMOR_SWEEP_JOBS", "3"))) as pool:
        list(pool.map(lambda r: run_one(exe, r, root / "home"), todo))
    if os.environ.get("DIFFTUMOR_SWEEP_LOG"):
        with open(os.environ["DIFFTUMOR_SWEEP_LOG"], "a", encoding="utf-8") as log:
            for cid, r in results.items():
                log.write(f"{cid:45s} {r.returncode} {r.seconds:6.1f}s {r.skip or r.stderr.strip()[:300]!r}\n")
    return results


def diff(before: dict, after: dict) -> str:
    new = sorted(set(after) - set(before))
    gone = sorted(set(before) - set(after))
    changed = sorted(k for k in set(before) & set(after) if before[k] != after[k])
    return f"new {new}, removed {gone}, changed {changed}"


def is_progress(line: str) -> bool:
    """Progress a long command reports before it meets the problem (log INFO lines, progress bars): not part of
    the error, so not counted against its two lines."""
    return not line.strip() or line.startswith("INFO: ") or re.search(r"\d+%\|", line) is not None


def check(res: Result) -> None:
    """The promise: exit 2, no traceback, at most two lines (besides progress) naming the input, the marker
    absent, the case folder unchanged."""
    if res.skip:
        pytest.skip(res.skip)
    shown = (f"difftumor {' '.join(res.spec.args)}\n--- exit {res.returncode}\n--- stderr\n{res.stderr}\n"
             f"--- stdout\n{res.stdout[-2000:]}")
    assert not (res.folder / MARKER).exists(), "an evil pickle/YAML ran its payload\n" + shown
    assert res.returncode == res.spec.code, shown
    assert "Traceback" not in res.stdout + res.stderr, shown
    lines = [line for line in res.stderr.splitlines() if not is_progress(line)]
    assert 1 <= len(lines) <= 2, shown
    assert any(name in res.stderr for name in res.spec.names), f"stderr names none of {res.spec.names}\n" + shown
    assert res.spec.says in res.stderr, shown
    assert res.after == res.before, diff(res.before, res.after) + "\n" + shown


def sweep_tests(cases: dict[str, Builder]):
    """The module-scoped ``sweep`` fixture and the parametrised ``test_bad_input`` for a table of cases, complete
    when this is called: a test module binds them as ``sweep, test_bad_input = sweep_tests(CASES)``."""

    @pytest.fixture(scope="module")
    def sweep(request, tmp_path_factory) -> dict[str, Result]:
        return run_sweep(request, tmp_path_factory, cases)

    @pytest.mark.parametrize("case_id", list(cases))
    def test_bad_input(sweep, case_id):
        res = sweep[case_id]
        if res.skip:
            pytest.skip(res.skip)
        check(res)

    return sweep, test_bad_input
