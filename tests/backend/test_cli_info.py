"""`difftumor info`: geometry, HU range, organs; one-line errors with exit code 2."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import SimpleITK as sitk

from backend.cli import main
from backend.io import Geometry, write_image


def test_info_real_ct(totalseg_ct, capsys):
    assert main(["info", str(totalseg_ct)]) == 0
    out = capsys.readouterr().out
    assert "122 x 101 x 30 voxels" in out
    assert "Spacing:     (3, 3, 3) mm" in out
    assert "Origin:      (177.956, -11.319, 94.3018) mm" in out
    assert "Direction:   [-1 0 0; 0 -1 0; 0 0 1]" in out
    assert "int16 (image)" in out
    assert "min -1100, max 1207" in out and "p50" in out
    assert "Labels" not in out


def test_info_real_seg_lists_organs(totalseg_seg, capsys):
    assert main(["info", str(totalseg_seg)]) == 0
    out = capsys.readouterr().out
    assert "uint8 (label map)" in out and "TotalSegmentator" in out
    for organ in ("spleen", "kidney_right", "kidney_left", "liver", "pancreas"):
        assert organ in out
    assert "liver                label   5:     38634 voxels,    1043.1 mL" in out
    assert "aorta (52)" in out and "inferior_vena_cava (63)" in out


def test_info_json_msd_map(tmp_path, capsys):
    g = Geometry((6, 5, 4), (2.0, 2.0, 2.5), (0, 0, 0))
    lab = np.zeros(g.shape, np.uint8)
    lab[1:3, 1:4, 1:4] = 1
    lab[2, 2, 2] = 2
    p = write_image(lab, tmp_path / "liver_1.nii.gz", g)
    assert main(["info", "--json", str(p)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["convention"] == "msd"
    assert info["organs"]["organ"] == {"label": 1, "voxels": 17, "volume_ml": 0.17}
    assert info["organs"]["tumor"]["voxels"] == 1
    assert info["spacing"] == [2.0, 2.0, 2.5]


def test_info_bad_inputs_exit_2_one_line(tmp_path, capsys):
    corrupt = tmp_path / "x.nii.gz"
    corrupt.write_bytes(b"not an image at all" * 20)
    flat = tmp_path / "flat.nii.gz"
    sitk.WriteImage(sitk.Image(8, 8, sitk.sitkInt16), str(flat))
    four = tmp_path / "four.nii.gz"
    sitk.WriteImage(sitk.Image([4, 4, 4, 2], sitk.sitkInt16), str(four))
    stamps = {p: (p.read_bytes(), os.stat(p).st_mtime_ns) for p in (corrupt, flat, four)}
    for path, problem in (
        (corrupt, "cannot read"),
        (flat, "image is 2D"),
        (four, "image is 4D"),
        (tmp_path / "missing.nii.gz", "no such file"),
    ):
        assert main(["info", str(path)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"difftumor: error: {path}: ") and problem in err
        assert "\n" not in err and "Traceback" not in err
    assert stamps == {p: (p.read_bytes(), os.stat(p).st_mtime_ns) for p in stamps}


def test_cli_survives_an_ascii_only_terminal():
    """A terminal whose locale is plain ASCII (no UTF-8 mode) still gets help text and tables."""
    import subprocess
    import sys
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}
    proc = subprocess.run([sys.executable, "-c", "from backend.cli import entry; entry()", "evaluate", "--help"], env=env,
                          capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr.decode("ascii", "replace")
    assert b"mean ? std" in proc.stdout


@pytest.mark.parametrize("keep", [200_000, 3000])
def test_info_refuses_a_cut_gzip_nifti(totalseg_ct, tmp_path, capsys, keep):
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes(open(totalseg_ct, "rb").read()[:keep])
    assert main(["info", str(cut)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.strip() == f"difftumor: error: {cut}: truncated or corrupt: the compressed data ends early"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.nii.gz"]


def test_info_names_nan_and_inf_voxels_and_scores_the_finite_ones(tmp_path, capsys):
    """Defect 7: info printed 'min nan, max nan, mean nan' without saying the file holds NaNs."""
    arr = np.linspace(-100, 100, 4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    arr[0, 0, :3] = np.nan
    arr[1, 1, 1] = np.inf
    path = write_image(arr, tmp_path / "nan.nii.gz", Geometry((6, 5, 4), (1, 1, 1), (0, 0, 0)))
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "Non-finite:  3 NaN and 1 inf voxel(s) of 120; the statistics below are over the 116 finite ones" in out
    assert "nan" not in out.replace("NaN", "").lower().split("non-finite")[1]
    finite = arr[np.isfinite(arr)]
    assert f"max {round(float(finite.max()), 3)}" in out
    assert main(["info", "--json", str(path)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["nan_voxels"], info["inf_voxels"], info["finite_voxels"]) == (3, 1, 116)
    all_nan = write_image(np.full((4, 5, 6), np.nan, np.float32), tmp_path / "allnan.nii.gz",
                          Geometry((6, 5, 4), (1, 1, 1), (0, 0, 0)))
    assert main(["info", str(all_nan)]) == 0
    assert "Range:       no finite voxel" in capsys.readouterr().out


def test_info_odd_paths_are_one_line(tmp_path, capsys):
    """A name too long for the file system, a device and a name that is not UTF-8 (SimpleITK used to abort the
    whole process on it) are one line each."""
    for path, problem in (
        (str(tmp_path / ("x" * 300 + ".nii.gz")), "the name is too long for the file system"),
        ("/dev/zero", "not an image file or folder (a device, pipe or socket)"),
        (os.fsdecode(bytes(tmp_path) + b"/bad\xff.nii.gz"), "the name is not valid UTF-8 text"),
    ):
        if "bad" in path:
            open(os.fsencode(path), "wb").close()
        assert main(["info", path]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and problem in err and "Traceback" not in err


def test_info_on_a_folder_of_image_files_names_them(tmp_path, capsys):
    """`info out/case1` (a synthesize output folder) said 'folder holds no DICOM series'."""
    g = Geometry((6, 5, 4), (2.0, 2.0, 2.5), (0, 0, 0))
    for name in ("ct.nii.gz", "label.nii.gz"):
        write_image(np.zeros(g.shape, np.int16), g, tmp_path / name)
    (tmp_path / "provenance.json").write_text("{}")
    assert main(["info", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].endswith(f"{tmp_path}: a folder of image files, not a DICOM series; give one of them "
                                             "(ct.nii.gz, label.nii.gz)"), err
