"""Long work is a generator that yields ``(message, done, total)`` and returns its result.

The napari plugin runs such generators in a thread worker (``yielded`` -> progress bar); scripts, the CLI
and tests drive them synchronously with :func:`run_sync`, or with :func:`run_with_bar` for a terminal
progress bar. These are the project's only generator runners.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import Any, TypeVar

T = TypeVar("T")
Progress = tuple[str, int, int]  # (message, done, total)


def run_sync(gen: Generator[Any, Any, T], on_progress: Callable[[Progress], None] | None = None) -> T:
    """Run a progress generator to the end on this thread and return its result; ``on_progress`` (if given)
    receives every yielded ``(message, done, total)`` tuple."""
    while True:
        try:
            item = next(gen)
        except StopIteration as stop:
            return stop.value
        if on_progress is not None:
            on_progress(item)


def run_with_bar(gen: Generator[Any, Any, T], desc: str, *, unit: str = "it") -> T:
    """:func:`run_sync` with a tqdm bar on stderr (shown on a terminal only; log lines are printed above it)."""
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    bar = None

    def show(item: Progress) -> None:
        nonlocal bar
        message, done, total = item
        if bar is None:
            bar = tqdm(total=total, desc=desc, unit=unit, leave=False, disable=None)  # None: off when not a terminal
        bar.n = done
        bar.set_postfix_str(str(message), refresh=True)

    try:
        with logging_redirect_tqdm():
            return run_sync(gen, show)
    finally:
        if bar is not None:
            bar.close()
