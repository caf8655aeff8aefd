"""Study creation: identical preprocessing, blinded reader package, separate key, no leaks."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest

from backend.errors import DiffTumorError
from study.design import (
    CaseSource,
    StudyOptions,
    StudySettings,
    _case_ids,
    create_study,
    list_cases,
    load_study,
    read_key,
    reader_orders,
)

SETTINGS = dict(readers=("R1", "R2"), seed=1234, roi_size_mm=(16.0, 14.0, 12.0), spacing=(1.0, 1.0, 1.5))


def _sources(source_cases, with_masks=True):
    real, syn = source_cases
    return ([CaseSource(p, "real", "liver", m if with_masks else None) for p, m in real],
            [CaseSource(p, "synthetic", "liver", m if with_masks else None) for p, m in syn])


@pytest.fixture
def created(tmp_path, source_cases):
    real, syn = _sources(source_cases)
    study = create_study(real, syn, tmp_path / "pkg" / "study1", settings=StudySettings(**SETTINGS))
    return study, tmp_path / "pkg" / "study1.key", source_cases


def test_package_layout_key_and_orders(created):
    study, key_dir, _ = created
    folder = study.root.parent
    assert sorted(p.name for p in folder.iterdir()) == ["R1", "R2", "packages.json"]
    assert study.root == folder / "R1" and study.readers == ("R1",)
    assert sorted(p.name for p in study.root.iterdir()) == ["cases", "study.json"]
    assert len(study.case_ids) == 6 and all(len(c) == 5 for c in study.case_ids)
    r2 = load_study(folder, "R2")
    assert r2.root == folder / "R2" and r2.readers == ("R2",) and list(r2.orders) == ["R2"]
    assert sorted(study.orders["R1"]) == sorted(r2.orders["R2"]) == sorted(study.case_ids)
    assert study.orders["R1"] != r2.orders["R2"]
    for cid in study.case_ids:  # the same bytes in every package (hard links where the file system allows)
        assert study.case_path(cid).read_bytes() == r2.case_path(cid).read_bytes()
        assert study.case_checks[cid] == r2.case_checks[cid]
    assert b"R1" not in (folder / "R2" / "study.json").read_bytes()  # a package names only its own reader
    assert study.size == (16, 14, 8)
    assert json.loads((key_dir / "key.json").read_text(encoding="utf-8"))["seed"] == 1234
    key = read_key(key_dir)
    assert set(key) == set(study.case_ids)
    assert sorted(t for t, _ in key.values()) == ["real"] * 3 + ["synthetic"] * 3
    rows = list(csv.DictReader(open(key_dir / "key.csv", encoding="utf-8")))
    assert list(rows[0]) == ["case_id", "truth", "organ", "source", "mask", "placement"]
    assert json.loads((key_dir / "key.json").read_text(encoding="utf-8"))["study_id"] == study.study_id
    assert sorted(p.name for p in key_dir.iterdir()) == ["case_statistics.csv", "confounds.json", "confounds.txt",
                                                         "key.csv", "key.json"]


def test_a_study_folder_needs_a_reader_and_knows_its_readers(created):
    study, _, _ = created
    folder = study.root.parent
    with pytest.raises(DiffTumorError, match=r"one package per reader \(R1, R2\); give --reader"):
        load_study(folder)
    with pytest.raises(DiffTumorError, match="reader 'R3': not in this study"):
        load_study(folder, "R3")
    with pytest.raises(DiffTumorError, match="reader 'R2': not in this study \\(readers: R1\\)"):
        load_study(study.root, "R2")  # R1's package knows nothing of R2


def test_seed_reproduces_orders_but_not_the_assignment(tmp_path, source_cases):
    """The seed (key only) reproduces each reader's order of the sorted ids; ids and the id -> source
    assignment come from fresh entropy, so neither a replayed nor a guessed seed can unblind a study."""
    real, syn = _sources(source_cases)
    a = create_study(real, syn, tmp_path / "a", settings=StudySettings(**SETTINGS))
    b = create_study(real, syn, tmp_path / "b", settings=StudySettings(**SETTINGS))
    for s in (a, b):
        orders = {r: tuple(load_study(s.root.parent, r).orders[r]) for r in SETTINGS["readers"]}
        assert orders == {r: tuple(o) for r, o in reader_orders(list(s.case_ids), SETTINGS["readers"],
                                                                 SETTINGS["seed"]).items()}
    pattern = [[sorted(s.case_ids).index(c) for c in s.orders["R1"]] for s in (a, b)]
    assert pattern[0] == pattern[1]  # the same shuffle of the sorted ids
    assert set(a.case_ids).isdisjoint(b.case_ids) and a.study_id != b.study_id
    for key in (read_key(tmp_path / "a.key"), read_key(tmp_path / "b.key")):
        assert sorted(t for t, _ in key.values()) == ["real"] * 3 + ["synthetic"] * 3


def test_replaying_the_creation_random_stream_recovers_nothing(created):
    """What an unblinding reader would try: regenerate ids from a seed and map them back to input
    positions. No seed is in the package, and even the key's seed regenerates none of the ids."""
    study, key_dir, _ = created
    meta = json.loads((study.root / "study.json").read_text(encoding="utf-8"))
    assert "seed" not in meta
    seed = json.loads((key_dir / "key.json").read_text(encoding="utf-8"))["seed"]
    for stream in ([seed, 0], [seed], seed):
        rng = np.random.default_rng(stream)
        rng.permutation(len(study.case_ids))
        assert set(_case_ids(len(study.case_ids), rng)).isdisjoint(study.case_ids)


