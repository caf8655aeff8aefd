"""The "Synthesis" widget: the whole flow on the phantom and on the real CT, threading, cancel, errors.

Run under ``xvfb-run -a pytest``. The flow tests run synchronously (DIFFTUMOR_NAPARI_NOTHREADS=1);
``test_event_loop_stays_responsive_during_a_threaded_run`` proves the worker keeps the GUI alive.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from backend.io import read_image
from difftumor_napari import synthesis as st

pytestmark = pytest.mark.gui



@pytest.fixture
def no_weights(monkeypatch, tmp_path):
    """No weights folder anywhere (env, user config) -> the auto method is model-based."""
    monkeypatch.delenv("DIFFTUMOR_WEIGHTS", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))


def _widgets(viewer, qtbot):
    from difftumor_napari._qt.placement_widget import PlacementWidget
    from difftumor_napari._qt.synthesis_widget import SynthesisWidget

    place, synth = PlacementWidget(viewer), SynthesisWidget(viewer)
    qtbot.addWidget(place.native)
    qtbot.addWidget(synth.native)
    return place, synth


def _inner_voxel(mask):
    from scipy import ndimage

    d = ndimage.distance_transform_edt(mask)
    return tuple(int(v) for v in np.unravel_index(np.argmax(d), mask.shape))


def _flow(viewer, qtbot, tmp_path, source_ct, organ: str):
    """place by click -> random placement -> synthesize -> before/after -> difference -> save -> reopen."""
    from difftumor_napari._qt.synthesis_widget import DIFFERENCE, RESULT_CT, RESULT_TUMOR

    place, synth = _widgets(viewer, qtbot)
    place.organ.value = organ
    ct = place.ct_layer.value
    mask = place.organ_mask()
    voxel = _inner_voxel(mask)
    assert place.place_at_world(ct.data_to_world(voxel))
    place.random_size.value = "small"
    assert place.place_random() == 1
    tumor = viewer.layers["tumor mask"]
    assert synth.tumor_layer.value is tumor and synth.ct_layer.value is ct
    synth.organ.value = organ
    assert synth.update_method_info().method == "model-based"
    assert "Model-based" in synth.method_info.value
    assert "choose the folder with the DiffTumor weights under Weights" in synth.method_info.value
    synth.seed.value = 11
    assert synth.run()
    out = synth.outcome
    assert out is not None and out.provenance["method"] == "model-based"
    assert len(out.provenance["placements"]) == 2
    result, labels = viewer.layers[RESULT_CT], viewer.layers[RESULT_TUMOR]
    assert result.scale == pytest.approx(ct.scale) and result.translate == pytest.approx(ct.translate)
    assert result.metadata["difftumor"]["geometry"] == ct.metadata["difftumor"]["geometry"]
    changed = result.data != ct.data
    assert changed.any() and (labels.data > 0).sum() == (tumor.data > 0).sum()
    # the tumour got darker (hypo-attenuating) and nothing far from it changed
    assert result.data[tumor.data > 0].mean() < ct.data[tumor.data > 0].mean() - 10
    from scipy import ndimage

    near = ndimage.binary_dilation(tumor.data > 0, iterations=4)
    assert not (changed & ~near).any()
    # before / after and difference
    stack = [ly.name for ly in viewer.layers]
    assert stack.index(RESULT_CT) == stack.index(ct.name) + 1  # drawn where the original is: same overlays on top
    assert result.interpolation2d == ct.interpolation2d and result.colormap.name == ct.colormap.name
    assert viewer.layers["synthetic tumor outline"].visible  # the synthetic tumour as a thin outline, not
    assert not labels.visible and not viewer.layers["tumor mask"].visible  # a mask over its texture
    assert synth.toggle_before_after() == "before" and ct.visible and not result.visible
    assert synth.toggle_before_after() == "after" and result.visible and not ct.visible
    diff = synth.show_difference()
    assert diff.name == DIFFERENCE and float(np.abs(diff.data).max()) > 10
    rgba = diff.colormap.map(np.array([0.0, 0.5, 1.0]))  # darker, unchanged, brighter
    assert rgba[1][3] == 0 and rgba[0][3] == rgba[2][3] == 1  # unchanged voxels let the CT show through
    assert rgba[0][2] > rgba[0][0] and rgba[2][0] > rgba[2][2]  # blue = darker, red = brighter
    # save onto the original grid and reopen
    synth.out_dir.value = str(tmp_path)
    synth.stem.value = "case"
    paths = synth.save()
    assert paths is not None
    original = read_image(source_ct)
    saved_ct, saved_lab = read_image(paths["ct"]), read_image(paths["label"])
    assert saved_ct.geometry.matches(original.geometry) and saved_lab.geometry.matches(original.geometry)
    assert saved_ct.dtype == original.dtype
    outside = saved_lab.array != 2
    far = ~ndimage.binary_dilation(~outside, iterations=4)
    np.testing.assert_array_equal(saved_ct.array[far], original.array[far])  # HU untouched away from the tumour
    assert set(np.unique(saved_lab.array)) == {0, 1, 2}
    # the difference layer saves onto the original grid too, voxel for voxel
    from difftumor_napari._writer import write_layer

    diff_path = write_layer(tmp_path / "diff.nii.gz", diff.data, {"name": diff.name, "metadata": diff.metadata,
                            "scale": diff.scale, "translate": diff.translate}, labels=False)
    saved_diff = read_image(diff_path)
    assert saved_diff.geometry.matches(original.geometry)
    np.testing.assert_allclose(saved_diff.array, saved_ct.array.astype(np.float32) - original.array, atol=0.51)
    prov = json.loads(paths["provenance"].read_text(encoding="utf-8"))
    assert prov["method"] == "model-based" and prov["seed"] == 11 and prov["version"]
    assert prov["weights_sha256"] == {} and len(prov["placements"]) == 2
    assert prov["files"] == {"ct": "case_ct.nii.gz", "label": "case_label.nii.gz"}
    assert prov["settings"]["seed"] == 11 and prov["inputs"]["ct"] == str(source_ct) and prov["created"]
    return synth


def test_whole_flow_on_the_phantom(make_napari_viewer, qtbot, tmp_path, monkeypatch, errors, no_weights):
    from backend.io import write_image
    from backend.phantom import make_phantom
    from difftumor_napari._reader import read_layer_data

    monkeypatch.setenv(st.NOTHREADS_ENV, "1")
    ct, labels = make_phantom(0)[:2]
    ct_path = write_image(ct, tmp_path / "phantom_ct.nii.gz")
    lab_path = write_image(labels, tmp_path / "phantom_organs.nii.gz")
    viewer = make_napari_viewer()
    for p in (ct_path, lab_path):
        data, kw, kind = read_layer_data(p)
        getattr(viewer, f"add_{kind}")(data, **kw)
    out = tmp_path / "out"
    out.mkdir()
    _flow(viewer, qtbot, out, ct_path, "liver")
    assert errors == []


def test_whole_flow_on_real_ct(make_napari_viewer, qtbot, tmp_path, monkeypatch, errors, no_weights,
                               totalseg_ct, totalseg_seg):
    from difftumor_napari._reader import read_layer_data

    monkeypatch.setenv(st.NOTHREADS_ENV, "1")
    viewer = make_napari_viewer()
    for p in (totalseg_ct, totalseg_seg):
        data, kw, kind = read_layer_data(p)
        getattr(viewer, f"add_{kind}")(data, **kw)
    _flow(viewer, qtbot, tmp_path, totalseg_ct, "liver")
    assert errors == []


def _slow_generator(seconds_per_step: float, steps: int):
    """A stand-in for the engine: sleeps per step, returns the CT unchanged + the mask."""

    def make(request):
        def gen():
            for i in range(steps):
                time.sleep(seconds_per_step)
                yield f"step {i + 1}", i + 1, steps
            from types import SimpleNamespace

            label = request.organ_mask.astype(np.uint8)
            label[request.tumor_mask] = 2
            return SimpleNamespace(ct=request.ct.copy(), label=label, tumor_mask=request.tumor_mask,
                                   provenance={"method": "slow test stand-in"})

        return gen()

    return make


@pytest.fixture
def phantom_viewer(make_napari_viewer, no_weights):
    from difftumor_napari._sample_data import make_phantom_sample

    viewer = make_napari_viewer()
    for data, kw, kind in make_phantom_sample():
        getattr(viewer, f"add_{kind}")(data, **kw)
    return viewer


def test_event_loop_stays_responsive_during_a_threaded_run(phantom_viewer, qtbot, monkeypatch, errors):
    from qtpy.QtCore import QTimer

    from difftumor_napari._qt.synthesis_widget import RESULT_CT

    monkeypatch.delenv(st.NOTHREADS_ENV, raising=False)
    place, synth = _widgets(phantom_viewer, qtbot)
    assert place.place_at_voxel(_inner_voxel(place.organ_mask()))
    synth.make_generator = _slow_generator(0.05, 16)  # ~0.8 s of "work" in the worker thread
    ticks = []
    timer = QTimer()
    timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
    timer.start(20)
    progress_seen = []  # (time, value) of each progress update on the GUI thread
    synth.progress.changed.connect(lambda v: progress_seen.append((time.perf_counter(), v)))
    assert synth.run()
    assert synth.running and not synth.run_button.enabled and synth.cancel_button.enabled
    qtbot.waitUntil(lambda: not synth.running, timeout=20000)
    timer.stop()
    # while the worker slept through its 16 steps, the GUI thread kept ticking and showing progress
    t_first, t_last = progress_seen[0][0], progress_seen[-1][0]
    assert t_last - t_first >= 0.6
    during = [t for t in ticks if t_first <= t <= t_last]
    assert len(during) >= 10
    assert max(np.diff([t_first, *during, t_last])) < 0.5
    assert [v for _, v in progress_seen][-1] == 16 and len(progress_seen) >= 8
    assert RESULT_CT in phantom_viewer.layers and errors == []


def test_cancel_stops_the_run_and_changes_nothing(phantom_viewer, qtbot, monkeypatch, errors):
    from difftumor_napari._qt.synthesis_widget import RESULT_CT

    monkeypatch.delenv(st.NOTHREADS_ENV, raising=False)
    place, synth = _widgets(phantom_viewer, qtbot)
    assert place.place_at_voxel(_inner_voxel(place.organ_mask()))
    synth.make_generator = _slow_generator(0.1, 100)
    n_layers = len(phantom_viewer.layers)
    assert synth.run()
    qtbot.waitUntil(lambda: synth.progress.value >= 2, timeout=10000)
    synth.cancel()
    qtbot.waitUntil(lambda: not synth.running, timeout=10000)
    assert synth.outcome is None and RESULT_CT not in phantom_viewer.layers
    assert len(phantom_viewer.layers) == n_layers
    assert "Cancelled" in synth.status.value and synth.run_button.enabled


def test_user_errors_are_notifications(phantom_viewer, qtbot, monkeypatch, errors, tmp_path):
    monkeypatch.setenv(st.NOTHREADS_ENV, "1")
    place, synth = _widgets(phantom_viewer, qtbot)
    # no tumour mask yet
    assert not synth.run()
    assert "no tumour mask layer" in errors[-1]
    # diffusion requested without weights
    assert place.place_at_voxel(_inner_voxel(place.organ_mask()))
    synth.method.value = "diffusion"
    assert not synth.run()
    assert errors[-1].startswith("diffusion:") and "model-based" in errors[-1]
    # an out-of-memory error inside the run is one sentence, and nothing is added
    synth.method.value = "model-based"

    def oom(request):
        raise MemoryError()
        yield  # pragma: no cover

    synth.make_generator = oom
    n = len(phantom_viewer.layers)
    assert synth.run()
    assert "ran out of memory" in errors[-1] and len(phantom_viewer.layers) == n
    # save before any result, and into a missing folder
    assert synth.save() is None and "nothing to save" in errors[-1]
    synth.make_generator = st.engine_generator
    assert synth.run() and synth.outcome is not None
    (tmp_path / "afile").write_text("x", encoding="utf-8")
    synth.out_dir.value = str(tmp_path / "afile" / "sub")  # a folder that cannot be made
    assert synth.save() is None and "cannot create the output folder" in errors[-1]
    synth.out_dir.value = str(tmp_path / "new" / "sub")  # a missing folder is made
    first = synth.save()
    assert first is not None and first["ct"].parent == tmp_path / "new" / "sub"
    before = {k: p.read_bytes() for k, p in first.items()}
    assert synth.save() is None and "nothing was overwritten" in errors[-1]  # same stem again: refused
    assert {k: p.read_bytes() for k, p in first.items()} == before and synth.stem.value == "synthetic_2"
    second = synth.save()  # the offered stem
    assert second is not None and second["ct"].name == "synthetic_2_ct.nii.gz"
    # removing the organ labels: clear sentence
    phantom_viewer.layers.remove("phantom organs")
    assert not synth.run() and "no organ label layer" in errors[-1]
    assert all("\n" not in e for e in errors)


def test_weights_folder_is_remembered(make_napari_viewer, qtbot, tmp_path, no_weights):
    from backend.weights import get_weights_dir_setting
    from difftumor_napari._qt.synthesis_widget import SynthesisWidget

    folder = tmp_path / "weights"
    folder.mkdir()
    w = SynthesisWidget(make_napari_viewer())
    qtbot.addWidget(w.native)
    w.weights_dir.value = str(folder)
    assert get_weights_dir_setting() == folder.resolve()
    assert "lacks AutoencoderModel.ckpt" in w.method_info.value
    w2 = SynthesisWidget(make_napari_viewer())
    qtbot.addWidget(w2.native)
    assert w2.weights_folder() == str(folder.resolve())


def test_tumours_already_in_msd_labels_stay_tumour(phantom_viewer, qtbot, monkeypatch, errors):
    """An MSD-style organ layer (1 liver, 2 tumour): its tumour stays 2 in the result and is not painted over."""
    monkeypatch.setenv(st.NOTHREADS_ENV, "1")
    organs = phantom_viewer.layers["phantom organs"]
    place, synth = _widgets(phantom_viewer, qtbot)
    place.organ.value = "liver"
    liver = place.organ_mask()
    centre = _inner_voxel(liver)
    real = np.zeros(liver.shape, bool)
    real[:, : centre[1]] = True  # a large real tumour: the anterior half of the liver
    real &= liver
    msd = np.where(liver, 1, 0).astype(np.uint8)
    msd[real] = 2
    organs.data = msd
    place._on_organ_layer()
    assert "One organ labelled (1 organ, 2 tumour): choose which under Organ" in place.status.value
    for _ in range(3):
        assert place.place_random() == 1
    assert not (phantom_viewer.layers["tumor mask"].data[real] > 0).any()  # random tumours avoid the real one
    synth.organ.value = "liver"
    assert synth.run() and synth.outcome is not None and errors == []
    label = synth.outcome.label
    assert (label[real] == 2).all() and not (synth.outcome.tumor_mask & real).any()
    assert synth.outcome.provenance["mask"]["existing_tumour_voxels"] == int(real.sum())


def test_closing_the_dock_cancels_and_removing_the_ct_discards_the_run(phantom_viewer, qtbot, monkeypatch, errors):
    from difftumor_napari._qt.synthesis_widget import RESULT_CT

    monkeypatch.delenv(st.NOTHREADS_ENV, raising=False)
    place, synth = _widgets(phantom_viewer, qtbot)
    assert place.place_at_voxel(_inner_voxel(place.organ_mask()))
    dock = phantom_viewer.window.add_dock_widget(synth, name="Synthesis", area="right")
    synth.make_generator = _slow_generator(0.1, 100)
    assert synth.run()
    qtbot.waitUntil(lambda: synth.progress.value >= 2, timeout=10000)
    phantom_viewer.window.remove_dock_widget(dock)  # what the dock's close button does
    qtbot.waitUntil(lambda: not synth.running, timeout=10000)
    assert synth.outcome is None and RESULT_CT not in phantom_viewer.layers

    synth2 = _widgets(phantom_viewer, qtbot)[1]
    synth2.make_generator = _slow_generator(0.05, 10)
    assert synth2.run()
    phantom_viewer.layers.remove("phantom CT")  # the CT goes away mid-run
    qtbot.waitUntil(lambda: not synth2.running, timeout=10000)
    assert synth2.outcome is None and RESULT_CT not in phantom_viewer.layers
    assert "removed during the run" in synth2.status.value


def test_an_error_in_the_worker_is_one_notification(phantom_viewer, qtbot, monkeypatch, errors):
    """A failing threaded run: one one-line notification (napari used to relay the worker's exception as a second
    one with a traceback and re-raise it in the GUI thread), the status says it, nothing is added."""
    from napari.utils.notifications import notification_manager

    from backend.errors import DiffTumorError

    monkeypatch.delenv(st.NOTHREADS_ENV, raising=False)
    place, synth = _widgets(phantom_viewer, qtbot)
    assert place.place_at_voxel(_inner_voxel(place.organ_mask()))

    def failing(request):
        yield "step 1", 1, 3
        raise DiffTumorError("tumor mask: a test failure")

    synth.make_generator = failing
    relayed = []
    notification_manager.notification_ready.connect(relayed.append)
    try:
        n = len(phantom_viewer.layers)
        assert synth.run()
        qtbot.waitUntil(lambda: not synth.running, timeout=10000)
        qtbot.wait(50)
    finally:
        notification_manager.notification_ready.disconnect(relayed.append)
    assert errors == ["tumor mask: a test failure"] and synth.status.value == errors[0]
    assert [r for r in relayed if "test failure" in str(r.message)] == []  # no second, traceback-style one
    assert len(phantom_viewer.layers) == n and synth.run_button.enabled


def test_organ_follows_placements_and_a_mismatch_names_the_organ(make_napari_viewer, qtbot, monkeypatch, tmp_path,
                                                                  errors, no_weights, totalseg_ct, totalseg_seg):
    from difftumor_napari._reader import read_layer_data

    monkeypatch.setenv(st.NOTHREADS_ENV, "1")
    viewer = make_napari_viewer()
    for p in (totalseg_ct, totalseg_seg):
        data, kw, kind = read_layer_data(p)
        getattr(viewer, f"add_{kind}")(data, **kw)
    place, synth = _widgets(viewer, qtbot)
    assert synth.organ.value == "liver"
    place.organ.value = "kidney"
    assert place.place_random() == 1
    assert synth.organ.value == "kidney"  # the organ the tumour was placed in
    synth.organ.value = "liver"  # the user overrides it: the run is refused in one line naming the organ
    assert not synth.run()
    assert "lie inside the liver (Organ)" in errors[-1] and "\n" not in errors[-1]
    assert "synthetic tumor" not in viewer.layers


def test_cross_organ_weights_fixed_sigma_and_pancreas_blend(make_napari_viewer, qtbot, monkeypatch, tmp_path, errors,
                                                            no_weights, parity_dir, totalseg_ct, totalseg_seg):
    """Diffusion on the real CT: a pancreas tumour painted with the liver model, σ fixed, pancreas blended; the
    choices reach the engine and the saved provenance."""
    import torch

    from difftumor_napari._reader import read_layer_data

    torch.set_num_threads(2)
    monkeypatch.setenv(st.NOTHREADS_ENV, "1")
    viewer = make_napari_viewer()
    for p in (totalseg_ct, totalseg_seg):
        data, kw, kind = read_layer_data(p)
        getattr(viewer, f"add_{kind}")(data, **kw)
    place, synth = _widgets(viewer, qtbot)
    place.organ.value = "pancreas"
    place.random_size.value = "tiny"
    assert place.place_random() == 1
    assert synth.organ.value == "pancreas"
    synth.weights_dir.value = str(parity_dir)  # liver weights only
    synth.method.value, synth.device.value = "diffusion", "cpu"
    assert not synth.run() and "lacks pancreas_early.pt" in errors[-1]
    assert not synth.pancreas_blend.value and synth.pancreas_blend.enabled
    synth.weights_organ.value = "liver"
    assert "liver model painting pancreas tumours" in synth.method_info.value
    synth.fixed_sigma.value = True
    assert synth.sigma.enabled
    synth.sigma.value = 1.5
    synth.pancreas_blend.value = True
    synth.keep_intermediates.value = False
    n_errors = len(errors)
    assert synth.run() and synth.outcome is not None, errors[n_errors:]
    prov = synth.outcome.provenance
    assert prov["method"] == "diffusion" and prov["organ"] == "pancreas" and prov["weights_organ"] == "liver"
    assert [t["sigma"] for t in prov["tumours"]] == [1.5] and "liver_early.pt" in prov["tumours"][0]["weights_sha256"]
    assert "liver weights" in synth.status.value and "σ 1.5" in synth.status.value
    changed = synth.outcome.ct != np.asarray(viewer.layers["example_ct_sm"].data)
    assert changed.any() and changed.sum() < 2000  # blended around the tumour, not the whole 96 mm crop replaced
    synth.out_dir.value = str(tmp_path / "out")
    paths = synth.save()
    saved = json.loads(paths["provenance"].read_text(encoding="utf-8"))
    assert saved["settings"]["weights_organ"] == "liver" and saved["settings"]["sigma"] == 1.5
    assert saved["settings"]["pancreas_blend"] is True and saved["weights_organ"] == "liver"
    assert set(saved["weights_sha256"]) == {"AutoencoderModel.ckpt", "liver_early.pt"}
    assert errors[n_errors:] == []


def test_missing_weights_folder_is_named_in_the_widgets_words(phantom_viewer, qtbot, monkeypatch, errors, tmp_path):
    """A weights folder that was moved or mistyped: the message speaks of the Weights field, not of the command
    line's '--weights' flag a napari user never typed."""
    monkeypatch.setenv(st.NOTHREADS_ENV, "1")
    place, synth = _widgets(phantom_viewer, qtbot)
    assert place.place_at_voxel(_inner_voxel(place.organ_mask()))
    synth.weights_dir.value = str(tmp_path / "moved")
    assert "--weights" not in synth.method_info.value and "Weights folder" in synth.method_info.value
    for method in ("diffusion", "auto"):
        synth.method.value = method
        assert not synth.run()
        assert "--weights" not in errors[-1] and errors[-1].startswith("Weights folder")
        assert "no such folder" in errors[-1]


