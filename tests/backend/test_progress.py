"""The one generator runner: results, progress callbacks, errors and the terminal bar."""

from __future__ import annotations

import pytest

from backend.progress import run_sync, run_with_bar


def _work(n: int, fail_at: int | None = None):
    for i in range(n):
        if i == fail_at:
            raise ValueError(f"failed at {i}")
        yield (f"item {i}", i + 1, n)
    return {"done": n}


def test_run_sync_returns_the_result_and_reports_each_step():
    seen = []
    assert run_sync(_work(3), seen.append) == {"done": 3}
    assert seen == [("item 0", 1, 3), ("item 1", 2, 3), ("item 2", 3, 3)]
    assert run_sync(_work(0)) == {"done": 0}


def test_errors_come_through_unchanged():
    with pytest.raises(ValueError, match="failed at 1"):
        run_sync(_work(3, fail_at=1))
    with pytest.raises(ValueError, match="failed at 2"):
        run_with_bar(_work(3, fail_at=2), "work")


def test_run_with_bar_returns_the_result(capsys):
    assert run_with_bar(_work(4), "work", unit="case") == {"done": 4}
    assert "Traceback" not in capsys.readouterr().err
