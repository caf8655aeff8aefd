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
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from backend import __version__
from backend.errors import DiffTumorError

# Order = order in `difftumor --help`. A subcommand is listed here only once it works.
COMMAND_MODULES = [
    "backend.cli.info",
    "backend.cli.demo",
    "backend.cli.synthesize",
    "backend.cli.weights",
    "backend.cli.evaluate",
    "backend.cli.realism",
    "backend.cli.study",
    "backend.cli.train",
]

# Options whose value is a comma-separated list of numbers that may start with '-' (a liver centre in
# LPS has a negative X). argparse reads "-60.5,20,-310" as an option; main() joins such pairs first.
NUMBER_LIST_OPTIONS = ("--center", "--radii", "--rotation")


class _Parser(argparse.ArgumentParser):
    """argparse, whose usage errors (``--count three``) are one line naming the option and where the options are
    listed, instead of the whole usage block (14 lines for ``synthesize``) with the error at its end."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
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


def _is_number_list(text: str) -> bool:
    try:
        [float(v) for v in text.split(",")]
    except ValueError:
        return False
    return True


def join_negative_values(argv: Sequence[str], options: Sequence[str] = NUMBER_LIST_OPTIONS) -> list[str]:
    """``["--center", "-60.5,20,-310"]`` -> ``["--center=-60.5,20,-310"]`` for ``options`` whose value is a
    number list starting with '-', which argparse would otherwise take for an option. Everything else,
    including ``--center=...`` and whatever follows ``--``, is left as it is."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            out.extend(argv[i:])
            break
        nxt = argv[i + 1] if i + 1 < len(argv) else None
        # argparse also accepts an unambiguous abbreviation (--cent); "--cent=..." resolves the same way
        named = arg in options or (len(arg) > 3 and any(o.startswith(arg) for o in options))
        if arg.startswith("--") and named and nxt is not None and nxt.startswith("-") and _is_number_list(nxt):
            out.append(f"{arg}={nxt}")
            i += 2
        else:
            out.append(arg)
            i += 1
    return out


def _is_override(text: str) -> bool:
    return "=" in text and not text.startswith("-") and not text.startswith("=")


def resume_without_value(argv: Sequence[str]) -> list[str]:
    """``["--resume", "max_steps=10"]`` -> ``["--resume=last", "max_steps=10"]``: a bare ``--resume``
    followed by a key=value override means "the last checkpoint", not a checkpoint named
    "max_steps=10" (unless a file of that name exists). Everything after ``--`` is left as it is."""
    out: list[str] = []
    for i, arg in enumerate(argv):
        if arg == "--":
            out.extend(argv[i:])
            break
        nxt = argv[i + 1] if i + 1 < len(argv) else None
        if arg == "--resume" and nxt is not None and _is_override(nxt) and not Path(nxt).exists():
            out.append("--resume=last")
        else:
            out.append(arg)
    return out


def parse(parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.Namespace:
    """Parse ``argv``; key=value words that argparse could not place (overrides written on both sides of
    an option, e.g. ``a=1 --resume b=2``) join the command's ``overrides`` in the order given."""
    argv = resume_without_value(join_negative_values(argv))
    args, extras = parser.parse_known_args(argv)
    if extras:
        takes_overrides = isinstance(getattr(args, "overrides", None), list)
        unknown = [e for e in extras if not (takes_overrides and _is_override(e))]
        if unknown:
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        args.overrides.extend(extras)
    return args


def main(argv: list[str] | None = None) -> int:
    _tolerant_streams()
    parser = build_parser()
    try:
        args = parse(parser, sys.argv[1:] if argv is None else argv)
    except DiffTumorError as exc:  # raised by an option's type= check: one line, like any user error
        print(f"difftumor: error: {exc}", file=sys.stderr)
        return 2
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
    except BrokenPipeError:  # a reader that stopped early (`| head`): entry() ends quietly
        raise
    except OSError as exc:  # a path the system refuses (too long, a file in the way, EINVAL...): one line naming it
        from backend.io import os_error_message

        print(f"difftumor: error: {os_error_message(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("difftumor: interrupted", file=sys.stderr)
        return 130
    return int(code or 0)


def entry() -> None:
    """The console script. Output piped into a reader that stops early (``difftumor ... | head``) ends the
    command quietly, as for other command-line tools, instead of with a BrokenPipeError traceback."""
    try:
        try:
            code = main()
        except SystemExit as exc:  # argparse's --help / usage errors: their text is still in the buffer
            code = exc.code
        sys.stdout.flush()
    except BrokenPipeError:
        # Python would report the failed flush of stdout again at exit: point stdout at /dev/null first
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 141  # 128 + SIGPIPE, what a shell reports for a command stopped by a closed pipe
    sys.exit(code)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