def test_before_after_with_the_original_ct_closed_keeps_the_result_shown(phantom_viewer, qtbot, monkeypatch, errors):
    """Closing the original CT after a run, Before / after used to hide the result and say 'Showing: before
    (original)' over an empty canvas."""
    from difftumor_napari._qt.synthesis_widget import RESULT_CT

    monkeypatch.setenv(st.NOTHREADS_ENV, "1")
    place, synth = _widgets(phantom_viewer, qtbot)
    assert place.place_at_voxel(_inner_voxel(place.organ_mask()))
    synth.method.value = "model-based"
    assert synth.run() and RESULT_CT in phantom_viewer.layers
    phantom_viewer.layers.remove(synth.ct_layer.value.name if synth.ct_layer.value is not None else "phantom CT")
    assert synth.toggle_before_after() == "after"
    assert phantom_viewer.layers[RESULT_CT].visible
    assert "was closed" in errors[-1] and "\n" not in errors[-1] and "before (original)" not in synth.status.value


def _off_centre_liver_voxel(liver: np.ndarray) -> tuple[int, int, int]:
    """A liver voxel well inside the organ on a slice away from the volume's middle one."""
    from scipy import ndimage

    d = ndimage.distance_transform_edt(liver)
    middle = liver.shape[0] // 2
    d[max(0, middle - 3):middle + 4] = 0  # not on the slice napari opens on
    return tuple(int(v) for v in np.unravel_index(np.argmax(d), liver.shape))