def test_reader_package_leaks_nothing(created):
    study, _, (real, syn) = created
    import SimpleITK as sitk

    forbidden = [b"real", b"synthetic", b"fake", b"patient", b"hospital", b"diffusion", b"secret", b"liver", b"mask",
                 b"phase", b"shift", b"placement", b"confound"]
    forbidden += [Path(p).name.split(".")[0].encode() for p, _ in real + syn]
    files = [p for p in study.root.parent.rglob("*") if p.is_file()]
    for path in files:
        blob = path.read_bytes().lower()
        for word in forbidden:
            assert word.lower() not in blob, f"{word!r} found in {path.name}"
        assert not any(w.decode() in path.name.lower() for w in forbidden)
    cases = sorted((study.root / "cases").iterdir())
    headers = {p.read_bytes()[:352] for p in cases}
    assert len(headers) == 1  # byte-identical NIfTI headers for every case, both classes
    assert len({p.stat().st_size for p in cases}) == 1
    assert len({p.stat().st_mtime for p in cases}) == 1
    for p in cases:
        img = sitk.ReadImage(str(p))
        assert img.GetPixelID() == sitk.sitkInt16
        assert img.GetOrigin() == (0.0, 0.0, 0.0)
        assert img.GetDirection() == (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0)
        assert img.GetSpacing() == (1.0, 1.0, 1.5)
        assert img.GetMetaData("descrip").strip("\x00 ") == ""
    meta = json.loads((study.root / "study.json").read_text(encoding="utf-8"))
    assert set(meta) == {"format", "version", "study_id", "created", "readers", "orders", "cases",
                         "grid", "display", "options"}
    assert all(set(c) == {"id", "file", "bytes", "sha256"} for c in meta["cases"])


def test_view_is_centred_on_the_tumor(created):
    study, key_dir, _ = created
    import SimpleITK as sitk

    for cid in study.case_ids:
        arr = sitk.GetArrayFromImage(sitk.ReadImage(str(study.case_path(cid)))).astype(float)
        z, y, x = (np.asarray(arr.shape) - 1) / 2
        centre = arr[int(z) : int(z) + 2, int(y) : int(y) + 2, int(x) : int(x) + 2].mean()
        assert centre > arr.mean() + 30  # the bright tumor sits in the middle of every case


