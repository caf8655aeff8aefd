"""`difftumor demo --screenshot`: the real window with the phantom and every DiffTumor widget."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

pytestmark = [
    pytest.mark.slow,
    pytest.mark.gui,
    pytest.mark.skipif(
        sys.platform.startswith("linux") and not os.environ.get("DISPLAY"),
        reason="needs a display (run under xvfb-run, as `make test` does)",
    ),
]

DEMO = [sys.executable, "-c", "import sys; from backend.cli import main; sys.exit(main())", "demo"]


def _gray_fraction(rgb: np.ndarray) -> float:
    """Share of pixels that are neutral grey of mid intensity (CT tissue, not UI chrome or black)."""
    rgb = rgb[..., :3].astype(np.int16)
    spread = rgb.max(axis=-1) - rgb.min(axis=-1)
    value = rgb.mean(axis=-1)
    return float(np.mean((spread < 12) & (value > 60) & (value < 200)))


def test_demo_screenshot(tmp_path):
    import imageio.v3 as iio

    out = tmp_path / "demo.png"
    proc = subprocess.run([*DEMO, "--screenshot", str(out)], capture_output=True, encoding="utf-8", errors="replace", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "could not dock" not in proc.stderr
    image = iio.imread(out)
    h, w = image.shape[:2]
    assert w >= 1000 and h >= 600
    assert float(np.mean(image[..., :3] > 30)) > 0.25  # not mostly black
    # CT tissue in the centre of the main (axial) canvas: the upper middle of the window
    centre = image[int(0.15 * h): int(0.45 * h), int(0.35 * w): int(0.65 * w)]
    assert _gray_fraction(centre) > 0.05
    assert centre[..., :3].std() > 20  # anatomy, not a flat fill
    assert not list(tmp_path.glob(".*tmp*"))  # written atomically: no temporary file left


def test_demo_refuses_a_mask_on_another_grid(tmp_path):
    import SimpleITK as sitk

    ct, seg = tmp_path / "ct.nii.gz", tmp_path / "seg.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 5, 6), np.int16)), str(ct))
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 5, 7), np.uint8)), str(seg))
    proc = subprocess.run([*DEMO, "--ct", str(ct), "--organs", str(seg), "--screenshot", str(tmp_path / "x.png")],
                          capture_output=True, encoding="utf-8", errors="replace", timeout=120)
    assert proc.returncode == 2
    [line] = [ln for ln in proc.stderr.splitlines() if ln.startswith("difftumor: error:")]
    assert "seg.nii.gz" in line
    assert not (tmp_path / "x.png").exists()