def test_after_synthesis_the_view_goes_to_the_tumour(phantom_viewer, qtbot, monkeypatch, errors):
    """Defect 3: the result was hidden: the organ labels stayed on top at full opacity, the tumour outline was
    hidden and nothing centred on it. Now the slice, the camera centre and the zoom go to the tumour, the organs
    drop to an outline and the tumour is a thin outline that the checkbox toggles."""
    from napari.layers import Shapes

    from difftumor_napari._qt.synthesis_widget import TUMOR_OUTLINE
    from difftumor_napari.layers import _camera, view_size_px

    monkeypatch.setenv(st.NOTHREADS_ENV, "1")
    viewer = phantom_viewer
    place, synth = _widgets(viewer, qtbot)
    ct, organs = viewer.layers["phantom CT"], viewer.layers["phantom organs"]
    voxel = _off_centre_liver_voxel(place.organ_mask())
    place.size.value = "small"
    assert place.place_at_voxel(voxel)
    viewer.dims.set_point(0, float(ct.data_to_world((0, 0, 0))[0]))  # the user looks elsewhere ...
    viewer.reset_view()  # ... at the whole slice
    synth.method.value = "model-based"
    assert synth.run() and synth.outcome is not None and errors == []

    mask = synth.outcome.tumor_mask
    centre = np.asarray(ct.data_to_world(np.argwhere(mask).mean(0)))
    assert viewer.dims.point[0] == pytest.approx(centre[0], abs=ct.scale[0])  # the tumour's slice
    camera = _camera(viewer)
    np.testing.assert_allclose(np.asarray(camera.center)[-2:], centre[-2:], atol=float(max(ct.scale)))
    extent_mm = (np.ptp(np.argwhere(mask), axis=0) + 1) * np.asarray(ct.scale)
    spans = float(max(extent_mm[1:])) * camera.zoom / float(min(view_size_px(viewer)))
    assert 0.1 <= spans <= 0.6, spans  # a readable part of the canvas, not 8 pixels, not the whole of it
    assert organs.contour >= 1 and organs.opacity <= 0.5  # organs drawn as a faint outline
    tumour = viewer.layers[TUMOR_OUTLINE]
    assert isinstance(tumour, Shapes) and tumour.visible and viewer.layers.index(tumour) == len(viewer.layers) - 1
    lines = np.concatenate(tumour.data)  # (z, y, x) on the CT grid: along the tumour's edge, between voxels
    assert set(np.unique(lines[:, 0]).astype(int)) == set(np.unique(np.nonzero(mask)[0]))
    inner = np.rint(lines).astype(int)
    assert 0 < mask[tuple(inner.T)].mean() < 1  # between tumour voxels and their neighbours, on no side only
    assert synth.show_outline.value
    synth.show_outline.value = False
    assert not tumour.visible
    tumour.visible = True  # the layer list's eye and the checkbox agree
    assert synth.show_outline.value
    viewer.reset_view()
    synth.go_to_tumour()
    np.testing.assert_allclose(np.asarray(camera.center)[-2:], centre[-2:], atol=float(max(ct.scale)))


