"""Qt set-up shared by the commands that open napari (``demo``, ``study read``).

Call :func:`prefer_qt6` before anything imports qtpy, and :func:`quiet_qt_binding_notice` after napari is
imported and before the window is shown.
"""

from __future__ import annotations

import importlib.util
import os


def prefer_qt6() -> None:
    """Use PyQt6 (napari's recommended binding) when it is installed and no binding was chosen: qtpy
    would otherwise pick PyQt5 first in an environment that has both."""
    if not os.environ.get("QT_API") and importlib.util.find_spec("PyQt6") is not None:
        os.environ["QT_API"] = "pyqt6"


def quiet_qt_binding_notice() -> None:
    """napari 0.9 pops a 'PyQt5 support is deprecated' toast over the canvas on first show when it runs on
    PyQt5 (an environment without PyQt6): a note for developers choosing a Qt binding, not for someone
    looking at CT (or reading a study case), so it is skipped."""
    try:
        from napari._qt import qt_main_window
    except ImportError:  # pragma: no cover - other napari layouts
        return
    if hasattr(qt_main_window, "SHOW_QT_WARNING"):
        qt_main_window.SHOW_QT_WARNING = False
