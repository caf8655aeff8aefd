"""backend.io: geometry-exact read/write, DICOM series, bad input."""

from __future__ import annotations

import os

import numpy as np
import pytest
import SimpleITK as sitk

from backend.errors import DiffTumorError
from backend.io import Geometry, Volume, check_same_grid, read_image, write_image


def _rotation(ax_deg: float, ay_deg: float, az_deg: float) -> np.ndarray:
    ax, ay, az = np.deg2rad([ax_deg, ay_deg, az_deg])
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


OBLIQUE = tuple(_rotation(10, -20, 35).ravel())
# A permuted + flipped direction and float32-representable spacing/origin: NIfTI keeps them bit-exact.
PERMUTED = (0.0, -1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0)


def _ct(shape=(5, 6, 7), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(-1024, 3000, size=shape).astype(np.int16)


def _snapshot(path):
    st = os.stat(path)
    return path.read_bytes(), st.st_mtime_ns


# ------------------------------------------------------------------------------------------ Geometry
def test_geometry_dict_round_trip_and_shape():
    g = Geometry((7, 6, 5), (0.7, 0.8, 2.5), (-1.0, 2.0, 3.0), OBLIQUE)
    assert Geometry.from_dict(g.to_dict()) == g
    assert g.shape == (5, 6, 7)
    assert g.voxel_volume_ml == pytest.approx(0.7 * 0.8 * 2.5 / 1000)


def test_geometry_matches_tolerates_noise_only():
    g = Geometry((4, 4, 4), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    noisy = Geometry((4, 4, 4), (0.9999999999999929, 1.0, 1.0000000000000002), (1e-9, 0.0, 0.0))
    assert g.matches(noisy)
    assert not g.matches(Geometry((4, 4, 4), (1.01, 1.0, 1.0), (0.0, 0.0, 0.0)))
    assert not g.matches(Geometry((4, 4, 5), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0)))
    assert not g.matches(Geometry((4, 4, 4), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (-1, 0, 0, 0, -1, 0, 0, 0, 1)))
    assert not g.matches(Geometry((4, 4, 4), (1.0, 1.0, 1.0), (0.5, 0.0, 0.0)))


def test_world_voxel_conversions_agree_with_simpleitk():
    g = Geometry((7, 6, 5), (0.7, 0.8, 2.5), (-100.3, 20.1, 55.55), OBLIQUE)
    image = g.apply_to(sitk.Image(7, 6, 5, sitk.sitkInt16))
    idx = np.array([[0, 0, 0], [3, 2, 1], [6.5, 0.25, 4]])
    world = g.voxel_to_world(idx)
    for i, p in zip(idx, world):
        np.testing.assert_allclose(p, image.TransformContinuousIndexToPhysicalPoint(tuple(i)), atol=1e-9)
    np.testing.assert_allclose(g.world_to_voxel(world), idx, atol=1e-9)


def test_volume_rejects_shape_mismatch():
    with pytest.raises(ValueError, match="does not match geometry"):
        Volume(np.zeros((5, 6, 7)), Geometry((5, 6, 7), (1, 1, 1), (0, 0, 0)))


# ------------------------------------------------------------------------------------------ round trips
@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha"])
def test_round_trip_exact_geometry_and_hu(tmp_path, suffix):
    g = Geometry((7, 6, 5), (0.75, 0.8125, 2.5), (-100.25, 20.5, 55.125), PERMUTED)
    arr = _ct()
    out = write_image(arr, tmp_path / f"ct{suffix}", g)
    v = read_image(out)
    assert v.geometry == g  # bit-exact
    assert v.dtype == np.int16
    np.testing.assert_array_equal(v.array, arr)
    assert v.path == out


def test_oblique_nifti_round_trip_is_float32_exact_then_stable(tmp_path):
    g = Geometry((7, 6, 5), (0.7, 0.8, 2.5), (-100.3, 20.1, 55.55), OBLIQUE)
    arr = _ct()
    v1 = read_image(write_image(arr, tmp_path / "a.nii.gz", g))
    # NIfTI stores float32: the first trip rounds float64 inputs to float32 and nothing more ...
    np.testing.assert_allclose(v1.spacing, np.float32(g.spacing), rtol=0, atol=0)
    np.testing.assert_allclose(v1.origin, np.float32(g.origin), rtol=0, atol=0)
    np.testing.assert_allclose(v1.direction, g.direction, atol=1e-7)
    assert v1.geometry.matches(g)
    # ... and geometry read from a file then survives any further trips bit-exactly.
    v2 = read_image(write_image(v1, tmp_path / "b.nii.gz"))
    assert v2.geometry == v1.geometry
    np.testing.assert_array_equal(v2.array, arr)


def test_real_ct_round_trip_is_bit_exact(totalseg_ct, tmp_path):
    v = read_image(totalseg_ct)
    assert v.dtype == np.int16
    assert v.geometry.direction == (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)
    w = read_image(write_image(v, tmp_path / "copy.nii.gz"))
    assert w.geometry == v.geometry
    assert w.dtype == np.int16
    np.testing.assert_array_equal(w.array, v.array)


def test_write_geometry_first_order_and_bool(tmp_path):
    g = Geometry((4, 3, 2), (1.5, 1.5, 3.0), (0, 0, 0))
    mask = np.zeros(g.shape, bool)
    mask[1, 1, 1] = True
    v = read_image(write_image(mask, g, tmp_path / "m.nii.gz"))
    assert v.dtype == np.uint8 and v.array.sum() == 1


# ------------------------------------------------------------------------------------------ DICOM
def _write_dicom_series(volume: Volume, folder, series_uid: str, n_slices: int | None = None):
    image = volume.to_sitk()
    d = np.reshape(volume.direction, (3, 3))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    orientation = "\\".join(f"{v:.10f}" for v in (*d[:, 0], *d[:, 1]))
    n = image.GetDepth() if n_slices is None else n_slices
    for k in range(n):
        sl = image[:, :, k]
        pos = image.TransformIndexToPhysicalPoint((0, 0, k))
        tags = {
            "0008|0060": "CT",
            "0008|0016": "1.2.840.10008.5.1.4.1.1.2",
            "0008|0018": f"{series_uid}.{k + 1}",
            "0020|000d": "1.2.826.0.1.3680043.2.1125.1",
            "0020|000e": series_uid,
            "0020|0013": str(k + 1),
            "0020|0032": "\\".join(f"{v:.10f}" for v in pos),
            "0020|0037": orientation,
            "0018|0050": f"{volume.spacing[2]:.6f}",
            "0028|0030": f"{volume.spacing[1]:.6f}\\{volume.spacing[0]:.6f}",
            "0028|1052": "0",
            "0028|1053": "1",
        }
        for key, value in tags.items():
            sl.SetMetaData(key, value)
        writer.SetFileName(str(folder / f"{series_uid[-3:]}_{k:03d}.dcm"))
        writer.Execute(sl)


def test_dicom_series_matches_nifti_conversion(tmp_path):
    rot = _rotation(0, 0, 20) @ np.diag([-1.0, -1.0, 1.0])  # right-handed, oblique in-plane
    g = Geometry((8, 7, 6), (0.75, 0.8, 2.5), (120.0, -30.0, 200.0), tuple(rot.ravel()))
    v = Volume(_ct((6, 7, 8), seed=3), g)
    folder = tmp_path / "dicom"
    folder.mkdir()
    _write_dicom_series(v, folder, "1.2.826.0.1.3680043.2.1125.2.100")
    _write_dicom_series(v, folder, "1.2.826.0.1.3680043.2.1125.2.200", n_slices=3)  # smaller decoy series
    before = {p.name: _snapshot(p) for p in folder.iterdir()}

    d = read_image(folder)
    assert d.shape == (6, 7, 8)
    assert d.geometry.matches(g)
    np.testing.assert_array_equal(d.array, v.array)
    assert np.issubdtype(d.dtype, np.integer)

    n = read_image(write_image(d, tmp_path / "converted.nii.gz"))
    assert n.geometry.matches(d.geometry)
    np.testing.assert_array_equal(n.array, d.array)
    assert {p.name: _snapshot(p) for p in folder.iterdir()} == before
    # a study folder with the series one level down is found too
    nested = read_image(tmp_path)
    assert nested.geometry == d.geometry
    np.testing.assert_array_equal(nested.array, d.array)


# ------------------------------------------------------------------------------------------ bad input
def test_missing_file(tmp_path):
    with pytest.raises(DiffTumorError, match=r"nope\.nii\.gz: no such file"):
        read_image(tmp_path / "nope.nii.gz")


def test_corrupt_file_is_one_line_and_untouched(tmp_path):
    p = tmp_path / "x.nii.gz"
    p.write_bytes(b"\x1f\x8b garbage, not an image" * 50)
    before = _snapshot(p)
    with pytest.raises(DiffTumorError) as info:
        read_image(p)
    msg = str(info.value)
    assert msg == f"{p}: truncated or corrupt: the compressed data does not start with a valid header"
    assert _snapshot(p) == before


def test_2d_image_rejected(tmp_path):
    p = tmp_path / "slice.nii.gz"
    sitk.WriteImage(sitk.Image(8, 8, sitk.sitkInt16), str(p))
    before = _snapshot(p)
    with pytest.raises(DiffTumorError, match=r"slice\.nii\.gz: image is 2D"):
        read_image(p)
    assert _snapshot(p) == before


def test_4d_image_rejected_but_singleton_time_accepted(tmp_path):
    p = tmp_path / "series.nii.gz"
    sitk.WriteImage(sitk.Image([6, 5, 4, 3], sitk.sitkInt16), str(p))
    before = _snapshot(p)
    with pytest.raises(DiffTumorError, match=r"series\.nii\.gz: image is 4D"):
        read_image(p)
    assert _snapshot(p) == before
    q = tmp_path / "single.nii.gz"
    sitk.WriteImage(sitk.Image([6, 5, 4, 1], sitk.sitkInt16), str(q))
    assert read_image(q).shape == (4, 5, 6)


def test_vector_image_rejected(tmp_path):
    p = tmp_path / "rgb.nii.gz"
    sitk.WriteImage(sitk.Image([6, 5, 4], sitk.sitkVectorUInt8, 3), str(p))
    with pytest.raises(DiffTumorError, match=r"rgb\.nii\.gz: image has 3 components"):
        read_image(p)


def test_folder_without_dicom(tmp_path):
    with pytest.raises(DiffTumorError, match="holds no DICOM series"):
        read_image(tmp_path)


def test_write_refuses_to_overwrite_source(tmp_path):
    p = write_image(_ct(), tmp_path / "ct.nii.gz", Geometry((7, 6, 5), (1, 1, 1), (0, 0, 0)))
    v = read_image(p)
    before = _snapshot(p)
    with pytest.raises(DiffTumorError, match="refusing to overwrite the input"):
        write_image(Volume(v.array * 0, v.geometry, p), p)
    assert _snapshot(p) == before
    write_image(Volume(v.array * 0, v.geometry, p), p, overwrite=True)
    assert read_image(p).array.max() == 0
    assert sorted(x.name for x in tmp_path.iterdir()) == ["ct.nii.gz"]  # no temporary left behind


def test_write_bad_targets(tmp_path):
    g = Geometry((7, 6, 5), (1, 1, 1), (0, 0, 0))
    with pytest.raises(DiffTumorError, match="unknown output format"):
        write_image(_ct(), tmp_path / "ct.png", g)
    with pytest.raises(DiffTumorError, match="does not exist"):
        write_image(_ct(), tmp_path / "missing" / "ct.nii.gz", g)


def test_check_same_grid_message():
    a = Geometry((7, 6, 5), (1, 1, 1), (0, 0, 0))
    check_same_grid(a, Geometry((7, 6, 5), (1.0000000001, 1, 1), (0, 0, 0)), names=("ct.nii.gz", "m.nii.gz"))
    with pytest.raises(DiffTumorError, match=r"m\.nii\.gz: grid does not match ct\.nii\.gz \(spacing"):
        check_same_grid(a, Geometry((7, 6, 5), (2, 1, 1), (0, 0, 0)), names=("ct.nii.gz", "m.nii.gz"))
    with pytest.raises(DiffTumorError, match=r"size \(7, 6, 4\) vs \(7, 6, 5\)"):
        check_same_grid(a, Geometry((7, 6, 4), (1, 1, 1), (0, 0, 0)), names=("ct.nii.gz", "m.nii.gz"))


def test_write_text_atomic_replaces_whole_or_not_at_all(tmp_path, monkeypatch):
    from backend.io import write_text_atomic

    target = tmp_path / "notes.json"
    write_text_atomic(target, "first – UTF-8\n")
    assert target.read_text(encoding="utf-8") == "first – UTF-8\n"

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="No space left on device"):
        write_text_atomic(target, "second")
    assert target.read_text(encoding="utf-8") == "first – UTF-8\n"  # the old file survives
    assert [p.name for p in tmp_path.iterdir()] == ["notes.json"]  # no temporary left behind


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".mha"])
def test_non_finite_voxels_survive_reading(tmp_path, suffix):
    """ITK's NIfTI reader turned NaN and inf into 0 (a valid HU), so a CT with NaNs passed every check."""
    a = np.random.default_rng(0).normal(0, 100, (6, 7, 8)).astype(np.float32)
    a[1, 2, 3], a[4, 5, 6], a[0, 0, 0] = np.nan, np.inf, 0.0
    img = sitk.GetImageFromArray(a)
    img.SetSpacing((0.8, 0.9, 2.5))
    sitk.WriteImage(img, str(tmp_path / f"ct{suffix}"))
    got = read_image(tmp_path / f"ct{suffix}").array
    assert np.isnan(got[1, 2, 3]) and np.isposinf(got[4, 5, 6]) and got[0, 0, 0] == 0
    assert np.array_equal(np.isfinite(got), np.isfinite(a))