def test_status_says_how_long_the_user_waited(phantom_viewer, qtbot, monkeypatch, errors):
    """Defect 5: the status said '< 0.1 s on cpu' (the engine's own time) when the user waited 27-40 s; it now
    gives the time from the click to the result shown."""
    import re

    monkeypatch.setenv(st.NOTHREADS_ENV, "1")
    place, synth = _widgets(phantom_viewer, qtbot)
    assert place.place_at_voxel(_inner_voxel(place.organ_mask()))
    slow = _slow_generator(0.1, 4)

    def quick_engine_slow_wait(request):  # the engine reports 0.01 s; 0.4 s pass before the result is there
        result = yield from slow(request)
        result.provenance.update(seconds=0.01, device="cpu", n_tumours=1, seed=0)
        return result

    synth.make_generator = quick_engine_slow_wait
    assert synth.run() and synth.outcome is not None
    status = synth.status.value
    assert status.startswith("Done:") and "< 0.1 s" not in status.split("(engine")[0], status
    waited = float(re.search(r"result in (\d+(?:\.\d+)?) s", status).group(1))
    assert waited >= 0.4, status


def test_every_refused_synthesize_updates_the_status(phantom_viewer, qtbot, monkeypatch, errors):
    """Defect 5: a refused Synthesize left the previous 'Done: ...' in the status line."""
    monkeypatch.setenv(st.NOTHREADS_ENV, "1")
    place, synth = _widgets(phantom_viewer, qtbot)
    assert place.place_at_voxel(_inner_voxel(place.organ_mask()))
    assert synth.run() and synth.status.value.startswith("Done:")
    phantom_viewer.layers.remove("tumor mask")
    assert not synth.run()
    assert synth.status.value == errors[-1] and "no tumour mask layer" in synth.status.value
    synth2 = _widgets(phantom_viewer, qtbot)[1]
    synth2.status.value = "old text"
    synth2.toggle_before_after()
    assert "synthesize a tumour first" in synth2.status.value
    synth2.status.value = "old text"
    synth2.show_difference()
    assert "synthesize a tumour first" in synth2.status.value


