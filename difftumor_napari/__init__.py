"""DiffTumor napari plugin: geometry-true CT reader/writer, phantom sample data and widgets.

The contributions are listed in ``napari.yaml``: the reader, writer and sample data in ``_reader.py``,
``_writer.py``, ``_sample_data.py``; the dock widgets in ``_qt/<name>_widget.py``, each over a Qt-free module
of the same name (``placement.py``, ``synthesis.py``, ``inspection.py``, ``viewing.py``) that a script can
import; the layer and view helpers every widget shares in ``layers.py``. ``backend`` and torch are imported
lazily inside the functions that need them, and the widgets (Qt) when first asked for
(``difftumor_napari.SynthesisWidget``), so that a script importing a Qt-free module loads no Qt.
"""

import importlib

from difftumor_napari._reader import get_reader
from difftumor_napari._sample_data import make_phantom_sample
from difftumor_napari._writer import write_image, write_labels

_WIDGETS = {  # name -> the module under _qt/ that defines it
    "InspectionWidget": "difftumor_napari._qt.inspection_widget",
    "PlacementWidget": "difftumor_napari._qt.placement_widget",
    "SynthesisWidget": "difftumor_napari._qt.synthesis_widget",
    "ViewingWidget": "difftumor_napari._qt.viewing_widget",
}

__all__ = ["InspectionWidget", "PlacementWidget", "SynthesisWidget", "ViewingWidget", "get_reader", "make_phantom_sample",
           "write_image", "write_labels"]


def __getattr__(name: str):
    if name not in _WIDGETS:
        raise AttributeError(f"module 'difftumor_napari' has no attribute {name!r}")
    value = getattr(importlib.import_module(_WIDGETS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WIDGETS))
