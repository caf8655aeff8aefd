"""Study analysis: answers + key -> table.csv, Table-1 Markdown, summary.json, figure, iMRMC file.

Inputs (interchange formats, documented in the README):

* answers: CSV ``reader,case_id,answer,confidence,seconds,answered_at`` (UTF-8, with or without
  a BOM; answer ``real|synthetic|unsure``, confidence empty or 1..5 on all or none of a reader's
  real/synthetic answers, seconds empty or >= 0, answered_at empty or ISO 8601), a session
  database (``*.sqlite``, as a reader sends it back), a reader's package (its ``answers/*.sqlite``) or
  the coordinator's study folder (every reader package's answers: this is where they are collected);
* key: CSV ``case_id,truth,organ`` (truth ``real|synthetic``), read by :func:`study.design.read_key`.

Everything is validated before anything is written; each output is written atomically.
pandas appears only here, where tables are assembled; the numbers come from :mod:`study.stats`.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd

from backend.errors import DiffTumorError
from study import stats
from study.design import load_study, package_readers, read_key

ANSWER_COLUMNS = ("reader", "case_id", "answer", "confidence", "seconds", "answered_at")
TABLE_COLUMNS = (
    "reader", "organ", "n_real", "n_synthetic", "n_unsure", "sensitivity", "specificity", "accuracy",
    "sensitivity_lo", "sensitivity_hi", "specificity_lo", "specificity_hi", "accuracy_lo", "accuracy_hi",
)
EXTRA_COLUMNS = ("n_unanswered", "accuracy_p_value", "auc")  # appended after TABLE_COLUMNS
ORGAN_ORDER = ("liver", "pancreas", "kidney", "kidney_left", "kidney_right", "spleen")
ALL = "all"


# --------------------------------------------------------------------------------------------
# Reading answers
# --------------------------------------------------------------------------------------------
def _parse_confidence(value, where: str) -> int | None:
    if value is None or (isinstance(value, float) and math.isnan(value)) or str(value).strip() == "":
        return None
    try:
        c = float(value)
    except ValueError:
        c = math.nan
    if not c.is_integer() or not 1 <= c <= stats.CONFIDENCE_LEVELS:
        raise DiffTumorError(f"{where}: confidence {value!r} must be empty or an integer 1..{stats.CONFIDENCE_LEVELS}")
    return int(c)


def _parse_seconds(value, where: str) -> float:
    """Seconds from display to answer: empty -> ``nan`` (unknown), else a finite number >= 0."""
    if value is None or str(value).strip() == "":
        return math.nan
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds) or seconds < 0:
        raise DiffTumorError(f"{where}: seconds {value!r} must be empty or a number >= 0")
    return seconds


def _check_answered_at(value: str, where: str) -> None:
    """``answered_at`` is empty or an ISO 8601 date/time (``Z`` accepted for UTC, also on Python 3.10)."""
    if not value:
        return
    text = value[:-1] + "+00:00" if value[-1] in "Zz" else value
    try:
        datetime.fromisoformat(text)
    except ValueError:
        raise DiffTumorError(f"{where}: answered_at {value!r} must be empty or an ISO 8601 time "
                             "(e.g. 2026-01-01T10:00:00+00:00)") from None


def read_answers_csv(path: Path) -> pd.DataFrame:
    try:  # -sig: a CSV saved by Excel starts with a byte-order mark
        df = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        raise DiffTumorError(f"{path}: unreadable answers CSV ({exc})") from None
    missing = [c for c in ANSWER_COLUMNS if c not in df.columns]
    if missing:
        raise DiffTumorError(f"{path}: answers CSV lacks column(s) {','.join(missing)} (needs {','.join(ANSWER_COLUMNS)})")
    if df.empty:
        raise DiffTumorError(f"{path}: answers CSV holds no answers (only a header)")
    df = df[list(ANSWER_COLUMNS)].copy()
    df["line"] = _record_lines(path, len(df))
    return df


def _record_lines(path: Path, n_rows: int) -> np.ndarray:
    """The line in the file of each of the ``n_rows`` data rows pandas read.

    pandas skips blank (and whitespace-only) lines, so a row's index is not its line: count them
    the same way. Falls back to ``index + 2`` if the two readings disagree.
    """
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            lines = [reader.line_num for row in reader if len(row) > 1 or (row and row[0].strip())]
    except (OSError, ValueError, csv.Error):
        lines = []
    if len(lines) == n_rows + 1:  # the header, then one line per row
        return np.asarray(lines[1:])
    return np.arange(n_rows) + 2


def read_answers_db(path: Path) -> pd.DataFrame:
    from study.session import AnswerStore

    with AnswerStore(path, readonly=True) as store:
        rows = store.answers()
    df = pd.DataFrame([(a.reader, a.case_id, a.answer, a.confidence, a.seconds, a.answered_at) for a in rows],
                      columns=list(ANSWER_COLUMNS))
    df["line"] = np.arange(len(df)) + 1
    return df


def read_unreadable_db(path: Path) -> list[tuple[str, str]]:
    """``(reader, case_id)`` of the cases a session noted as unreadable (shown to nobody, never answers)."""
    from study.session import AnswerStore

    with AnswerStore(path, readonly=True) as store:
        return [(r, c) for r, c, *_ in store.unreadable()]


def check_confidence_all_or_none(answers: pd.DataFrame) -> None:
    """Each reader's real/synthetic answers carry a confidence on every case or on none.

    A mix cannot be scored on one scale: :func:`study.stats.answer_score` gives an answer without
    confidence a binary score (real 1), which on the 1..10 scale means "certainly synthetic".
    Unsure answers never carry a confidence and are not checked.
    """
    decided = answers[answers.answer != stats.UNSURE]
    for reader, rows in decided.groupby("reader", sort=True):
        given = rows.confidence.notna()
        if given.any() and not given.all():
            first = rows[~given].iloc[0]
            raise DiffTumorError(
                f"{first.source}: line {first.line}: reader {reader} gave no confidence on case {first.case_id} "
                f"but gave one on {int(given.sum())} other case(s); a reader's real/synthetic answers must all "
                "have a confidence or none")


def load_answers(sources: Sequence[str | Path]) -> tuple[pd.DataFrame, set[str] | None]:
    """All answers from CSV files, session databases and study folders, validated for form.

    Returns the answers (columns ``ANSWER_COLUMNS`` + ``source``) and, when study folders were
    given, the set of their case ids (so the key can be checked to cover them). Text fields are
    stripped of surrounding whitespace, ``seconds`` is a float (``nan`` when empty).
    """
    frames, study_cases = [], None
    unreadable: list[tuple[str, str]] = []
    for src in sources:
        src = Path(src)
        if src.is_dir():
            packages = package_readers(src)
            roots = list(packages.values()) if packages is not None and not (src / "study.json").is_file() else [src]
            for root in roots:
                study = load_study(root)  # "not a study" error for other folders
                study_cases = (study_cases or set()) | set(study.case_ids)
                for db in sorted((root / "answers").glob("*.sqlite")):  # a reader not started yet has none
                    frames.append(read_answers_db(db).assign(source=str(db)))
                    unreadable += read_unreadable_db(db)
        elif not src.is_file():
            raise DiffTumorError(f"--answers {src}: no such file or folder")
        elif src.suffix.lower() in (".sqlite", ".db", ".sqlite3"):
            frames.append(read_answers_db(src).assign(source=str(src)))
            unreadable += read_unreadable_db(src)
            if frames[-1].empty:
                raise DiffTumorError(f"{src}: the answers database holds no answers")
        else:
            frames.append(read_answers_csv(src).assign(source=str(src)))
    df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    if df.empty:
        raise DiffTumorError(f"--answers {', '.join(map(str, sources))}: no answers found")
    for col in ("reader", "case_id", "answer", "answered_at"):
        df[col] = [str(v).strip() for v in df[col]]
    for row in df.itertuples():
        where = f"{row.source}: line {row.line}"
        if not row.reader or not row.case_id:
            raise DiffTumorError(f"{where}: reader and case_id must not be empty")
        if row.answer not in stats.ANSWERS:
            raise DiffTumorError(f"{where}: answer {row.answer!r} must be one of {'|'.join(stats.ANSWERS)}")
        _check_answered_at(row.answered_at, f"{where} (case {row.case_id})")
    df["confidence"] = [_parse_confidence(v, f"{s}: line {ln}") for v, s, ln in zip(df.confidence, df.source, df.line)]
    df["seconds"] = [_parse_seconds(v, f"{s}: line {ln} (case {c})")
                     for v, s, ln, c in zip(df.seconds, df.source, df.line, df.case_id)]
    dup = df[df.duplicated(["reader", "case_id"], keep=False)]
    if len(dup):
        first = dup.iloc[0]
        where = sorted(set(dup[(dup.reader == first.reader) & (dup.case_id == first.case_id)].source))
        raise DiffTumorError(f"duplicate answers: reader {first.reader} answered case {first.case_id} more than once "
                             f"(in {', '.join(where)})")
    check_confidence_all_or_none(df)
    answered = set(zip(df.reader, df.case_id))
    df.attrs["unreadable"] = sorted({(r, c) for r, c in unreadable if (r, c) not in answered})
    return df, study_cases


def check_key_organs(key: dict, key_path) -> None:
    """Cases without an organ (organ ``all``) cannot sit beside cases with one: the ``all`` rows pool every organ."""
    unnamed = sorted(c for c, (_, o) in key.items() if o.lower() == ALL)
    named = organ_order(o for _, o in key.values() if o.lower() != ALL)
    if unnamed and named:
        raise DiffTumorError(f"{key_path}: {len(unnamed)} case(s) have no organ (e.g. {unnamed[0]}) but the others have one "
                             f"({', '.join(named)}); give every case an organ, or none")


def check_against_key(answers: pd.DataFrame, key: dict, key_path, study_cases: set[str] | None) -> None:
    def listing(ids: list[str]) -> str:
        return ", ".join(ids[:5]) + (f" and {len(ids) - 5} more" if len(ids) > 5 else "")

    if study_cases is not None:
        uncovered = sorted(study_cases - set(key))
        if uncovered:
            raise DiffTumorError(f"{key_path}: key does not cover the study's case(s) {listing(uncovered)}")
    unknown = sorted(set(answers.case_id) - set(key))
    if unknown:
        src = answers[answers.case_id == unknown[0]].source.iloc[0]
        raise DiffTumorError(f"{src}: answers for case(s) not in the key {key_path}: {listing(unknown)}")


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------
def organ_order(organs: Iterable[str]) -> list[str]:
    organs = set(organs)
    known = [o for o in ORGAN_ORDER if o in organs]
    return known + sorted(organs - set(known))


def _cell(reader: str, organ: str, rows: pd.DataFrame, n_cases: int) -> dict:
    c = stats.count_answers(rows.truth, rows.answer)
    s_lo, s_hi = stats.sensitivity_interval(c)
    p_lo, p_hi = stats.specificity_interval(c)
    a_lo, a_hi = stats.accuracy_interval(c)
    decided = rows[rows.answer != stats.UNSURE]
    have_conf = len(decided) > 0 and decided.confidence.notna().all()
    auc = (stats.roc_auc(list(decided.truth), [stats.answer_score(a, int(k)) for a, k in zip(decided.answer, decided.confidence)])
           if have_conf else math.nan)
    return {
        "reader": reader, "organ": organ, "n_real": c.n_real, "n_synthetic": c.n_synthetic, "n_unsure": c.n_unsure,
        "sensitivity": stats.sensitivity(c), "specificity": stats.specificity(c), "accuracy": stats.accuracy(c),
        "sensitivity_lo": s_lo, "sensitivity_hi": s_hi, "specificity_lo": p_lo, "specificity_hi": p_hi,
        "accuracy_lo": a_lo, "accuracy_hi": a_hi,
        "n_unanswered": n_cases - len(rows), "accuracy_p_value": stats.accuracy_p_value(c), "auc": auc,
    }


def build_table(answers: pd.DataFrame, key: dict) -> pd.DataFrame:
    """One row per reader x organ (+ organ "all" when the key has several organs)."""
    df = answers.assign(truth=[key[c][0] for c in answers.case_id], organ=[key[c][1] for c in answers.case_id])
    organs = organ_order(o for _, o in key.values())
    n_by_organ = {o: sum(1 for _, ko in key.values() if ko == o) for o in organs}
    groups = [(o, df[df.organ == o], n_by_organ[o]) for o in organs]
    if len(organs) > 1:
        groups.append((ALL, df, len(key)))
    rows = [_cell(r, organ, sub[sub.reader == r], n) for r in sorted(df.reader.unique()) for organ, sub, n in groups]
    return pd.DataFrame(rows, columns=[*TABLE_COLUMNS, *EXTRA_COLUMNS])


def kappa_by_organ(answers: pd.DataFrame, key: dict) -> dict[str, float]:
    readers = sorted(answers.reader.unique())
    lookup = {(r, c): a for r, c, a in zip(answers.reader, answers.case_id, answers.answer)}
    organs = organ_order(o for _, o in key.values())
    out = {}
    for organ in organs + ([ALL] if len(organs) > 1 else []):
        cases = [c for c, (_, o) in key.items() if organ in (ALL, o)]
        out[organ] = stats.fleiss_kappa([[lookup.get((r, c)) for r in readers] for c in cases])
    return out


def markdown_table(table: pd.DataFrame, kappa: dict[str, float]) -> str:
    """Table 1 layout: rows = readers, per organ Sens./Spec./Acc. in % with one decimal."""
    organs = list(dict.fromkeys(table.organ))
    head = ["Reader"] + [f"{o.capitalize() if o != ALL else 'All'} {m} (%)" for o in organs for m in ("Sens.", "Spec.", "Acc.")]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" + "---:|" * (len(head) - 1)]
    for reader in dict.fromkeys(table.reader):
        cells = [reader]
        for organ in organs:
            row = table[(table.reader == reader) & (table.organ == organ)].iloc[0]
            cells += [stats.format_percent(row[m]) for m in ("sensitivity", "specificity", "accuracy")]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Positives are real tumors: sensitivity = real called real / real, specificity = synthetic "
              "called synthetic / synthetic. Unsure answers are excluded from the rates (counted in table.csv); "
              "95% Wilson intervals and exact binomial p-values are in table.csv.", "",
              "Fleiss' kappa (cases answered real/synthetic by every reader): "
              + ", ".join(f"{o}: {'n/a' if math.isnan(k) else f'{k:.3f}'}" for o, k in kappa.items())]
    return "\n".join(lines) + "\n"


def imrmc_text(answers: pd.DataFrame, key: dict) -> str:
    """iMRMC input: header, ``BEGIN DATA:``, truth rows (reader -1, modality truth), then scores.

    Signal-present (truth 1) = real tumor. Score = :func:`study.stats.answer_score` (1..10 with
    confidences, else 1 real / 0 synthetic). Unsure answers are left out (missing reader-case pairs).
    """
    decided = answers[answers.answer != stats.UNSURE]
    truths = [t for t, _ in key.values()]
    lines = [
        "difftumor study report: Visual Turing Test in iMRMC input format",
        "truth 1 = real tumor (signal present), 0 = synthetic tumor; score = reader's rating that the tumor is real",
        f"NR: {decided.reader.nunique()}",  # readers with a score row (one who only answered unsure has none)
        f"N0: {truths.count(stats.SYNTHETIC)}",
        f"N1: {truths.count(stats.REAL)}",
        "NM: 1",
        "",
        "BEGIN DATA:",
    ]
    lines += [f"-1,{cid},truth,{1 if key[cid][0] == stats.REAL else 0}" for cid in sorted(key)]
    for r, c, a, k in sorted(zip(decided.reader, decided.case_id, decided.answer, decided.confidence)):
        score = stats.answer_score(a, None if k is None or (isinstance(k, float) and math.isnan(k)) else int(k))
        lines.append(f"{r},{c},reading,{score:g}")
    return "\n".join(lines) + "\n"


METRICS = ("sensitivity", "specificity", "accuracy")


def figure_bars(table: pd.DataFrame, metric: str) -> list[dict]:
    """Bar geometry of one figure panel: per reader, ``x``, ``height`` and ``yerr`` (2 x n) in %, and ``na``.

    ``na`` marks organs whose rate is n/a (empty denominator): they get no bar and no error bar
    (``height`` and ``yerr`` stay ``nan``, never 0) and are labelled "n/a" instead, so they cannot
    be mistaken for a genuine 0 %.
    """
    organs = list(dict.fromkeys(table.organ))
    readers = list(dict.fromkeys(table.reader))
    width = 0.8 / max(1, len(readers))
    bars = []
    for i, reader in enumerate(readers):
        sub = table[table.reader == reader].set_index("organ").reindex(organs)
        y = sub[metric].to_numpy(float) * 100
        lo, hi = sub[f"{metric}_lo"].to_numpy(float) * 100, sub[f"{metric}_hi"].to_numpy(float) * 100
        bars.append({
            "reader": reader,
            "x": np.arange(len(organs)) + (i - (len(readers) - 1) / 2) * width,
            "width": width,
            "height": y,
            "yerr": np.abs(np.vstack([y - lo, hi - y])),
            "na": np.isnan(y),
        })
    return bars


def render_figure(table: pd.DataFrame):
    """Sensitivity, specificity and accuracy per organ and reader, with 95% Wilson intervals."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    organs = list(dict.fromkeys(table.organ))
    readers = list(dict.fromkeys(table.reader))
    fig = Figure(figsize=(4 + 2.2 * len(organs), 3.6), dpi=120, layout="constrained")
    axes = fig.subplots(1, 3, sharey=True)
    for ax, metric in zip(axes, METRICS):
        for i, bar in enumerate(figure_bars(table, metric)):
            ok, na = ~bar["na"], bar["na"]
            ax.bar(bar["x"][ok], bar["height"][ok], bar["width"], yerr=bar["yerr"][:, ok], capsize=3, color=f"C{i % 10}")
            for x in bar["x"][na]:
                ax.text(x, 2, "n/a", ha="center", va="bottom", rotation=90, fontsize=8, color=f"C{i % 10}")
        ax.axhline(50, color="0.3", linestyle="--", linewidth=1)
        ax.set_xticks(np.arange(len(organs)), [o.capitalize() for o in organs])
        ax.set_xlim(-0.5, len(organs) - 0.5)  # every reader's slot, also one with only "n/a" (text does not autoscale)
        ax.set_title(metric.capitalize())
        ax.set_ylim(0, 105)
    axes[0].set_ylabel("% (95% Wilson interval; dashed = chance)")
    handles = [Patch(color=f"C{i % 10}", label=r) for i, r in enumerate(readers)]  # also for readers with no bar
    fig.legend(handles=handles, loc="outside upper center", ncols=min(len(readers), 8), fontsize=8)
    return fig


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------
REPORT_FILES = ("table.csv", "table.md", "summary.json", "figure.png", "imrmc.csv")


