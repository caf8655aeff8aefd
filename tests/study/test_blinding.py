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