@pytest.fixture
def unwritable_folder():
    """A folder the (effective) user cannot write to: mode 0555, and when the tests run as root - who may write
    anywhere - the effective user is 'nobody' while the fixture is active."""
    import os
    import shutil
    import tempfile
    from pathlib import Path

    folder = Path(tempfile.mkdtemp(prefix="difftumor-ro-", dir="/tmp"))
    folder.chmod(0o555)
    root = os.geteuid() == 0
    if root:
        os.setegid(65534)
        os.seteuid(65534)
    try:
        yield folder
    finally:
        if root:
            os.seteuid(0)
            os.setegid(0)
        folder.chmod(0o755)
        shutil.rmtree(folder)


def test_saving_into_a_read_only_folder_says_permission_denied(phantom_viewer, qtbot, monkeypatch, errors,
                                                                request):
    """Defect 5: 'ITK ERROR: NiftiImageIO(0x55c6...)' with a temporary path; now one sentence naming the folder."""
    monkeypatch.setenv(st.NOTHREADS_ENV, "1")
    place, synth = _widgets(phantom_viewer, qtbot)
    assert place.place_at_voxel(_inner_voxel(place.organ_mask()))
    assert synth.run() and synth.outcome is not None
    folder = request.getfixturevalue("unwritable_folder")
    synth.out_dir.value = str(folder)
    assert synth.save() is None
    assert errors[-1] == f"output folder {folder}: cannot write in it: permission denied", errors[-1]
    assert synth.status.value == errors[-1] and list(folder.iterdir()) == []