def _atomic(path: Path, write) -> None:
    from backend.io import atomic_write

    with atomic_write(path) as tmp:
        write(tmp)


def study_folder_holding(path: str | Path) -> Path | None:
    """The reader package or study folder (a folder with ``study.json`` or ``packages.json``) that ``path``
    is, or lies inside; else None."""
    path = Path(path).resolve()
    for folder in (path, *path.parents):
        if (folder / "study.json").is_file() or (folder / "packages.json").is_file():
            return folder
    return None


def check_report_folder(out: Path, *, force: bool = False) -> None:
    """Refuse an ``--out`` that is a file, lies in a reader package, or holds files of anything but a report.

    A folder that holds only (some of) :data:`REPORT_FILES` is a previous report: it is replaced
    file by file. ``force`` allows other files beside the report (they are left alone), never a
    reader package: the report holds the truth (imrmc.csv, table.csv).
    """
    if out.exists() and not out.is_dir():
        raise DiffTumorError(f"--out {out}: exists and is not a folder")
    study = study_folder_holding(out)
    if study is not None:
        raise DiffTumorError(f"--out {out}: lies inside the study folder {study} that readers are given; a report "
                             "holds the truth, write it elsewhere")
    if out.is_dir() and not force:
        foreign = sorted(p.name for p in out.iterdir() if p.name not in REPORT_FILES or not p.is_file())
        if foreign:
            raise DiffTumorError(f"--out {out}: folder holds other files than a previous report ({', '.join(foreign[:3])}"
                                 f"{', ...' if len(foreign) > 3 else ''}); choose an empty or new folder, or --force")


