"""DiffTumor napari plugin: geometry-true CT reader/writer, phantom sample data and widgets.

The contributions are listed in ``napari.yaml``; ``backend`` and torch are imported lazily inside the
functions that need them.
"""

from difftumor_napari._inspection import InspectionWidget
from difftumor_napari._placement import PlacementWidget
from difftumor_napari._reader import get_reader
from difftumor_napari._sample_data import make_phantom_sample
from difftumor_napari._synthesis import SynthesisWidget
from difftumor_napari._viewing import ViewingWidget
from difftumor_napari._writer import write_image, write_labels

__all__ = ["InspectionWidget", "PlacementWidget", "SynthesisWidget", "ViewingWidget", "get_reader", "make_phantom_sample",
           "write_image", "write_labels"]