def _yellow_box(shot: np.ndarray) -> tuple[int, int] | None:
    """(height, width) in pixels of the box around the tumour outline's yellow pixels, or None if none."""
    rgb = np.asarray(shot)[..., :3].astype(int)
    yellow = (rgb[..., 0] > 200) & (rgb[..., 1] > 160) & (rgb[..., 2] < 90)
    if yellow.sum() < 10:
        return None
    rows, cols = np.nonzero(yellow)
    return int(np.ptp(rows)) + 1, int(np.ptp(cols)) + 1


def test_result_screenshots_show_the_tumour(make_napari_viewer, qtbot, monkeypatch, tmp_path, no_weights):
    """Render before / after at the tumour's slice and the zoomed side-by-side Inspection to PNG (the docs/img
    images: ``DIFFTUMOR_SCREENSHOT_DIR=docs/img``), and check that the tumour is outlined and large enough."""
    import os
    from pathlib import Path

    from PIL import Image

    from difftumor_napari._qt.inspection_widget import InspectionWidget
    from difftumor_napari._qt.placement_widget import PlacementWidget
    from difftumor_napari._qt.synthesis_widget import SynthesisWidget
    from difftumor_napari._sample_data import make_phantom_sample

    out = Path(os.environ.get("DIFFTUMOR_SCREENSHOT_DIR", tmp_path))
    monkeypatch.setenv(st.NOTHREADS_ENV, "1")
    viewer = make_napari_viewer(show=True)
    viewer.window._qt_window.resize(1500, 950)
    for data, kw, kind in make_phantom_sample():
        getattr(viewer, f"add_{kind}")(data, **kw)
    place, synth, inspect = PlacementWidget(viewer), SynthesisWidget(viewer), InspectionWidget(viewer)
    docks = [viewer.window.add_dock_widget(w, name=n, area="right", tabify=i > 0)
             for i, (w, n) in enumerate(((place, "Tumor placement"), (synth, "Synthesis"), (inspect, "Inspection")))]
    place.size.value = "small"
    assert place.place_at_voxel(_off_centre_liver_voxel(place.organ_mask()))
    viewer.reset_view()  # the user looks at the whole slice before pressing Synthesize
    qtbot.wait(50)
    docks[1].raise_()
    assert synth.run() and synth.outcome is not None

    def save(name: str) -> np.ndarray:
        qtbot.wait(400)  # the docks re-lay out after the widgets' texts change
        shot = np.asarray(viewer.screenshot(canvas_only=False, flash=False))
        img = Image.fromarray(shot[..., :3])
        img.resize((1200, round(img.height * 1200 / img.width)), Image.LANCZOS).save(out / f"{name}.png", optimize=True)
        return np.asarray(viewer.screenshot(canvas_only=True, flash=False))

    after = save("result_after")
    assert synth.toggle_before_after() == "before"
    before = save("result_before")
    canvas_px = min(after.shape[:2])
    for shot in (after, before):  # the outline is there, and the tumour spans a readable part of the canvas
        box = _yellow_box(shot)
        assert box is not None and max(box) >= 0.1 * canvas_px, box
    assert np.abs(after[..., :3].astype(int) - before[..., :3].astype(int)).sum() > 0
    synth.toggle_before_after()

    docks[2].raise_()
    assert inspect.measure() is not None
    assert inspect.toggle_side_by_side()
    grid = save("inspection_side_by_side")
    cell = min(inspect._viewer.canvas.viewbox_size(viewer.layers))
    box = _yellow_box(grid)
    assert box is not None and min(box) >= 0.1 * cell, box  # in the cells, not 8 pixels


