"""DiffTumor Studio backend: I/O, preprocessing, the three training stages and the synthesis engine.

Nothing in this package imports napari or Qt.
"""

__version__ = "0.1.0"