def test_label_map_range_tells_label_maps_from_ct(totalseg_ct, totalseg_seg):
    from backend.io import label_map_range, read_image

    rng = np.random.default_rng(0)
    labels = np.zeros((20, 40, 40), np.uint8)
    labels[5:15, 10:30, 10:30] = 1
    labels[8:12, 15:20, 15:20] = 2
    assert label_map_range(labels) == (0, 2)
    soft_tissue_crop = rng.normal(50, 15, (20, 40, 40)).clip(0, 120).astype(np.int16)  # no air, no fat
    assert label_map_range(soft_tissue_crop) is None
    assert label_map_range(labels.astype(np.float32)) is None  # not whole-number typed
    seg, ct = read_image(totalseg_seg), read_image(totalseg_ct)
    assert label_map_range(seg.array) is not None
    assert label_map_range(ct.array) is None


def test_scaled_integer_nifti_stays_integer(tmp_path):
    """uint16 with scl_inter -1024 (as some converters store CT): ITK reads float32; we give back int16 with the
    same HU, so synthesis and saving keep an integer CT. A fractional scaling stays float."""
    import nibabel as nib

    rng = np.random.default_rng(0)
    hu = rng.integers(-1024, 2000, (10, 12, 14))
    img = nib.Nifti1Image((hu + 1024).astype(np.uint16), np.diag([0.8, 0.8, 2.5, 1.0]))
    img.header.set_slope_inter(1, -1024)
    nib.save(img, tmp_path / "scaled.nii.gz")
    v = read_image(tmp_path / "scaled.nii.gz")
    assert v.dtype == np.int16 and np.array_equal(v.array, hu.T)
    out = write_image(v, tmp_path / "copy.nii.gz")
    back = read_image(out)
    assert back.dtype == np.int16 and np.array_equal(back.array, hu.T)

    img.header.set_slope_inter(0.5, -1024)
    nib.save(img, tmp_path / "half.nii.gz")
    assert read_image(tmp_path / "half.nii.gz").dtype.kind == "f"


