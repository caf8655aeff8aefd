"""backend.organs: the four label conventions, auto-detection and bad input."""

from __future__ import annotations

import os

import numpy as np
import pytest

from backend.errors import DiffTumorError
from backend.io import Geometry, Volume, read_image, write_image
from backend.organs import (
    ORGAN_TOTALSEG_IDS,
    ORGANS,
    TOTALSEG_IDS,
    TOTALSEG_NAMES,
    detect_convention,
    load_organ_mask,
    organs_present,
    parse_organ,
)

GEO = Geometry((6, 5, 4), (1.5, 1.5, 2.0), (10.0, -5.0, 3.0))


def _totalseg() -> np.ndarray:
    lab = np.zeros(GEO.shape, np.uint8)
    lab[0, :2, :2] = 1  # spleen: 4 voxels
    lab[1, 0, :3] = 2  # kidney_right: 3
    lab[1, 4, :2] = 3  # kidney_left: 2
    lab[2:, 1:4, 1:5] = 5  # liver: 24
    lab[0, 4, 5] = 7  # pancreas: 1
    lab[3, 0, 0] = 52  # aorta
    return lab


def _snapshot(path):
    return path.read_bytes(), os.stat(path).st_mtime_ns


def test_parse_organ():
    assert parse_organ(" Liver ") == "liver"
    assert parse_organ("kidney-left") == "kidney_left"
    assert parse_organ("left kidney") == "kidney_left"
    assert parse_organ("kidneys") == "kidney"
    with pytest.raises(DiffTumorError, match=r"unknown organ 'lung'; choose one of liver, pancreas, kidney"):
        parse_organ("lung")


def test_id_tables_agree():
    assert all(TOTALSEG_NAMES[i] == name for name, i in TOTALSEG_IDS.items())
    for organ, ids in ORGAN_TOTALSEG_IDS.items():
        assert {TOTALSEG_NAMES[i] for i in ids} == ({"kidney_left", "kidney_right"} if organ == "kidney" else {organ})


def test_detect_convention():
    assert detect_convention(np.array([0, 1, 2])) == "msd"
    assert detect_convention(np.array([0, 1])) == "msd"
    assert detect_convention(np.array([0, 1, 2, 5])) == "totalseg"


@pytest.mark.parametrize(
    "organ, expected",
    [("spleen", 4), ("kidney_right", 3), ("kidney_left", 2), ("kidney", 5), ("liver", 24), ("pancreas", 1)],
)
def test_totalseg_file(tmp_path, organ, expected):
    p = write_image(_totalseg(), tmp_path / "seg.nii.gz", GEO)
    mask = load_organ_mask(p, organ, reference=GEO)
    assert mask.dtype == np.bool_ and mask.shape == GEO.shape
    assert mask.sum() == expected


def test_totalseg_real_seg_against_real_ct(totalseg_ct, totalseg_seg):
    ct = read_image(totalseg_ct)
    seg = read_image(totalseg_seg)
    liver = load_organ_mask(totalseg_seg, "liver", reference=ct)
    np.testing.assert_array_equal(liver, seg.array == 5)
    kidney = load_organ_mask(seg, "kidney", reference=ct.geometry)
    np.testing.assert_array_equal(kidney, np.isin(seg.array, (2, 3)))
    found = organs_present(seg)
    for name in ("spleen", "kidney_right", "kidney_left", "liver", "pancreas", "aorta", "inferior_vena_cava"):
        assert found[name] > 0
    assert found["liver"] == int((seg.array == 5).sum())


def test_atlas_folder(tmp_path):
    seg_dir = tmp_path / "BDMAP_0001" / "segmentations"
    seg_dir.mkdir(parents=True)
    lab = _totalseg()
    for name, i in (("liver", 5), ("kidney_left", 3), ("kidney_right", 2), ("pancreas", 7)):
        write_image((lab == i).astype(np.uint8), seg_dir / f"{name}.nii.gz", GEO)
    case = tmp_path / "BDMAP_0001"
    np.testing.assert_array_equal(load_organ_mask(case, "liver", reference=GEO), lab == 5)
    np.testing.assert_array_equal(load_organ_mask(case, "kidney"), np.isin(lab, (2, 3)))
    np.testing.assert_array_equal(load_organ_mask(seg_dir, "kidney_left", convention="atlas"), lab == 3)
    with pytest.raises(DiffTumorError, match=r"BDMAP_0001: no spleen\.nii\.gz"):
        load_organ_mask(case, "spleen")


