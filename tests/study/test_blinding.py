"""Blinding on real-looking data: the resampling treats every case alike, and confounds are warned about.

The cases are cut from the shared abdominal CT (3 mm, int16, flipped x/y axes) and, for the spacing
confound, from a 1 mm resampling of it.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from study.design import CaseSource, StudySettings, create_study, read_key


def _liver_core(seg) -> tuple[int, int, int]:
    """(z, y, x) index of the liver voxel farthest from the liver's edge."""
    from scipy import ndimage

    depth = ndimage.distance_transform_edt(np.pad(seg == 5, 1))[1:-1, 1:-1, 1:-1]  # the volume's edge is an edge
    return tuple(int(i) for i in np.unravel_index(np.argmax(depth), depth.shape))


def _noise(arr: np.ndarray) -> float:
    """Noise as the confound check measures it: robust high-pass std over the soft tissue of the whole crop
    (a one-voxel shift of the crop changes it by well under 1 %)."""
    from study.confounds import organ_noise

    return organ_noise(arr, None, arr <= -1024)


@pytest.fixture(scope="module")
def ct_and_core(totalseg_ct, totalseg_seg):
    import SimpleITK as sitk

    ct = sitk.ReadImage(str(totalseg_ct))
    core = _liver_core(sitk.GetArrayFromImage(sitk.ReadImage(str(totalseg_seg))))
    return ct, core


def _write_case(ct, x_stop: int, corner_zyx, width: int, path) -> CaseSource:
    """A crop of ``ct`` (x voxels 0..x_stop, geometry kept) and a tumor mask: a cube of ``width`` voxels
    from ``corner_zyx``; an odd width puts the centroid on a voxel, an even one between voxels."""
    import SimpleITK as sitk

    crop = ct[:x_stop, :, :]
    mask = np.zeros(sitk.GetArrayFromImage(crop).shape, np.uint8)
    z, y, x = corner_zyx
    mask[z:z + width, y:y + width, x:x + width] = 2
    m = sitk.GetImageFromArray(mask)
    m.CopyInformation(crop)
    sitk.WriteImage(crop, str(path), useCompression=True)
    sitk.WriteImage(m, str(path).replace(".nii.gz", "_mask.nii.gz"), useCompression=True)
    return CaseSource(path, "real", "liver", path.with_name(path.name.replace(".nii.gz", "_mask.nii.gz")))


@pytest.mark.parametrize("spacing", [3.0, 1.0])
def test_on_voxel_and_off_voxel_centroids_get_the_same_noise(tmp_path, ct_and_core, spacing):
    """A centroid on a whole voxel (every symmetric synthesized tumor) used to land half a voxel off the
    even study grid, so linear resampling averaged neighbours and halved the noise of that case only."""
    ct, (z, y, x) = ct_and_core
    on = _write_case(ct, 121, (z - 1, y - 1, x - 1), 3, tmp_path / "on.nii.gz")  # centroid (z, y, x)
    off = _write_case(ct, 120, (z, y, x), 2, tmp_path / "off.nii.gz")  # centroid (z, y, x) + 0.5
    off = CaseSource(off.image, "synthetic", "liver", off.mask)
    settings = StudySettings(seed=1, spacing=(spacing,) * 3, roi_size_mm=(90.0, 90.0, 90.0))
    study = create_study([on], [off], tmp_path / "study", settings=settings)
    assert all(n % 2 == 0 for n in study.size)  # an even grid: its centre lies between voxels
    import SimpleITK as sitk

    key = read_key(tmp_path / "study.key")
    noise = {key[cid][0]: _noise(sitk.GetArrayFromImage(sitk.ReadImage(str(study.case_path(cid)))))
             for cid in study.case_ids}
    assert noise["real"] == pytest.approx(noise["synthetic"], rel=0.05), noise
    resampling = json.loads((tmp_path / "study.key" / "key.json").read_text(encoding="utf-8"))["resampling"]
    if spacing == 3.0:  # the source spacing: voxels copied with an integer shift, no interpolation at all
        source = sitk.GetArrayFromImage(ct)
        for cid in study.case_ids:
            arr = sitk.GetArrayFromImage(sitk.ReadImage(str(study.case_path(cid))))
            assert np.isin(arr, source).all()
    else:
        assert len(resampling["phase"]) == 3 and all(0 <= p < 1 for p in resampling["phase"])


