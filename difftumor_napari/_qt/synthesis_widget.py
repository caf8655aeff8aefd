"""The "Synthesis" dock widget: method / weights folder / device / stage / steps / seed, a threaded run
with progress and Cancel, before/after + difference views, and Save onto the original grid.

Logic lives in :mod:`difftumor_napari.synthesis`; this module builds the layout, runs the
task's generator in a napari ``thread_worker`` (synchronously when ``DIFFTUMOR_NAPARI_NOTHREADS=1``)
and turns results into layers.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from magicgui.widgets import (
    CheckBox,
    ComboBox,
    Container,
    FileEdit,
    FloatSpinBox,
    Label,
    LineEdit,
    ProgressBar,
    PushButton,
    SpinBox,
)

from backend.progress import run_sync
from difftumor_napari import placement as pl
from difftumor_napari import synthesis as st
from difftumor_napari._qt.dock import ScrollableContainer, browse, forms, notify_error, select_first, watch, wrapped
from difftumor_napari._qt.synthesis_results import DIFFERENCE, RESULT_CT, RESULT_TUMOR, TUMOR_OUTLINE, ResultViews
from difftumor_napari.layers import TUMOR_LAYER, ct_image_layers, label_facts, organ_label_layers, unwrap

if TYPE_CHECKING:
    import napari

__all__ = ["DIFFERENCE", "RESULT_CT", "RESULT_TUMOR", "TUMOR_OUTLINE", "SynthesisWidget", "done_summary"]

SAME_ORGAN = "same as Organ"


class _Failed:
    """What the worker returns instead of raising: napari would also relay (and re-raise) a worker's exception,
    so one failure showed as two or three notifications, one of them a traceback."""

    def __init__(self, exc: BaseException):
        self.exc = exc


class SynthesisWidget(ResultViews, ScrollableContainer):
    """Dock widget running the synthesis engine on the CT, organ and tumour-mask layers."""

    def __init__(self, viewer: napari.viewer.Viewer):
        super().__init__(labels=False)  # forms inside; sentences span the full width
        self._viewer = viewer
        self.make_generator = st.engine_generator  # the engine call (tests may slow it down)
        self.worker = None
        self.outcome: st.SynthesisOutcome | None = None
        self._cancel = threading.Event()
        self._source_ct = None  # the CT layer the current result was made from
        self._clicked_at: float | None = None  # perf_counter() of the Synthesize click being answered

        self.ct_layer = ComboBox(label="CT layer", choices=self._ct_choices, nullable=True)
        self.organ_layer = ComboBox(label="Organ labels", choices=self._organ_choices, nullable=True)
        self.organ = ComboBox(label="Organ", choices=list(pl.PLACEABLE_ORGANS), value="liver")
        self.tumor_layer = ComboBox(label="Tumour mask", choices=self._tumor_choices, nullable=True)
        self.method = ComboBox(label="Method", choices=list(st.METHODS), value="auto")
        self.method_info = wrapped(Label(value=""))
        self.weights_dir = browse(FileEdit(label="Weights", mode="d", value="",
                                           tooltip="Folder with AutoencoderModel.ckpt and {organ}_{early,noearly}.pt (remembered)"))
        self.device = ComboBox(label="Device", choices=list(st.DEVICES), value="auto")
        self.stage = ComboBox(label="Tumour stage", choices=[("auto (from size)", "auto"), ("early", "early"),
                                                              ("mid-late", "mid_late")], value="auto")
        self.steps = SpinBox(label="Sampling steps", min=1, max=1000, value=50,
                             tooltip="DDIM steps for mid/late tumours; early tumours use the release's 4 steps")
        self.seed = SpinBox(label="Seed", min=0, max=2**31 - 1, value=0)
        self._add_realism_controls()
        self.weights_organ = ComboBox(
            label="Model organ", choices=[SAME_ORGAN, "liver", "pancreas", "kidney"], value=SAME_ORGAN,
            tooltip="Cross-organ (paper section 4.2): paint this organ's tumours with another organ's diffusion model; "
                    "blending and stage still follow Organ")
        self.fixed_sigma = CheckBox(text="Fixed blend blur σ (voxels)", value=False,
                                    tooltip="Off: σ drawn from U(0, 4) for each tumour, as released")
        self.sigma = FloatSpinBox(label="Blend σ", min=0.0, max=20.0, step=0.5, value=2.0, enabled=False,
                                  tooltip="Blur of the tumour mask that blends the decoded crop into the CT")
        self.pancreas_blend = CheckBox(
            text="Pancreas: blend like liver and kidney", value=False,
            tooltip="Off (as released): the whole 96 mm crop around a pancreas tumour becomes the decoded volume")
        self.keep_intermediates = CheckBox(
            text="Keep intermediates for inspection", value=True,
            tooltip="Diffusion: also return the masked input, the autoencoder reconstruction and the raw decoded "
                    "sample (one extra decode per tumour) for the Inspection widget")
        self.run_button = PushButton(text="Synthesize")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.progress = ProgressBar(label="Progress", min=0, max=1, value=0)
        self.progress_text = wrapped(Label(value=""))
        self.before_after = PushButton(text="Before / after")
        self.difference = PushButton(text="Difference view")
        self.go_to_button = PushButton(text="Go to tumour", tooltip="Its slice, centred and zoomed")
        self.show_outline = CheckBox(text="Tumour outline", value=True,
                                     tooltip="Draw the synthetic tumour's outline over the result")
        self.out_dir = browse(FileEdit(label="Save to", mode="d", value="",
                                       tooltip="Folder the CT, tumour mask and provenance are written to"))
        self.stem = LineEdit(label="File name stem", value="synthetic")
        self.save_button = PushButton(text="Save CT, tumour mask and provenance")
        self.status = wrapped(Label(value=""))
        layers, settings, blending, progress, saving = forms(
            [self.ct_layer, self.organ_layer, self.organ, self.tumor_layer, self.method],
            [self.weights_dir, self.weights_organ, self.device, self.stage, self.steps, self.seed, self.mass_effect,
             self.phase],
            [self.sigma],
            [self.progress], [self.out_dir, self.stem])
        self.extend([layers, self.method_info, settings, self.fixed_sigma, blending, self.pancreas_blend,
                     self.keep_intermediates,
                     Container(widgets=[self.run_button, self.cancel_button], layout="horizontal", labels=False),
                     progress, self.progress_text,
                     Container(widgets=[self.before_after, self.difference], layout="horizontal", labels=False),
                     Container(widgets=[self.go_to_button, self.show_outline], layout="horizontal", labels=False),
                     saving, self.save_button, self.status])

        self._remembered_weights()
        self._connect_buttons()
        self._watched_tumor = None
        self._warmed = False  # the engine was prepared in the background (see _warm_engine)
        self._offered_folder = None  # the default "Save to" shown, replaced while the user has not chosen one
        self._on_organ()
        self.organ_layer.changed.connect(self._on_organ_layer)
        for emitter in (viewer.layers.events.inserted, viewer.layers.events.removed):
            emitter.connect(self._on_layers_changed)
        self._on_layers_changed()
        from difftumor_napari._qt.viewing_widget import keep_radiological

        keep_radiological(viewer)  # superior up in coronal/sagittal, sliders named, whichever widget opens first
        self._watch_closing()
        self._warm_engine()

    def _connect_buttons(self) -> None:
        """What each button and option box does when clicked or changed."""
        self.run_button.changed.connect(lambda _=None: self.run())
        self.cancel_button.changed.connect(lambda _=None: self.cancel())
        self.before_after.changed.connect(lambda _=None: self.toggle_before_after())
        self.difference.changed.connect(lambda _=None: self.show_difference())
        self.go_to_button.changed.connect(lambda _=None: self.go_to_tumour())
        self.show_outline.changed.connect(self._on_show_outline)
        self.save_button.changed.connect(lambda _=None: self.save())
        self.weights_dir.changed.connect(self._on_weights_dir)
        for box in (self.method, self.organ, self.stage, self.tumor_layer, self.weights_organ, self.steps):
            box.changed.connect(self.update_method_info)
        self.fixed_sigma.changed.connect(lambda on: setattr(self.sigma, "enabled", bool(on)))
        self.organ.changed.connect(self._on_organ)
        self.tumor_layer.changed.connect(self._watch_tumor_layer)


    def _add_realism_controls(self) -> None:
        """Mass effect and contrast phase: the request's ``mass_effect`` and ``phase``."""
        self.mass_effect = ComboBox(
            label="Mass effect", choices=[("auto (model-based ≥ 20 mm)", "auto"), ("on", "on"), ("off", "off")],
            value="auto", tooltip="Push the tissue around the tumour outward, the organ label with it (both methods). "
                                  "auto: model-based tumours of 20 mm and more, none for diffusion (as released)")
        self.phase = ComboBox(
            label="Contrast phase", choices=[("auto (from the organ's HU)", "auto"), ("non-contrast", "non-contrast"),
                                             ("enhanced", "enhanced")],
            value="auto", tooltip="Model-based: the phase whose tumour contrast is drawn; auto tells it from the "
                                  "organ's own median HU (a threshold per organ, 80 HU for the liver)")

    def _watch_closing(self) -> None:
        """Closing the dock (napari takes the widget out of it) cancels a run: no layers appear later."""
        from qtpy.QtCore import QEvent

        self._close_watch = watch(self.native, (QEvent.Type.ParentChange,), self._on_parent_change)

    def _on_parent_change(self, native) -> None:
        if native.parent() is None and self.running:
            self.cancel()

    # -- choices ----------------------------------------------------------------------------------
    def _ct_choices(self, widget=None):
        return [(ly.name, ly) for ly in ct_image_layers(self._viewer)
                if ly.metadata.get("difftumor", {}).get("kind") != "synthetic"]

    def _organ_choices(self, widget=None):
        return [(ly.name, ly) for ly in organ_label_layers(self._viewer)]

    def _tumor_choices(self, widget=None):
        from napari.layers import Labels

        layers = [ly for ly in self._viewer.layers if isinstance(ly, Labels)
                  and ly.metadata.get("difftumor", {}).get("kind") != "synthetic" and ly not in organ_label_layers(self._viewer)]
        layers.sort(key=lambda ly: ly.name != TUMOR_LAYER)
        return [(ly.name, ly) for ly in layers]

    def _on_layers_changed(self, event=None) -> None:
        old = (self.ct_layer.value, self.organ_layer.value, self.tumor_layer.value)
        self.reset_choices()
        for box, prev in zip((self.ct_layer, self.organ_layer, self.tumor_layer), old):
            select_first(box, prev)
        self._offer_save_folder()
        self.update_method_info()

    def _offer_save_folder(self) -> None:
        """Save to: a default for the chosen CT (next to its file, else the user's documents) until the user
        picks a folder."""
        current = str(self.out_dir.value or "").strip()
        if current not in ("", ".") and current != self._offered_folder:
            return
        ct = self.ct_layer.value
        folder = str(st.default_save_folder(ct.metadata.get("difftumor", {}).get("source") if ct is not None else None))
        self._offered_folder = folder
        if current != folder:
            self.out_dir.value = folder

    def _on_organ(self, _=None) -> None:
        self.pancreas_blend.enabled = self.organ.value == "pancreas"

    def _watch_tumor_layer(self, _=None) -> None:
        """Follow the placements made in the chosen tumour mask (Tumor placement emits a paint event per placement)."""
        layer = self.tumor_layer.value
        old = self._watched_tumor
        if old is not None and (layer is None or unwrap(old) is not unwrap(layer)):
            try:
                unwrap(old).events.paint.disconnect(self._follow_placements)
            except (TypeError, ValueError, RuntimeError):
                pass
            self._watched_tumor = None
        if layer is not None and self._watched_tumor is None:
            unwrap(layer).events.paint.connect(self._follow_placements)
            self._watched_tumor = layer
        self._follow_placements()

    def _warm_engine(self) -> None:
        """Prepare the engine in a background thread (:func:`~difftumor_napari.synthesis.warm_engine`) as the
        widget opens, once per widget; not with threads off. Loading torch's libraries holds Python's lock for
        about a second whenever it happens: during start-up, before the user acts, rather than after the first
        Synthesize click or in the middle of a placement."""
        if self._warmed or st.threads_disabled():
            return
        self._warmed = True
        threading.Thread(target=st.warm_engine, args=(self.weights_folder(), self.device.value),
                         name="difftumor engine warm-up", daemon=True).start()

    def _follow_placements(self, _=None) -> None:
        """Organ := the organ the tumours were placed in (Tumor placement records it), so a tumour placed in
        the kidney is not synthesized as a liver tumour because Organ here still said liver."""
        layer = self.tumor_layer.value
        placements = (layer.metadata.get("difftumor", {}).get("placements") or []) if layer is not None else []
        organs = {p.get("organ") for p in placements}
        if len(organs) == 1:
            organ = organs.pop()
            if organ in pl.PLACEABLE_ORGANS and organ != self.organ.value:
                self.organ.value = organ
        self.update_method_info()

    def _on_organ_layer(self, _=None) -> None:
        layer = self.organ_layer.value
        present = list(label_facts(layer).organs) if layer is not None else []
        if present and self.organ.value not in present:
            self.organ.value = present[0]

    # -- weights and method -----------------------------------------------------------------------
    def _remembered_weights(self) -> None:
        from backend.errors import DiffTumorError
        from backend.weights import resolve_weights_dir

        try:
            folder, _source = resolve_weights_dir()
        except DiffTumorError as exc:
            notify_error(exc, "Weights folder")
            folder = None
        if folder is not None:
            with self.weights_dir.changed.blocked():
                self.weights_dir.value = str(folder)

    def weights_folder(self) -> str | None:
        value = str(self.weights_dir.value or "").strip()
        return value if value not in ("", ".") else None

    def _on_weights_dir(self, _=None) -> None:
        from backend.weights import set_weights_dir

        folder = self.weights_folder()
        if folder is not None and Path(folder).is_dir():
            try:
                set_weights_dir(folder)  # remembered for the next session (user config)
            except OSError as exc:
                notify_error(exc, "Weights folder")
        self.update_method_info()

    def stages(self) -> list[str]:
        if self.stage.value != "auto":
            return [self.stage.value]
        layer, ct = self.tumor_layer.value, self.ct_layer.value
        if layer is not None and ct is not None and layer.data.shape == ct.data.shape and np.any(layer.data):
            return pl.tumor_stages(layer.data, self.geometry())
        return ["early", "mid_late"]

    def update_method_info(self, _=None) -> st.MethodStatus | None:
        """Say which method will run and why (diffusion only with the weights for organ + stage)."""
        try:
            status = st.method_status(self.method.value, self.organ.value, self.stages(), self.weights_folder(),
                                      weights_organ=self.model_organ(), steps=int(self.steps.value))
        except Exception as exc:  # noqa: BLE001 - shown in the label, not a popup on every change
            self.method_info.value = st.user_message(exc, "Method")
            return None
        self.method_info.value = status.reason
        return status

    def model_organ(self) -> str | None:
        """Whose diffusion weights run: None = the organ's own."""
        value = self.weights_organ.value
        return None if value == SAME_ORGAN or value == self.organ.value else value

    # -- run --------------------------------------------------------------------------------------
    def geometry(self):
        ct = self.ct_layer.value
        return pl.layer_geometry(ct.data.shape, ct.scale, ct.translate, ct.metadata)

    def build_request(self) -> st.SynthesisJob:
        from backend.errors import DiffTumorError

        ct, organs, tumor = self.ct_layer.value, self.organ_layer.value, self.tumor_layer.value
        if ct is None:
            raise DiffTumorError("CT layer: no CT image is open; open a CT or the phantom sample first")
        organ, existing = pl.organ_and_tumors(None if organs is None else organs.data, self.organ.value,
                                              name=organs.name if organs is not None else "organ labels")
        if tumor is None:
            raise DiffTumorError("tumour mask: no tumour mask layer; place a tumour with the Tumor placement widget first")
        for layer, arr in ((organs, organ), (tumor, tumor.data)):
            if np.shape(arr) != tuple(ct.data.shape):
                raise DiffTumorError(f"{layer.name}: shape {np.shape(arr)} differs from the CT {tuple(ct.data.shape)}")
        voxels = np.asarray(tumor.data) > 0
        n, inside = int(voxels.sum()), int((voxels & organ).sum())
        if n and inside < 0.5 * n:  # the engine says "the organ"; here the user needs to hear which one
            raise DiffTumorError(f"{tumor.name}: only {inside} of its {n} voxels lie inside the {self.organ.value} "
                                 f"(Organ); choose the organ the tumours were placed in, or place them inside the "
                                 f"{self.organ.value}")
        self.method_info.value = st.method_status(self.method.value, self.organ.value, self.stages(),
                                                  self.weights_folder(), weights_organ=self.model_organ(),
                                                  steps=int(self.steps.value)).reason
        placements = list(tumor.metadata.get("difftumor", {}).get("placements", []))
        return st.build_job(
            ct=np.asarray(ct.data), geometry=self.geometry(), organ_mask=organ, tumor_mask=np.asarray(tumor.data) > 0,
            organ=self.organ.value, method=self.method.value, device=self.device.value, stage=self.stage.value,
            steps=int(self.steps.value), seed=int(self.seed.value), weights_dir=self.weights_folder(),
            placements=placements, source=ct.metadata.get("difftumor", {}).get("source"),
            keep_intermediates=bool(self.keep_intermediates.value), existing_tumor=existing,
            weights_organ=self.model_organ(), sigma=float(self.sigma.value) if self.fixed_sigma.value else None,
            pancreas_blend=bool(self.pancreas_blend.value) and self.organ.value == "pancreas",
            mass_effect=self.mass_effect.value, phase=self.phase.value)

    @property
    def running(self) -> bool:
        return self.worker is not None

    def run(self) -> bool:
        """Start a synthesis run (threaded unless DIFFTUMOR_NAPARI_NOTHREADS=1); False if refused."""
        if self.running:
            self.status.value = "Synthesis: a run is in progress; wait for it or press Cancel"
            return False
        self._clicked_at = time.perf_counter()  # what the user waits is counted from here to the result shown
        try:
            request = self.build_request()
        except Exception as exc:  # noqa: BLE001
            self.status.value = notify_error(exc, "Synthesis")  # never the previous run's "Done: ..."
            return False
        self.status.value = "Synthesizing…"
        self._cancel.clear()
        self._source_ct = self.ct_layer.value
        gen = st.synthesis_steps(request, cancel=self._cancel, make_generator=self.make_generator)
        self._set_running(True)
        if st.threads_disabled():
            try:
                outcome = run_sync(gen, self._on_progress)
            except Exception as exc:  # noqa: BLE001
                self._on_synthesis_errored(exc)
            else:
                self._on_synthesis_done(outcome)
            finally:
                self._on_finished()
            return True
        from napari.qt.threading import create_worker

        def _steps():
            """Worker: runs the engine generator; never touches Qt. A failure is returned (see :class:`_Failed`)."""
            try:
                return (yield from gen)
            except Exception as exc:  # noqa: BLE001 - reported once, on the GUI thread
                return _Failed(exc)

        worker = create_worker(_steps, _start_thread=False, _connect={"errored": self._on_synthesis_errored})
        worker.yielded.connect(self._on_progress)
        worker.returned.connect(self._on_synthesis_done)
        worker.aborted.connect(self._on_synthesis_aborted)
        worker.finished.connect(self._on_finished)
        self.worker = worker
        worker.start()
        return True

    def cancel(self) -> None:
        """Stop the run at the engine's next step; nothing is added or changed."""
        self._cancel.set()
        if self.worker is not None:
            self.worker.quit()
        self.progress_text.value = "Cancelling…"

    def _set_running(self, on: bool) -> None:
        self.run_button.enabled = not on
        self.cancel_button.enabled = on
        if on:
            self.progress.max, self.progress.value = 1, 0
            self.progress_text.value = "Starting…"

    def _on_progress(self, item) -> None:
        message, done, total = item
        self.progress.max = max(1, int(total))
        self.progress.value = min(int(done), self.progress.max)
        self.progress_text.value = message

    def _on_synthesis_done(self, outcome) -> None:
        if isinstance(outcome, _Failed):
            self._on_synthesis_errored(outcome.exc)
            return
        if self._source_ct is None or self._source_ct not in self._viewer.layers:
            self.status.value = "The CT layer was removed during the run; the result was discarded"
            return
        self.outcome = outcome
        self.add_result_layers(outcome, overlays_later=not st.threads_disabled())
        self.go_to_tumour()
        waited = time.perf_counter() - self._clicked_at if self._clicked_at is not None else None
        self.status.value = (f"Done: {done_summary(outcome.provenance, waited)}. "
                             "Next: Before / after, Inspection, or Save.")

    def _on_synthesis_errored(self, exc: BaseException) -> None:
        if self._cancel.is_set():  # the engine stopped at the user's Cancel: not an error
            self.status.value = "Cancelled: nothing was changed"
            return
        self.status.value = notify_error(exc, "Synthesis")

    def _on_synthesis_aborted(self) -> None:
        self.status.value = "Cancelled: nothing was changed"

    def _on_finished(self) -> None:
        self.worker = None
        self._set_running(False)
        if self._cancel.is_set() and self.outcome is None:
            self.status.value = "Cancelled: nothing was changed"
        self.progress_text.value = "" if self.outcome is None else "Finished"

    def save(self) -> dict | None:
        """Write CT, tumour label (0/1/2) and provenance JSON onto the original grid."""
        try:
            from backend.errors import DiffTumorError

            if self.outcome is None:
                raise DiffTumorError("Save: nothing to save yet; run Synthesize first")
            folder = str(self.out_dir.value or "").strip()
            if folder in ("", "."):
                raise DiffTumorError("Save to folder: choose an output folder first")
            stem = self.stem.value.strip() or "synthetic"
            free = st.free_stem(folder, stem) if Path(folder).is_dir() else stem
            if free != stem:  # never overwrite an earlier result: offer the next free name instead
                self.stem.value = free
                raise DiffTumorError(f"{Path(folder) / (stem + '_ct.nii.gz')}: already exists; nothing was "
                                     f"overwritten. The file name stem is now '{free}': press Save again")
            ct = self._source_ct
            paths = st.save_outcome(self.outcome, folder, stem, ct.metadata, scale=ct.scale, translate=ct.translate)
        except Exception as exc:  # noqa: BLE001
            self.status.value = notify_error(exc, "Save")
            return None
        from napari.utils.notifications import show_info

        show_info(f"Saved {paths['ct'].name}, {paths['label'].name} and {paths['provenance'].name} in {folder}")
        self.status.value = f"Saved to {folder}"
        return paths


