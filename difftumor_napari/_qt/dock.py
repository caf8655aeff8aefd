"""What every DiffTumor dock widget is built from: a magicgui Container that scrolls inside a napari dock,
aligned forms, event hooks, wrapped status lines, error notifications and stale-toast clean-up.

napari docks a magicgui widget's ``.native``. For ``Container(scrollable=True)`` that is the inner
widget holding the layout, not the ``QScrollArea`` around it (magicgui's ``root_native_widget``;
pyapp-kit/magicgui#431), so the scroll area is left behind without a parent, and its resize handling
keeps resizing the inner widget to its own default width (624 px) whatever the dock's width: the
right-hand side of every row is cut off. :class:`ScrollableContainer` hands napari the scroll area
instead, so the dock lays out the scroll area and the scroll area lays out the form: rows fill the
dock's width, a vertical scroll bar appears when the window is shorter than the form, and the dock
cannot be made narrower than the form's minimum width plus that scroll bar.
"""

from __future__ import annotations

import functools
import weakref

from magicgui.widgets import ComboBox, Container, Label
from qtpy.QtCore import QEvent, QObject


class EventHook(QObject):
    """Calls ``callback(obj)`` when the watched ``obj`` receives an event of one of ``types`` (``once``: only
    the first time). It is the watched widget's child, so Qt still asks it to filter the "child removed"
    event sent while it is being destroyed, after its Python attributes are gone: it ignores that event
    (the event filters written as closures before raised NameError there, failing tests at random)."""

    def __init__(self, parent, types, callback, *, once: bool = False):
        self._types, self._callback, self._once = tuple(types), callback, once  # before Qt can call it
        super().__init__(parent)

    def eventFilter(self, obj, event):  # noqa: N802 (Qt's name)
        if "_types" not in self.__dict__:  # being destroyed: its parent (the watched widget) reports it removed
            return False
        if event.type() in self._types:
            if self._once:
                obj.removeEventFilter(self)
            self._callback(obj)
        return False


def watch(widget, types, callback, *, once: bool = False) -> EventHook:
    """Install an :class:`EventHook` on ``widget`` (owned by it) and return it (keep it on the widget that
    asked for it)."""
    hook = EventHook(widget, types, callback, once=once)
    widget.installEventFilter(hook)
    return hook


def _fit_scroll_width(area, form) -> None:
    """Keep the scroll area at least as wide as the form's minimum plus a vertical scroll bar (magicgui sets
    it once per insert, from a minimum that grows later as labels align)."""
    bar = area.verticalScrollBar().sizeHint().width()
    area.setMinimumWidth(form.minimumSizeHint().width() + bar + 2 * area.frameWidth())


def _show_bar_when_needed(area, _obj=None) -> None:
    from qtpy.QtCore import Qt

    form = area.widget()
    if form is None:
        return
    width = area.width() - 2 * area.frameWidth()
    height = area.height() - 2 * area.frameWidth()
    needed = form.minimumSizeHint().height()
    layout = form.layout()
    if layout is not None and layout.hasHeightForWidth():
        needed = max(needed, layout.totalHeightForWidth(width))
    policy = Qt.ScrollBarPolicy.ScrollBarAlwaysOn if needed > height else Qt.ScrollBarPolicy.ScrollBarAlwaysOff
    if area.verticalScrollBarPolicy() != policy:
        area.setVerticalScrollBarPolicy(policy)


def _align_labels(labels, _obj=None) -> None:
    widest = max(label.sizeHint().width() for label in labels)
    for label in labels:
        if label.minimumWidth() != widest:
            label.setMinimumWidth(widest)


TAB_GROUP = "difftumor_dock"  # Qt property marking the scroll areas of DiffTumor's docks


def join_difftumor_tabs(area) -> bool:
    """Tabify the dock holding ``area`` with a visible DiffTumor dock in the same dock area; True if it did."""
    from qtpy.QtWidgets import QDockWidget, QMainWindow

    dock = area.parentWidget()
    main = dock.parentWidget() if isinstance(dock, QDockWidget) else None
    if not isinstance(main, QMainWindow) or dock.isFloating():
        return False
    where = main.dockWidgetArea(dock)
    for other in main.findChildren(QDockWidget):
        if (other is not dock and other.isVisible() and not other.isFloating() and other.widget() is not None
                and other.widget().property(TAB_GROUP) and main.dockWidgetArea(other) == where):
            if dock not in main.tabifiedDockWidgets(other):
                main.tabifyDockWidget(other, dock)
            dock.show()
            dock.raise_()  # the widget just opened is the tab in front
            return True
    return False


class ScrollableContainer(Container):
    """``Container(scrollable=True)`` whose ``native`` is the scroll area (what napari docks)."""

    def __init__(self, **kwargs):
        super().__init__(scrollable=True, **kwargs)
        from qtpy.QtWidgets import QFrame

        area = self.root_native_widget
        area.setFrameShape(QFrame.Shape.NoFrame)
        self.form.layout().addStretch(1)  # rows packed at the top; later inserts go before the stretch
        self._fit_width = watch(self.form, (QEvent.Type.LayoutRequest, QEvent.Type.Show),
                                functools.partial(_fit_scroll_width, area))
        area.setProperty(TAB_GROUP, True)
        # Qt 6 can leave the vertical scroll bar shown (the form then sticks out on the right) after the dock
        # grew tall enough for the form: the bar is shown exactly when the form needs more height
        self._bar_hooks = [watch(w, (QEvent.Type.Resize, QEvent.Type.LayoutRequest),
                                 functools.partial(_show_bar_when_needed, area)) for w in (area, self.form)]
        # the first time it is shown in a dock, join the other DiffTumor docks of that area as a tab (napari
        # stacks plugin docks one under another, squeezing each to a few rows)
        self._join_tabs = watch(area, (QEvent.Type.Show,), join_difftumor_tabs, once=True)

    @property
    def native(self):
        return self.root_native_widget

    @property
    def form(self):
        """The widget inside the scroll area that holds the layout."""
        return self.root_native_widget.widget()


