"""The ``difftumor`` command line: one entry point, one module per subcommand.

Each module listed in :data:`COMMAND_MODULES` defines ``register(subparsers)`` which adds its
subcommand (with ``--help``) and sets ``func`` on the parser via ``set_defaults(func=...)``.
Handlers return an exit code (or None for 0) and raise :class:`backend.errors.DiffTumorError`
for user errors; :func:`main` prints those as one line and exits with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from backend import __version__
from backend.errors import DiffTumorError

# Order = order in `difftumor --help`. A subcommand is listed here only once it works.
COMMAND_MODULES = [
    "backend.cli.info",
    "backend.cli.demo",
    "backend.cli.synthesize",
    "backend.cli.weights",
    "backend.cli.evaluate",
    "backend.cli.study",
    "backend.cli.train",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="difftumor",
        description="DiffTumor Studio: synthesize realistic tumors in CT, train the models, run reader studies.",
    )
    parser.add_argument("--version", action="version", version=f"difftumor {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def _tolerant_streams() -> None:
    """Tables and progress bars use a few non-ASCII marks (–, ≤); on a terminal whose
    locale cannot encode them, print a replacement instead of dying mid-run."""
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="replace")


def main(argv: list[str] | None = None) -> int:
    _tolerant_streams()
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s: %(message)s",
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        code = args.func(args)
    except DiffTumorError as exc:
        print(f"difftumor: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("difftumor: interrupted", file=sys.stderr)
        return 130
    return int(code or 0)


def entry() -> None:  # pragma: no cover - thin wrapper
    sys.exit(main())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
