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
    again.answer("real")
    again.answer("synthetic")
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
        s.answer("unsure")
    with pytest.raises(DiffTumorError, match="does not allow revisiting"):
        s.back()
    assert s.answer("real", confidence=4).confidence is None  # confidence not collected here


def test_confidence_and_unsure(tmp_path, study_factory):
    root, _ = study_factory(3, unsure=True, confidence=True)
    s = ReadingSession(root, "R1")
    with pytest.raises(DiffTumorError, match="confidence"):
        s.answer("real")
    assert s.answer("real", confidence=5).confidence == 5
    assert s.answer("unsure", confidence=3).confidence is None
    with pytest.raises(DiffTumorError, match="1..5"):
        s.answer("synthetic", confidence=7)
    assert s.case_id == "K002"  # the refused answer did not advance


def test_revisit_updates_and_keeps_history(study_factory):
    root, ids = study_factory(3, revisit=True)
    s = ReadingSession(root, "R1")
    s.answer("real")
    s.answer("real")
    s.back()
    assert s.case_id == ids[1] and s.previous_answer().answer == "real"
    s.answer("synthetic")
    assert s.case_id == ids[2]  # back to the first unanswered case
    got = {a.case_id: a.answer for a in s.store.answers("R1")}
    assert got == {ids[0]: "real", ids[1]: "synthetic"}
    hist = s.store.history("R1")
    assert len(hist) == 1 and hist[0][1] == ids[1] and hist[0][2] == "real"
    s.answer("real")
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