def test_listing_from_csv_and_folder(tmp_path, source_cases):
    real, _ = source_cases
    folder = Path(real[0][0]).parent
    assert len(list_cases(folder, "real")) == 6  # images and masks alike when given a folder
    sheet = tmp_path / "real.csv"
    sheet.write_text("image,mask,organ\n" + "".join(f"{p},{m},pancreas\n" for p, m in real))
    got = list_cases(sheet, "real")
    assert [c.organ for c in got] == ["pancreas"] * 3 and got[0].mask == Path(real[0][1])
    sheet.write_text("image\n/does/not/exist.nii.gz\n", encoding="utf-8")
    with pytest.raises(DiffTumorError, match="does not exist"):
        list_cases(sheet, "real")


def test_refuses_to_overwrite_and_mixed_masks(tmp_path, source_cases):
    real, syn = _sources(source_cases)
    out = tmp_path / "s"
    create_study(real, syn, out, settings=StudySettings(**SETTINGS))
    before = sorted(os.listdir(out))
    with pytest.raises(DiffTumorError, match="refusing to overwrite"):
        create_study(real, syn, out, settings=StudySettings(**SETTINGS))
    assert sorted(os.listdir(out)) == before == ["R1", "R2", "packages.json"]
    real_nomask, _ = _sources(source_cases, with_masks=False)
    with pytest.raises(DiffTumorError, match="masks for all or none"):
        create_study(real_nomask, syn, tmp_path / "t", settings=StudySettings(**SETTINGS))
    with pytest.raises(DiffTumorError, match="inside the reader package"):
        create_study(real, syn, tmp_path / "u", key_out=tmp_path / "u" / "key", settings=StudySettings(**SETTINGS))
    assert not (tmp_path / "t").exists() and not (tmp_path / "u").exists()


def test_bad_settings_and_not_a_study(tmp_path):
    with pytest.raises(DiffTumorError, match="reader"):
        StudySettings(readers=("bad/name",))
    with pytest.raises(DiffTumorError, match="--window"):
        StudySettings(window=(200.0, -100.0))
    with pytest.raises(DiffTumorError, match="not a study"):
        load_study(tmp_path)
    (tmp_path / "study.json").write_text("{}", encoding="utf-8")
    with pytest.raises(DiffTumorError, match="not a difftumor study"):
        load_study(tmp_path)


def test_options_recorded(tmp_path, source_cases):
    real, syn = _sources(source_cases)
    s = create_study(real, syn, tmp_path / "o", settings=StudySettings(
        **SETTINGS, options=StudyOptions(unsure=True, confidence=True, revisit=True), compress=True))
    assert s.options == StudyOptions(True, True, True)
    assert all(f.endswith(".nii.gz") for f in s.case_files.values())


@pytest.mark.parametrize("text, message", [
    ("case_id,truth,organ\n\nA,real,liver\n\nB,reel,liver\n", r"key.csv: line 5: truth 'reel'"),  # blank lines counted
    ("case_id,truth,organ\nA,real,liver\nB\n", r"key.csv: line 3: truth '' must be real or synthetic"),  # short line
    ("case_id,truth,organ\n,real,liver\n", r"key.csv: line 2: case_id is empty"),
    (b"case_id,truth,organ\nA,real,\xff\n", r"key.csv: unreadable key CSV \('utf-8' codec"),
])
def test_malformed_key_is_one_line_naming_file_and_line(tmp_path, text, message):
    path = tmp_path / "key.csv"
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    with pytest.raises(DiffTumorError, match=message) as exc:
        read_key(path)
    assert "\n" not in str(exc.value)