# ------------------------------------------------------------------------------------ integrity (issue 14)
def _real_ct_copy(totalseg_ct, tmp_path):
    p = tmp_path / "ct.nii.gz"
    p.write_bytes(open(totalseg_ct, "rb").read())
    return p


@pytest.mark.parametrize("keep", [200_000, 3000, -4])
def test_cut_gzip_nifti_is_refused_as_ending_early(totalseg_ct, tmp_path, keep):
    """Defect 2: SimpleITK read a cut-off .nii.gz as a partly zero volume without a word."""
    data = open(totalseg_ct, "rb").read()
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes(data[:keep])
    with pytest.raises(DiffTumorError) as info:
        read_image(cut)
    assert str(info.value) == f"{cut}: truncated or corrupt: the compressed data ends early"
    assert cut.read_bytes() == data[:keep]


def test_damaged_gzip_nifti_fails_its_checksum(totalseg_ct, tmp_path):
    data = bytearray(open(totalseg_ct, "rb").read())
    data[len(data) // 2] ^= 0xFF
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(bytes(data))
    with pytest.raises(DiffTumorError, match=r"bad\.nii\.gz: truncated or corrupt: the compressed data (fails its "
                       r"checksum|is damaged)"):
        read_image(bad)


def test_complete_gzip_of_a_short_nifti_is_refused(tmp_path):
    import gzip

    write_image(_ct((6, 7, 8)), tmp_path / "ct.nii", Geometry((8, 7, 6), (1, 1, 1), (0, 0, 0)))
    raw = (tmp_path / "ct.nii").read_bytes()
    (tmp_path / "short.nii.gz").write_bytes(gzip.compress(raw[:-10]))
    with pytest.raises(DiffTumorError, match=r"short\.nii\.gz: truncated or corrupt: the image data ends early \(the "
                       r"complete compressed stream holds 1,014 of the 1,024 bytes its NIfTI header promises\)"):
        read_image(tmp_path / "short.nii.gz")
    # several gzip members (as pigz or cat a.gz b.gz write) are one valid file
    (tmp_path / "two.nii.gz").write_bytes(gzip.compress(raw[:500]) + gzip.compress(raw[500:]))
    np.testing.assert_array_equal(read_image(tmp_path / "two.nii.gz").array, read_image(tmp_path / "ct.nii").array)


@pytest.mark.parametrize("suffix,compress", [(".nii", False), (".nrrd", False), (".nrrd", True), (".mha", False),
                                             (".mha", True), (".mhd", False), (".mhd", True), (".nhdr", False),
                                             (".nhdr", True)])
def test_cut_files_of_every_format_are_refused(tmp_path, suffix, compress):
    g = Geometry((20, 18, 12), (0.8, 0.8, 2.0), (1.0, 2.0, 3.0))
    path = write_image(_ct((12, 18, 20)), tmp_path / f"ct{suffix}", g, compress=compress)
    assert read_image(path).shape == (12, 18, 20)
    data_files = [p for p in tmp_path.iterdir() if p != path]
    target = data_files[0] if data_files else path
    data = target.read_bytes()
    target.write_bytes(data[: len(data) * 3 // 5])
    with pytest.raises(DiffTumorError) as info:
        read_image(path)
    msg = str(info.value)
    assert msg.startswith(f"{target}: truncated or corrupt: the ") and " ends early" in msg and "\n" not in msg


def test_empty_file_is_refused(tmp_path):
    (tmp_path / "empty.nii.gz").write_bytes(b"")
    with pytest.raises(DiffTumorError, match=r"empty\.nii\.gz: truncated or corrupt: the file is empty \(0 bytes\)"):
        read_image(tmp_path / "empty.nii.gz")


@pytest.mark.parametrize("keep", [-100, 900, 300, 0])
def test_dicom_series_with_a_cut_slice_is_refused(tmp_path, keep):
    """GDCM leaves a slice it cannot parse out of the series: the volume silently lacked it."""
    g = Geometry((16, 16, 5), (0.75, 0.8, 2.5), (120.0, -30.0, 200.0))
    folder = tmp_path / "dicom"
    folder.mkdir()
    _write_dicom_series(Volume(_ct((5, 16, 16), seed=3), g), folder, "1.2.826.0.1.3680043.2.1125.2.300")
    _write_dicom_series(Volume(_ct((5, 16, 16), seed=4), g), folder, "1.2.826.0.1.3680043.2.1125.2.400", n_slices=3)
    assert read_image(folder).shape == (5, 16, 16)  # an intact decoy series beside it is fine
    victim = sorted(folder.glob("300_*.dcm"))[2]
    data = victim.read_bytes()
    victim.write_bytes(data[:keep] if keep else b"")
    with pytest.raises(DiffTumorError) as info:
        read_image(folder)
    assert str(info.value).startswith(f"{victim}: truncated or corrupt: the ")


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.uint16, np.int32, np.float32, np.float64])
def test_gzip_nifti_inflated_once_equals_simpleitk(tmp_path, dtype, monkeypatch):
    """A plain 3D .nii.gz is inflated once, by the integrity check, into the array: same voxels, type and grid
    as SimpleITK's own read."""
    import backend.integrity as integrity

    used = []
    real = integrity.read_gzip_nifti_voxels
    monkeypatch.setattr(integrity, "read_gzip_nifti_voxels", lambda *a: used.append(1) or real(*a))
    g = Geometry((9, 7, 5), (0.75, 0.8125, 2.5), (-100.25, 20.5, 55.125), PERMUTED)
    arr = (np.random.default_rng(1).random((5, 7, 9)) * 100).astype(dtype)
    path = write_image(arr, tmp_path / "x.nii.gz", g)
    v = read_image(path)
    ref = sitk.ReadImage(str(path))
    assert used and v.dtype == sitk.GetArrayViewFromImage(ref).dtype and v.array.flags.c_contiguous
    np.testing.assert_array_equal(v.array, sitk.GetArrayFromImage(ref))
    assert v.geometry == Geometry.from_image(ref)


def test_big_endian_gzip_nifti_reads_like_simpleitk(tmp_path):
    import nibabel as nib

    arr = np.arange(4 * 5 * 6, dtype=">i2").reshape(4, 5, 6)  # nibabel order (x, y, z)
    img = nib.Nifti1Image(arr, np.diag([1.5, 2.0, 2.5, 1.0]))
    img.set_data_dtype(">i2")
    nib.save(img, tmp_path / "be.nii.gz")
    v = read_image(tmp_path / "be.nii.gz")
    np.testing.assert_array_equal(v.array, sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "be.nii.gz"))))
    np.testing.assert_array_equal(v.array, arr.T)
    assert v.dtype == np.int16 and v.dtype.isnative


