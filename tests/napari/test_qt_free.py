"""The plugin's logic modules import without Qt: a script (or a benchmark) that measures a tumour or places
one loads neither a Qt binding nor magicgui; the widgets under ``_qt/`` still come from the package."""

from __future__ import annotations

import subprocess
import sys

QT = ("qtpy", "PyQt5", "PyQt6", "PySide2", "PySide6", "magicgui", "vispy")


def test_logic_modules_import_no_qt():
    code = ("import sys\n"
            "import difftumor_napari.inspection, difftumor_napari.layers, difftumor_napari.placement\n"
            "import difftumor_napari.synthesis, difftumor_napari.viewing\n"
            f"print(sorted(m for m in sys.modules if m.split('.')[0] in {QT!r}))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]", proc.stdout


def test_widgets_still_come_from_the_package():
    import difftumor_napari
    from difftumor_napari._qt.synthesis_widget import SynthesisWidget

    assert difftumor_napari.SynthesisWidget is SynthesisWidget
    assert set(difftumor_napari.__all__) <= set(dir(difftumor_napari))
