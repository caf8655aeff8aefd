"""The reading widget: a whole session through the widget, blinding, resume after SIGKILL, first paint,
cases that cannot be shown.

Viewers here are hidden (nothing is painted), so tests say when a case "was painted" with
:func:`_seen`; one test shows the window and lets the canvas's own draw event do it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("napari")

from study.design import CaseSource, StudyOptions, StudySettings, create_study  # noqa: E402
from study.session import AnswerStore, ReadingSession, session_db_path  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def _make_study(tmp_path, n_per_class=3, **options):
    import SimpleITK as sitk

    rng = np.random.default_rng(1)
    cases = []
    for truth in ("real", "synthetic"):
        for i in range(n_per_class):
            arr = rng.normal(40, 20, size=(12, 16, 16)).astype(np.int16)
            path = tmp_path / f"{truth}_source_{i}.nii.gz"
            sitk.WriteImage(sitk.GetImageFromArray(arr), str(path))
            cases.append(CaseSource(path, truth, "liver"))
    real = [c for c in cases if c.truth == "real"]
    syn = [c for c in cases if c.truth == "synthetic"]
    settings = StudySettings(readers=("R1",), seed=3, roi_size_mm=(16.0, 16.0, 12.0), window=(-100.0, 200.0),
                             options=StudyOptions(**options))
    return create_study(real, syn, tmp_path / "study", settings=settings)


@pytest.fixture(autouse=True)
def _no_answer_guard(monkeypatch):
    """These tests answer faster than a reader can; the guard has its own test."""
    from difftumor_napari._qt.reading_widget import ReadingWidget

    monkeypatch.setattr(ReadingWidget, "ANSWER_GUARD_S", 0.0)


def _seen(widget):
    """What the canvas's first paint of the case does in a shown window."""
    widget.case_painted()
    return widget


def _answer(widget, kind):
    _seen(widget).answer(kind)


def _stored(study, reader="R1"):
    with AnswerStore(session_db_path(study, reader), readonly=True) as store:
        return store.answers(reader)


def test_widget_drives_a_whole_session(make_napari_viewer, qtbot, tmp_path):
    from difftumor_napari._qt.reading_widget import ReadingWidget

    study = _make_study(tmp_path, unsure=True, confidence=True)
    viewer = make_napari_viewer()
    session = ReadingSession(study, "R1")
    widget = ReadingWidget(viewer, session)
    qtbot.addWidget(widget.native)
    order = study.orders["R1"]
    assert widget.progress.value == "Case 1 of 6"
    assert [ly.name for ly in viewer.layers] == [order[0]]
    layer = viewer.layers[0]
    assert tuple(layer.contrast_limits) == (-100.0, 200.0)
    assert layer.source.path is None and layer.metadata == {}
    assert viewer.dims.current_step[0] == 6  # the middle of 12 slices, where the ROI centre is
    widget.shortcuts["4"].activated.emit()
    widget.real_button.native.click()  # the case was not painted yet: no answer
    assert widget.progress.value == "Case 1 of 6" and _stored(study) == []
    widget._set_confidence_display(None)
    _seen(widget)
    # without a confidence the answer is refused and nothing is stored
    widget.real_button.native.click()
    assert widget.progress.value == "Case 1 of 6" and _stored(study) == []

    widget.shortcuts["4"].activated.emit()
    assert widget.confidence == 4 and widget.confidence_buttons[4].native.isChecked()
    widget.shortcuts["R"].activated.emit()
    rows = _stored(study)  # committed the moment it was given
    assert [(r.case_id, r.answer, r.confidence, r.position) for r in rows] == [(order[0], "real", 4, 1)]
    assert widget.progress.value == "Case 2 of 6" and widget.confidence is None
    assert [ly.name for ly in viewer.layers] == [order[1]]

    widget.toggle_3d()
    assert viewer.dims.ndisplay == 3
    widget.toggle_3d()
    assert viewer.dims.ndisplay == 2

    _seen(widget).shortcuts["U"].activated.emit()  # unsure needs no confidence
    widget.confidence_buttons[2].native.click()
    _seen(widget).synthetic_button.native.click()
    for _ in range(3):
        widget.set_confidence(5)
        _answer(widget, "real")
    assert widget.progress.value == "Thank you — all 6 cases answered"
    assert len(viewer.layers) == 0 and not widget.real_button.enabled
    rows = _stored(study)
    assert [r.case_id for r in rows] == list(order)
    assert [r.answer for r in rows[:3]] == ["real", "unsure", "synthetic"]
    assert all(r.seconds >= 0 for r in rows)


