"""The "Inspection" widget after a model-based synthesis on the real CT (run under xvfb-run)."""

from __future__ import annotations

import numpy as np
import pytest

from difftumor_napari import inspection as ins
from difftumor_napari import synthesis as st

pytestmark = pytest.mark.gui


def _real_ct_with_tumour(make_napari_viewer, qtbot, monkeypatch, tmp_path, ct_path, seg_path, *, size: str):
    """Viewer with the real CT and its organs, one ``size`` tumour placed at the liver's deepest voxel;
    returns (viewer, synthesis widget). No weights configured unless the caller sets them."""
    from scipy import ndimage

    from difftumor_napari._qt.placement_widget import PlacementWidget
    from difftumor_napari._qt.synthesis_widget import SynthesisWidget
    from difftumor_napari._reader import read_layer_data

    monkeypatch.setenv(st.NOTHREADS_ENV, "1")
    monkeypatch.delenv("DIFFTUMOR_WEIGHTS", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    viewer = make_napari_viewer()
    for p in (ct_path, seg_path):
        data, kw, kind = read_layer_data(p)
        getattr(viewer, f"add_{kind}")(data, **kw)
    place, synth = PlacementWidget(viewer), SynthesisWidget(viewer)
    for w in (place, synth):
        qtbot.addWidget(w.native)
    liver = place.organ_mask()
    d = ndimage.distance_transform_edt(liver)
    place.size.value = size
    assert place.place_at_voxel(np.unravel_index(np.argmax(d), liver.shape))
    return viewer, synth




@pytest.fixture
def synthesized(make_napari_viewer, qtbot, monkeypatch, tmp_path, totalseg_ct, totalseg_seg):
    """Viewer with the real CT, a medium liver tumour placed and synthesized (model-based)."""
    viewer, synth = _real_ct_with_tumour(make_napari_viewer, qtbot, monkeypatch, tmp_path, totalseg_ct, totalseg_seg,
                                         size="medium")
    synth.method.value = "model-based"
    assert synth.run() and synth.outcome is not None
    return viewer


def test_measure_flags_and_side_by_side(synthesized, qtbot, errors):
    from napari.layers import Shapes

    from difftumor_napari._qt.inspection_widget import OUTLINE, PREFIX, InspectionWidget

    viewer = synthesized
    w = InspectionWidget(viewer)
    qtbot.addWidget(w.native)
    assert w.result_layer.value.name == "CT + synthetic tumor"
    assert w.tumor_layer.value.name == "synthetic tumor"
    assert w.original_layer.value.name == "example_ct_sm" and w.organ.value == "liver"
    assert len(w.tumor.choices) == 1 and "ml" in w.tumor.native.currentText()
    m = w.measure()
    assert m is not None and errors == []
    assert m["contrast_hu"] < -10  # model-based tumours are hypo-attenuating
    assert 0 < m["sphericity"] <= 1.05 and m["elongation"] >= 1
    assert "shell_change_hu" in m  # the original CT was available
    assert len(w.table.value.splitlines()) >= 12 and "Sphericity" in w.table.value
    # flags tick the reviewer boxes (and only those)
    assert {c for c, b in w.checks.items() if b.value} == set(w.flags)
    assert ("Automatic flags: none" in w.flag_text.value) == (not w.flags)
    # side by side: original CT, masked CT, blended result, each with the tumour outlined; the AE layers need
    # the diffusion method
    assert w.toggle_side_by_side()
    names = [ly.name for ly in viewer.layers if ly.name.startswith(PREFIX)]
    cells = ("original CT", "masked CT", "blended result")
    assert names == [PREFIX + n + suffix for n in cells for suffix in ("", OUTLINE)]
    assert viewer.grid.enabled and "only for the diffusion method" in w.intermediates_text.value
    captions = w.intermediates_text.value.splitlines()[0]  # which cell is which (napari draws no titles)
    assert captions.startswith("Grid — ") and captions.count(": ") == 3
    assert "masked CT (what the model is conditioned on)" in captions and "blended result (the synthetic CT)" in captions
    layers = list(viewer.layers)
    cell = {}
    for name in cells:  # each image shares its cell with its outline, and has a cell of its own
        k = next(i for i, ly in enumerate(layers) if ly.name == PREFIX + name)
        cell[name] = viewer.grid.position(k, layers)
        assert viewer.grid.position(k + 1, layers) == cell[name] and layers[k + 1].name == PREFIX + name + OUTLINE
    assert len(set(cell.values())) == 3 and viewer.grid.actual_shape(layers) == (2, 2)
    where = {(0, 0): "top left", (0, 1): "top right", (1, 0): "bottom left", (1, 1): "bottom right"}[cell["masked CT"]]
    assert f"{where}: masked CT" in captions
    masked = viewer.layers[PREFIX + "masked CT"].data
    outline = viewer.layers[PREFIX + "masked CT" + OUTLINE]
    tumour = viewer.layers["synthetic tumor"].data > 0
    assert isinstance(outline, Shapes) and len(outline.data) >= 1  # a line along the tumour's edge
    assert set(np.concatenate(outline.data)[:, 0].astype(int)) == set(np.nonzero(tumour)[0])
    assert np.all(masked[tumour] == np.float32(37.5))
    assert np.array_equal(viewer.layers[PREFIX + "original CT"].data, viewer.layers["example_ct_sm"].data)
    assert not w.toggle_side_by_side()
    assert not viewer.grid.enabled and not any(ly.name.startswith(PREFIX) for ly in viewer.layers)
    assert viewer.grid.stride == 1 and viewer.layers["CT + synthetic tumor"].visible


def test_review_log_grows_across_sessions(synthesized, qtbot, tmp_path, errors):
    from difftumor_napari._qt.inspection_widget import InspectionWidget

    log = tmp_path / "reviews.csv"
    for session in range(2):  # two widgets = two sessions appending to one file
        w = InspectionWidget(synthesized)
        qtbot.addWidget(w.native)
        w.log_path.value = str(log)
        w.measure()
        for box in w.checks.values():
            box.value = False
        w.checks["too_sharp_edge"].value = True
        w.checks["other"].value = session == 1
        w.reviewer.value = f"reader {session}"
        w.note.value = f"session {session}"
        assert w.save_review() == log
    rows = ins.read_reviews(log)
    assert log.read_text(encoding="utf-8").count("timestamp,") == 1 and len(rows) == 2
    assert [r["reviewer"] for r in rows] == ["reader 0", "reader 1"]
    assert [r["other"] for r in rows] == ["0", "1"] and all(r["too_sharp_edge"] == "1" for r in rows)
    assert rows[0]["method"] == "model-based" and rows[0]["case"] == "example_ct_sm"
    assert errors == []
    w.log_path.value = str(tmp_path / "missing" / "r.csv")
    assert w.save_review() is None and "does not exist" in errors[-1]


def test_nothing_to_inspect_is_a_notification(make_napari_viewer, qtbot, errors):
    from difftumor_napari._qt.inspection_widget import InspectionWidget

    w = InspectionWidget(make_napari_viewer())
    qtbot.addWidget(w.native)
    assert w.measure() is None and "run Synthesis first" in errors[-1]
    assert not w.toggle_side_by_side()


@pytest.mark.slow
def test_diffusion_run_shows_reconstruction_and_decoded(make_napari_viewer, qtbot, monkeypatch, tmp_path, errors,
                                                         parity_dir, totalseg_ct, totalseg_seg):
    """Issue 6: synthesize with the (small, official-format) parity weights, then inspect the AE layers."""
    import torch
    from scipy import ndimage

    from difftumor_napari._qt.inspection_widget import OUTLINE, PREFIX, InspectionWidget
    from difftumor_napari._qt.synthesis_widget import RESULT_CT

    torch.set_num_threads(2)
    viewer, synth = _real_ct_with_tumour(make_napari_viewer, qtbot, monkeypatch, tmp_path, totalseg_ct, totalseg_seg,
                                         size="small")
    synth.weights_dir.value = str(parity_dir)
    synth.method.value, synth.device.value, synth.stage.value = "diffusion", "cpu", "early"
    assert synth.keep_intermediates.value  # on by default
    assert synth.run() and synth.outcome is not None, errors
    assert synth.outcome.provenance["method"] == "diffusion"
    assert set(synth.outcome.intermediates) == {"masked", "reconstruction", "decoded"}

    w = InspectionWidget(viewer)
    qtbot.addWidget(w.native)
    assert w.result_layer.value.name == RESULT_CT
    assert w.toggle_side_by_side()
    names = [ly.name for ly in viewer.layers if ly.name.startswith(PREFIX) and not ly.name.endswith(OUTLINE)]
    assert names == [PREFIX + n for n in ("original CT", "masked CT", "autoencoder reconstruction",
                                          "raw decoded sample", "blended result")]
    assert errors == [] and "Grid — " in w.intermediates_text.value  # captions only: nothing is missing
    assert "only for the diffusion method" not in w.intermediates_text.value
    assert "middle: masked CT" in w.intermediates_text.value  # 5 cells: 2 rows x 3 columns
    ct = viewer.layers["example_ct_sm"]
    for n in ("autoencoder reconstruction", "raw decoded sample"):
        layer = viewer.layers[PREFIX + n]
        assert layer.data.shape == ct.data.shape and layer.scale == pytest.approx(ct.scale)
        assert not np.array_equal(layer.data, np.asarray(ct.data, np.float32))  # the crop was replaced
    mask = viewer.layers["synthetic tumor"].data > 0  # the outline layer is a line now, not a mask
    core = ndimage.binary_erosion(mask) if ndimage.binary_erosion(mask).any() else mask
    np.testing.assert_allclose(viewer.layers[PREFIX + "masked CT"].data[core], 37.5, atol=0.05)


def test_results_reopened_from_disk_can_be_inspected(make_napari_viewer, qtbot, monkeypatch, tmp_path, errors,
                                                     totalseg_ct, totalseg_seg):
    """A later session: the original CT, the saved <stem>_ct and <stem>_label (0/1/2) opened with the reader.
    The saved label offers its tumours, and Original CT never defaults to the synthetic CT itself."""
    from difftumor_napari._qt.inspection_widget import InspectionWidget
    from difftumor_napari._reader import read_layer_data

    viewer, synth = _real_ct_with_tumour(make_napari_viewer, qtbot, monkeypatch, tmp_path, totalseg_ct, totalseg_seg,
                                         size="medium")
    synth.method.value = "model-based"
    assert synth.run()
    synth.out_dir.value = str(tmp_path / "saved")
    synth.stem.value = "case"
    paths = synth.save()
    later = make_napari_viewer()
    for p in (totalseg_ct, paths["ct"], paths["label"]):
        data, kw, kind = read_layer_data(p)
        getattr(later, f"add_{kind}")(data, **kw)
    w = InspectionWidget(later)
    qtbot.addWidget(w.native)
    w.result_layer.value = later.layers["case_ct"]
    w._on_layers_changed()
    assert w.tumor_layer.value is not None and w.tumor_layer.value.name == "case_label"
    assert w.original_layer.value.name != "case_ct"
    assert len(w.tumor.choices) == 1 and w.measure() is not None and errors == []
    assert w.metrics["mean_hu"] < w.metrics["organ_mean_hu"]  # the model-based tumour is hypo-attenuating
    w.original_layer.value = later.layers["case_ct"]
    assert w.measure() is None and "also the Synthetic CT" in errors[-1]


def test_docked_before_synthesis_picks_up_the_result(make_napari_viewer, qtbot, monkeypatch, tmp_path, errors,
                                                      totalseg_ct, totalseg_seg):
    """The usual docked flow: Inspection exists before the first run. The new result and its tumour are
    chosen (not the original CT and the placement mask chosen before), also after a second run."""
    from difftumor_napari._qt.inspection_widget import InspectionWidget

    viewer, synth = _real_ct_with_tumour(make_napari_viewer, qtbot, monkeypatch, tmp_path, totalseg_ct, totalseg_seg,
                                         size="small")
    w = InspectionWidget(viewer)
    qtbot.addWidget(w.native)
    assert w.result_layer.value.name == "example_ct_sm" and w.tumor_layer.value.name == "tumor mask"
    synth.method.value = "model-based"
    for _ in range(2):
        assert synth.run() and synth.outcome is not None
        assert w.result_layer.value.name == "CT + synthetic tumor"
        assert w.tumor_layer.value.name == "synthetic tumor"
        assert w.original_layer.value.name == "example_ct_sm"
        assert w.measure() is not None and errors == []


def test_side_by_side_cells_are_zoomed_to_the_tumour(synthesized, qtbot, errors):
    """Defect 6: each side-by-side cell showed the whole slice (a 13 mm tumour was ~8 px); every cell is now
    centred on the tumour and zoomed so that it spans a readable part of the cell."""
    from difftumor_napari._qt.inspection_widget import InspectionWidget
    from difftumor_napari.layers import _camera, view_size_px

    viewer = synthesized
    w = InspectionWidget(viewer)
    qtbot.addWidget(w.native)
    assert w.toggle_side_by_side()
    result = viewer.layers["CT + synthetic tumor"]
    mask = viewer.layers["synthetic tumor"].data > 0
    camera = _camera(viewer)
    centre = np.asarray(result.data_to_world(np.argwhere(mask).mean(0)))
    np.testing.assert_allclose(np.asarray(camera.center)[-2:], centre[-2:], atol=float(max(result.scale)))
    assert viewer.dims.point[0] == pytest.approx(centre[0], abs=result.scale[0])
    cell = view_size_px(viewer)  # one grid cell
    assert tuple(cell) != tuple(np.asarray(viewer.canvas.size, float))
    extent = float(max((np.ptp(np.argwhere(mask), axis=0)[1:] + 1) * np.asarray(result.scale)[1:]))
    assert 0.1 <= extent * camera.zoom / float(min(cell)) <= 0.6
    assert errors == []


def test_organ_numbers_leave_out_tumours_labelled_in_msd_organ_labels(synthesized, qtbot, errors):
    """Defect 8 in the widget: an MSD/LiTS organ layer (1 liver, 2 tumour) - its labelled tumours no longer
    count as organ: the numbers match those measured with the clean liver."""
    from scipy import ndimage

    from difftumor_napari._qt.inspection_widget import InspectionWidget

    viewer = synthesized
    w = InspectionWidget(viewer)
    qtbot.addWidget(w.native)
    clean = w.measure()
    assert clean is not None
    seg, result = viewer.layers["example_seg"], viewer.layers["CT + synthetic tumor"]
    liver = np.isin(np.asarray(seg.data), [5])
    tumour = viewer.layers["synthetic tumor"].data > 0
    far = liver & ~ndimage.binary_dilation(tumour, iterations=6)
    d = ndimage.distance_transform_edt(far)
    real = far & (d >= np.quantile(d[far], 0.94))  # the liver's deepest part, away from the synthetic tumour
    result.data[real] = 0  # a dark real tumour (about 5 % of the liver) in the synthetic CT ...
    msd = liver.astype(np.uint8)
    msd[real] = 2  # ... labelled as tumour in an MSD map
    seg.data = msd
    w.organ.value = "liver"
    m = w.measure()
    assert m is not None and errors == []
    assert real.sum() > 0.03 * liver.sum()
    assert m["organ_mean_hu"] == pytest.approx(clean["organ_mean_hu"], abs=1.0)
    assert m["contrast_hu"] == pytest.approx(clean["contrast_hu"], abs=1.0)
