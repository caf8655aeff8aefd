"""DiffTumor napari plugin: geometry-true CT reader/writer, phantom sample data and widgets.

The contributions are listed in ``napari.yaml``: the reader, writer and sample data in ``_reader.py``,
``_writer.py``, ``_sample_data.py``; the dock widgets in ``_qt/<name>_widget.py``, each over a Qt-free module
of the same name (``placement.py``, ``synthesis.py``, ``inspection.py``, ``viewing.py``) that a script can
import; the layer and view helpers every widget shares in ``layers.py``. ``backend`` and torch are imported
lazily inside the functions that need them.
"""

from difftumor_napari._qt.inspection_widget import InspectionWidget
from difftumor_napari._qt.placement_widget import PlacementWidget
from difftumor_napari._qt.synthesis_widget import SynthesisWidget
from difftumor_napari._qt.viewing_widget import ViewingWidget
from difftumor_napari._reader import get_reader
from difftumor_napari._sample_data import make_phantom_sample
from difftumor_napari._writer import write_image, write_labels

__all__ = ["InspectionWidget", "PlacementWidget", "SynthesisWidget", "ViewingWidget", "get_reader", "make_phantom_sample",
           "write_image", "write_labels"]