def test_cases_with_and_without_organ_are_refused(tmp_path, source_cases):
    real, syn = _sources(source_cases)
    real[0] = CaseSource(real[0].image, "real", "all", real[0].mask)
    with pytest.raises(DiffTumorError, match=r"study: 1 of \d+ cases have no organ but the others have one \(liver\)"):
        create_study(real, syn, tmp_path / "s", settings=StudySettings(**SETTINGS))
    assert not (tmp_path / "s").exists() and not (tmp_path / "s.key").exists()


@pytest.mark.parametrize("twice_as", ["real", "synthetic"])
def test_an_image_listed_twice_is_refused(tmp_path, source_cases, twice_as):
    real, syn = _sources(source_cases)
    real = real + [CaseSource(real[0].image, twice_as, "liver", real[0].mask)]
    with pytest.raises(DiffTumorError, match=rf"is listed twice \(as real and as {twice_as}\)") as exc:
        create_study(real, syn, tmp_path / "s", settings=StudySettings(**SETTINGS))
    assert "\n" not in str(exc.value)
    assert not (tmp_path / "s").exists() and not (tmp_path / "s.key").exists()


def test_a_label_map_among_the_cases_is_refused(tmp_path, source_cases):
    """A folder of ``difftumor synthesize`` outputs holds label.nii.gz beside ct.nii.gz: the label map must not
    become a case that a reader is shown as a CT."""
    from study.design import list_cases

    _, syn = source_cases
    folder = syn[0][0].parent  # the synthetic folder also holds each case's mask_*.nii.gz
    cases = list_cases(folder, "synthetic", "liver")
    assert any(c.image.name.startswith("mask_") for c in cases)
    real, _ = _sources(source_cases, with_masks=False)
    with pytest.raises(DiffTumorError, match=r"--synthetic: .*mask_.* looks like a label map \(whole values 0\.\.2\), not a CT") as exc:
        create_study(real, cases, tmp_path / "s", settings=StudySettings(**SETTINGS))
    assert "\n" not in str(exc.value)
    assert not (tmp_path / "s").exists() and not (tmp_path / "s.key").exists()


def test_confounds_of_the_leaky_fixture_are_written_to_the_key(created):
    """The fixture's real cases are int16 at 0.8 x 0.8 x 2.5 mm, its synthetic ones float32 at 1 mm."""
    _, key_dir, _ = created
    lines = (key_dir / "confounds.txt").read_text(encoding="utf-8").splitlines()
    assert "confound: source data type: real int16 x3, synthetic float32 x3" in lines
    assert "confound: slice thickness of the source (mm): real 2.50 (all 3), synthetic 1.00 (all 3); " \
           "it alone separates the classes with AUC 1.00" in lines
    assert "confound: in-plane spacing of the source (mm): real 0.80 (all 3), synthetic 1.00 (all 3); " \
           "it alone separates the classes with AUC 1.00" in lines


def _row(**values):
    row = dict(in_plane_mm=1.0, slice_mm=1.0, dtype="int16", padded_pct=0.0, noise_hu=10.0, high_freq_pct=50.0,
               min_hu=-1024.0, max_hu=1500.0, file_bytes=float("nan"))
    row.update(values)
    return row


