"""The repository's layout rules (issue 15), read from the source so a new file that breaks one fails here.

* no source file in ``backend/``, ``difftumor_napari/``, ``study/`` over :data:`MAX_FILE_LINES` lines;
* no function (or method) over :data:`MAX_FUNCTION_LINES` lines;
* only the command line (``backend/cli``) imports ``difftumor_napari`` from outside the plugin;
* the model and engine packages import no training and no command-line code;
* ``difftumor --help`` and ``difftumor info --help`` import neither torch nor Qt.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("backend", "difftumor_napari", "study")
MAX_FILE_LINES = 600
MAX_FUNCTION_LINES = 100
ENGINE_PACKAGES = ("backend/vqgan", "backend/diffusion", "backend/synthesis", "backend/segmentation")
HEAVY = ("torch", "monai", "qtpy", "PyQt5", "PyQt6", "PySide2", "PySide6", "napari", "vispy", "magicgui",
         "difftumor_napari")

def _sources() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py") if "__pycache__" not in p.parts)


def _rel(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


def _params(files: list[Path]) -> list:
    return [pytest.param(p, id=_rel(p)) for p in files]


def _imports(path: Path) -> set[str]:
    """Absolute module names ``path`` imports (relative imports resolved against its package)."""
    package = _rel(path.parent).replace("/", ".")
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            names.add(module)
            names.update(f"{module}.{a.name}" for a in node.names)
    return names


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def long_functions(path: Path, limit: int = MAX_FUNCTION_LINES) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return [f"{node.name} (line {node.lineno}: {node.end_lineno - node.lineno + 1} lines)"
            for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > limit]


def test_the_rules_can_fail(tmp_path):
    """The checks below are not vacuous: a long function and a wrong-way import are found."""
    bad = tmp_path / "backend" / "synthesis" / "bad.py"
    bad.parent.mkdir(parents=True)
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    bad.write_text(f"from ..train import loop\nimport difftumor_napari\n\ndef f():\n{body}\n", encoding="utf-8")
    assert long_functions(bad) == [f"f (line 4: {MAX_FUNCTION_LINES + 1} lines)"]
    global REPO
    saved, REPO = REPO, tmp_path
    try:
        assert "backend.train.loop" in _imports(bad) and "difftumor_napari" in _imports(bad)
    finally:
        REPO = saved
    assert len(_sources()) > 50


@pytest.mark.parametrize("path", _params(_sources()))
def test_no_source_file_over_the_line_limit(path):
    n = len(path.read_text(encoding="utf-8").splitlines())
    assert n <= MAX_FILE_LINES, f"{_rel(path)}: {n} lines (at most {MAX_FILE_LINES})"


@pytest.mark.parametrize("path", _params(_sources()))
def test_no_function_over_the_line_limit(path):
    assert long_functions(path) == [], _rel(path)


def test_only_the_command_line_imports_the_plugin():
    found = {_rel(p): sorted(n for n in _imports(p) if _under(n, "difftumor_napari"))
             for p in _sources() if not _rel(p).startswith(("backend/cli/", "difftumor_napari/"))}
    assert {k: v for k, v in found.items() if v} == {}


def test_model_and_engine_packages_import_no_training_or_cli_code():
    files = [p for pkg in ENGINE_PACKAGES for p in sorted((REPO / pkg).rglob("*.py"))]
    assert len(files) > 20
    found = {_rel(p): sorted(n for n in _imports(p) if _under(n, "backend.train") or _under(n, "backend.cli"))
             for p in files}
    assert {k: v for k, v in found.items() if v} == {}


@pytest.mark.parametrize("argv", [["--help"], ["info", "--help"]], ids=["help", "info-help"])
def test_help_imports_neither_torch_nor_qt(argv):
    code = ("import sys\nfrom backend.cli import main\n"
            f"try:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
            f"print('HEAVY:' + ','.join(m for m in {HEAVY!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120,
                         env={"PYTHONPATH": str(REPO), "PATH": "", "HOME": str(REPO)})
    assert out.returncode == 0, out.stderr
    assert "usage: difftumor" in out.stdout
    assert out.stdout.strip().splitlines()[-1] == "HEAVY:"
