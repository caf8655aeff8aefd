"""``study`` is a library: it imports neither napari/Qt nor the command line (the CLI imports it)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FORBIDDEN = ("napari", "qtpy", "PyQt5", "PyQt6", "PySide2", "PySide6", "magicgui", "vispy", "difftumor_napari",
             "backend.cli")


def _imported_names(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _forbidden(name: str) -> bool:
    return any(name == f or name.startswith(f + ".") for f in FORBIDDEN)


def test_no_study_module_imports_the_gui_or_the_cli():
    found = {p.name: sorted(n for n in _imported_names(p) if _forbidden(n)) for p in sorted((REPO / "study").glob("*.py"))}
    assert {k: v for k, v in found.items() if v} == {}


def test_importing_every_study_module_loads_neither_gui_nor_cli():
    code = ("import sys, pkgutil, importlib, study\n"
            "for m in pkgutil.iter_modules(study.__path__): importlib.import_module('study.' + m.name)\n"
            "print('\\n'.join(sorted(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True,
                         env={"PYTHONPATH": str(REPO), "PATH": ""}).stdout.split()
    assert [m for m in out if _forbidden(m)] == []