def test_nothing_in_the_viewer_names_the_source(make_napari_viewer, tmp_path):
    from difftumor_napari._qt.reading_widget import ReadingWidget

    study = _make_study(tmp_path)
    viewer = make_napari_viewer()
    widget = ReadingWidget(viewer, ReadingSession(study, "R1"))
    texts = [viewer.title, *(ly.name for ly in viewer.layers), str(viewer.layers[0].source),
             widget.progress.value, widget.prompt.value, str(viewer.layers[0].metadata)]
    for text in texts:
        for word in ("real", "synthetic", "source", ".nii"):
            assert word not in text.lower().replace("real or synthetic", ""), text


def test_revisit_and_resume_in_the_widget(make_napari_viewer, tmp_path):
    from difftumor_napari._qt.reading_widget import ReadingWidget

    study = _make_study(tmp_path, revisit=True)
    viewer = make_napari_viewer()
    widget = ReadingWidget(viewer, ReadingSession(study, "R1"))
    order = study.orders["R1"]
    _answer(widget, "real")
    _answer(widget, "real")
    widget.shortcuts["B"].activated.emit()
    assert widget.progress.value == "Case 2 of 6" and "your answer was 'real'" in widget.prompt.value
    _answer(widget, "synthetic")
    assert widget.progress.value == "Case 3 of 6"
    widget.session.close()
    viewer.layers.clear()

    again = ReadingWidget(viewer, ReadingSession(study, "R1"))
    assert again.progress.value == "Case 3 of 6" and viewer.layers[0].name == order[2]
    assert {r.case_id: r.answer for r in _stored(study)} == {order[0]: "real", order[1]: "synthetic"}


def test_no_back_without_revisit(make_napari_viewer, tmp_path):
    from difftumor_napari._qt.reading_widget import ReadingWidget

    study = _make_study(tmp_path)
    widget = ReadingWidget(make_napari_viewer(), ReadingSession(study, "R1"))
    assert "B" not in widget.shortcuts and not widget.back_button.visible
    assert "U" not in widget.shortcuts


GUI_CHILD = textwrap.dedent("""
    import sys, time
    import napari
    from study.session import ReadingSession
    from difftumor_napari._qt.reading_widget import ReadingWidget
    viewer = napari.Viewer(show=False)
    ReadingWidget.ANSWER_GUARD_S = 0.0  # answers come faster than a reader's
    widget = ReadingWidget(viewer, ReadingSession(sys.argv[1], "R1"))
    print("ready", flush=True)
    for line in sys.stdin:
        widget.case_painted()  # a hidden viewer paints nothing
        widget.shortcuts[line.strip()].activated.emit()
        print(widget.progress.value, flush=True)
""")


