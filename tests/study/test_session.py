"""Reading sessions: one transaction per answer, resume, revisit, refusal of bad databases, SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from backend.errors import DiffTumorError
from study.session import Answer, AnswerStore, ReadingSession, session_db_path


def _answer(session, answer, confidence=None):
    """What the widget does: the case is shown (first paint), then answered."""
    session.show()
    return session.answer(answer, confidence)


class FakeClock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_answers_in_order_with_times_and_resume(study_factory):
    root, ids = study_factory(4)
    clock = FakeClock()
    s = ReadingSession(root, "R1", clock=clock)
    assert s.progress_text() == "Case 1 of 4" and s.case_id == ids[0]
    s.show()
    clock.t += 12.5
    a = s.answer("real")
    assert (a.case_id, a.answer, a.seconds, a.position, a.confidence) == (ids[0], "real", 12.5, 1, None)
    s.show()
    clock.t += 3
    s.answer("synthetic")
    assert s.progress_text() == "Case 3 of 4"
    s.close()

    again = ReadingSession(root, "R1")
    assert again.case_id == ids[2] and again.n_answered == 2
    assert [x.answer for x in again.store.answers("R1")] == ["real", "synthetic"]
    _answer(again, "real")
    _answer(again, "synthetic")
    assert again.finished and again.progress_text() == "Thank you — all 4 cases answered"
    with pytest.raises(DiffTumorError, match="finished"):
        again.answer("real")


def test_reader_order_is_followed(study_factory):
    root, ids = study_factory(3, readers=("R1", "R2"), orders={"R1": ["K000", "K001", "K002"],
                                                              "R2": ["K002", "K000", "K001"]})
    s = ReadingSession(root, "R2")
    assert s.case_id == "K002"
    with pytest.raises(DiffTumorError, match="not in this study"):
        ReadingSession(root, "R9")


def test_options_enforced(study_factory):
    root, _ = study_factory(3)
    s = ReadingSession(root, "R1")
    with pytest.raises(DiffTumorError, match="does not allow unsure"):
        _answer(s, "unsure")
    with pytest.raises(DiffTumorError, match="does not allow revisiting"):
        s.back()
    assert _answer(s, "real", confidence=4).confidence is None  # confidence not collected here


def test_confidence_and_unsure(tmp_path, study_factory):
    root, _ = study_factory(3, unsure=True, confidence=True)
    s = ReadingSession(root, "R1")
    with pytest.raises(DiffTumorError, match="confidence"):
        _answer(s, "real")
    assert _answer(s, "real", confidence=5).confidence == 5
    assert _answer(s, "unsure", confidence=3).confidence is None
    with pytest.raises(DiffTumorError, match="1..5"):
        _answer(s, "synthetic", confidence=7)
    assert s.case_id == "K002"  # the refused answer did not advance


def test_revisit_updates_and_keeps_history(study_factory):
    root, ids = study_factory(3, revisit=True)
    s = ReadingSession(root, "R1")
    _answer(s, "real")
    _answer(s, "real")
    s.back()
    assert s.case_id == ids[1] and s.previous_answer().answer == "real"
    _answer(s, "synthetic")
    assert s.case_id == ids[2]  # back to the first unanswered case
    got = {a.case_id: a.answer for a in s.store.answers("R1")}
    assert got == {ids[0]: "real", ids[1]: "synthetic"}
    hist = s.store.history("R1")
    assert len(hist) == 1 and hist[0][1] == ids[1] and hist[0][2] == "real"
    _answer(s, "real")
    assert s.finished and s.can_go_back
    s.back()
    assert s.case_id == ids[2]


def test_duplicate_answer_refused_without_revisit(tmp_path):
    store = AnswerStore(tmp_path / "a.sqlite")
    row = Answer("R1", "K1", "real", None, 1.0, "2026-01-01T00:00:00+00:00", 1)
    store.record(row)
    with pytest.raises(DiffTumorError, match="already answered"):
        store.record(row)
    assert len(store.answers()) == 1


def test_corrupt_database_one_line_and_untouched(study_factory):
    root, _ = study_factory(2)
    db = root / "answers" / "R1.sqlite"
    db.parent.mkdir()
    junk = b"this is not sqlite" * 100
    db.write_bytes(junk)
    with pytest.raises(DiffTumorError, match="not a readable answers database") as exc:
        ReadingSession(root, "R1")
    assert "\n" not in str(exc.value)
    assert db.read_bytes() == junk


def test_database_of_another_study_refused(study_factory):
    root, _ = study_factory(2)
    path = session_db_path(ReadingSession(root, "R1").study, "R1")
    AnswerStore(path, study_id="0" * 32).close()
    with pytest.raises(DiffTumorError, match="another study"):
        AnswerStore(path, study_id="f" * 32)


def test_not_a_study(tmp_path):
    with pytest.raises(DiffTumorError, match="not a study"):
        ReadingSession(tmp_path, "R1")


CHILD = textwrap.dedent("""
    import sys, time
    from study.session import ReadingSession
    s = ReadingSession(sys.argv[1], "R1")
    while not s.finished:
        s.show()
        cid = s.case_id
        s.answer("real" if len(cid) % 2 else "synthetic")
        print(cid, flush=True)
        time.sleep(0.05)
    time.sleep(60)
