"""The blinded reading widget (Visual Turing Test) and the launcher behind ``difftumor study read``.

All reading logic (order, resume, timing, one SQLite transaction per answer, revisits) lives in
the Qt-free :class:`study.session.ReadingSession`; this widget only shows the current case and
forwards the reader's choices. Nothing shown reveals the truth: the layer is named by the
anonymous case id, the volume is added from an array (no file name as layer source), and the
window title names only the reader.

Keys (window-wide ``QShortcut`` s, so they work whichever part of the window has focus):
``R`` real, ``S`` synthetic, ``U`` unsure (if the study offers it), ``1``-``5`` confidence (if
asked), ``B`` back (if revisits are allowed), ``V`` toggles the 2D / 3D view, ``N`` next case (only
after a case could not be shown). Keys do not repeat while held, and an answer given within
:attr:`ReadingWidget.ANSWER_GUARD_S` of a case appearing is ignored, so a held key or a double click
cannot answer the next cases unseen.

A case counts as shown at its first paint: the canvas's draw event after its layer was added calls
:meth:`ReadingWidget.case_painted`, which starts the answer time (so the first case's time does not
include napari's start-up) and only then accepts answers. A case file that cannot be read (deleted
or damaged after the session started) is not shown: answering is disabled, one line says why, and
the case is noted as unreadable in the session, not as an answer; ``N`` moves on.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from magicgui.widgets import Container, Label, PushButton

from backend.errors import DiffTumorError

if TYPE_CHECKING:
    import napari

    from study.session import ReadingSession

CONFIDENCE_TEXT = {1: "guess", 2: "unsure", 3: "fairly sure", 4: "sure", 5: "certain"}


class ReadingWidget(Container):
    """Dock widget driving one :class:`~study.session.ReadingSession` in a napari viewer."""

    ANSWER_GUARD_S = 0.3  # answers this soon after a case appears are ignored (double click, held key)

    def __init__(self, viewer: napari.viewer.Viewer, session: ReadingSession):
        super().__init__(labels=False)
        self._shown_at = float("inf")  # when the current case was first painted (monotonic); inf: not yet
        self._awaiting_paint = False
        self.unreadable = False  # the current case could not be shown
        self._viewer = viewer
        self.session = session
        opts = session.study.options
        self.confidence: int | None = None
        self.layer = None

        self.progress = Label(value="")
        self.prompt = Label(value="")
        self.real_button = PushButton(text="Real  [R]")
        self.synthetic_button = PushButton(text="Synthetic  [S]")
        self.unsure_button = PushButton(text="Unsure  [U]", visible=opts.unsure)
        answers = Container(widgets=[self.real_button, self.synthetic_button, self.unsure_button],
                            layout="horizontal", labels=False)
        self.confidence_buttons = {k: PushButton(text=str(k), tooltip=f"{k}: {CONFIDENCE_TEXT[k]}") for k in range(1, 6)}
        self.confidence_row = Container(widgets=list(self.confidence_buttons.values()), layout="horizontal",
                                        labels=False, visible=opts.confidence)
        self.confidence_label = Label(value="", visible=opts.confidence)
        self.back_button = PushButton(text="Back  [B]", visible=opts.revisit)
        self.next_button = PushButton(text="Next case  [N]", visible=False)
        self.view_button = PushButton(text="3D view  [V]")
        self.extend([self.progress, self.prompt, answers, self.confidence_label, self.confidence_row,
                     self.back_button, self.next_button, self.view_button])
        self.progress.native.setStyleSheet("font-size: 16pt; font-weight: bold;")
        for button in self.confidence_buttons.values():
            button.native.setCheckable(True)

        self.real_button.changed.connect(lambda _=None: self.answer("real"))
        self.synthetic_button.changed.connect(lambda _=None: self.answer("synthetic"))
        self.unsure_button.changed.connect(lambda _=None: self.answer("unsure"))
        for k, button in self.confidence_buttons.items():
            button.changed.connect(lambda _=None, k=k: self.set_confidence(k))
        self.back_button.changed.connect(lambda _=None: self.back())
        self.next_button.changed.connect(lambda _=None: self.next_case())
        self.view_button.changed.connect(lambda _=None: self.toggle_3d())
        self.shortcuts = self._bind_keys()
        canvas = viewer.window._qt_viewer.canvas
        canvas.events.draw.connect(self._on_draw, position="last")  # after the scene itself was drawn
        self._canvas = canvas
        self.native.destroyed.connect(self._disconnect_draw)
        self.show_current()

    # -- keys -----------------------------------------------------------------------------------
    def _bind_keys(self) -> dict:
        from qtpy.QtCore import Qt
        from qtpy.QtGui import QKeySequence
        from qtpy.QtWidgets import QShortcut

        opts = self.session.study.options
        actions = {"R": lambda: self.answer("real"), "S": lambda: self.answer("synthetic"), "V": self.toggle_3d,
                   "N": self.next_case}
        if opts.unsure:
            actions["U"] = lambda: self.answer("unsure")
        if opts.confidence:
            actions.update({str(k): (lambda k=k: self.set_confidence(k)) for k in range(1, 6)})
        if opts.revisit:
            actions["B"] = self.back
        window = self._viewer.window._qt_window
        shortcuts = {}
        for key, action in actions.items():
            sc = QShortcut(QKeySequence(key), window)
            sc.setContext(Qt.WindowShortcut)
            sc.setAutoRepeat(False)  # a held key is one answer, not one per case
            sc.activated.connect(action)
            shortcuts[key] = sc
        return shortcuts

    # -- display --------------------------------------------------------------------------------
    def show_current(self) -> None:
        """Show the session's current case (or the thank-you state); its timer starts at its first paint."""
        from backend.io import read_image

        s = self.session
        self._remove_layer()
        self.unreadable = False
        self.prompt.native.setWordWrap(False)
        self.next_button.visible = False
        self._shown_at = float("inf")
        self.progress.value = s.progress_text()
        self._set_confidence_display(None)
        finished = s.finished
        self._enable_answers(not finished)
        self.back_button.enabled = s.can_go_back
        if finished:
            self.prompt.value = "Your answers are saved. You can close this window."
            self._viewer.dims.ndisplay = 2
            return
        try:
            path = s.case_path()  # checked again: size and sha256 as 'study create' wrote them
            volume = read_image(path)
        except DiffTumorError as exc:
            self._case_unreadable(str(exc))
            return
        except (OSError, RuntimeError, ValueError) as exc:  # anything else the file system or reader raises
            self._case_unreadable(f"{s.study.case_path(s.case_id)}: cannot be shown ({exc})")
            return
        study = s.study
        low, high = study.window
        layer = self._viewer.add_image(volume.array, name=s.case_id, scale=tuple(reversed(volume.spacing)),
                                       colormap="gray", interpolation2d="linear", interpolation3d="linear")
        layer.contrast_limits_range = (min(low, float(volume.array.min())), max(high, float(volume.array.max())))
        layer.contrast_limits = (low, high)
        self.layer = layer
        self._centre_view()
        previous = s.previous_answer()
        keys = "R / S" + (" / U" if study.options.unsure else "")
        self.prompt.value = (f"Real or synthetic tumor? ({keys})" if previous is None
                             else f"Revisiting: your answer was '{previous.answer}'. Answer again to change it.")
        self._awaiting_paint = True
        self._canvas.native.update()  # ask for a paint; case_painted() runs when it has happened

    def _on_draw(self, event=None) -> None:
        if self._awaiting_paint:
            self.case_painted()

    def _disconnect_draw(self, *_) -> None:
        try:
            self._canvas.events.draw.disconnect(self._on_draw)
        except (RuntimeError, AttributeError):  # the canvas went first
            pass

    def case_painted(self) -> None:
        """The current case is on screen: start its answer time and accept answers (after the guard)."""
        if not self._awaiting_paint or self.layer is None or self.session.finished:
            return
        self._awaiting_paint = False
        self.session.show()
        self._shown_at = time.monotonic()

    def _enable_answers(self, enabled: bool) -> None:
        for w in (self.real_button, self.synthetic_button, self.unsure_button, self.view_button,
                  *self.confidence_buttons.values()):
            w.enabled = enabled

    def _case_unreadable(self, reason: str) -> None:
        """The current case cannot be shown: no answer is possible; note it and offer the next case."""
        self._awaiting_paint = False
        self.unreadable = True
        self._enable_answers(False)
        self.back_button.enabled = False
        case_id = self.session.case_id
        self.session.mark_unreadable(reason)
        self.prompt.native.setWordWrap(True)  # the one long line of this state
        self.prompt.value = (f"Case {case_id} cannot be shown (its file is missing or damaged), so it takes no answer; "
                             "it is noted for the study coordinator. Press Next case [N] to go on.")
        self.next_button.visible = True
        self.next_button.enabled = True
        _notify(f"case {case_id} cannot be shown and is noted as unreadable, not answered: {reason}")

    def next_case(self) -> None:
        """After an unreadable case: go on to the next case."""
        if self.unreadable:
            self.show_current()

    def recentre(self) -> None:
        """Fit the case to the canvas again, centred on the ROI (e.g. after the window got its size)."""
        if not self.session.finished:
            self._centre_view()

    def _centre_view(self) -> None:
        viewer, study = self._viewer, self.session.study
        centre = study.centre_zyx
        viewer.reset_view()
        step = list(viewer.dims.current_step)
        step[0] = int(round((study.size[2] - 1) / 2))  # the middle slice holds the tumor centre
        viewer.dims.current_step = tuple(step)
        viewer.camera.center = centre if viewer.dims.ndisplay == 3 else centre[1:]

    def _remove_layer(self) -> None:
        if self.layer is not None and self.layer in self._viewer.layers:
            self._viewer.layers.remove(self.layer)
        self.layer = None

    # -- actions --------------------------------------------------------------------------------
    def set_confidence(self, value: int) -> None:
        if not self.session.study.options.confidence or self.session.finished:
            return
        self._set_confidence_display(value)

    def _set_confidence_display(self, value: int | None) -> None:
        self.confidence = value
        for k, button in self.confidence_buttons.items():
            button.native.setChecked(k == value)
        self.confidence_label.value = ("Confidence: press 1 (guess) … 5 (certain)" if value is None
                                       else f"Confidence: {value} ({CONFIDENCE_TEXT[value]})")

    def answer(self, kind: str) -> None:
        """Commit ``kind`` for the current case (saved before the next case appears)."""
        if self.session.finished or self.unreadable or self.layer is None:
            return
        if time.monotonic() - self._shown_at < self.ANSWER_GUARD_S:
            return  # not painted yet, the second click of a double click, or a key pressed before the case was seen
        try:
            self.session.answer(kind, self.confidence)
        except DiffTumorError as exc:
            _notify(str(exc))
            return
        self.show_current()

    def back(self) -> None:
        try:
            self.session.back()
        except DiffTumorError as exc:
            _notify(str(exc))
            return
        self.show_current()

    def toggle_3d(self) -> None:
        if self.session.finished or self.layer is None:
            return
        dims = self._viewer.dims
        dims.ndisplay = 3 if dims.ndisplay == 2 else 2
        self.view_button.text = "2D view  [V]" if dims.ndisplay == 3 else "3D view  [V]"
        self._centre_view()


def _notify(message: str) -> None:
    from napari.utils.notifications import show_warning

    show_warning(message)


def open_reading(session: ReadingSession, viewer: napari.viewer.Viewer | None = None):
    """Put the reading widget into ``viewer`` (a new one if None); returns (viewer, widget)."""
    import napari

    if viewer is None:
        viewer = napari.Viewer(title=f"DiffTumor reading session: reader {session.reader}")
    try:
        from difftumor_napari._qt.viewing_widget import keep_radiological

        keep_radiological(viewer)
    except ImportError:  # pragma: no cover - viewing helpers are optional here
        pass
    widget = ReadingWidget(viewer, session)
    viewer.window.add_dock_widget(widget, name="Reading", area="right")
    return viewer, widget


def run_reading_app(session: ReadingSession) -> None:
    """``difftumor study read``: open napari with the reading widget and block until it closes."""
    import napari
    from qtpy.QtCore import QTimer

    _, widget = open_reading(session)
    QTimer.singleShot(0, widget.recentre)  # once the window is shown and has its final size
    try:
        napari.run()
    finally:
        session.close()
