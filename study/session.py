"""Reading sessions: answers stored in SQLite, one transaction per answer, and a Qt-free controller.

:class:`AnswerStore` owns one SQLite file (``<reader package>/answers/<reader>.sqlite``, in the
reader's own package, so no reader's package holds another's answers). The database runs
in rollback-journal mode with ``synchronous=FULL``, and every answer is its own ``BEGIN
IMMEDIATE .. COMMIT`` transaction, so once :meth:`AnswerStore.record` returns the answer
survives quitting, a crash (SIGKILL) or a power loss. A second answer for the same
``(reader, case_id)`` is refused unless the study allows revisits; then it replaces the first
and the replaced row is kept in ``history``.

:class:`ReadingSession` is the controller the napari reading widget drives (and scripts/tests
drive without a GUI): the reader's case order, the current case, the time from display to
answer, resume at the first unanswered case, and going back when revisits are allowed. It never
records an answer for a case that was not shown: every case file is checked against the byte size
and sha256 that ``create`` recorded when the session starts; an answer needs :meth:`ReadingSession.show`
(called at the case's first paint, so ``seconds`` runs from there); and a case that cannot be shown
later is recorded as *unreadable* (table ``unreadable``), never as an answer.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from backend.errors import DiffTumorError
from study.design import Study, check_case_file, check_case_files, check_reader_name, load_study
from study.stats import ANSWERS, CONFIDENCE_LEVELS, UNSURE

SCHEMA_VERSION = 2  # 2: table unreadable
ANSWER_COLUMNS = ("reader", "case_id", "answer", "confidence", "seconds", "answered_at")

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS answers (
    reader TEXT NOT NULL,
    case_id TEXT NOT NULL,
    answer TEXT NOT NULL CHECK (answer IN ('real', 'synthetic', 'unsure')),
    confidence INTEGER CHECK (confidence IS NULL OR confidence BETWEEN 1 AND {CONFIDENCE_LEVELS}),
    seconds REAL NOT NULL,
    answered_at TEXT NOT NULL,
    position INTEGER NOT NULL,
    PRIMARY KEY (reader, case_id)
);
CREATE TABLE IF NOT EXISTS history (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    reader TEXT NOT NULL, case_id TEXT NOT NULL, answer TEXT NOT NULL, confidence INTEGER,
    seconds REAL NOT NULL, answered_at TEXT NOT NULL, position INTEGER NOT NULL,
    replaced_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS unreadable (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    reader TEXT NOT NULL, case_id TEXT NOT NULL, reason TEXT NOT NULL, noted_at TEXT NOT NULL,
    position INTEGER NOT NULL
);
"""