def test_sigkill_during_a_widget_session_then_resume(make_napari_viewer, tmp_path):
    """A reader answers through the widget in another process, which is SIGKILLed mid-session."""
    from difftumor_napari._qt.reading_widget import ReadingWidget

    study = _make_study(tmp_path, n_per_class=4)
    env = dict(os.environ, PYTHONPATH=str(REPO), QT_QPA_PLATFORM="offscreen")
    proc = subprocess.Popen([sys.executable, "-c", GUI_CHILD, str(study.root)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, encoding="utf-8", errors="replace", env=env, cwd=str(tmp_path))
    try:
        assert proc.stdout.readline().strip() == "ready"
        for k, key in enumerate("RSRS", start=2):
            proc.stdin.write(key + "\n")
            proc.stdin.flush()
            assert proc.stdout.readline().strip() == f"Case {k} of 8"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    order = study.orders["R1"]
    assert [(r.case_id, r.answer) for r in _stored(study)] == list(zip(order[:4], ["real", "synthetic"] * 2))
    viewer = make_napari_viewer()
    widget = ReadingWidget(viewer, ReadingSession(study, "R1"))
    assert widget.progress.value == "Case 5 of 8" and viewer.layers[0].name == order[4]


def test_held_key_or_double_click_answers_one_case(make_napari_viewer, qtbot, tmp_path, monkeypatch):
    """Auto-repeat is off for every key, and an answer right after a case appears is ignored."""
    from difftumor_napari._qt.reading_widget import ReadingWidget

    monkeypatch.setattr(ReadingWidget, "ANSWER_GUARD_S", 0.5)
    study = _make_study(tmp_path, unsure=True)
    viewer = make_napari_viewer()
    widget = ReadingWidget(viewer, ReadingSession(study, "R1"))
    qtbot.addWidget(widget.native)
    assert widget.shortcuts and not any(sc.autoRepeat() for sc in widget.shortcuts.values())
    _seen(widget)
    qtbot.wait(600)  # the reader looked at case 1
    widget.real_button.native.click()
    widget.real_button.native.click()  # a double click: the second lands on case 2 at once
    widget.shortcuts["S"].activated.emit()  # so does a key pressed right after
    assert widget.progress.value == "Case 2 of 6" and len(_stored(study)) == 1
    _seen(widget)
    qtbot.wait(600)
    widget.shortcuts["S"].activated.emit()
    assert widget.progress.value == "Case 3 of 6"
    assert [r.answer for r in _stored(study)] == ["real", "synthetic"]


def test_the_answer_time_starts_at_the_first_paint(make_napari_viewer, qtbot, tmp_path):
    """A shown window: the canvas's draw event marks the case shown; before it no answer is taken, and the time
    does not include what happened before the paint (napari's start-up for the first case)."""
    from difftumor_napari._qt.reading_widget import ReadingWidget

    study = _make_study(tmp_path)
    viewer = make_napari_viewer(show=True)
    session = ReadingSession(study, "R1")
    widget = ReadingWidget(viewer, session)
    assert not session.shown
    widget.answer("real")  # no paint yet
    assert _stored(study) == []
    qtbot.waitUntil(lambda: session.shown, timeout=10000)
    qtbot.wait(200)
    widget.answer("real")
    (row,) = _stored(study)
    assert 0.2 <= row.seconds < 5
    assert not session.shown  # the next case waits for its own paint
    qtbot.waitUntil(lambda: session.shown, timeout=10000)


def test_a_case_that_cannot_be_shown_takes_no_answer(make_napari_viewer, tmp_path):
    """The file of case 2 is truncated after the session started: no traceback, no empty canvas with live
    buttons, no answer with seconds 0; one line, answering disabled, the case noted as unreadable."""
    from difftumor_napari._qt.reading_widget import ReadingWidget

    study = _make_study(tmp_path)
    viewer = make_napari_viewer()
    session = ReadingSession(study, "R1")
    widget = ReadingWidget(viewer, session)
    order = study.orders["R1"]
    path = study.case_path(order[1])
    path.write_bytes(path.read_bytes()[:200])
    _answer(widget, "real")
    assert widget.unreadable and len(viewer.layers) == 0
    assert not widget.real_button.enabled and not widget.synthetic_button.enabled
    assert not widget.next_button.native.isHidden() and widget.next_button.enabled
    assert f"Case {order[1]} cannot be shown" in widget.prompt.value and "\n" not in widget.prompt.value
    for key in ("R", "S"):
        widget.case_painted()
        widget.shortcuts[key].activated.emit()
    assert [r.case_id for r in _stored(study)] == [order[0]]  # nothing recorded for case 2
    with AnswerStore(session_db_path(study, "R1"), readonly=True) as store:
        (note,) = store.unreadable("R1")
    assert note[1] == order[1] and "bytes" in note[2]
    widget.shortcuts["N"].activated.emit()
    assert widget.progress.value == "Case 3 of 6" and viewer.layers[0].name == order[2]
    assert widget.real_button.enabled and widget.next_button.native.isHidden()
    for _ in range(4):
        _answer(widget, "synthetic")
    assert widget.progress.value == "Thank you — 5 of 6 cases answered, 1 could not be shown"
    assert [r.case_id for r in _stored(study)] == [order[0], *order[2:]]
