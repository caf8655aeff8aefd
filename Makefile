# DiffTumor Studio: the two README commands.
#   make demo   set up .venv (once) and open napari with the CT phantom and the DiffTumor widgets
#   make test   set up .venv (once) + the virtual-display system packages, run ruff and the whole test suite
#   make screenshot   re-render docs/img/demo.png (the README picture) on a virtual display
# Setup is idempotent: a stamp in .venv keyed on pyproject.toml's hash makes a second run take ~1 s.
# Variables: PYTHON (interpreter for the venv, default: first python3.x >= 3.10 found),
#            TORCH_SPEC (default torch==2.13.0), PYTEST_ARGS (extra pytest arguments).

VENV ?= .venv
PYTEST_ARGS ?=
XVFB_SCREEN ?= -screen 0 1600x1000x24

.PHONY: demo test setup sysdeps screenshot

setup:
	@bash scripts/setup.sh

sysdeps:
	@bash scripts/sysdeps.sh

demo: setup
	$(VENV)/bin/difftumor demo

test: setup sysdeps
	$(VENV)/bin/ruff check .
	xvfb-run -a -s "$(XVFB_SCREEN)" $(VENV)/bin/python -m pytest tests $(PYTEST_ARGS)

screenshot: setup sysdeps
	xvfb-run -a -s "$(XVFB_SCREEN)" $(VENV)/bin/difftumor demo --screenshot docs/img/demo.png
