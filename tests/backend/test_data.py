"""Dataset listing: plain folder, AbdomenAtlas tree, MSD dataset.json, list files, errors."""

from __future__ import annotations

import json

import pytest

from backend.data import list_cases, split_cases
from backend.errors import DiffTumorError


def _touch(p):
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(b"")
    return p


def test_folder_of_cts(tmp_path):
    for n in ("b.nii.gz", "a.nrrd", "notes.txt", ".hidden.nii.gz"):
        _touch(tmp_path / n)
    cases = list_cases(tmp_path)
    assert [c.name for c in cases] == ["a", "b"] and all(c.label is None for c in cases)
    with pytest.raises(DiffTumorError, match="have no label"):
        list_cases(tmp_path, require_labels=True)


def test_abdomenatlas_tree(tmp_path):
    _touch(tmp_path / "BDMAP_2" / "ct.nii.gz")
    _touch(tmp_path / "BDMAP_2" / "segmentations" / "liver.nii.gz")
    _touch(tmp_path / "BDMAP_1" / "ct.nii.gz")
    _touch(tmp_path / "BDMAP_1" / "combined_labels.nii.gz")
    cases = list_cases(tmp_path)
    assert [c.name for c in cases] == ["BDMAP_1", "BDMAP_2"]
    assert cases[0].label.name == "combined_labels.nii.gz" and cases[0].segmentations is None
    assert cases[1].segmentations.name == "segmentations" and cases[1].label is None
    assert list_cases(tmp_path, require_labels=True) == cases


def test_msd_dataset_json(tmp_path):
    _touch(tmp_path / "imagesTr" / "liver_1.nii.gz")
    _touch(tmp_path / "labelsTr" / "liver_1.nii.gz")
    meta = {"training": [{"image": "./imagesTr/liver_1.nii.gz", "label": "./labelsTr/liver_1.nii.gz"}]}
    (tmp_path / "dataset.json").write_text(json.dumps(meta))
    cases = list_cases(tmp_path)
    assert len(cases) == 1 and cases[0].label == tmp_path / "labelsTr" / "liver_1.nii.gz"
    assert cases[0].as_dict()["label"].endswith("labelsTr/liver_1.nii.gz")
    meta["training"].append({"image": "./imagesTr/missing.nii.gz"})
    (tmp_path / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(DiffTumorError, match=r"training entry 1: image './imagesTr/missing.nii.gz' does not exist"):
        list_cases(tmp_path / "dataset.json")


def test_list_file(tmp_path):
    img = _touch(tmp_path / "data" / "ct1.nii.gz")
    lab = _touch(tmp_path / "data" / "seg1.nii.gz")
    _touch(tmp_path / "atlas" / "C3" / "ct.nii.gz")
    lst = tmp_path / "train.txt"
    lst.write_text(f"# comment\ndata/ct1.nii.gz, data/seg1.nii.gz\n\n{img}\natlas/C3\n", encoding="utf-8")
    cases = list_cases(lst)
    assert [(c.image, c.label) for c in cases[:2]] == [(img, lab), (img, None)]
    assert cases[2].name == "C3"
    lst.write_text("data/ct1.nii.gz,a,b\n", encoding="utf-8")
    with pytest.raises(DiffTumorError, match="line 1: expected 'image\\[,label\\]'"):
        list_cases(lst)


def test_empty_and_missing(tmp_path):
    with pytest.raises(DiffTumorError, match="no CT images found"):
        list_cases(tmp_path)
    with pytest.raises(DiffTumorError, match="does not exist"):
        list_cases(tmp_path / "nope")


def test_split_is_deterministic(tmp_path):
    for i in range(10):
        _touch(tmp_path / f"c{i}.nii.gz")
    cases = list_cases(tmp_path)
    tr, va = split_cases(cases, val_fraction=0.2, seed=3)
    assert len(va) == 2 and not set(tr) & set(va) and (tr, va) == split_cases(cases, val_fraction=0.2, seed=3)
    assert split_cases(cases[:1]) == (cases[:1], cases[:1])
