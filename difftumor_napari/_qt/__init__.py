"""The Qt side of the plugin: the dock widgets (``<name>_widget.py``, each over the Qt-free
``difftumor_napari/<name>.py``), the coronal and sagittal views (``three_views.py``) and the dock plumbing they
share (``dock.py``). Nothing outside the plugin's widgets and the command line's GUI handlers imports it."""