def test_compare_classes_by_hand():
    from study.confounds import compare_classes

    truths = ["real"] * 4 + ["synthetic"] * 4
    # only the compressed file size differs: one warning for it, plus the classifier's
    rows = [_row(file_bytes=b) for b in (1000, 1010, 1020, 1030, 2000, 2100, 2050, 1990)]
    result = compare_classes(rows, truths)
    assert [w["statistic"] for w in result["warnings"]] == ["file_bytes", "classifier"]
    assert result["warnings"][0]["message"] == (
        "confound: compressed case file size (bytes): real median 1015, 1000 to 1030 (n=4), "
        "synthetic median 2025, 1990 to 2100 (n=4); it alone separates the classes with AUC 1.00")
    # a perfect separation by an immaterial amount (0.1 HU of noise) is no confound
    rows = [_row(noise_hu=10.0 + 0.1 * (t == "real") + 0.01 * i) for i, t in enumerate(truths)]
    assert [w["statistic"] for w in compare_classes(rows, truths)["warnings"]] in ([], ["classifier"])
    # the padding where the source's field of view is shorter than the ROI
    rows = [_row(padded_pct=p) for p in (0, 0, 1, 0, 12, 15, 12, 20)]
    assert compare_classes(rows, truths)["warnings"][0]["message"].startswith(
        "confound: field of view: ROI outside the source, padded with -1024 (%): real median 0.0, 0.0 to 1.0 (n=4)")
    # too few cases for a cross-validated classifier: no AUC, said so
    few = compare_classes([_row(), _row(), _row()], ["real", "real", "synthetic"])
    assert few["warnings"] == [] and few["classifier"]["auc"] is None


def test_the_same_ct_under_another_path_is_refused(tmp_path, source_cases):
    real, syn = _sources(source_cases)
    copy = tmp_path / "copied_elsewhere.nii"  # same voxels, another path and format (uncompressed)
    import SimpleITK as sitk

    sitk.WriteImage(sitk.ReadImage(str(real[0].image)), str(copy))
    syn = syn + [CaseSource(copy, "synthetic", "liver", real[0].mask)]
    with pytest.raises(DiffTumorError, match="holds the same voxels as .*; each image may be one case only") as exc:
        create_study(real, syn, tmp_path / "s", settings=StudySettings(**SETTINGS))
    text = str(exc.value)  # the two files are named in the (random) order they were read
    assert "\n" not in text and "patient_real_0.nii.gz (real)" in text and "copied_elsewhere.nii (synthetic)" in text
    assert not (tmp_path / "s").exists() and not (tmp_path / "s.key").exists()


def test_a_truncated_nii_gz_is_refused_in_one_line(tmp_path, source_cases):
    """A .nii.gz cut short (``head -c``) must not become a flat grey case: backend.io.read_image refuses it."""
    import subprocess

    real, syn = _sources(source_cases)
    cut = tmp_path / "cut.nii.gz"
    size = real[0].image.stat().st_size
    with open(cut, "wb") as f:
        subprocess.run(["head", "-c", str(size // 2), str(real[0].image)], stdout=f, check=True)
    real[0] = CaseSource(cut, "real", "liver", real[0].mask)
    with pytest.raises(DiffTumorError, match="cut.nii.gz") as exc:
        create_study(real, syn, tmp_path / "s", settings=StudySettings(**SETTINGS))
    assert "\n" not in str(exc.value)
    assert not (tmp_path / "s").exists() and not (tmp_path / "s.key").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".s")]


def test_a_csv_with_a_header_and_no_rows(tmp_path):
    sheet = tmp_path / "real.csv"
    sheet.write_text("image,mask,organ\n", encoding="utf-8")
    with pytest.raises(DiffTumorError, match=r"--real .*real.csv: the list file names no cases \(a header and no rows\)"):
        list_cases(sheet, "real")
    sheet.write_text("path,organ\nx.nii.gz,liver\n", encoding="utf-8")  # no 'image' column: not a header
    with pytest.raises(DiffTumorError, match=r"--real .*real.csv: line 1: image 'path' does not exist"):
        list_cases(sheet, "real")


def test_seed_help_says_what_the_seed_does():
    import argparse

    from backend.cli import study as study_cli

    parser = argparse.ArgumentParser(prog="difftumor")
    study_cli.register(parser.add_subparsers(dest="command"))
    create = parser._subparsers._group_actions[0].choices["study"]._subparsers._group_actions[0].choices["create"]
    (seed,) = [a for a in create._actions if "--seed" in a.option_strings]
    text = " ".join(seed.help.split())
    assert text.startswith("seed for each reader's reading order only")
    assert "Case ids and which case gets which id never come from it" in text
