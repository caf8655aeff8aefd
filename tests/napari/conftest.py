"""Fixtures shared by the napari widget tests."""

from __future__ import annotations

import pytest


@pytest.fixture
def errors(monkeypatch) -> list[str]:
    """Collect napari error notifications (the plugin's user-error channel) instead of showing them."""
    import napari.utils.notifications as notifications

    seen: list[str] = []
    monkeypatch.setattr(notifications, "show_error", lambda msg: seen.append(str(msg)))
    return seen
