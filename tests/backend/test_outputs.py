"""One writer of synthesis outputs (backend/synthesis/outputs.py)."""

import json

import numpy as np
import pytest

from backend.errors import DiffTumorError
from backend.io import Geometry, Volume, read_image
from backend.synthesis import outputs


def _images():
    g = Geometry((8, 8, 4), (1.0, 1.0, 2.0), (0.0, 0.0, 0.0))
    ct = Volume(np.full((4, 8, 8), 40, np.int16), g)
    label = np.zeros((4, 8, 8), np.uint8)
    label[1:3, 2:5, 2:5] = 2
    return {"ct": ct, "label": (label, g)}


def test_folder_output_is_complete_with_provenance_last(tmp_path):
    out = tmp_path / "new" / "case"
    paths = outputs.write_output(out, _images(), {"method": "model-based", "settings": {"seed": 1}})
    assert sorted(p.name for p in out.iterdir()) == sorted(outputs.OUTPUT_FILES)
    assert paths["label"] == out / "label.nii.gz" and read_image(paths["label"]).array.max() == 2
    prov = json.loads(paths["provenance"].read_text(encoding="utf-8"))
    assert prov["files"] == {"ct": "ct.nii.gz", "label": "label.nii.gz"} and prov["created"]
    assert outputs.output_done(out, {"seed": 1}) and not outputs.output_done(out, {"seed": 2})
    (out / "label.nii.gz").unlink()
    assert not outputs.output_done(out, {"seed": 1})
    assert not any(p.name.startswith(".") for p in out.parent.iterdir())  # no staging folder left


def test_stem_outputs_never_replace_and_offer_a_free_stem(tmp_path):
    first = outputs.write_output(tmp_path, _images(), {}, stem="case", replace=False)
    assert sorted(p.name for p in first.values()) == ["case_ct.nii.gz", "case_label.nii.gz", "case_provenance.json"]
    before = {k: p.read_bytes() for k, p in first.items()}
    with pytest.raises(DiffTumorError, match="case_ct.nii.gz: already exists; nothing was overwritten"):
        outputs.write_output(tmp_path, _images(), {}, stem="case", replace=False)
    assert {k: p.read_bytes() for k, p in first.items()} == before
    assert outputs.free_stem(tmp_path, "case") == "case_2"


def test_a_failure_half_way_leaves_nothing_and_names_the_output_folder(tmp_path):
    images = _images()
    images["label"] = (np.zeros((2, 2, 2), np.uint8), images["label"][1])  # does not fit its grid
    with pytest.raises(ValueError, match=r"Volume.array shape \(2, 2, 2\) \(z, y, x\) does not match geometry size"):
        outputs.write_output(tmp_path / "out", images, {})
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []
    (tmp_path / "file").write_text("x", encoding="utf-8")
    with pytest.raises(DiffTumorError, match=r"^output folder .*file: is an existing file; give a folder"):
        outputs.check_out_writable(tmp_path / "file")
    with pytest.raises(DiffTumorError, match=r"^--out .*file: is an existing file"):
        outputs.check_out_writable(tmp_path / "file", names=lambda o: "--" + o)


def test_a_dataset_folder_made_with_other_settings_is_refused_in_the_callers_words(tmp_path):
    outputs.start_dataset_run(tmp_path / "aug", {"seed": 0}, overwrite=False)
    (tmp_path / "aug" / "c_s0").mkdir()
    outputs.start_dataset_run(tmp_path / "aug", {"seed": 0}, overwrite=False)  # same settings: resume
    with pytest.raises(DiffTumorError, match="made with seed 0, but this run has seed 9; choose another output folder"):
        outputs.start_dataset_run(tmp_path / "aug", {"seed": 9}, overwrite=False)


def test_the_documented_library_example_runs_as_written(tmp_path, monkeypatch, totalseg_ct, totalseg_seg):
    """docs/synthesis.md's "Library use" example: request -> engine -> outputs, on the shared CT."""
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[2] / "docs" / "synthesis.md").read_text(encoding="utf-8")
    code = doc.split("## Library use", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    (tmp_path / "ct.nii.gz").symlink_to(totalseg_ct)
    (tmp_path / "organs.nii.gz").symlink_to(totalseg_seg)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "cfg"))
    exec(compile(code, "docs/synthesis.md", "exec"), {})
    prov = json.loads((tmp_path / "out" / "provenance.json").read_text(encoding="utf-8"))
    assert (prov["method"], prov["n_tumours"], prov["settings"]["seed"]) == ("model-based", 2, 7)
    label = read_image(tmp_path / "out" / "label.nii.gz")
    ct = read_image(tmp_path / "out" / "ct.nii.gz")
    assert 0 < (label.array == 2).sum() <= sum(t["voxels"] for t in prov["mask"]["tumours"])
    assert ct.array.dtype == read_image(totalseg_ct).array.dtype and ct.geometry == read_image(totalseg_ct).geometry
