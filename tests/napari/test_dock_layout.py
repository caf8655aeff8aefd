"""Every DiffTumor widget fits its dock: nothing cut off on the right, a scroll bar when the window is short.

napari docks a magicgui container's ``.native``; for a scrollable container that used to be the inner
form, whose orphaned scroll area kept it 624 px wide inside a ~430 px dock, so the right-hand half of
the buttons and drop-downs was off screen. These tests look at the real geometry of a shown window.
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.gui

WIDGETS = ("Window / level", "Tumor placement", "Synthesis", "Inspection")


def _cut_off(dock) -> list[str]:
    """Visible controls whose right edge lies beyond the visible part of the dock."""
    from qtpy.QtCore import QPoint
    from qtpy.QtWidgets import (
        QAbstractButton,
        QAbstractSpinBox,
        QComboBox,
        QLabel,
        QLineEdit,
        QProgressBar,
        QScrollArea,
    )

    content = dock.widget()
    visible_right = dock.contentsRect().right() + 1  # the dock clips whatever sticks out of it
    if isinstance(content, QScrollArea):
        viewport = content.viewport()
        visible_right = min(visible_right, viewport.mapTo(dock, QPoint(viewport.width(), 0)).x())
    cut = []
    for child in content.findChildren((QAbstractButton, QAbstractSpinBox, QComboBox, QLabel, QLineEdit, QProgressBar)):
        if not child.isVisibleTo(dock) or child.width() <= 1:
            continue
        right = child.mapTo(dock, QPoint(child.width(), 0)).x()
        if right > visible_right + 1:
            cut.append(f"{type(child).__name__} {getattr(child, 'text', lambda: '')()!r}: right edge {right} > {visible_right}")
    return cut


@pytest.mark.parametrize("size", [(1500, 950), (1100, 620)])
def test_docked_widgets_fit_the_dock(make_napari_viewer, qtbot, size):
    from qtpy.QtWidgets import QScrollArea

    viewer = make_napari_viewer(show=True)
    viewer.window._qt_window.resize(*size)
    problems = []
    for name in WIDGETS:
        dock, widget = viewer.window.add_plugin_dock_widget("difftumor", name)
        qtbot.wait(300)  # let the dock and scroll area settle their sizes (the bug showed after ~100 ms)
        problems += [f"{name} at {size}: {p}" for p in _cut_off(dock)]
        paths = [a for a in ("weights_dir", "out_dir", "log_path") if hasattr(widget, a)]
        if paths:  # at a dock 420 px wide, a chosen path stays readable beside its button
            from qtpy.QtCore import Qt

            viewer.window._qt_window.resizeDocks([dock], [420], Qt.Orientation.Horizontal)
            qtbot.wait(100)
        for attr in paths:
            edit = getattr(widget, attr).line_edit.native
            assert edit.width() >= 140, (name, attr, edit.width())  # about 20 characters
            assert getattr(widget, attr).choose_btn.text == "Browse…"
        problems += [f"{name} at {size}, dock 420 px: {p}" for p in _cut_off(dock)] if paths else []
        area = dock.widget()
        if isinstance(area, QScrollArea):  # the form fills the dock's width and scrolls vertically
            form = area.widget()
            assert form.width() <= area.viewport().width(), (name, form.width(), area.viewport().width())
            assert form.width() >= area.viewport().width() - 2, (name, form.width(), area.viewport().width())
            if form.minimumSizeHint().height() > area.viewport().height():
                assert area.verticalScrollBar().isVisible(), name
        viewer.window.remove_dock_widget(dock)
    assert not problems, "\n".join(problems)


def test_scrollable_widget_hands_napari_its_scroll_area(make_napari_viewer):
    from qtpy.QtWidgets import QScrollArea

    from difftumor_napari._qt.synthesis_widget import SynthesisWidget

    viewer = make_napari_viewer()
    widget = SynthesisWidget(viewer)
    dock = viewer.window.add_dock_widget(widget, name="Synthesis", area="right")
    assert isinstance(dock.widget(), QScrollArea) and dock.widget().widget() is widget.form
    assert widget.form.layout() is widget._widget._layout  # the form is the magicgui layout's widget


def test_widgets_docked_from_the_plugins_menu_share_one_tabbed_dock(make_napari_viewer, qtbot):
    """Opening Placement, Synthesis and Inspection one after another gives tabs, the newest in front, not
    three docks stacked in one column (each squeezed to a few rows)."""
    viewer = make_napari_viewer(show=True)
    viewer.window._qt_window.resize(1400, 900)
    main = viewer.window._qt_window
    docks = []
    for name in ("Tumor placement", "Synthesis", "Inspection"):
        dock, _ = viewer.window.add_plugin_dock_widget("difftumor", name)
        qtbot.wait(100)
        docks.append(dock)
    assert set(main.tabifiedDockWidgets(docks[0])) >= {docks[1], docks[2]}
    assert not docks[2].visibleRegion().isEmpty() and docks[1].visibleRegion().isEmpty()  # newest in front
    assert docks[2].height() > 500  # the full height of the window, not a third of it
