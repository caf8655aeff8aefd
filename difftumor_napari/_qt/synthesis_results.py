"""What the "Synthesis" widget does with a result: the layers it adds ('CT + synthetic tumor', the tumour
labels, the tumour outline), the view brought to the tumour, Before / after and the Difference view.

:class:`ResultViews` is a part of :class:`difftumor_napari._qt.synthesis_widget.SynthesisWidget` (which holds the
options, the run and Save): it needs the widget's ``_viewer``, ``outcome``, ``_source_ct``, ``organ_layer``,
``show_outline`` and ``status``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from difftumor_napari._qt.dock import notify_error
from difftumor_napari.layers import TUMOR_LAYER, organ_label_layers, unwrap

if TYPE_CHECKING:
    from difftumor_napari import synthesis as st

RESULT_CT = "CT + synthetic tumor"
RESULT_TUMOR = "synthetic tumor"
TUMOR_OUTLINE = "synthetic tumor outline"
DIFFERENCE = "difference (synthetic − original)"
ORGAN_OPACITY = 0.4  # the organ outline after a synthesis: there, but not over the tumour's texture


class ResultViews:
    """The result half of the Synthesis widget (see the module docstring)."""

    def add_result_layers(self, outcome: st.SynthesisOutcome, *, overlays_later: bool = False) -> None:
        """'CT + synthetic tumor' (image), the tumour's outline, 'synthetic tumor' (labels, hidden) on the CT's
        grid; the organ labels drop to a faint outline and the placement mask is hidden.

        ``overlays_later``: add the result CT now and the rest one step per event-loop turn, so that the window
        draws the result, and stays responsive, between the steps instead of freezing for all of them (the GUI's
        way; scripts and tests get every layer at once)."""
        self._add_result_ct(outcome)
        steps = [self._add_result_outline, self._dim_other_layers, self._add_result_labels]
        if not overlays_later:
            for step in steps:
                step(outcome)
            return
        from qtpy.QtCore import QTimer

        def _next():
            if steps and self.outcome is outcome and RESULT_CT in self._viewer.layers:
                steps.pop(0)(outcome)
                if steps:
                    QTimer.singleShot(0, _next)

        QTimer.singleShot(0, _next)

    def _add_result_ct(self, outcome: st.SynthesisOutcome) -> None:
        ct = self._source_ct
        info = dict(ct.metadata.get("difftumor", {}))
        info.update(kind="synthetic", source=None, provenance=outcome.provenance, original_layer=ct.name,
                    organ=outcome.request.organ, intermediates=outcome.intermediates)
        for name in (RESULT_CT, RESULT_TUMOR, TUMOR_OUTLINE, DIFFERENCE):
            if name in self._viewer.layers:
                self._viewer.layers.remove(name)
        # "after" is drawn exactly like "before": same window, colormap and interpolation, and at the original's
        # place in the layer stack, so Before / after swaps only the CT and every overlay looks the same in both
        result = self._viewer.add_image(outcome.ct, name=RESULT_CT, scale=ct.scale, translate=ct.translate,
                                        contrast_limits=ct.contrast_limits, colormap=ct.colormap.name,
                                        interpolation2d=ct.interpolation2d, interpolation3d=ct.interpolation3d,
                                        metadata={"difftumor": info})
        layers = self._viewer.layers
        layers.move(layers.index(result), layers.index(ct) + 1)
        ct.visible = False  # "after" first; Before / after swaps
        layers.selection.active = result  # its contrast (window) in the layer controls, not the outline's

    def _add_result_outline(self, outcome: st.SynthesisOutcome) -> None:
        """The tumour as a thin line along its edge on top of everything (toggled by "Tumour outline"): the
        synthetic texture and its blended margin stay visible."""
        from difftumor_napari.layers import outline_layer

        ct = self._source_ct
        outline = outline_layer(outcome.tumor_mask, ct, TUMOR_OUTLINE, visible=bool(self.show_outline.value),
                                metadata={"difftumor": {"kind": "outline", "original_layer": ct.name}})
        self._viewer.layers.append(outline)
        outline.events.visible.connect(self._on_outline_visible)
        self._viewer.layers.selection.active = self._viewer.layers[RESULT_CT]

    def _dim_other_layers(self, outcome: st.SynthesisOutcome) -> None:
        """The organs drop to a faint outline, the placement mask is hidden."""
        for layer in self._viewer.layers:
            if layer.name == TUMOR_LAYER:
                layer.visible = False
        organs = self.organ_layer.value
        for layer in organ_label_layers(self._viewer):
            if organs is not None and unwrap(layer) is unwrap(organs):
                layer.contour = max(1, int(layer.contour))
                layer.opacity = min(float(layer.opacity), ORGAN_OPACITY)

    def _add_result_labels(self, outcome: st.SynthesisOutcome) -> None:
        """'synthetic tumor' (labels, hidden): what Inspection measures and Save writes."""
        from difftumor_napari.layers import tumor_colormap, tumor_layer_metadata

        ct = self._source_ct
        meta = tumor_layer_metadata(ct, kind="synthetic")
        meta["difftumor"].update(provenance=outcome.provenance, original_layer=ct.name, result_layer=RESULT_CT)
        labels = self._viewer.add_labels(np.asarray(outcome.tumor_mask).astype(np.uint8), name=RESULT_TUMOR,
                                         scale=ct.scale, translate=ct.translate, metadata=meta, opacity=0.35,
                                         visible=False, colormap=tumor_colormap())
        layers = self._viewer.layers
        if TUMOR_OUTLINE in layers:  # the outline stays on top of everything
            layers.move(layers.index(labels), layers.index(TUMOR_OUTLINE))
        layers.selection.active = layers[RESULT_CT]

    def go_to_tumour(self) -> bool:
        """Bring the synthetic tumour into view: its slice, centred, zoomed (the largest one when there are
        several); False (and the status says why) without a result."""
        from difftumor_napari.layers import focus_on_mask

        if self.outcome is None or self._source_ct is None:
            self.status.value = "Go to tumour: synthesize a tumour first"
            return False
        layer = self._viewer.layers[RESULT_CT] if RESULT_CT in self._viewer.layers else self._source_ct
        return focus_on_mask(self._viewer, self.outcome.tumor_mask, layer) is not None

    def _on_show_outline(self, on: bool) -> None:
        if TUMOR_OUTLINE in self._viewer.layers:
            self._viewer.layers[TUMOR_OUTLINE].visible = bool(on)

    def _on_outline_visible(self, event=None) -> None:
        """The layer list's eye on the outline and the checkbox show the same state."""
        if TUMOR_OUTLINE in self._viewer.layers:
            visible = bool(self._viewer.layers[TUMOR_OUTLINE].visible)
            if visible != bool(self.show_outline.value):
                with self.show_outline.changed.blocked():
                    self.show_outline.value = visible

    def toggle_before_after(self) -> str:
        """Swap the visibility of the original CT and 'CT + synthetic tumor'; returns what is shown."""
        if RESULT_CT not in self._viewer.layers or self._source_ct is None:
            from napari.utils.notifications import show_info

            self.status.value = "Before / after: synthesize a tumour first"
            show_info(self.status.value)
            return ""
        after = self._viewer.layers[RESULT_CT]
        if self._source_ct not in self._viewer.layers:  # hiding the result would leave an empty canvas
            from backend.errors import DiffTumorError

            after.visible = True
            self.status.value = notify_error(
                DiffTumorError(f"Before / after: the original CT '{self._source_ct.name}' was closed; open it again "
                           f"and synthesize to compare (showing: after)"), "Before / after")
            return "after"

        show_after = not after.visible
        after.visible, self._source_ct.visible = show_after, not show_after
        self.status.value = "Showing: after (synthetic)" if show_after else "Showing: before (original)"
        return "after" if show_after else "before"

    def show_difference(self):
        """A 'difference' layer: synthetic minus original HU, blue (darker) to red (brighter), unchanged voxels
        transparent so the CT shows through; symmetric window."""
        if self.outcome is None or self._source_ct is None:
            from napari.utils.notifications import show_info

            self.status.value = "Difference view: synthesize a tumour first"
            show_info(self.status.value)
            return None
        if DIFFERENCE in self._viewer.layers:
            layer = self._viewer.layers[DIFFERENCE]
            layer.visible = not layer.visible
            return layer
        ct = self._source_ct
        diff = self.outcome.ct.astype(np.float32) - np.asarray(ct.data, np.float32)
        lim = float(max(1.0, np.abs(diff).max()))
        info = dict(ct.metadata.get("difftumor", {}), kind="difference", dtype="float32", source=None)
        info.pop("data_range", None)  # the CT's grid and orientation, so it saves onto the original file grid
        return self._viewer.add_image(diff, name=DIFFERENCE, scale=ct.scale, translate=ct.translate,
                                      colormap=difference_colormap(), contrast_limits=(-lim, lim), opacity=0.9,
                                      metadata={"difftumor": info})


def difference_colormap():
    """Blue (darker) - transparent (unchanged) - red (brighter): napari's 'bwr' is white at 0 and, over the whole
    CT, washed the slice out so the change could not be seen against the anatomy."""
    from napari.utils.colormaps import Colormap

    return Colormap([[0.0, 0.3, 1.0, 1.0], [0.0, 0.3, 1.0, 0.0], [1.0, 0.15, 0.0, 0.0], [1.0, 0.15, 0.0, 1.0]],
                    controls=[0.0, 0.5 - 1e-3, 0.5 + 1e-3, 1.0], name="difftumor difference")