@dataclass(frozen=True)
class Answer:
    reader: str
    case_id: str
    answer: str
    confidence: int | None
    seconds: float
    answered_at: str
    position: int  # 1-based position of the case in the reader's order


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class AnswerStore:
    """One reader's answers in SQLite. Refuses (never repairs or overwrites) a corrupt file."""

    def __init__(self, path: str | Path, *, study_id: str | None = None, readonly: bool = False):
        self.path = Path(path)
        self.readonly = readonly
        if readonly and not self.path.is_file():
            raise DiffTumorError(f"{self.path}: no answers database here")
        try:
            if readonly:  # reports and exports never modify the database
                self._conn = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True,
                                             isolation_level=None, timeout=10.0)
            else:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._conn = sqlite3.connect(self.path, isolation_level=None, timeout=10.0)
                self._conn.execute("PRAGMA journal_mode=DELETE")
                self._conn.execute("PRAGMA synchronous=FULL")
            check = self._conn.execute("PRAGMA quick_check").fetchone()[0]
            if check != "ok":
                raise sqlite3.DatabaseError(check)
            tables = {r[0] for r in self._conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if tables and not {"meta", "answers"} <= tables:
                raise DiffTumorError(f"{self.path}: an SQLite file, but not a difftumor answers database; it was left untouched")
            if readonly and not tables:
                raise DiffTumorError(f"{self.path}: empty database (no answers)")
            if not readonly:
                self._conn.executescript(_SCHEMA)
            self._check_meta(study_id)
        except DiffTumorError:
            self._close_quietly()
            raise
        except sqlite3.DatabaseError as exc:
            self._close_quietly()
            raise DiffTumorError(f"{self.path}: not a readable answers database ({exc}); it was left untouched") from None

    def _check_meta(self, study_id: str | None) -> None:
        meta = dict(self._conn.execute("SELECT key, value FROM meta").fetchall())
        if not meta and not self.readonly:
            with self._transaction():
                self._conn.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
                if study_id:
                    self._conn.execute("INSERT INTO meta VALUES ('study_id', ?)", (study_id,))
            return
        if int(meta.get("schema_version", "0")) > SCHEMA_VERSION:
            raise DiffTumorError(f"{self.path}: written by a newer difftumor (schema {meta['schema_version']})")
        if study_id and meta.get("study_id") not in (None, study_id):
            raise DiffTumorError(f"{self.path}: answers belong to another study ({meta['study_id']}, expected {study_id})")

    def _close_quietly(self) -> None:
        conn = getattr(self, "_conn", None)
        try:
            if conn is not None:
                conn.close()
        except sqlite3.Error:  # closing a broken handle
            pass

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> AnswerStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _transaction(self):
        conn = self._conn

        class _Tx:
            def __enter__(self_inner):
                conn.execute("BEGIN IMMEDIATE")

            def __exit__(self_inner, exc_type, exc, tb):
                conn.execute("COMMIT" if exc_type is None else "ROLLBACK")
                return False

        return _Tx()

    def record(self, answer: Answer, *, allow_update: bool = False) -> None:
        """Commit one answer (its own transaction). Duplicate -> error unless ``allow_update``."""
        if answer.answer not in ANSWERS:
            raise DiffTumorError(f"answer {answer.answer!r}: must be one of {', '.join(ANSWERS)}")
        if answer.confidence is not None and not 1 <= answer.confidence <= CONFIDENCE_LEVELS:
            raise DiffTumorError(f"confidence {answer.confidence!r}: must be 1..{CONFIDENCE_LEVELS}")
        row = (answer.reader, answer.case_id, answer.answer, answer.confidence,
               float(answer.seconds), answer.answered_at, int(answer.position))
        try:
            with self._transaction():
                old = self._conn.execute(
                    "SELECT reader, case_id, answer, confidence, seconds, answered_at, position "
                    "FROM answers WHERE reader = ? AND case_id = ?", row[:2]).fetchone()
                if old is not None and not allow_update:
                    raise DiffTumorError(
                        f"case {answer.case_id}: reader {answer.reader} already answered it and this study does not allow revisits")
                if old is not None:
                    self._conn.execute(
                        "INSERT INTO history (reader, case_id, answer, confidence, seconds, answered_at, position, replaced_at)"
                        " VALUES (?, ?, ?, ?, ?, ?, ?, ?)", (*old, now_iso()))
                    self._conn.execute("DELETE FROM answers WHERE reader = ? AND case_id = ?", row[:2])
                self._conn.execute("INSERT INTO answers VALUES (?, ?, ?, ?, ?, ?, ?)", row)
        except sqlite3.DatabaseError as exc:
            raise DiffTumorError(f"{self.path}: could not save the answer ({exc})") from None

    def answers(self, reader: str | None = None) -> list[Answer]:
        sql = "SELECT reader, case_id, answer, confidence, seconds, answered_at, position FROM answers"
        params: tuple = ()
        if reader is not None:
            sql += " WHERE reader = ?"
            params = (reader,)
        try:
            rows = self._conn.execute(sql + " ORDER BY reader, position", params).fetchall()
        except sqlite3.DatabaseError as exc:
            raise DiffTumorError(f"{self.path}: not a readable answers database ({exc})") from None
        return [Answer(*r) for r in rows]

    def record_unreadable(self, reader: str, case_id: str, reason: str, position: int) -> None:
        """Note (one transaction) that ``case_id`` could not be shown to ``reader``: not an answer."""
        try:
            with self._transaction():
                self._conn.execute("INSERT INTO unreadable (reader, case_id, reason, noted_at, position) "
                                   "VALUES (?, ?, ?, ?, ?)", (reader, case_id, reason, now_iso(), int(position)))
        except sqlite3.DatabaseError as exc:
            raise DiffTumorError(f"{self.path}: could not note the unreadable case ({exc})") from None

    def unreadable(self, reader: str | None = None) -> list[tuple[str, str, str, str]]:
        """``(reader, case_id, reason, noted_at)`` of every case noted unreadable (none in a schema-1 file)."""
        tables = {r[0] for r in self._conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if "unreadable" not in tables:
            return []
        sql = "SELECT reader, case_id, reason, noted_at FROM unreadable"
        if reader is None:
            return self._conn.execute(sql + " ORDER BY id").fetchall()
        return self._conn.execute(sql + " WHERE reader = ? ORDER BY id", (reader,)).fetchall()

    def history(self, reader: str | None = None) -> list[tuple]:
        sql = "SELECT reader, case_id, answer, confidence, seconds, answered_at, position, replaced_at FROM history"
        if reader is None:
            return self._conn.execute(sql + " ORDER BY id").fetchall()
        return self._conn.execute(sql + " WHERE reader = ? ORDER BY id", (reader,)).fetchall()


def session_db_path(study: Study, reader: str) -> Path:
    return study.root / "answers" / f"{check_reader_name(reader)}.sqlite"


class ReadingSession:
    """Qt-free reading logic for one reader of one study (the widget only displays and forwards keys).

    ``study`` is the reader's package (or the study folder holding it). ``clock`` is injectable for
    tests. :meth:`show` marks the moment the current case is on screen; :meth:`answer` commits and
    moves to the first unanswered case; :meth:`mark_unreadable` notes a case that cannot be shown and
    moves on without an answer.
    """

    def __init__(self, study: Study | str | Path, reader: str, *, clock: Callable[[], float] = time.monotonic):
        self.study = study if isinstance(study, Study) else load_study(study, reader)
        if reader not in self.study.readers:
            raise DiffTumorError(f"reader {reader!r}: not in this study (readers: {', '.join(self.study.readers)})")
        self.reader = reader
        self.order: list[str] = list(self.study.orders[reader])
        check_case_files(self.study, self.order)  # before anything is shown or stored
        self.store = AnswerStore(session_db_path(self.study, reader), study_id=self.study.study_id)
        self._clock = clock
        self._shown_at: float | None = None
        self._skipped: set[str] = set()  # cases noted unreadable in this session
        self._answers = {a.case_id: a for a in self.store.answers(reader)}
        unknown = set(self._answers) - set(self.order)
        if unknown:
            self.store.close()
            raise DiffTumorError(f"{self.store.path}: answers for cases not in this study: {', '.join(sorted(unknown))}")
        self.index: int | None = self.first_unanswered()

    # --- state -------------------------------------------------------------------------------
    @property
    def n_cases(self) -> int:
        return len(self.order)

    @property
    def n_answered(self) -> int:
        return len(self._answers)

    @property
    def finished(self) -> bool:
        return self.index is None

    @property
    def case_id(self) -> str | None:
        return None if self.index is None else self.order[self.index]

    @property
    def can_go_back(self) -> bool:
        return self.study.options.revisit and self.n_cases > 0 and (self.index is None or self.index > 0)

    def first_unanswered(self) -> int | None:
        """The first case neither answered nor noted unreadable in this session (None: finished)."""
        for i, case_id in enumerate(self.order):
            if case_id not in self._answers and case_id not in self._skipped:
                return i
        return None

    @property
    def n_unreadable(self) -> int:
        return len(self._skipped)

    def previous_answer(self) -> Answer | None:
        """The reader's own earlier answer on the current case (only when revisiting)."""
        return None if self.case_id is None else self._answers.get(self.case_id)

    def progress_text(self) -> str:
        if self.finished:
            if self._skipped:
                return (f"Thank you — {self.n_answered} of {self.n_cases} cases answered, "
                        f"{len(self._skipped)} could not be shown")
            return f"Thank you — all {self.n_cases} cases answered"
        return f"Case {self.index + 1} of {self.n_cases}"

    def case_path(self) -> Path:
        """The current case's file, checked again (size, sha256) so a file damaged since the start is refused."""
        if self.case_id is None:
            raise DiffTumorError("the session is finished: there is no current case")
        check_case_file(self.study, self.case_id)
        return self.study.case_path(self.case_id)

    # --- actions -----------------------------------------------------------------------------
    def show(self) -> None:
        """Call when the current case is on screen (its first paint); the answer time runs from here."""
        if self.finished:
            raise DiffTumorError("the session is finished: there is no case to show")
        self._shown_at = self._clock()

    @property
    def shown(self) -> bool:
        return self._shown_at is not None

    def mark_unreadable(self, reason: str) -> None:
        """Note that the current case could not be shown (never an answer) and move to the next case."""
        if self.finished:
            raise DiffTumorError("the session is finished: there is no current case")
        self.store.record_unreadable(self.reader, self.case_id, reason, self.index + 1)
        self._skipped.add(self.case_id)
        self._shown_at = None
        self.index = self.first_unanswered()

    def answer(self, answer: str, confidence: int | None = None) -> Answer:
        """Commit the answer on the current case (one transaction) and move to the next unanswered case."""
        if self.finished:
            raise DiffTumorError("the session is finished: all cases are answered")
        opts = self.study.options
        if answer == UNSURE and not opts.unsure:
            raise DiffTumorError("answer 'unsure': this study does not allow unsure answers")
        if answer not in ANSWERS:
            raise DiffTumorError(f"answer {answer!r}: must be one of real, synthetic" + (", unsure" if opts.unsure else ""))
        if answer == UNSURE:
            confidence = None
        elif opts.confidence and confidence is None:
            raise DiffTumorError("confidence: choose 1 (guess) .. 5 (certain) before answering")
        elif not opts.confidence:
            confidence = None
        if self._shown_at is None:
            raise DiffTumorError(f"case {self.case_id}: not on screen yet; an answer is taken only for a case that was shown")
        seconds = max(0.0, self._clock() - self._shown_at)
        record = Answer(self.reader, self.case_id, answer, None if confidence is None else int(confidence),
                        round(seconds, 3), now_iso(), self.index + 1)
        self.store.record(record, allow_update=opts.revisit)
        self._answers[record.case_id] = record
        self._shown_at = None
        self.index = self.first_unanswered()
        return record

    def back(self) -> None:
        """Go to the previous case in the reader's order (only if the study allows revisits)."""
        if not self.study.options.revisit:
            raise DiffTumorError("back: this study does not allow revisiting earlier cases")
        if not self.can_go_back:
            raise DiffTumorError("back: already at the first case")
        self.index = (self.n_cases if self.index is None else self.index) - 1
        self._shown_at = None

    def close(self) -> None:
        self.store.close()
