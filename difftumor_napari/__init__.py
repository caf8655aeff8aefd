"""DiffTumor napari plugin: geometry-true CT reader/writer, phantom sample data and widgets.

The contributions are listed in ``napari.yaml``; ``backend`` and torch are imported lazily inside the
functions that need them.
"""

from difftumor_napari._reader import get_reader
from difftumor_napari._sample_data import make_phantom_sample
from difftumor_napari._viewing import ViewingWidget
from difftumor_napari._writer import write_image, write_labels

__all__ = ["ViewingWidget", "get_reader", "make_phantom_sample", "write_image", "write_labels"]