def test_mass_effect_control_reaches_the_request(phantom_viewer, qtbot, monkeypatch, errors, no_weights):
    """The Mass effect box maps to SynthesisRequest.mass_effect: "on" pushes the tissue around a small tumour
    (recorded in the provenance), "off" leaves everything beyond the blend alone."""
    monkeypatch.setenv(st.NOTHREADS_ENV, "1")
    place, synth = _widgets(phantom_viewer, qtbot)
    place.organ.value = "liver"
    assert synth.mass_effect.value == "auto"
    assert tuple(synth.mass_effect.choices) == ("auto", "on", "off")
    place.random_size.value = "small"
    assert place.place_random() == 1
    synth.organ.value = "liver"
    runs = {}
    for mode in ("on", "off"):
        synth.mass_effect.value = mode
        assert synth.run() and synth.outcome is not None
        runs[mode] = synth.outcome
    assert errors == []
    on, off = runs["on"], runs["off"]
    assert on.request.request.mass_effect == "on" and on.request.settings()["mass_effect"] == "on"
    assert on.provenance["mass_effect"]["groups_applied"] == 1 and off.provenance["mass_effect"]["groups_applied"] == 0
    assert np.array_equal(on.tumor_mask, off.tumor_mask)
    from scipy import ndimage

    beyond_blend = ~ndimage.binary_dilation(on.tumor_mask, iterations=4)
    assert (on.ct != off.ct)[beyond_blend].any()  # tissue beyond the blend's reach moved