def test_compressed_dicom_series_with_a_cut_slice_is_refused_and_other_objects_are_not(tmp_path):
    import struct

    folder = tmp_path / "dicom"
    folder.mkdir()
    arr = np.random.default_rng(0).integers(0, 2000, (4, 32, 32)).astype(np.int16)
    img = sitk.GetImageFromArray(arr)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    writer.SetUseCompression(True)  # encapsulated (compressed) pixel data
    for k in range(4):
        sl = img[:, :, k]
        for key, value in {"0020|000e": "1.2.826.0.1.3680043.2.1125.2.777", "0020|0032": f"0\\0\\{k * 2.5}",
                           "0020|0037": "1\\0\\0\\0\\1\\0", "0020|0013": str(k), "0008|0060": "CT"}.items():
            sl.SetMetaData(key, value)
        writer.SetFileName(str(folder / f"s{k}.dcm"))
        writer.Execute(sl)
    data = (folder / "s2.dcm").read_bytes()
    # a DICOM object without pixel data and without a series (just a file meta header, as in a DICOMDIR) is no slice
    (meta_len,) = struct.unpack("<I", data[140:144])
    (folder / "DICOMDIR").write_bytes(data[: 144 + meta_len])
    np.testing.assert_array_equal(read_image(folder).array, arr)
    (folder / "s2.dcm").write_bytes(data[:-9])
    with pytest.raises(DiffTumorError, match=r"s2\.dcm: truncated or corrupt: the compressed pixel data ends early"):
        read_image(folder)