def write_report(answers: Sequence[str | Path], key_path: str | Path, out: str | Path, *,
                 force: bool = False) -> dict[str, Path]:
    """Validate everything, then write table.csv, table.md, summary.json, figure.png, imrmc.csv into ``out``.

    ``out`` is new, empty or a previous report (see :func:`check_report_folder`; ``force`` allows
    other files in it). Each file is replaced atomically.
    """
    out = Path(out)
    check_report_folder(out, force=force)
    df, study_cases = load_answers(answers)
    key = read_key(key_path)
    check_key_organs(key, key_path)
    check_against_key(df, key, key_path, study_cases)
    table = build_table(df, key)
    kappa = kappa_by_organ(df, key)
    summary = {
        "positives": "real",
        "readers": sorted(df.reader.unique()),
        "n_cases": len(key),
        "fleiss_kappa": {o: (None if math.isnan(k) else k) for o, k in kappa.items()},
        "cells": json.loads(table.to_json(orient="records")),
        "median_seconds": {r: float(np.median(g.seconds.dropna())) if g.seconds.notna().any() else None
                           for r, g in df.groupby("reader")},
        "confidence_collected": bool(df[df.answer != stats.UNSURE].confidence.notna().all()),
        "unreadable": {r: [c for rr, c in df.attrs.get("unreadable", []) if rr == r]
                       for r in sorted({rr for rr, _ in df.attrs.get("unreadable", [])})},
    }
    figure = render_figure(table)
    out.mkdir(parents=True, exist_ok=True)
    paths = {name: out / name for name in REPORT_FILES}
    _atomic(paths["figure.png"], lambda p: figure.savefig(p, format="png"))
    _atomic(paths["table.csv"], lambda p: table.to_csv(p, index=False, float_format="%.6g", encoding="utf-8"))
    _atomic(paths["table.md"], lambda p: p.write_text(markdown_table(table, kappa), encoding="utf-8"))
    _atomic(paths["summary.json"], lambda p: p.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8"))
    _atomic(paths["imrmc.csv"], lambda p: p.write_text(imrmc_text(df, key), encoding="utf-8"))
    return paths


def export_answers(study_dir: str | Path, reader: str, out: str | Path, *, force: bool = False) -> Path:
    """Write one reader's answers from the session database as the interchange CSV ``out``.

    ``out`` must not exist (unless ``force``) and must not lie inside a reader package.
    """
    from study.session import AnswerStore, session_db_path

    target = Path(out)
    study_inside = study_folder_holding(target.parent)
    if study_inside is not None:
        raise DiffTumorError(f"--out {target}: lies inside the study folder {study_inside} that readers are given; "
                             "write answers elsewhere")
    if target.is_dir():
        raise DiffTumorError(f"--out {target}: is a folder; give the CSV file to write")
    if target.exists() and not force:
        raise DiffTumorError(f"--out {target}: already exists; refusing to overwrite it (use --force to replace it)")
    if not target.parent.is_dir():
        raise DiffTumorError(f"--out {target}: folder {target.parent} does not exist")
    study = load_study(study_dir, reader)
    db = session_db_path(study, reader)
    if not db.exists():
        raise DiffTumorError(f"{db}: reader {reader} has no answers yet")
    with AnswerStore(db, study_id=study.study_id, readonly=True) as store:
        rows = store.answers(reader)
    table = pd.DataFrame([(a.reader, a.case_id, a.answer, "" if a.confidence is None else a.confidence,
                           a.seconds, a.answered_at) for a in rows], columns=list(ANSWER_COLUMNS))
    _atomic(target, lambda p: table.to_csv(p, index=False, encoding="utf-8"))
    return target


__all__ = ["write_report", "export_answers", "build_table", "load_answers", "markdown_table", "imrmc_text",
           "TABLE_COLUMNS", "ANSWER_COLUMNS", "REPORT_FILES"]