""")


def test_sigkill_mid_session_loses_no_answer(study_factory):
    root, ids = study_factory(40)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(root)], stdout=subprocess.PIPE, encoding="utf-8", errors="replace", env=env)
    reported = []
    try:
        while len(reported) < 7:
            line = proc.stdout.readline()
            assert line, "child exited early"
            reported.append(line.strip())
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    assert proc.returncode == -signal.SIGKILL
    s = ReadingSession(root, "R1")
    recorded = [a.case_id for a in s.store.answers("R1")]
    assert recorded[: len(reported)] == reported  # every acknowledged answer survived
    assert recorded == ids[: len(recorded)] and len(recorded) < len(ids)
    assert s.case_id == ids[len(recorded)]  # resumes at the first unanswered case


@pytest.mark.parametrize("damage, message", [
    (lambda p: p.unlink(), "case file is missing"),
    (lambda p: p.write_bytes(p.read_bytes()[:-7]), "bytes, 'study create' wrote"),
    (lambda p: p.write_bytes(p.read_bytes()[::-1]), "sha256 mismatch"),  # same size, other content
])
def test_a_damaged_case_file_refuses_the_session_before_anything_is_stored(study_factory, damage, message):
    root, ids = study_factory(4)
    damage(root / "cases" / f"{ids[2]}.nii")
    damage(root / "cases" / f"{ids[3]}.nii")
    with pytest.raises(DiffTumorError, match=message) as exc:
        ReadingSession(root, "R1")
    text = str(exc.value)
    assert "\n" not in text and f"{ids[2]}.nii" in text and "and 1 more damaged case file" in text
    assert not (root / "answers").exists()  # no database was created


def test_no_answer_for_a_case_never_shown(study_factory):
    root, ids = study_factory(2)
    s = ReadingSession(root, "R1")
    with pytest.raises(DiffTumorError, match=f"case {ids[0]}: not on screen yet") as exc:
        s.answer("real")
    assert "\n" not in str(exc.value) and s.store.answers() == [] and s.case_id == ids[0]
    _answer(s, "real")
    with pytest.raises(DiffTumorError, match="not on screen yet"):  # the next case needs its own show()
        s.answer("real")


def test_seconds_run_from_show_not_from_the_session_start(study_factory):
    root, _ = study_factory(1)
    clock = FakeClock()
    s = ReadingSession(root, "R1", clock=clock)
    clock.t += 40  # napari starting up
    s.show()
    clock.t += 2.5
    assert s.answer("real").seconds == 2.5


def test_a_case_damaged_mid_session_is_recorded_unreadable_not_answered(study_factory):
    root, ids = study_factory(3)
    s = ReadingSession(root, "R1")
    _answer(s, "real")
    (root / "cases" / f"{ids[1]}.nii").unlink()  # gone after the session started
    with pytest.raises(DiffTumorError, match="case file is missing") as exc:
        s.case_path()
    s.mark_unreadable(str(exc.value))
    assert s.case_id == ids[2] and s.n_unreadable == 1
    _answer(s, "synthetic")
    assert s.finished and s.progress_text() == "Thank you — 2 of 3 cases answered, 1 could not be shown"
    assert [(a.case_id, a.answer) for a in s.store.answers()] == [(ids[0], "real"), (ids[2], "synthetic")]
    (row,) = s.store.unreadable("R1")
    assert row[:2] == ("R1", ids[1]) and "missing" in row[2]
    s.close()
    with pytest.raises(DiffTumorError, match="missing"):  # still damaged: the next session refuses to start
        ReadingSession(root, "R1")