def _crops(ct, seg_core, folder, truth, shifts, *, spacing=None):
    """One case per x shift in ``shifts``, cut from ``ct`` around the liver core, each with a small tumor
    mask; resampled to ``spacing`` mm first when given (a finer-sliced copy of the same anatomy)."""
    import SimpleITK as sitk

    folder.mkdir()
    z, y, x = seg_core
    cases = []
    for i in shifts:
        sub = ct[x - 12 + i:x + 12 + i, y - 12:y + 12, max(0, z - 8):z + 8]
        if spacing is not None:
            size = [int(round(s * sp / spacing)) for s, sp in zip(sub.GetSize(), sub.GetSpacing())]
            sub = sitk.Resample(sub, size, sitk.Transform(), sitk.sitkLinear, sub.GetOrigin(), (spacing,) * 3,
                                sub.GetDirection(), -1024.0, sitk.sitkInt16)
        arr = sitk.GetArrayFromImage(sub)
        mask = np.zeros(arr.shape, np.uint8)
        c = np.asarray(arr.shape) // 2
        r = max(1, arr.shape[0] // 8)
        mask[c[0] - r:c[0] + r, c[1] - r:c[1] + r + i % 2, c[2] - r:c[2] + r] = 2
        m = sitk.GetImageFromArray(mask)
        m.CopyInformation(sub)
        path = folder / f"case{i}.nii.gz"
        sitk.WriteImage(sub, str(path), useCompression=True)
        sitk.WriteImage(m, str(folder / f"mask{i}.nii.gz"), useCompression=True)
        cases.append(CaseSource(path, truth, "liver", folder / f"mask{i}.nii.gz"))
    return cases


def test_a_spacing_confound_is_warned_with_numbers_and_strict_refuses(tmp_path, ct_and_core, caplog):
    """Real cases from a 1 mm resampling of the shared CT, synthetic ones from the 3 mm CT itself."""
    from backend.errors import DiffTumorError

    ct, core = ct_and_core
    real = _crops(ct, core, tmp_path / "real_1mm", "real", range(4), spacing=1.0)
    syn = _crops(ct, core, tmp_path / "syn_3mm", "synthetic", range(4))
    settings = dict(seed=2, spacing=(1.0, 1.0, 1.0), roi_size_mm=(40.0, 40.0, 30.0))
    with caplog.at_level("WARNING", logger="study.confounds"):
        create_study(real, syn, tmp_path / "study", settings=StudySettings(**settings))
    text = (tmp_path / "study.key" / "confounds.txt").read_text(encoding="utf-8")
    lines = text.splitlines()
    thickness = [line for line in lines if line.startswith("confound: slice thickness")]
    assert thickness == ["confound: slice thickness of the source (mm): real 1.00 (all 4), synthetic 3.00 (all 4); "
                         "it alone separates the classes with AUC 1.00"]
    assert any(line.startswith("confound: in-plane spacing of the source (mm): real 1.00") for line in lines)
    classifier = [line for line in lines if "logistic regression" in line]
    assert len(classifier) == 1 and "cross-validated AUC 1.00 (4-fold x 10, 8 cases)" in classifier[0]
    assert not any("dtype" in line or "data type" in line for line in lines)  # both int16
    logged = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert logged == [line for line in lines if line.startswith("confound:")]  # one warning per confound, as written
    result = json.loads((tmp_path / "study.key" / "confounds.json").read_text(encoding="utf-8"))
    assert result["classifier"]["auc"] == 1.0
    stats_csv = (tmp_path / "study.key" / "case_statistics.csv").read_text(encoding="utf-8").splitlines()
    assert stats_csv[0].startswith("case_id,truth,in_plane_mm,slice_mm,dtype,padded_pct,noise_hu") and len(stats_csv) == 9

    with pytest.raises(DiffTumorError, match=r"study --strict: \d+ confound\(s\) between the real and synthetic cases "
                                             r"\(.*slice_mm.*classifier\); nothing was written") as exc:
        create_study(real, syn, tmp_path / "strict", settings=StudySettings(**settings, strict=True))
    assert "\n" not in str(exc.value)
    assert not (tmp_path / "strict").exists() and not (tmp_path / "strict.key").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".strict")]


def test_classes_cut_alike_raise_no_confound(tmp_path, ct_and_core):
    ct, core = ct_and_core
    real = _crops(ct, core, tmp_path / "a", "real", [0, 3, 4, 7])  # the two classes interleave along x
    syn = _crops(ct, core, tmp_path / "b", "synthetic", [1, 2, 5, 6])
    settings = StudySettings(seed=2, spacing=(3.0, 3.0, 3.0), roi_size_mm=(48.0, 48.0, 30.0), strict=True)
    create_study(real, syn, tmp_path / "study", settings=settings)  # strict: would refuse on any confound
    lines = (tmp_path / "study.key" / "confounds.txt").read_text(encoding="utf-8").splitlines()
    assert len(lines) == 1 and lines[0].startswith("classifier: cross-validated AUC")
