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
    assert all(c.organ is None for c in cases)
    lst.write_text("data/ct1.nii.gz,data/seg1.nii.gz,liver,extra\n", encoding="utf-8")
    with pytest.raises(DiffTumorError, match=r"line 1: expected 'image\[,label\[,organ\]\]', got 4 fields"):
        list_cases(lst)


def test_list_file_organ_column_and_header(tmp_path):
    """The one list-file format also carries what a reader study needs: an organ per case, a header naming
    the columns (``mask`` is read as ``label``), empty fields for "none"."""
    img = _touch(tmp_path / "ct1.nii.gz")
    lab = _touch(tmp_path / "seg1.nii.gz")
    lst = tmp_path / "cases.csv"
    lst.write_text("ct1.nii.gz,seg1.nii.gz,pancreas\nct1.nii.gz,,kidney\n", encoding="utf-8")
    assert [(c.image, c.label, c.organ) for c in list_cases(lst)] == [(img, lab, "pancreas"), (img, None, "kidney")]
    lst.write_text("organ,image,mask\nliver,ct1.nii.gz,seg1.nii.gz\n,ct1.nii.gz\n", encoding="utf-8")
    assert [(c.image, c.label, c.organ) for c in list_cases(lst)] == [(img, lab, "liver"), (img, None, None)]
    lst.write_text("image,labels\nct1.nii.gz,seg1.nii.gz\n", encoding="utf-8")
    with pytest.raises(DiffTumorError, match=r"cases.csv: line 1: header columns must be among image, label"):
        list_cases(lst)
    lst.write_text("image,label\n,seg1.nii.gz\n", encoding="utf-8")
    with pytest.raises(DiffTumorError, match=r"cases.csv: line 2: no image"):
        list_cases(lst)


def test_ct_folder_with_a_separate_labels_folder(tmp_path):
    """CTs in one folder, labels in another (as ``synthesize --ct DIR --organs DIR`` takes them): a label file
    of the same name or a case folder; case folders may hold ct.<any image ending>."""
    cts, labs = tmp_path / "ct", tmp_path / "labels"
    _touch(cts / "a.nii.gz")
    _touch(cts / "b" / "ct.nrrd")
    _touch(labs / "a.nii.gz")
    _touch(labs / "b" / "segmentations" / "liver.nii.gz")
    cases = list_cases(cts, labels=labs, require_labels=True)
    assert [c.name for c in cases] == ["a", "b"] and cases[1].image == cts / "b" / "ct.nrrd"
    assert cases[0].label == labs / "a.nii.gz" and cases[1].segmentations == labs / "b" / "segmentations"
    _touch(cts / "c.mha")
    with pytest.raises(DiffTumorError, match=r"labels: no label file or case folder for c.mha"):
        list_cases(cts, labels=labs)
    with pytest.raises(DiffTumorError, match=r"a.nii.gz: the labels of a CT folder must be a folder too"):
        list_cases(cts, labels=labs / "a.nii.gz")


def test_empty_and_missing(tmp_path):
    with pytest.raises(DiffTumorError, match="no CT images found"):
        list_cases(tmp_path)
    with pytest.raises(DiffTumorError, match="does not exist"):
        list_cases(tmp_path / "nope")


def test_a_list_file_saved_by_excel_and_one_with_only_a_header(tmp_path):
    """A spreadsheet saved as CSV starts with a byte-order mark: its header line is still a header."""
    _touch(tmp_path / "a.nii.gz")
    _touch(tmp_path / "a_mask.nii.gz")
    sheet = tmp_path / "cases.csv"
    sheet.write_text("\ufeffimage,mask,organ\na.nii.gz,a_mask.nii.gz,liver\n", encoding="utf-8")
    (case,) = list_cases(sheet)
    assert (case.image.name, case.label.name, case.organ) == ("a.nii.gz", "a_mask.nii.gz", "liver")
    sheet.write_text("image,mask,organ\n", encoding="utf-8")
    with pytest.raises(DiffTumorError, match=r"cases.csv: the list file names no cases \(a header and no rows\)"):
        list_cases(sheet)


def test_split_is_deterministic(tmp_path):
    for i in range(10):
        _touch(tmp_path / f"c{i}.nii.gz")
    cases = list_cases(tmp_path)
    tr, va = split_cases(cases, val_fraction=0.2, seed=3)
    assert len(va) == 2 and not set(tr) & set(va) and (tr, va) == split_cases(cases, val_fraction=0.2, seed=3)
    assert split_cases(cases[:1]) == (cases[:1], cases[:1])
