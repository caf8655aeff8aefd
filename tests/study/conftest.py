"""Study fixtures: a hand-written reader package (placeholder case files) and tiny source CT volumes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from study.design import STUDY_FORMAT, STUDY_VERSION


def write_study_json(root: Path, case_ids, *, readers=("R1",), orders=None, unsure=False,
                     confidence=False, revisit=False) -> Path:
    """A minimal reader package: study.json and one small placeholder file per case, with its byte size and
    sha256 as ``create`` records them (session logic checks the files but never opens them as images)."""
    import hashlib

    (root / "cases").mkdir(parents=True, exist_ok=True)
    orders = orders or {r: list(case_ids) for r in readers}
    entries = []
    for c in case_ids:
        data = f"case {c}".encode() * 10
        (root / "cases" / f"{c}.nii").write_bytes(data)
        entries.append({"id": c, "file": f"cases/{c}.nii", "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})
    meta = {
        "format": STUDY_FORMAT, "version": STUDY_VERSION, "study_id": "0" * 32,
        "readers": list(readers), "orders": orders,
        "cases": entries,
        "grid": {"spacing": [1.0, 1.0, 1.0], "size": [8, 8, 4]},
        "display": {"window": [-160.0, 240.0]},
        "options": {"unsure": unsure, "confidence": confidence, "revisit": revisit},
    }
    (root / "study.json").write_text(json.dumps(meta))
    return root


@pytest.fixture
def study_factory(tmp_path):
    def make(n=5, **kw):
        ids = [f"K{i:03d}" for i in range(n)]
        return write_study_json(tmp_path / "study", ids, **kw), ids
    return make


@pytest.fixture
def source_cases(tmp_path):
    """Real and synthetic CTs whose files differ in every way a class could leak through:
    names, dtype, compression, spacing, direction, origin, header description."""
    import SimpleITK as sitk

    rng = np.random.default_rng(0)
    real_dir, syn_dir = tmp_path / "real_tumors_hospitalA", tmp_path / "synthetic_diffusion_out"
    real_dir.mkdir()
    syn_dir.mkdir()

    def make(path, dtype, spacing, direction, origin, shape=(20, 24, 28)):
        arr = rng.normal(40, 30, size=shape)
        arr[8:12, 10:14, 12:16] += 80  # a bright "tumor"
        img = sitk.GetImageFromArray(arr.astype(dtype))
        img.SetSpacing(spacing)
        img.SetDirection(direction)
        img.SetOrigin(origin)
        img.SetMetaData("descrip", f"{path.stem} secret-description")
        sitk.WriteImage(img, str(path), useCompression=str(path).endswith(".gz"))
        mask = np.zeros(shape, np.uint8)
        mask[8:12, 10:14, 12:16] = 2
        m = sitk.GetImageFromArray(mask)
        m.CopyInformation(img)
        mpath = path.parent / ("mask_" + path.name)
        sitk.WriteImage(m, str(mpath), useCompression=True)
        return path, mpath

    flip = (-1.0, 0, 0, 0, -1.0, 0, 0, 0, 1.0)
    ident = (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0)
    real = [make(real_dir / f"patient_real_{i}.nii.gz", np.int16, (0.8, 0.8, 2.5), flip, (100.0, -50.0, 7.0))
            for i in range(3)]
    syn = [make(syn_dir / f"synthetic_fake_{i}.nii", np.float32, (1.0, 1.0, 1.0), ident, (0.0, 0.0, 0.0))
           for i in range(3)]
    return real, syn