# -- issue 16 (second pass): the result first, the overlays a turn later; the engine ready before the click ----
def test_result_ct_is_shown_before_its_overlays(phantom_viewer, qtbot, monkeypatch, errors):
    """The GUI adds 'CT + synthetic tumor' at once and the tumour labels and outline on the next event-loop
    turn (three inserts in one handler froze the window for all three before anything was drawn)."""
    from difftumor_napari._qt.synthesis_widget import RESULT_CT, RESULT_TUMOR, TUMOR_OUTLINE

    monkeypatch.setenv(st.NOTHREADS_ENV, "1")
    place, synth = _widgets(phantom_viewer, qtbot)
    assert place.place_at_voxel(_inner_voxel(place.organ_mask()))
    assert synth.run() and synth.outcome is not None
    assert {RESULT_CT, RESULT_TUMOR, TUMOR_OUTLINE} <= {ly.name for ly in phantom_viewer.layers}  # scripts: all
    synth.add_result_layers(synth.outcome, overlays_later=True)
    assert RESULT_CT in phantom_viewer.layers
    assert RESULT_TUMOR not in phantom_viewer.layers and TUMOR_OUTLINE not in phantom_viewer.layers
    qtbot.waitUntil(lambda: RESULT_TUMOR in phantom_viewer.layers, timeout=5000)  # one step per turn
    assert not phantom_viewer.layers[RESULT_TUMOR].visible and phantom_viewer.layers[-1].name == TUMOR_OUTLINE
    assert phantom_viewer.layers.selection.active.name == RESULT_CT
    assert errors == []


def test_engine_is_prepared_as_the_widget_opens(phantom_viewer, qtbot, monkeypatch, no_weights):
    """The first Synthesize click does not wait for torch to load: the shared engine is made in a background
    thread when the widget opens."""
    monkeypatch.delenv(st.NOTHREADS_ENV, raising=False)
    monkeypatch.setattr(st, "_ENGINES", {})
    place, synth = _widgets(phantom_viewer, qtbot)
    qtbot.waitUntil(lambda: bool(st._ENGINES), timeout=60000)
    engine = next(iter(st._ENGINES.values()))
    assert st.shared_engine(synth.weights_folder(), synth.device.value) is engine  # the run reuses it


def test_contrast_phase_control_reaches_the_request(phantom_viewer, qtbot, monkeypatch, errors, no_weights):
    """Contrast phase maps to SynthesisRequest.phase: auto leaves the engine to tell it from the organ's HU,
    a chosen phase is used as given (recorded in the provenance)."""
    import json

    monkeypatch.setenv(st.NOTHREADS_ENV, "1")
    place, synth = _widgets(phantom_viewer, qtbot)
    assert synth.phase.value == "auto"
    assert tuple(synth.phase.choices) == ("auto", "non-contrast", "enhanced")
    assert place.place_at_voxel(_inner_voxel(place.organ_mask()))
    synth.method.value = "model-based"
    assert synth.build_request().request.phase is None
    synth.phase.value = "enhanced"
    assert synth.run() and synth.outcome is not None and errors == []
    assert synth.outcome.request.request.phase == "enhanced"
    text = json.dumps(synth.outcome.provenance)
    assert '"phase": "enhanced"' in text and '"phase_source": "given"' in text
