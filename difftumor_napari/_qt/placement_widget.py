"""The "Tumor placement" dock widget: click to place, size / radii / rotation / irregularity, random
placement, keep-inside-organ, undo/redo. All logic lives in :mod:`difftumor_napari.placement`.

The mask goes into a Labels layer called "tumor mask" on the CT's grid (same scale, translate and
geometry metadata, so the DiffTumor writer saves it on the original grid); the user may paint or
erase it with napari's brush (napari's Ctrl+Z undoes brush strokes; the widget's Undo undoes
placements).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from magicgui.widgets import CheckBox, ComboBox, FloatSlider, FloatSpinBox, Label, PushButton, SpinBox

from difftumor_napari import placement as pl
from difftumor_napari._qt.dock import ScrollableContainer, forms, notify_error, select_first, wrapped
from difftumor_napari.layers import (
    TUMOR_LAYER,
    ct_image_layers,
    focus_on_voxels,
    label_facts,
    organ_label_layers,
    tumor_colormap,
    tumor_layer_metadata,
    unwrap,
)

if TYPE_CHECKING:
    import napari

CUSTOM = "custom (radii below)"
# what to do next, for a first-time user (the status line under the buttons)
NEXT_PLACE = "Tick 'Click on the image to place a tumour' and click inside the organ, or press Random placement."
NEXT_SYNTHESIZE = "Next: Synthesis > Synthesize."


class PlacementWidget(ScrollableContainer):
    """Dock widget: choose CT + organ labels + organ, then click (or randomise) to place tumours."""

    def __init__(self, viewer: napari.viewer.Viewer):
        super().__init__(labels=False)  # a labelled form inside; buttons and the status span the width
        self._viewer = viewer
        self.history = pl.PlacementHistory()
        self._history_layer = None  # the tumour layer the history refers to

        self.ct_layer = ComboBox(label="CT layer", choices=self._image_choices, nullable=True)
        self.organ_layer = ComboBox(label="Organ labels", choices=self._labels_choices, nullable=True)
        self.organ = ComboBox(label="Organ", choices=list(pl.PLACEABLE_ORGANS), value="liver")
        self.place_mode = CheckBox(text="Click on the image to place a tumour", value=False)
        self.size = ComboBox(label="Size class", choices=[CUSTOM, *pl.SIZE_NAMES], value="small")
        self.radius_x = FloatSpinBox(label="Radius R–L (mm)", min=0.5, max=100, step=0.5, value=8)
        self.radius_y = FloatSpinBox(label="Radius A–P (mm)", min=0.5, max=100, step=0.5, value=8)
        self.radius_z = FloatSpinBox(label="Radius S–I (mm)", min=0.5, max=100, step=0.5, value=8)
        self.rotation = FloatSpinBox(label="Rotation in plane (°)", min=-180, max=180, step=5, value=0)
        self.tilt = FloatSpinBox(label="Tilt (°)", min=-90, max=90, step=5, value=0)
        self.irregularity = FloatSlider(label="Irregularity", min=0.0, max=1.0, step=0.05, value=0.3)
        self.seed = SpinBox(label="Seed", min=0, max=2**31 - 1, value=0)
        self.keep_inside = CheckBox(text="Keep inside organ", value=True)
        self.count = SpinBox(label="Number of tumours", min=1, max=20, value=1)
        self.random_size = ComboBox(label="Random size class", choices=list(pl.SIZE_NAMES), value="small")
        self.random_button = PushButton(text="Random placement")
        self.undo_button = PushButton(text="Undo placement")
        self.redo_button = PushButton(text="Redo placement")
        self.status = wrapped(Label(value=""))
        settings, = forms([self.ct_layer, self.organ_layer, self.organ, self.place_mode, self.size, self.radius_x,
                           self.radius_y, self.radius_z, self.rotation, self.tilt, self.irregularity, self.seed,
                           self.keep_inside, self.count, self.random_size])
        self.extend([settings, self.random_button, self.undo_button, self.redo_button, self.status])  # status: full width
        for size in pl.SIZE_NAMES:
            self.size.native.setItemData(self.size.choices.index(size), pl.size_class_text(size), 3)  # tooltip role

        self.size.changed.connect(self._on_size)
        self.organ_layer.changed.connect(self._on_organ_layer)
        self.place_mode.changed.connect(self._on_place_mode)
        self.random_button.changed.connect(lambda _=None: self.place_random())
        self.undo_button.changed.connect(lambda _=None: self.undo())
        self.redo_button.changed.connect(lambda _=None: self.redo())
        for emitter in (viewer.layers.events.inserted, viewer.layers.events.removed):
            emitter.connect(self._on_layers_changed)
        self._on_layers_changed()
        self._on_organ_layer()  # the first hint even when no organ layer is open yet (no change event then)
        from difftumor_napari._qt.viewing_widget import keep_radiological

        keep_radiological(viewer)  # superior up in coronal/sagittal, sliders named, whichever widget opens first
        self._on_size()

    # -- choices ----------------------------------------------------------------------------------
    def _image_choices(self, widget=None):
        return [(ly.name, ly) for ly in ct_image_layers(self._viewer)]

    def _labels_choices(self, widget=None):
        return [(ly.name, ly) for ly in organ_label_layers(self._viewer)]

    def _on_layers_changed(self, event=None) -> None:
        ct, organs = self.ct_layer.value, self.organ_layer.value
        self.reset_choices()
        select_first(self.ct_layer, ct)
        select_first(self.organ_layer, organs)

    def _on_organ_layer(self, _=None) -> None:
        layer = self.organ_layer.value
        facts = label_facts(layer) if layer is not None else None
        present = list(facts.organs) if facts is not None else []
        if present and self.organ.value not in present:
            self.organ.value = present[0]
        single = facts is not None and facts.single_organ
        self.status.value = (f"One organ labelled (1 organ, 2 tumour): choose which under Organ. {NEXT_PLACE}"
                             if present and single else f"Organs found: {', '.join(present)}. {NEXT_PLACE}" if present else (
            "No organ ids in this label layer" if layer is not None else "Open an organ label layer"))

    def _on_size(self, _=None) -> None:
        if self.size.value != CUSTOM:
            r = pl.size_class_radii(self.size.value)
            self.radius_x.value, self.radius_y.value, self.radius_z.value = r
            self.size.tooltip = pl.size_class_text(self.size.value)

    # -- layers -----------------------------------------------------------------------------------
    def _require_ct(self):
        from backend.errors import DiffTumorError

        ct = self.ct_layer.value
        if ct is None:
            raise DiffTumorError("CT layer: no CT image is open; open a CT (File > Open) or the phantom sample first")
        return ct

    def organ_mask(self) -> np.ndarray:
        return self.organ_and_tumors()[0]

    def organ_and_tumors(self) -> tuple[np.ndarray, np.ndarray | None]:
        """(organ mask, tumours already labelled in it (MSD/LiTS/KiTS label 2) or None), on the CT's grid."""
        layer = self.organ_layer.value
        mask, existing = pl.organ_and_tumors(None if layer is None else layer.data, self.organ.value,
                                             name=layer.name if layer is not None else "organ labels")
        ct = self._require_ct()
        if mask.shape != tuple(ct.data.shape):
            from backend.errors import DiffTumorError

            raise DiffTumorError(f"{layer.name}: shape {mask.shape} differs from the CT {tuple(ct.data.shape)}; "
                                 "use labels on the CT's grid")
        return mask, existing

    def geometry(self):
        ct = self._require_ct()
        return pl.layer_geometry(ct.data.shape, ct.scale, ct.translate, ct.metadata)

    def file_geometry(self):
        """The CT file's own grid (recorded by the DiffTumor reader), or None for an array opened otherwise."""
        from backend.io import Geometry

        info = self._require_ct().metadata.get("difftumor", {})
        return Geometry.from_dict(info["geometry"]) if "geometry" in info else None

    def tumor_layer(self, create: bool = True):
        """The "tumor mask" Labels layer on the CT's grid (created empty when missing)."""
        ct = self._require_ct()
        layer = self._viewer.layers[TUMOR_LAYER] if TUMOR_LAYER in self._viewer.layers else None
        if layer is not None and tuple(layer.data.shape) != tuple(ct.data.shape):
            layer.name = f"{TUMOR_LAYER} (other grid)"
            layer = None
        if layer is None and create:
            layer = self._viewer.add_labels(np.zeros(ct.data.shape, np.uint8), name=TUMOR_LAYER, scale=ct.scale,
                                            translate=ct.translate, metadata=tumor_layer_metadata(ct), opacity=0.6,
                                            colormap=tumor_colormap())
        if unwrap(layer) is not unwrap(self._history_layer):
            self.history = pl.PlacementHistory()
            self._history_layer = layer
        return layer

    # -- actions ----------------------------------------------------------------------------------
    def spec_at(self, centre_zyx) -> pl.TumorSpec:
        return pl.TumorSpec(tuple(float(c) for c in centre_zyx),
                            (self.radius_x.value, self.radius_y.value, self.radius_z.value),
                            (self.tilt.value, 0.0, self.rotation.value), float(self.irregularity.value),
                            int(self.seed.value))

    def place_at_world(self, world) -> bool:
        """Place a tumour centred at a world position (napari world coordinates, mm)."""
        try:
            ct = self._require_ct()
            centre = np.asarray(ct.world_to_data(tuple(world)), float)[-3:]
            return self.place_at_voxel(centre)
        except Exception as exc:  # noqa: BLE001 - reported, nothing changed
            self.status.value = notify_error(exc, "Tumour placement")
            return False

    def place_at_voxel(self, centre_zyx) -> bool:
        """Place a tumour centred at a (continuous) data index (z, y, x) of the CT."""
        had_layer = TUMOR_LAYER in self._viewer.layers
        try:
            organ, existing = self.organ_and_tumors()
            geometry = self.geometry()
            spec = self.spec_at(centre_zyx)
            layer = self.tumor_layer()
            p = pl.place_ellipsoid(layer.data, self.history, geometry, organ, spec, organ_name=self.organ.value,
                                   keep_inside_organ=self.keep_inside.value, file_geometry=self.file_geometry(),
                                   existing=existing)
        except Exception as exc:  # noqa: BLE001
            self._drop_new_tumor_layer(had_layer)
            self.status.value = notify_error(exc, "Tumour placement")
            return False
        left_out = int(p.params.get("overlap_left_out_voxels", 0))
        overlap = (f" {left_out} voxels on the labelled tumour were left out (a real tumour is never painted over)."
                   if left_out else "")
        self._after_edit(layer, f"Tumour {p.label}: {len(p.index[0])} voxels at voxel "
                                f"{[int(round(c)) for c in centre_zyx]} (z, y, x).{overlap} {NEXT_SYNTHESIZE}",
                         focus=[p])
        self.seed.value = (self.seed.value + 1) % (2**31 - 1)  # the next irregular shape differs
        return True

    def _drop_new_tumor_layer(self, had_layer: bool) -> None:
        """A failed first placement leaves the layers as they were: no empty tumour layer behind."""
        if not had_layer and TUMOR_LAYER in self._viewer.layers and not np.any(self._viewer.layers[TUMOR_LAYER].data):
            self._viewer.layers.remove(TUMOR_LAYER)

    def place_random(self) -> int:
        """Drop N tumours of the random size class at valid places in the organ (seeded)."""
        try:
            organ, existing = self.organ_and_tumors()
            if existing is not None:  # tumours already labelled (MSD/LiTS/KiTS): new ones go into healthy tissue
                organ = organ & ~existing
            shapes, params = pl.random_tumors(self.geometry(), organ, self.organ.value, size=self.random_size.value,
                                              count=int(self.count.value), seed=int(self.seed.value),
                                              keep_inside_organ=self.keep_inside.value)
            layer = self.tumor_layer()
        except Exception as exc:  # noqa: BLE001
            self.status.value = notify_error(exc, "Random placement")
            return 0
        placed = [self.history.apply(layer.data, shape, params=p) for shape, p in zip(shapes, params)]
        self._after_edit(layer, f"{len(shapes)} random {self.random_size.value} tumour(s) in the {self.organ.value} "
                                f"(seed {self.seed.value}). {NEXT_SYNTHESIZE}", focus=placed)
        self.seed.value = (self.seed.value + 1) % (2**31 - 1)
        return len(shapes)

    def undo(self) -> bool:
        layer = self.tumor_layer(create=False) if self.ct_layer.value is not None else None
        p = self.history.undo(layer.data) if layer is not None else None
        if p is None:
            self.status.value = "Nothing to undo (brush strokes: Ctrl+Z on the tumour layer)"
            return False
        self._after_edit(layer, f"Undid tumour {p.label}")
        return True

    def redo(self) -> bool:
        layer = self.tumor_layer(create=False) if self.ct_layer.value is not None else None
        p = self.history.redo(layer.data) if layer is not None else None
        if p is None:
            self.status.value = "Nothing to redo"
            return False
        self._after_edit(layer, f"Redid tumour {p.label}")
        return True

    def placements(self) -> list[dict]:
        """Parameters of the placements in effect (synthesis records them in the provenance)."""
        return self.history.params()

    def _after_edit(self, layer, message: str, focus: list[pl.Placement] | None = None) -> None:
        """Record the placements, redraw, and (``focus``: the placements just made) go to the largest new one."""
        layer.metadata.setdefault("difftumor", {})["placements"] = self.history.params()  # provenance
        layer.refresh()
        layer.events.paint(value=[])  # linked views (three views) refresh on paint events
        self._viewer.layers.selection.active = layer
        if focus:
            index = tuple(np.concatenate([p.index[axis] for p in focus]) for axis in range(3))
            focus_on_voxels(self._viewer, index, layer)
        self.status.value = message

    # -- click mode -------------------------------------------------------------------------------
    def _on_place_mode(self, on: bool) -> None:
        callbacks = self._viewer.mouse_drag_callbacks
        if on and self._on_click not in callbacks:
            callbacks.append(self._on_click)
        elif not on and self._on_click in callbacks:
            callbacks.remove(self._on_click)

    def _on_click(self, viewer, event):
        """Left click without drag places a tumour there; a drag pans as usual. Clicks that a drawing tool
        of the active layer takes (brush, eraser, fill, picker) are left to that tool."""
        if event.button != 1:
            return
        if getattr(viewer.layers.selection.active, "mode", "pan_zoom") not in ("pan_zoom", "transform"):
            return
        moved = False
        yield
        while event.type == "mouse_move":
            moved = True
            yield
        if not moved:
            self.place_at_world(event.position)