def test_msd_map_organ_includes_tumor(tmp_path):
    lab = np.zeros(GEO.shape, np.uint8)
    lab[1:3, 1:4, 1:4] = 1
    lab[2, 2, 2] = 2
    p = write_image(lab, tmp_path / "liver_007.nii.gz", GEO)
    mask = load_organ_mask(p, "liver")  # auto -> msd
    assert mask.sum() == 18 and mask[2, 2, 2]
    assert load_organ_mask(p, "pancreas", convention="msd").sum() == 18
    assert organs_present(read_image(p)) == {"organ": 17, "tumor": 1}
    with pytest.raises(DiffTumorError, match="do not tell kidney sides apart"):
        load_organ_mask(p, "kidney_left")
    # the same map read as TotalSegmentator ids: label 1 is the spleen, the liver is absent
    with pytest.raises(DiffTumorError, match=r"no 'liver' voxels \(label 5\)"):
        load_organ_mask(p, "liver", convention="totalseg")


def test_explicit_label_id_and_arrays():
    lab = _totalseg()
    np.testing.assert_array_equal(load_organ_mask(lab, "liver", label_id=52), lab == 52)
    np.testing.assert_array_equal(load_organ_mask(Volume(lab, GEO), "pancreas"), lab == 7)
    with pytest.raises(DiffTumorError, match="no voxels with label 9"):
        load_organ_mask(lab, "liver", label_id=9)


def test_absent_organ_names_file_and_label(tmp_path):
    lab = _totalseg()
    lab[lab == 7] = 0
    p = write_image(lab, tmp_path / "seg.nii.gz", GEO)
    before = _snapshot(p)
    with pytest.raises(DiffTumorError) as info:
        load_organ_mask(p, "pancreas")
    assert str(info.value) == f"{p}: no 'pancreas' voxels (label 7) in this mask"
    assert _snapshot(p) == before


def test_mask_grid_mismatch(tmp_path):
    other = Geometry(GEO.size, (1.5, 1.5, 3.0), GEO.origin)
    p = write_image(_totalseg(), tmp_path / "seg.nii.gz", other)
    before = _snapshot(p)
    ct = Volume(np.zeros(GEO.shape, np.int16), GEO, tmp_path / "ct.nii.gz")
    with pytest.raises(DiffTumorError, match=rf"{p}: grid does not match {tmp_path / 'ct.nii.gz'} \(spacing"):
        load_organ_mask(p, "liver", reference=ct)
    assert _snapshot(p) == before


def test_bad_arguments(tmp_path):
    with pytest.raises(DiffTumorError, match="unknown label convention 'nnunet'"):
        load_organ_mask(_totalseg(), "liver", convention="nnunet")
    with pytest.raises(DiffTumorError, match="not a label map"):
        load_organ_mask(np.full(GEO.shape, 0.5), "liver")
    with pytest.raises(DiffTumorError, match="needs a case folder"):
        load_organ_mask(_totalseg(), "liver", convention="atlas")
    assert set(ORGANS) == {"liver", "pancreas", "kidney", "kidney_left", "kidney_right", "spleen"}


def test_msd_map_gives_its_tumours_other_conventions_none():
    from backend.organs import load_organ_and_tumors

    labels = np.zeros((4, 5, 6), np.uint8)
    labels[1:3, 1:4, 1:5] = 1
    labels[2, 2, 2:4] = 2
    organ, tumours = load_organ_and_tumors(labels, "liver")
    assert organ.sum() == 24 and tumours is not None and tumours.sum() == 2 and (organ[tumours]).all()
    labels[labels == 2] = 1
    assert load_organ_and_tumors(labels, "liver")[1] is None  # no tumour labelled
    totalseg = np.zeros((4, 5, 6), np.uint8)
    totalseg[1:3, 1:3, 1:3] = 5  # liver
    totalseg[0, 0, 0] = 2  # kidney_right, not a tumour
    assert load_organ_and_tumors(totalseg, "liver")[1] is None
    assert load_organ_and_tumors(labels * 2, "liver", label_id=2)[1] is None