def browse(edit):
    """A magicgui FileEdit whose button reads "Browse…" (not "Choose directory"), leaving the path room;
    the whole path shows as the field's tooltip."""
    from qtpy.QtWidgets import QSizePolicy

    edit.choose_btn.text = "Browse…"
    edit.choose_btn.native.setSizePolicy(QSizePolicy.Policy.Maximum, QSizePolicy.Policy.Fixed)  # the path takes the rest
    edit.native.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)  # as wide as the row's drop-downs

    def show_path(value=None):
        edit.line_edit.tooltip = str(edit.value) if str(edit.value) not in ("", ".") else None

    edit.changed.connect(show_path)
    show_path()
    edit.choose_btn.tooltip = {"d": "Choose a folder", "w": "Choose where to save", "r": "Choose a file"}.get(
        str(getattr(edit.mode, "value", edit.mode)), "Choose")
    return edit


def forms(*groups) -> list[Container]:
    """One labelled ``Container`` per group of widgets, all with the same label width, so the controls of
    every group start at one x position. (magicgui aligns labels only within one container, not for the
    widgets handed to ``Container(widgets=...)``, and measures them in the default font, narrower than
    napari's theme: the labels are measured again as drawn, whenever they are shown or restyled.)"""
    made = []
    for widgets in groups:
        box = Container(labels=True)
        box.extend(widgets)
        made.append(box)
    labels = [w._labeled_widget()._label_widget.native for box in made for w in box
              if w._labeled_widget() is not None]
    if not labels:
        return made

    align = functools.partial(_align_labels, labels)
    made[0]._label_hooks = [watch(label, (QEvent.Type.Show, QEvent.Type.StyleChange, QEvent.Type.FontChange), align)
                            for label in labels]
    return made


_PROBLEMS: dict[str, None] = {}  # messages of the warnings and errors notified (newest last), to find their toasts


def dismiss_error_toasts(event=None) -> int:
    """Close the error and warning toasts still over the canvas; returns how many were closed.

    napari starts a toast's dismiss timer only when its window is active, and stops every other toast's
    timer when a new one shows, so an error toast could stay over the canvas after the user had fixed
    the problem and the next step had worked. (A toast does not keep its severity: it is recognised by
    its message, recorded when the warning or error was notified.)"""
    from napari._qt.dialogs.qt_notification import NapariQtNotification

    closed = 0
    for toast in list(NapariQtNotification._instances):
        label = getattr(toast, "message", None)
        if label is not None and label.text() in _PROBLEMS:
            toast.close()
            closed += 1
    return closed


_DISMISSING: weakref.WeakSet = weakref.WeakSet()  # viewers whose successes clear stale error toasts


def _on_notification(notification) -> None:
    from napari.utils.notifications import NotificationSeverity

    severity = getattr(notification, "severity", None)
    if severity is None:
        return
    if NotificationSeverity(severity) >= NotificationSeverity.WARNING:
        _PROBLEMS[str(notification.message)] = None
        while len(_PROBLEMS) > 50:
            _PROBLEMS.pop(next(iter(_PROBLEMS)))
    elif NotificationSeverity(severity) == NotificationSeverity.INFO:
        dismiss_error_toasts()


def clear_errors_on_success(viewer) -> None:
    """Close stale error toasts when something worked: a layer was added (a CT opened, a tumour placed, a
    result arrived) or an info notification (e.g. "Saved …") was shown. Set up once per viewer."""
    from napari.utils.notifications import notification_manager

    model = getattr(viewer, "__wrapped__", viewer)
    if model in _DISMISSING:
        return
    _DISMISSING.add(model)
    model.layers.events.inserted.connect(dismiss_error_toasts)
    notification_manager.notification_ready.connect(_on_notification)  # no-op when connected


def notify_error(exc: BaseException, what: str) -> str:
    """One napari error notification for a user error (DiffTumorError / out of memory); returns the
    message, for the widget's own status line (a notification disappears, the status stays)."""
    from napari.utils.notifications import show_error

    from difftumor_napari.synthesis import user_message

    message = user_message(exc, what)
    show_error(message)
    return message


def wrapped(label: Label) -> Label:
    """A status/info label that wraps long sentences instead of widening the dock."""
    from qtpy.QtWidgets import QSizePolicy

    label.native.setWordWrap(True)
    label.native.setMinimumWidth(50)
    label.native.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Preferred)
    return label


def select_first(box: ComboBox, previous) -> None:
    """After ``reset_choices``: keep ``previous`` if still offered, else take the first real choice."""
    options = [c for c in box.choices if c is not None]
    if (previous is None or previous not in options) and options:
        box.value = options[0]
