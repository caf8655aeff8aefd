"""Long work is a generator that yields ``(message, done, total)`` and returns its result.

The napari plugin runs such generators in a thread worker (``yielded`` -> progress bar); scripts, the CLI
and tests drive them synchronously with :func:`run_sync`.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any, TypeVar

T = TypeVar("T")


def run_sync(gen: Generator[Any, Any, T]) -> T:
    """Run a progress generator to the end and return its result."""
    while True:
        try:
            next(gen)
        except StopIteration as stop:
            return stop.value
