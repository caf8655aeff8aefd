"""Render each widget state of the place -> synthesize -> inspect flow to PNG (run under xvfb-run).

The PNGs go to ``tmp_path`` (or to ``$DIFFTUMOR_SCREENSHOT_DIR`` when set: that is how the README
images in ``docs/img/widget_*.png`` were made, then looked at by eye). The test checks that each
state renders, that the tumour is drawn where it was placed, and that the result differs from the
original where the tumour is.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from difftumor_napari import synthesis as st

pytestmark = pytest.mark.gui


def _save(viewer, folder: Path, name: str, width: int = 1200) -> np.ndarray:
    """Whole-window screenshot, downscaled to ``width`` px, written as ``widget_<name>.png``."""
    from PIL import Image

    shot = viewer.screenshot(canvas_only=False, flash=False)
    img = Image.fromarray(np.asarray(shot)[..., :3])
    if img.width > width:
        img = img.resize((width, round(img.height * width / img.width)), Image.LANCZOS)
    img.save(folder / f"widget_{name}.png", optimize=True)
    return np.asarray(shot)


def _tumour_screen_colour(viewer, layer, voxel) -> bool:
    """True when the canvas pixel at the tumour centre shows the labels layer's colour (not grey CT)."""
    shot = np.asarray(viewer.screenshot(canvas_only=True, flash=False))[..., :3].astype(int)
    # the canvas maps world -> screen; find the pixel via the layer's world position of the voxel
    world = np.asarray(layer.data_to_world(voxel))[-2:]
    canvas = viewer.window._qt_viewer.canvas
    h, w = shot.shape[:2]
    cam = viewer.camera
    scale = cam.zoom * (h / canvas.size[1] if canvas.size[1] else 1)
    row = int(round(h / 2 + (world[0] - cam.center[-2]) * scale))
    col = int(round(w / 2 + (world[1] - cam.center[-1]) * scale))
    patch = shot[max(row - 2, 0):row + 3, max(col - 2, 0):col + 3].reshape(-1, 3)
    spread = patch.max(axis=1) - patch.min(axis=1)  # grey CT pixels have r = g = b
    return bool((spread > 25).any())


def test_widget_screenshots(make_napari_viewer, qtbot, monkeypatch, tmp_path):
    from scipy import ndimage

    from difftumor_napari._qt.inspection_widget import InspectionWidget
    from difftumor_napari._qt.placement_widget import PlacementWidget
    from difftumor_napari._qt.synthesis_widget import RESULT_CT, RESULT_TUMOR, TUMOR_OUTLINE, SynthesisWidget
    from difftumor_napari._sample_data import make_phantom_sample
    from difftumor_napari.viewing import window_to_contrast_limits

    out = Path(os.environ.get("DIFFTUMOR_SCREENSHOT_DIR", tmp_path))
    out.mkdir(parents=True, exist_ok=True)
    monkeypatch.setenv(st.NOTHREADS_ENV, "1")
    monkeypatch.delenv("DIFFTUMOR_WEIGHTS", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))

    viewer = make_napari_viewer(show=True)
    viewer.window._qt_window.resize(1500, 950)
    for data, kw, kind in make_phantom_sample():
        getattr(viewer, f"add_{kind}")(data, **kw)
    ct = viewer.layers["phantom CT"]

    place = PlacementWidget(viewer)
    dock = viewer.window.add_dock_widget(place, name="Tumor placement", area="right")
    place.organ.value = "liver"
    liver = place.organ_mask()
    d = ndimage.distance_transform_edt(liver * 1, sampling=ct.scale)
    centre = tuple(int(v) for v in np.unravel_index(np.argmax(d), liver.shape))
    viewer.dims.set_point(0, float(ct.data_to_world(centre)[0]))
    viewer.reset_view()
    qtbot.wait(50)
    before = _save(viewer, tmp_path, "before")
    place.size.value = "medium"
    place.irregularity.value = 0.4
    assert place.place_at_voxel(centre)
    tumor = viewer.layers["tumor mask"]
    qtbot.wait(50)
    placed = _save(viewer, out, "placement")
    assert placed.shape == before.shape and np.abs(placed.astype(int) - before.astype(int)).sum() > 0
    assert _tumour_screen_colour(viewer, tumor, centre)

    viewer.window.remove_dock_widget(dock)
    synth = SynthesisWidget(viewer)
    dock = viewer.window.add_dock_widget(synth, name="Synthesis", area="right")
    synth.seed.value = 2
    assert synth.run() and synth.outcome is not None
    # the GUI adds the overlays one event-loop turn each and then frames the tumour: let that finish before
    # the view is set for the picture (in a full run a late step moved the camera after reset_view)
    qtbot.waitUntil(lambda: {TUMOR_OUTLINE, RESULT_TUMOR} <= {ly.name for ly in viewer.layers}, timeout=20000)
    qtbot.wait(200)
    tumor.visible = False
    viewer.layers["synthetic tumor"].visible = False
    viewer.layers["phantom organs"].visible = False
    viewer.layers[RESULT_CT].contrast_limits = window_to_contrast_limits(200, 90)  # narrow window on the enhanced phantom liver
    viewer.reset_view()
    qtbot.wait(50)
    _save(viewer, out, "synthesis")
    assert not _tumour_screen_colour(viewer, viewer.layers[RESULT_CT], centre)  # grey CT, no overlay

    viewer.window.remove_dock_widget(dock)
    inspect = InspectionWidget(viewer)
    viewer.window.add_dock_widget(inspect, name="Inspection", area="right")
    assert inspect.measure() is not None
    viewer.reset_view()
    qtbot.wait(50)
    _save(viewer, out, "inspection")
    assert inspect.toggle_side_by_side()
    qtbot.wait(50)
    _save(viewer, out, "side_by_side")
    for name in ("placement", "synthesis", "inspection", "side_by_side"):
        assert (out / f"widget_{name}.png").stat().st_size > 10_000