def done_summary(prov: dict, waited: float | None = None) -> str:
    """'1 tumour(s), diffusion (mid/late: DDIM 3 steps, σ 3.2), seed 5, result in 12.1 s (engine 10.4 s on cpu)'
    for the status line. ``waited``: seconds from the Synthesize click to the result shown (what the user waited,
    including the layers being added); the engine's own time alone once read '< 0.1 s' after a 30 s wait."""
    what = str(prov.get("method"))
    crops = prov.get("tumours") or []
    if what == "diffusion" and crops:
        stages = sorted({"early" if c.get("stage") == "early" else "mid/late" for c in crops})
        sigmas = [c["sigma"] for c in crops if c.get("sigma") is not None]
        detail = ", ".join(stages)
        if any(c.get("stage") != "early" for c in crops):
            detail += f": DDIM {next(c['steps'] for c in crops if c.get('stage') != 'early')} steps"
        if sigmas:
            detail += ", blend σ " + "/".join(f"{v:.1f}" for v in sigmas)
        elif prov.get("organ") == "pancreas":
            detail += ", whole crop replaced (pancreas as released)"
        if prov.get("weights_organ") and prov.get("weights_organ") != prov.get("organ"):
            detail += f", {prov['weights_organ']} weights"
        what += f" ({detail})"
    secs = prov.get("seconds")
    engine = ""
    if isinstance(secs, (int, float)) and prov.get("device"):
        engine = f"{'< 0.1' if secs < 0.05 else f'{secs:.1f}'} s on {prov.get('device')}"
    if waited is not None:
        timing = f", result in {waited:.1f} s" + (f" (engine {engine})" if engine else "")
    else:
        timing = f", {engine}" if engine else ""
    return f"{prov.get('n_tumours')} tumour(s), {what}, seed {prov.get('seed')}{timing}"
