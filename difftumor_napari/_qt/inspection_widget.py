"""The "Inspection" dock widget: look at one synthetic tumour closely, measure it, flag failure modes
(paper appendix F.2) and log a reviewer's verdict to a CSV that grows across sessions.

Numbers and flags come from :mod:`difftumor_napari.inspection` (Qt-free); this module picks the
layers, shows the intermediate volumes side by side (napari grid mode) and writes reviews.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from magicgui.widgets import CheckBox, ComboBox, FileEdit, Label, LineEdit, PushButton

from difftumor_napari import inspection as ins
from difftumor_napari import placement as pl
from difftumor_napari._qt.dock import ScrollableContainer, browse, forms, notify_error, select_first, wrapped
from difftumor_napari.layers import label_facts, organ_label_layers, unwrap

if TYPE_CHECKING:
    import napari

PREFIX = "inspect: "
OUTLINE = " · tumour outline"  # suffix of the outline layer drawn over each side-by-side cell
CAPTIONS = {  # what each side-by-side cell shows
    "original CT": "original CT",
    "masked CT": "masked CT (what the model is conditioned on)",
    "autoencoder reconstruction": "autoencoder reconstruction (encode + decode, no diffusion)",
    "raw decoded sample": "raw decoded sample (before blending)",
    "blended result": "blended result (the synthetic CT)",
}
ROW_NAMES = {2: ("top", "bottom"), 3: ("top", "middle", "bottom")}  # grid cells in words
COL_NAMES = {2: ("left", "right"), 3: ("left", "middle", "right")}
MASKED_HU = 37.5  # the diffusion model sees the tumour region as 0 in [-1, 1] = 37.5 HU of [-175, 250]
DEFAULT_LOG = Path.home() / "difftumor_reviews.csv"
FAILURE_TEXT = {
    "too_sharp_edge": "Too sharp edge", "sickle_or_strip_shape": "Sickle / strip shape", "fat_density": "Fat density",
    "fluid_density": "Fluid density", "noise_mismatch": "Noise mismatch", "no_mass_effect": "No mass effect",
    "other": "Other",
}


def components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """Connected tumour components (26-connectivity) of a mask: (labelled array, count)."""
    from scipy import ndimage

    return ndimage.label(np.asarray(mask) > 0, structure=np.ones((3, 3, 3), bool))


def metrics_text(rows: list[tuple[str, str]]) -> str:
    """The numbers as aligned plain-text lines (shown in a monospace label)."""
    width = max((len(k) for k, _ in rows), default=0) + 2
    return "\n".join(f"{k.ljust(width)}{v}" for k, v in rows)


class InspectionWidget(ScrollableContainer):
    """Dock widget: metrics, automatic failure flags, side-by-side intermediates, review log."""

    def __init__(self, viewer: napari.viewer.Viewer):
        super().__init__(labels=False)  # forms inside; sentences and the table span the full width
        self._viewer = viewer
        self.metrics: dict | None = None
        self.flags: dict[str, str] = {}
        self._comps: np.ndarray | None = None
        self._hidden: list = []
        self._stride = 1  # napari grid stride to restore after the side-by-side view

        self.result_layer = ComboBox(label="Synthetic CT", choices=self._result_choices, nullable=True)
        self.tumor_layer = ComboBox(label="Tumour mask", choices=self._tumor_choices, nullable=True)
        self.original_layer = ComboBox(label="Original CT", choices=self._original_choices, nullable=True)
        self.organ_layer = ComboBox(label="Organ labels", choices=self._organ_choices, nullable=True)
        self.organ = ComboBox(label="Organ", choices=list(pl.PLACEABLE_ORGANS), value="liver")
        self._tumor_items: list[tuple[str, int]] = []
        self.tumor = ComboBox(label="Tumour", choices=lambda _w=None: self._tumor_items)
        self.measure_button = PushButton(text="Measure")
        self.table = Label(value="")
        self.table.native.setStyleSheet("font-family: monospace;")
        self.flag_text = wrapped(Label(value=""))
        self.side_by_side = PushButton(text="Show intermediates side by side")
        self.intermediates_text = wrapped(Label(value=""))
        self.checks = {c: CheckBox(text=FAILURE_TEXT[c], value=False) for c in ins.FAILURE_CATEGORIES}
        self.reviewer = LineEdit(label="Reviewer", value="")
        self.note = LineEdit(label="Note", value="")
        self.log_path = browse(FileEdit(label="Review log", mode="w", value=str(DEFAULT_LOG), filter="*.csv",
                                        tooltip="CSV file each saved review is appended to"))
        self.save_review_button = PushButton(text="Save review")
        self.status = wrapped(Label(value=""))
        layers, review = forms([self.result_layer, self.tumor_layer, self.original_layer, self.organ_layer,
                                self.organ, self.tumor], [self.reviewer, self.note, self.log_path])
        self.extend([layers, self.measure_button, self.table, self.flag_text, self.side_by_side,
                     self.intermediates_text, Label(value="Reviewer: failure modes seen (paper F.2)"),
                     *self.checks.values(), review, self.save_review_button, self.status])
        self.native.setMinimumWidth(360)  # room for the numbers and the flag sentences
        from qtpy.QtWidgets import QSizePolicy

        for text in (self.table, self.flag_text, self.intermediates_text):  # never squeezed: the dock scrolls
            text.native.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Minimum)

        self.result_layer.changed.connect(self._on_result)
        self.tumor_layer.changed.connect(self._on_tumor_layer)
        self.measure_button.changed.connect(lambda _=None: self.measure())
        self.side_by_side.changed.connect(lambda _=None: self.toggle_side_by_side())
        self.save_review_button.changed.connect(lambda _=None: self.save_review())
        for emitter in (viewer.layers.events.inserted, viewer.layers.events.removed):
            emitter.connect(self._on_layers_changed)
        self._on_layers_changed()
        from difftumor_napari._qt.viewing_widget import keep_radiological

        keep_radiological(viewer)  # superior up in coronal/sagittal, sliders named, whichever widget opens first

    # -- choices ----------------------------------------------------------------------------------
    def _images(self):
        from napari.layers import Image

        return [ly for ly in self._viewer.layers if isinstance(ly, Image) and ly.ndim == 3 and not ly.rgb
                and not ly.name.startswith(PREFIX)]

    def _result_choices(self, widget=None):
        layers = self._images()
        layers.sort(key=lambda ly: ly.metadata.get("difftumor", {}).get("kind") != "synthetic")
        return [(ly.name, ly) for ly in layers if ly.metadata.get("difftumor", {}).get("kind") != "difference"]

    def _original_choices(self, widget=None):
        wanted = (self.result_layer.value.metadata.get("difftumor", {}).get("original_layer")
                  if self.result_layer.value is not None else None)
        result = self.result_layer.value
        layers = [ly for ly in self._images() if ly.metadata.get("difftumor", {}).get("kind") not in ("synthetic", "difference")]
        layers.sort(key=lambda ly: (ly.name != wanted, result is not None and ly.name == result.name))  # never itself first
        return [(ly.name, ly) for ly in layers]

    def _tumor_choices(self, widget=None):
        from napari.layers import Labels

        organs = organ_label_layers(self._viewer)
        layers = [ly for ly in self._viewer.layers if isinstance(ly, Labels) and not ly.name.startswith(PREFIX)
                  and (ly not in organs or label_facts(ly).has_tumour)]  # a saved 0/1/2 label counts
        layers.sort(key=lambda ly: ly.metadata.get("difftumor", {}).get("kind") != "synthetic")
        return [(ly.name, ly) for ly in layers]

    def _organ_choices(self, widget=None):
        return [(ly.name, ly) for ly in organ_label_layers(self._viewer)]

    def _on_layers_changed(self, event=None) -> None:
        boxes = (self.result_layer, self.tumor_layer, self.original_layer, self.organ_layer)
        old = [b.value for b in boxes]
        self.reset_choices()
        for box, prev in zip(boxes, old):
            select_first(box, prev)
        # a new synthesis result is what to inspect: the widget was docked before it existed (or the run was
        # repeated), so take the new 'CT + synthetic tumor' and its tumour instead of the layers chosen before
        inserted = getattr(event, "value", None) if getattr(event, "type", "") == "inserted" else None
        if inserted is not None and inserted.metadata.get("difftumor", {}).get("kind") == "synthetic":
            for box in (self.result_layer, self.tumor_layer):
                same = [c for c in box.choices if c is not None and unwrap(c) is unwrap(inserted)]
                if same:
                    box.value = same[0]
        self._on_tumor_layer()

    def _on_result(self, _=None) -> None:
        layer = self.result_layer.value
        if layer is None:
            return
        info = layer.metadata.get("difftumor", {})
        self.original_layer.reset_choices()
        if info.get("original_layer") in self._viewer.layers:
            self.original_layer.value = self._viewer.layers[info["original_layer"]]
        if info.get("organ") in pl.PLACEABLE_ORGANS:
            self.organ.value = info["organ"]
        elif str(info.get("organ", "")).startswith("kidney"):
            self.organ.value = "kidney"

    def _on_tumor_layer(self, _=None) -> None:
        layer = self.tumor_layer.value
        if layer is None:
            self._comps, self._tumor_items = None, []
        else:
            values = (np.asarray(layer.data) == 2 if layer in organ_label_layers(self._viewer)
                      and label_facts(layer).has_tumour else None)
            self._comps, n = components(layer.data if values is None else values)
            sizes = np.bincount(self._comps.ravel())[1:] if n else []
            vox_ml = float(np.prod(layer.scale[-3:])) / 1000.0
            self._tumor_items = [(f"tumour {i + 1} ({s * vox_ml:.2f} ml)", i + 1) for i, s in enumerate(sizes)]
        self.tumor.reset_choices()

    # -- measuring --------------------------------------------------------------------------------
    def _selected(self):
        from backend.errors import DiffTumorError

        result, tumor_layer = self.result_layer.value, self.tumor_layer.value
        if result is None:
            raise DiffTumorError("Synthetic CT: no image layer to inspect; run Synthesis first")
        if tumor_layer is None or self._comps is None or self.tumor.value is None:
            raise DiffTumorError("Tumour mask: no tumour to inspect; choose a tumour mask (the 'synthetic tumor' "
                                 "layer after Synthesis, or a saved *_tumor label file)")
        if self.original_layer.value is not None and self.original_layer.value.name == result.name:
            raise DiffTumorError(f"Original CT: '{result.name}' is also the Synthetic CT; choose the CT without the "
                                 "tumour as Original CT")
        if tumor_layer.data.shape != result.data.shape:
            raise DiffTumorError(f"{tumor_layer.name}: shape {tumor_layer.data.shape} differs from {result.name} {result.data.shape}")
        return result, self._comps == int(self.tumor.value)

    def measure(self) -> dict | None:
        """Compute the numbers and flags for the selected tumour and show them."""
        try:
            result, mask = self._selected()
            organ, others = None, (self._comps > 0) & ~mask  # the mask's other tumours are not organ either
            if self.organ_layer.value is not None:
                organ, real = pl.organ_and_tumors(self.organ_layer.value.data, self.organ.value,
                                                  name=self.organ_layer.value.name)
                if real is not None and real.shape == others.shape:  # MSD/LiTS label 2: real tumours
                    others |= real & ~mask
            original = self.original_layer.value
            orig = np.asarray(original.data) if original is not None and original.data.shape == result.data.shape else None
            self.metrics = ins.tumor_metrics(np.asarray(result.data), mask, organ, tuple(result.scale[-3:]), original_ct=orig,
                                             existing_tumor=others if others.any() else None)
        except Exception as exc:  # noqa: BLE001
            notify_error(exc, "Inspection")
            return None
        self.flags = ins.failure_flags(self.metrics)
        rows = ins.metric_rows(self.metrics)
        self.table.value = metrics_text(rows)
        self.flag_text.value = ("Automatic flags:\n" + "\n".join(f"• {FAILURE_TEXT[k]}: {v}" for k, v in self.flags.items())
                                if self.flags else "Automatic flags: none")
        for name, box in self.checks.items():
            box.value = name in self.flags  # the reviewer confirms or unticks
        self._keep_rows_apart()
        self._centre_on(mask, result)
        return self.metrics

    def _keep_rows_apart(self) -> None:
        """After the table and the sentences change: the form may grow, never squeeze its rows together. (The
        scroll area sized it from the word-wrapped labels' height-for-width, smaller than the rows need, so the
        form's rows overlapped once Measure had filled the table while the tab was hidden.)"""
        self.form.setMinimumHeight(0)
        self.form.setMinimumHeight(self.form.sizeHint().height())

    def _centre_on(self, mask: np.ndarray, layer) -> None:
        """The tumour's slice, centred and zoomed (in every cell of the side-by-side grid: they share a camera)."""
        from difftumor_napari.layers import focus_on_mask

        focus_on_mask(self._viewer, mask, layer)

    @property
    def _grid(self):
        canvas = getattr(self._viewer, "canvas", None)  # napari >= 0.9; viewer.grid before (deprecated since)
        return canvas.grid if canvas is not None and hasattr(canvas, "grid") else self._viewer.grid

    # -- intermediates ------------------------------------------------------------------------------
    def intermediate_volumes(self) -> tuple[dict[str, np.ndarray], str]:
        """name -> volume on the CT grid (the images of the side-by-side cells, each shown with the tumour's
        outline), and a sentence about what is missing."""
        result, mask = self._selected()
        info = result.metadata.get("difftumor", {})
        method = info.get("provenance", {}).get("method", "unknown")
        inter = dict(info.get("intermediates") or {})
        vols: dict[str, np.ndarray] = {}
        original = self.original_layer.value
        if original is not None and original.data.shape == mask.shape:
            vols["original CT"] = np.asarray(original.data)
        if "masked" in inter:  # what the encoder saw (windowed crop, tumour at 37.5 HU)
            vols["masked CT"] = np.asarray(inter["masked"])
        elif original is not None and original.data.shape == mask.shape:
            vols["masked CT"] = np.where(mask, np.float32(MASKED_HU), np.asarray(original.data, np.float32))
        for key, name in (("reconstruction", "autoencoder reconstruction"), ("decoded", "raw decoded sample")):
            if key in inter:
                vols[name] = np.asarray(inter[key])
        vols["blended result"] = np.asarray(result.data)
        if method == "diffusion" and not inter:
            note = "The engine returned no autoencoder reconstruction or raw decoded sample for this run."
        elif method != "diffusion":
            note = (f"Made with the {method} method: the autoencoder reconstruction and raw decoded sample exist "
                    "only for the diffusion method.")
        else:
            note = ""
        return vols, note

    def toggle_side_by_side(self) -> bool:
        """Show the intermediates in napari's grid, one cell each with the tumour's outline drawn over it;
        a second click restores the view."""
        from napari.layers import Image, Shapes

        from difftumor_napari.layers import OUTLINE_RGBA, OUTLINE_WIDTH_MM, outline_paths

        if self._grid.enabled and any(ly.name.startswith(PREFIX) for ly in self._viewer.layers):
            for ly in [ly for ly in self._viewer.layers if ly.name.startswith(PREFIX)]:
                self._viewer.layers.remove(ly)
            for ly in self._hidden:
                if ly in self._viewer.layers:
                    ly.visible = True
            self._hidden = []
            self._grid.stride = self._stride
            self._grid.enabled = False
            return False
        try:
            vols, note = self.intermediate_volumes()
            _, mask = self._selected()
        except Exception as exc:  # noqa: BLE001
            notify_error(exc, "Inspection")
            return False
        result = self.result_layer.value
        self._hidden = [ly for ly in self._viewer.layers if ly.visible]
        for ly in self._hidden:
            ly.visible = False
        paths = outline_paths(mask)  # a line along the tumour's edge, not a ring of voxels over its margin
        # image + outline pairs at the front of the layer list: with stride 2, napari's grid puts layers
        # 2k and 2k + 1 in cell k (the outline drawn over its image); the hidden layers take no cell
        for k, (name, vol) in enumerate(vols.items()):
            kw = dict(scale=result.scale, translate=result.translate, metadata={"difftumor": {"kind": "intermediate"}})
            image = Image(vol, name=PREFIX + name, contrast_limits=result.contrast_limits, colormap="gray",
                          interpolation2d=result.interpolation2d, **kw)  # drawn like the result
            edge = Shapes(paths, ndim=3, shape_type="path", name=PREFIX + name + OUTLINE, face_color="transparent",
                          edge_color=[OUTLINE_RGBA] * len(paths), edge_width=OUTLINE_WIDTH_MM / float(np.mean(
                              np.asarray(result.scale, float)[-2:])), blending="translucent_no_depth", **kw)
            self._viewer.layers.insert(2 * k, image)
            self._viewer.layers.insert(2 * k + 1, edge)
        self._stride = self._grid.stride
        self._grid.stride = 2
        self._grid.enabled = True
        self.intermediates_text.value = f"{self.grid_captions()}\n{note}".strip()
        self._keep_rows_apart()
        self._centre_on(mask, result)  # zoomed to the tumour: the whole slice made a 13 mm tumour 8 pixels
        return True

    def grid_captions(self) -> str:
        """Which grid cell shows which intermediate (napari's grid has no titles of its own)."""
        layers = list(self._viewer.layers)
        rows, cols = self._grid.actual_shape(layers)

        def name(i, n, names, word):
            if n == 1:
                return ""
            return names[n][i] if n in names else f"{word} {i + 1}"

        cells = []
        for k, ly in enumerate(layers):
            if ly.name.startswith(PREFIX) and not ly.name.endswith(OUTLINE):
                r, c = self._grid.position(k, layers)
                if r >= 0:
                    where = " ".join(w for w in (name(r, rows, ROW_NAMES, "row"), name(c, cols, COL_NAMES, "column"))
                                     if w) or "the view"
                    cells.append((r, c, f"{where}: {CAPTIONS.get(ly.name[len(PREFIX):], ly.name[len(PREFIX):])}"))
        if not cells:
            return ""
        return "Grid — " + "; ".join(text for _, _, text in sorted(cells)) + " (tumour outlined in yellow in each)"

    # -- review -----------------------------------------------------------------------------------
    def save_review(self) -> Path | None:
        """Append the ticked categories + note for the selected tumour to the review CSV."""
        try:
            result, _ = self._selected()
            info = result.metadata.get("difftumor", {})
            prov = info.get("provenance", {})
            case = info.get("geometry") and (self.original_layer.value.name if self.original_layer.value else result.name)
            review = ins.Review(case=str(case or result.name), tumor=str(self.tumor.value), reviewer=self.reviewer.value,
                                method=str(prov.get("method", "")), seed=str(prov.get("seed", "")),
                                failures=tuple(c for c, box in self.checks.items() if box.value),
                                auto_flags=tuple(self.flags), note=self.note.value)
            path = ins.append_review(Path(str(self.log_path.value)).expanduser(), review)
        except Exception as exc:  # noqa: BLE001
            notify_error(exc, "Review")
            return None
        self.status.value = f"Review saved to {path}"
        self.note.value = ""
        return path