def test_a_ct_given_as_labels_is_refused():
    ct_like = np.full((4, 5, 6), -1000, np.int16)
    ct_like[1:3, 1:4, 1:5] = 5  # a voxel of 5 HU would otherwise be "liver" (TotalSegmentator id 5)
    with pytest.raises(DiffTumorError, match=r"not a label map \(values -1000\.\.5.*is this the CT"):
        load_organ_mask(ct_like, "liver")
    mr_like = np.arange(4 * 5 * 6, dtype=np.uint16).reshape(4, 5, 6) * 20
    with pytest.raises(DiffTumorError, match="not a label map"):
        load_organ_mask(mr_like, "liver")


def test_kits_map_with_cysts_is_told_from_a_totalseg_map_with_spleen_and_kidneys():
    from backend.organs import load_organ_and_tumors

    kits = np.zeros((10, 20, 20), np.uint8)
    kits[2:8, 4:14, 4:14] = 1  # kidney
    kits[4:6, 6:9, 6:9] = 2  # tumour inside it
    kits[3, 11:13, 11:13] = 3  # cyst
    assert detect_convention(kits) == "msd"
    organ, tumours = load_organ_and_tumors(kits, "kidney")
    assert organ.sum() == (kits > 0).sum() and tumours.sum() == (kits == 2).sum()
    ts = np.zeros((10, 20, 20), np.uint8)
    ts[2:8, 1:6, 1:6] = 1  # spleen (patient's left)
    ts[2:8, 14:19, 14:19] = 2  # right kidney, far from it
    ts[2:8, 8:12, 1:5] = 3  # left kidney
    assert detect_convention(ts) == "totalseg"
    assert load_organ_mask(ts, "kidney").sum() == ((ts == 2) | (ts == 3)).sum()


def test_totalsegmentator_v2_vocabulary_is_complete():
    from backend.organs import TOTALSEG_V2_NAMES

    assert sorted(TOTALSEG_V2_NAMES) == list(range(1, 118)) and len(set(TOTALSEG_V2_NAMES.values())) == 117
    assert all(TOTALSEG_V2_NAMES[i] == n for i, n in TOTALSEG_NAMES.items())
    assert (TOTALSEG_V2_NAMES[26], TOTALSEG_V2_NAMES[51], TOTALSEG_V2_NAMES[90], TOTALSEG_V2_NAMES[92],
            TOTALSEG_V2_NAMES[104], TOTALSEG_V2_NAMES[116]) == (
        "vertebrae_S1", "heart", "brain", "rib_left_1", "rib_right_1", "sternum")


def test_an_organ_label_that_names_another_structure_is_warned_about(caplog):
    """--organ-label 99 (a rib in a TotalSegmentator map) was taken as the liver without a word."""
    labels = np.zeros((6, 8, 8), np.uint8)
    labels[1:3, 2:5, 2:5] = 5  # liver
    labels[3:5, 2:5, 2:5] = 99  # rib_left_8
    labels[0, 0, 0] = 52  # aorta: a TotalSegmentator map, not MSD
    with caplog.at_level("WARNING"):
        mask = load_organ_mask(labels, "liver", label_id=99)
    assert mask.sum() == 18  # still used: the user asked for it
    assert [r.getMessage() for r in caplog.records] == [
        "<label array>: label 99 is 'rib_left_8' in TotalSegmentator v2, not the liver (label 5); "
        "using it as the liver as asked"]
    caplog.clear()
    with caplog.at_level("WARNING"):
        load_organ_mask(labels, "liver", label_id=5)
        msd = np.where(labels == 5, 1, 0).astype(np.uint8)
        msd[0, 0, 1] = 2
        load_organ_mask(msd, "liver", label_id=1)
    assert not [r for r in caplog.records if "label 5 is" in r.getMessage() or "label 1 is" in r.getMessage()]
    with caplog.at_level("WARNING"):
        load_organ_mask(msd, "liver", label_id=2)
    assert "label 2 is the tumor in an MSD/LiTS/KiTS label map, not the liver" in caplog.text
