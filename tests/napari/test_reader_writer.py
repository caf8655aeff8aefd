"""Reader/writer: LPS display, geometry kept in metadata, exact round trip, clear errors."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import SimpleITK as sitk

from backend.io import Geometry, read_image
from difftumor_napari._reader import (
    display_geometry,
    from_display,
    get_reader,
    looks_like_labels,
    lps_reorientation,
    to_display,
)
from difftumor_napari._writer import write_image, write_labels

# RAS-stored NIfTI-like direction with an axis swap: index x -> world -y, y -> world -x, z -> +z
SWAPPED_RAS = (0.0, -1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0)


def _write(path, array, spacing=(0.75, 0.8, 2.5), origin=(-10.5, 20.25, -300.0), direction=SWAPPED_RAS):
    img = sitk.GetImageFromArray(array)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    img.SetDirection(direction)
    sitk.WriteImage(img, str(path))
    return path


def _ct(shape=(6, 7, 8), seed=0):
    return np.random.default_rng(seed).integers(-1024, 1500, size=shape).astype(np.int16)


def _labels(shape=(6, 7, 8)):
    lab = np.zeros(shape, np.uint8)
    lab[1:4, 2:5, 1:3] = 5  # liver
    lab[2:5, 1:3, 5:7] = 1  # spleen
    lab[0:2, 5:7, 6:8] = 3  # kidney_left
    return lab


@pytest.mark.parametrize("signs", list(itertools.product((1, -1), repeat=3)))
@pytest.mark.parametrize("perm", list(itertools.permutations(range(3))))
def test_reorientation_to_lps_world_points_agree(perm, signs):
    """Every voxel keeps its world position after the display reorientation (all 48 directions)."""
    d = np.zeros((3, 3))
    for j, (w, s) in enumerate(zip(perm, signs)):
        d[w, j] = s
    geo = Geometry((4, 5, 6), (0.7, 1.3, 2.9), (3.0, -8.0, 12.5), tuple(d.ravel()))
    arr = np.arange(np.prod(geo.shape)).reshape(geo.shape)
    axes, flip = lps_reorientation(geo)
    shown = display_geometry(geo, axes, flip)
    assert np.allclose(shown.direction_matrix, np.eye(3))
    disp = to_display(arr, axes, flip)
    assert disp.shape == shown.shape
    np.testing.assert_array_equal(from_display(disp, axes, flip), arr)
    # the voxel holding value v sits at the same world point in both grids
    for v in (0, 17, arr.size - 1):
        old = np.argwhere(arr == v)[0][::-1]  # (x, y, z) index
        new = np.argwhere(disp == v)[0][::-1]
        np.testing.assert_allclose(geo.voxel_to_world(old[None]), shown.voxel_to_world(new[None]), atol=1e-9)


def test_get_reader_cheap_check(tmp_path):
    assert get_reader(str(tmp_path / "notes.txt")) is None
    assert get_reader(str(tmp_path / "photo.png")) is None
    assert get_reader(str(tmp_path)) is None  # empty folder: not a DICOM series
    for name in ("a.nii", "a.nii.gz", "A.NRRD", "a.nhdr", "a.mha", "a.mhd"):
        assert callable(get_reader(str(tmp_path / name)))
    assert get_reader([str(tmp_path / "a.nii.gz"), str(tmp_path / "b.txt")]) is None


def test_ct_opens_lps_with_abdomen_window(tmp_path):
    ct = _ct()
    path = _write(tmp_path / "ct.nii.gz", ct)
    [(data, kw, kind)] = get_reader(str(path))(str(path))
    assert kind == "image" and data.dtype == np.int16
    assert kw["contrast_limits"] == (-150.0, 250.0) and kw["colormap"] == "gray"
    meta = kw["metadata"]["difftumor"]
    assert meta["kind"] == "ct"
    orig = Geometry.from_dict(meta["geometry"])
    vol = read_image(path)
    assert orig == vol.geometry
    # swapped axes + RAS signs: display axes are (z, y, x) of LPS -> shape (6, 8, 7)
    assert data.shape == (6, 8, 7)
    shown = Geometry.from_dict(meta["display_geometry"])
    assert kw["scale"] == tuple(shown.spacing[::-1]) == pytest.approx((2.5, 0.75, 0.8))
    assert kw["translate"] == tuple(shown.origin[::-1])
    np.testing.assert_allclose(shown.direction_matrix, np.eye(3))


def test_labels_open_as_labels_with_organ_names(tmp_path):
    path = _write(tmp_path / "case_seg.nii.gz", _labels())
    [(data, kw, kind)] = get_reader(str(path))(str(path))
    assert kind == "labels" and np.issubdtype(data.dtype, np.integer)
    names = dict(zip(kw["features"]["index"].tolist(), kw["features"]["organ"].tolist()))
    assert names == {0: "background", 1: "spleen", 3: "kidney_left", 5: "liver"}
    assert kw["metadata"]["difftumor"]["label_names"] == {"1": "spleen", "3": "kidney_left", "5": "liver"}


def test_looks_like_labels():
    assert looks_like_labels(_labels())
    assert not looks_like_labels(_ct())
    assert not looks_like_labels(np.random.default_rng(0).random((4, 4, 4)))
    assert looks_like_labels(np.zeros((4, 4, 4), bool))
    many = np.arange(1000, dtype=np.uint16).reshape(10, 10, 10)
    assert not looks_like_labels(many) and looks_like_labels(many, "mask.nii.gz")


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha"])
def test_round_trip_restores_geometry_and_values(tmp_path, suffix):
    ct, lab = _ct(), _labels()
    ct_in = _write(tmp_path / f"ct{suffix}", ct)
    lab_in = _write(tmp_path / f"seg{suffix}", lab)
    before = {p: p.read_bytes() for p in (ct_in, lab_in)}
    for src, writer, ref in ((ct_in, write_image, ct), (lab_in, write_labels, lab)):
        [(data, kw, _)] = get_reader(str(src))(str(src))
        out = tmp_path / f"out_{src.name.split('.')[0]}{suffix}"
        assert writer(str(out), data, kw) == [str(out)]
        a, b = read_image(src), read_image(out)
        assert a.geometry == b.geometry  # exact: spacing, origin, direction
        assert b.dtype == ref.dtype
        np.testing.assert_array_equal(b.array, ref)
    assert {p: p.read_bytes() for p in before} == before  # inputs untouched


def test_real_ct_round_trip(tmp_path, totalseg_ct, totalseg_seg):
    for src, writer in ((totalseg_ct, write_image), (totalseg_seg, write_labels)):
        [(data, kw, kind)] = get_reader(str(src))(str(src))
        assert kind == ("labels" if src == totalseg_seg else "image")
        out = tmp_path / f"{kind}.nii.gz"
        writer(str(out), data, kw)
        a, b = read_image(src), read_image(out)
        assert a.geometry == b.geometry and a.dtype == b.dtype
        np.testing.assert_array_equal(a.array, b.array)
    names = set(kw["features"]["organ"].tolist())
    assert {"liver", "spleen", "pancreas"} <= names


def test_new_labels_layer_written_on_lps_grid(tmp_path):
    lab = _labels()
    out = tmp_path / "painted"  # no suffix -> .nii.gz appended
    [written] = write_labels(str(out), lab.astype(np.int32), {"name": "painted", "scale": (2.0, 1.0, 0.5),
                                                              "translate": (5.0, -1.0, 3.0)})
    vol = read_image(written)
    assert written.endswith("painted.nii.gz")
    assert vol.geometry.spacing == (0.5, 1.0, 2.0) and vol.geometry.origin == (3.0, -1.0, 5.0)
    np.testing.assert_array_equal(vol.array, lab)


def test_writer_refuses_bad_layers(tmp_path):
    from backend.errors import DiffTumorError

    path = _write(tmp_path / "ct.nii.gz", _ct())
    [(data, kw, _)] = get_reader(str(path))(str(path))
    with pytest.raises(DiffTumorError, match="recorded grid"):
        write_image(str(tmp_path / "x.nii.gz"), data[:3], kw)
    with pytest.raises(DiffTumorError, match="only 3D"):
        write_image(str(tmp_path / "x.nii.gz"), data[0], kw)
    with pytest.raises(DiffTumorError, match="non-integer"):
        write_labels(str(tmp_path / "x.nii.gz"), np.full((2, 2, 2), 0.5), {"name": "l"})
    assert not (tmp_path / "x.nii.gz").exists()


def test_corrupt_file_gives_one_notification(tmp_path, monkeypatch):
    import napari.utils.notifications as notifications

    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"this is not a NIfTI file")
    shown = []
    monkeypatch.setattr(notifications, "show_error", lambda msg: shown.append(msg))
    result = get_reader(str(bad))(str(bad))
    assert result == [(None,)]  # napari adds nothing and shows no second error
    assert len(shown) == 1 and "broken.nii.gz" in shown[0] and "\n" not in shown[0]
    assert bad.read_bytes() == b"this is not a NIfTI file"


def test_2d_image_is_refused_with_a_clear_line(tmp_path, monkeypatch):
    import napari.utils.notifications as notifications

    path = tmp_path / "slice.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((5, 5), np.int16)), str(path))
    shown = []
    monkeypatch.setattr(notifications, "show_error", lambda msg: shown.append(msg))
    assert get_reader(str(path))(str(path)) == [(None,)]
    assert len(shown) == 1 and "slice.nii.gz" in shown[0] and "2D" in shown[0]


def test_dicom_folder_is_read(tmp_path):
    ct = _ct((4, 5, 6))
    img = sitk.GetImageFromArray(ct)
    img.SetSpacing((0.7, 0.7, 2.0))
    folder = tmp_path / "series"
    folder.mkdir()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    series_uid = "1.2.826.0.1.3680043.2.1125.1"
    for k in range(ct.shape[0]):
        sl = img[:, :, k]
        sl.SetMetaData("0020|000e", series_uid)
        sl.SetMetaData("0020|0032", f"0\\0\\{2.0 * k}")
        sl.SetMetaData("0020|0013", str(k + 1))
        sl.SetMetaData("0020|0037", "1\\0\\0\\0\\1\\0")
        sl.SetMetaData("0008|0060", "CT")
        writer.SetFileName(str(folder / f"{k:03d}.dcm"))
        writer.Execute(sl)
    reader = get_reader(str(folder))
    assert callable(reader)
    [(data, kw, kind)] = reader(str(folder))
    assert kind == "image" and data.shape == ct.shape
    np.testing.assert_array_equal(data, ct)
    assert kw["scale"] == pytest.approx((2.0, 0.7, 0.7))


def test_napari_open_and_save_through_the_plugin(tmp_path):
    """The same round trip through napari's own plugin machinery (npe2 reader + writer)."""
    from napari.components import ViewerModel
    from npe2 import PluginManager

    PluginManager.instance().discover()  # what napari does when its window starts
    ct_in = _write(tmp_path / "ct.nii.gz", _ct())
    seg_in = _write(tmp_path / "ct_seg.nii.gz", _labels())
    viewer = ViewerModel()
    viewer.open([str(ct_in), str(seg_in)], plugin="difftumor", stack=False)
    ct, seg = viewer.layers
    assert type(ct).__name__ == "Image" and type(seg).__name__ == "Labels"
    for layer, src in ((ct, ct_in), (seg, seg_in)):
        out = tmp_path / f"saved_{src.name}"
        assert layer.save(str(out), plugin="difftumor") == [str(out)]
        a, b = read_image(src), read_image(out)
        assert a.geometry == b.geometry and a.dtype == b.dtype
        np.testing.assert_array_equal(a.array, b.array)


def test_cut_gzip_file_gives_one_notification_naming_the_cause(tmp_path, totalseg_ct, monkeypatch):
    """The plugin reads through backend.io.read_image, so a cut-off file is refused there too (issue 14)."""
    import napari.utils.notifications as notifications

    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes(open(totalseg_ct, "rb").read()[:200_000])
    shown = []
    monkeypatch.setattr(notifications, "show_error", lambda msg: shown.append(msg))
    assert get_reader(str(cut))(str(cut)) == [(None,)]
    assert shown == [f"{cut}: truncated or corrupt: the compressed data ends early"]
