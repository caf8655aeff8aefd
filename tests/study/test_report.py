"""Reports: exact table.csv columns, hand-checked numbers, Table-1 Markdown, iMRMC, errors, CLI."""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import pandas as pd
import pytest

from backend.errors import DiffTumorError
from study.report import REPORT_FILES, TABLE_COLUMNS, export_answers, write_report
from study.session import ReadingSession

KEY = """case_id,truth,organ
L1,real,liver
L2,real,liver
L3,synthetic,liver
L4,synthetic,liver
P1,real,pancreas
P2,synthetic,pancreas
"""
# R1: liver tp=1 fn=0 unsure_real=1, tn=1 fp=1; pancreas tp=1 tn=1.  R2: answers everything real.
ANSWERS = """reader,case_id,answer,confidence,seconds,answered_at
R1,L1,real,5,3.5,2026-01-01T10:00:00+00:00
R1,L2,unsure,,4,2026-01-01T10:00:05+00:00
R1,L3,synthetic,4,2,2026-01-01T10:00:09+00:00
R1,L4,real,2,6,2026-01-01T10:00:15+00:00
R1,P1,real,3,1,2026-01-01T10:00:16+00:00
R1,P2,synthetic,3,1,2026-01-01T10:00:17+00:00
R2,L1,real,,1,2026-01-01T11:00:00+00:00
R2,L2,real,,1,2026-01-01T11:00:01+00:00
R2,L3,real,,1,2026-01-01T11:00:02+00:00
R2,L4,real,,1,2026-01-01T11:00:03+00:00
R2,P1,real,,1,2026-01-01T11:00:04+00:00
R2,P2,real,,1,2026-01-01T11:00:05+00:00
"""
T = "2026-01-01T12:00:00+00:00"


@pytest.fixture
def files(tmp_path):
    key, answers = tmp_path / "key.csv", tmp_path / "answers.csv"
    key.write_text(KEY, encoding="utf-8")
    answers.write_text(ANSWERS, encoding="utf-8")
    return key, answers


def test_table_by_hand(tmp_path, files):
    key, answers = files
    paths = write_report([answers], key, tmp_path / "out")
    table = pd.read_csv(paths["table.csv"])
    assert list(table.columns[: len(TABLE_COLUMNS)]) == list(TABLE_COLUMNS)
    assert list(table.columns[len(TABLE_COLUMNS):]) == ["n_unanswered", "accuracy_p_value", "auc"]
    cell = table.set_index(["reader", "organ"])
    r1 = cell.loc[("R1", "liver")]
    assert (r1.n_real, r1.n_synthetic, r1.n_unsure) == (2, 2, 1)
    assert (r1.sensitivity, r1.specificity, r1.accuracy) == (1.0, 0.5, pytest.approx(2 / 3))
    assert r1.sensitivity_hi == 1.0 and 0 < r1.sensitivity_lo < 1
    # R1 liver scores: L1 (real) answered real/5 -> 10; L3 (synthetic) synthetic/4 -> 2; L4 (synthetic) real/2 -> 7
    assert r1.auc == pytest.approx(1.0)  # real L1 (10) > synthetic L3 (2) and L4 (7)
    r2 = cell.loc[("R2", "all")]
    assert (r2.sensitivity, r2.specificity, r2.accuracy) == (1.0, 0.0, 0.5)
    assert math.isnan(r2.auc)  # no confidences collected from R2
    assert r2.accuracy_p_value == pytest.approx(1.0)
    assert set(table.organ) == {"liver", "pancreas", "all"}
    assert table[["sensitivity", "specificity", "accuracy"]].stack().between(0, 1).all()

    md = paths["table.md"].read_text(encoding="utf-8")
    assert md.splitlines()[0] == ("| Reader | Liver Sens. (%) | Liver Spec. (%) | Liver Acc. (%) | Pancreas Sens. (%) | "
                                  "Pancreas Spec. (%) | Pancreas Acc. (%) | All Sens. (%) | All Spec. (%) | All Acc. (%) |")
    assert "| R1 | 100.0 | 50.0 | 66.7 | 100.0 | 100.0 | 100.0 | 100.0 | 66.7 | 80.0 |" in md
    assert "| R2 | 100.0 | 0.0 | 50.0 | 100.0 | 0.0 | 50.0 | 100.0 | 0.0 | 50.0 |" in md

    summary = json.loads(paths["summary.json"].read_text(encoding="utf-8"))
    # complete cases (no unsure): L1 RR, L3 SR, L4 RR, P1 RR, P2 SR -> kappa = (0.6 - 0.68) / 0.32
    assert summary["fleiss_kappa"]["all"] == pytest.approx((0.6 - 0.68) / 0.32)
    assert summary["median_seconds"] == {"R1": 2.75, "R2": 1.0}
    assert paths["figure.png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_imrmc_format(tmp_path, files):
    key, answers = files
    text = write_report([answers], key, tmp_path / "out")["imrmc.csv"].read_text(encoding="utf-8").splitlines()
    assert "NR: 2" in text and "N0: 3" in text and "N1: 3" in text and "NM: 1" in text
    data = text[text.index("BEGIN DATA:") + 1:]
    truth = [r for r in data if r.startswith("-1,")]
    assert sorted(truth) == sorted(["-1,L1,truth,1", "-1,L2,truth,1", "-1,L3,truth,0", "-1,L4,truth,0",
                                    "-1,P1,truth,1", "-1,P2,truth,0"])
    scores = [r for r in data if not r.startswith("-1,")]
    assert "R1,L1,reading,10" in scores and "R1,L4,reading,7" in scores and "R2,L3,reading,1" in scores
    assert not any(r.startswith("R1,L2,") for r in scores)  # unsure left out
    assert len(scores) == 11


@pytest.mark.parametrize("mutate, message", [
    (lambda a, k: a.write_text(ANSWERS + f"R2,X9,real,,1,{T}\n"), "not in the key"),
    (lambda a, k: a.write_text(ANSWERS + f"R1,L1,synthetic,,1,{T}\n"), "more than once"),
    (lambda a, k: a.write_text(ANSWERS.replace("R1,L3,synthetic", "R1,L3,fake")), "must be one of"),
    (lambda a, k: a.write_text(ANSWERS.replace("R1,L3,synthetic,4", "R1,L3,synthetic,9")), "confidence"),
    (lambda a, k: a.write_text("reader,case,answer\nR1,L1,real\n", encoding="utf-8"), "lacks column"),
    (lambda a, k: k.write_text("case_id,truth\nL1,real\n", encoding="utf-8"), "lacks column"),
    (lambda a, k: k.write_text(KEY.replace("L4,synthetic", "L4,maybe")), "real or synthetic"),
])
def test_bad_input_one_line_nothing_overwritten(tmp_path, files, mutate, message):
    key, answers = files
    mutate(answers, key)
    out = tmp_path / "out"
    out.mkdir()
    (out / "table.csv").write_text("previous", encoding="utf-8")
    with pytest.raises(DiffTumorError, match=message) as exc:
        write_report([answers], key, out)
    assert "\n" not in str(exc.value)
    assert sorted(p.name for p in out.iterdir()) == ["table.csv"]
    assert (out / "table.csv").read_text(encoding="utf-8") == "previous"


def test_folder_not_a_study(tmp_path, files):
    key, _ = files
    with pytest.raises(DiffTumorError, match="not a study"):
        write_report([tmp_path], key, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _parser():
    from backend.cli import study as study_cli

    parser = argparse.ArgumentParser(prog="difftumor")
    study_cli.register(parser.add_subparsers(dest="command"))
    return parser


def test_end_to_end_create_read_export_report(tmp_path, source_cases, capsys):
    real, syn = source_cases
    real_csv, syn_csv = tmp_path / "real.csv", tmp_path / "syn.csv"
    real_csv.write_text("image,mask,organ\n" + "".join(f"{p},{m},liver\n" for p, m in real))
    syn_csv.write_text("image,mask,organ\n" + "".join(f"{p},{m},liver\n" for p, m in syn))
    study_dir = tmp_path / "study"
    args = _parser().parse_args(["study", "create", "--real", str(real_csv), "--synthetic", str(syn_csv),
                                 "--out", str(study_dir), "--readers", "R1,R2", "--seed", "5",
                                 "--roi-size", "12", "--confidence"])
    assert args.func(args) == 0
    key = tmp_path / "study.key" / "key.csv"
    truth = {c: t for c, t, *_ in (line.split(",") for line in key.read_text(encoding="utf-8").splitlines()[1:])}
    for reader in ("R1", "R2"):
        s = ReadingSession(study_dir, reader)
        while not s.finished:  # R1 is always right, R2 always says real
            s.show()
            s.answer(truth[s.case_id] if reader == "R1" else "real", confidence=4)
        s.close()

    args = _parser().parse_args(["study", "export", str(study_dir), "--reader", "R1", "--out", str(tmp_path / "r1.csv")])
    assert args.func(args) == 0
    exported = pd.read_csv(tmp_path / "r1.csv")
    assert list(exported.columns) == ["reader", "case_id", "answer", "confidence", "seconds", "answered_at"]
    assert len(exported) == 6 and (exported.confidence == 4).all()

    args = _parser().parse_args(["study", "report", "--answers", str(study_dir), "--key", str(key.parent),
                                 "--out", str(tmp_path / "rep")])
    assert args.func(args) == 0
    assert "| R1 | 100.0 | 100.0 | 100.0 |" in capsys.readouterr().out
    table = pd.read_csv(tmp_path / "rep" / "table.csv").set_index("reader")
    assert table.loc["R1", "auc"] == 1.0 and table.loc["R2", "auc"] == 0.5
    assert table.loc["R2", "specificity"] == 0.0

    # the exported CSV reproduces the database's numbers for R1
    export_answers(study_dir, "R2", tmp_path / "r2.csv")
    write_report([tmp_path / "r1.csv", tmp_path / "r2.csv"], key, tmp_path / "rep2")
    assert (tmp_path / "rep2" / "table.csv").read_text(encoding="utf-8") == (tmp_path / "rep" / "table.csv").read_text(encoding="utf-8")

    # a key that misses a study case is refused
    short = tmp_path / "short.csv"
    short.write_text("\n".join(key.read_text(encoding="utf-8").splitlines()[:-1]) + "\n")
    with pytest.raises(DiffTumorError, match="does not cover"):
        write_report([study_dir], short, tmp_path / "rep3")


def test_cli_errors_exit_2_with_one_line(tmp_path, files, capsys):
    from backend.cli import main

    assert main(["study", "read", str(tmp_path), "--reader", "R1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("difftumor: error: ") and "not a study" in err and "\n" not in err
    key, answers = files
    answers.write_text(ANSWERS + f"R2,P2,real,,1,{T}\n")
    assert main(["study", "report", "--answers", str(answers), "--key", str(key), "--out", str(tmp_path / "o")]) == 2
    assert "more than once" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


# --------------------------------------------------------------------------------------------
# Answers: form of each field
# --------------------------------------------------------------------------------------------
def _report_fails(tmp_path, key, answers, message):
    out = tmp_path / "out"
    with pytest.raises(DiffTumorError, match=message) as exc:
        write_report([answers], key, out)
    assert "\n" not in str(exc.value)
    assert not out.exists()
    return str(exc.value)


def test_mixed_confidences_of_one_reader_are_refused(tmp_path, files):
    key, answers = files
    answers.write_text(ANSWERS.replace("R1,L4,real,2,", "R1,L4,real,,"), encoding="utf-8")
    msg = _report_fails(tmp_path, key, answers, "must all have a confidence or none")
    assert "reader R1" in msg and "case L4" in msg and "line 5" in msg
    # another reader with confidences only on some answers; R1's unsure answer (no confidence) is fine
    answers.write_text(ANSWERS.replace("R2,P2,real,,", "R2,P2,real,4,"), encoding="utf-8")
    msg = _report_fails(tmp_path, key, answers, "must all have a confidence or none")
    assert "reader R2" in msg and "case L1" in msg


def test_header_only_answers_are_an_error(tmp_path, files, capsys):
    from backend.cli import main

    key, answers = files
    answers.write_text(ANSWERS.splitlines()[0] + "\n", encoding="utf-8")
    _report_fails(tmp_path, key, answers, "holds no answers")
    assert main(["study", "report", "--answers", str(answers), "--key", str(key), "--out", str(tmp_path / "o")]) == 2
    assert "holds no answers" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_study_folder_without_answers_is_an_error(tmp_path, study_factory):
    study_dir, ids = study_factory(n=2)
    ReadingSession(study_dir, "R1").close()  # R1 opened the session (empty database) but answered nothing
    key = tmp_path / "key.csv"
    key.write_text(f"case_id,truth,organ\n{ids[0]},real,liver\n{ids[1]},synthetic,liver\n", encoding="utf-8")
    with pytest.raises(DiffTumorError, match="no answers found"):
        write_report([study_dir], key, tmp_path / "out")
    with pytest.raises(DiffTumorError, match="holds no answers"):
        write_report([study_dir / "answers" / "R1.sqlite"], key, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("old, new, message", [
    ("R1,L3,synthetic,4,2,", "R1,L3,synthetic,4,abc,", r"line 4 \(case L3\): seconds 'abc'"),
    ("R1,L3,synthetic,4,2,", "R1,L3,synthetic,4,-1,", "seconds '-1' must be empty or a number >= 0"),
    ("R1,L3,synthetic,4,2,", "R1,L3,synthetic,4,nan,", "seconds 'nan'"),
    ("R2,P1,real,,1,2026-01-01T11:00:04+00:00", "R2,P1,real,,1,yesterday", r"line 12 \(case P1\): answered_at 'yesterday'"),
    ("R2,P1,real,,1,2026-01-01T11:00:04+00:00", "R2,P1,real,,1,2026-13-01", "ISO 8601"),
])
def test_bad_seconds_or_time_are_refused(tmp_path, files, old, new, message):
    key, answers = files
    answers.write_text(ANSWERS.replace(old, new), encoding="utf-8")
    _report_fails(tmp_path, key, answers, message)


def test_answers_fields_are_stripped_and_times_may_be_empty_or_utc_z(tmp_path, files):
    key, answers = files
    paths = write_report([answers], key, tmp_path / "plain")
    spaced = (ANSWERS.replace("R1,L1,real,5,3.5,2026-01-01T10:00:00+00:00", " R1 , L1 , real ,5, 3.5 ,2026-01-01T10:00:00Z")
              .replace("R2,L3,real,,1,2026-01-01T11:00:02+00:00", "R2,L3 ,real,,,")
              .replace("R2,P1,real,,1,2026-01-01T11:00:04+00:00", "R2,\tP1,real,,1, 2026-01-01 "))
    assert spaced != ANSWERS
    answers.write_text(spaced, encoding="utf-8")
    paths2 = write_report([answers], key, tmp_path / "spaced")
    assert paths2["table.csv"].read_text(encoding="utf-8") == paths["table.csv"].read_text(encoding="utf-8")
    assert paths2["imrmc.csv"].read_text(encoding="utf-8") == paths["imrmc.csv"].read_text(encoding="utf-8")
    # R2's empty seconds are unknown, not 0: the median of 1,1,1,1,1 stays 1
    assert json.loads(paths2["summary.json"].read_text(encoding="utf-8"))["median_seconds"] == {"R1": 2.75, "R2": 1.0}


def test_csv_inputs_saved_with_a_bom(tmp_path, files):
    """Excel writes UTF-8 CSV with a byte-order mark; key and answers are read as utf-8-sig."""
    key, answers = files
    plain = write_report([answers], key, tmp_path / "plain")["table.csv"].read_text(encoding="utf-8")
    key.write_bytes(b"\xef\xbb\xbf" + KEY.encode("utf-8"))
    answers.write_bytes(b"\xef\xbb\xbf" + ANSWERS.encode("utf-8"))
    assert write_report([answers], key, tmp_path / "bom")["table.csv"].read_text(encoding="utf-8") == plain


# --------------------------------------------------------------------------------------------
# Figure: an n/a rate is drawn as "n/a", never as a 0 % bar
# --------------------------------------------------------------------------------------------
FIGURE_KEY = "case_id,truth,organ\nL1,real,liver\nL2,synthetic,liver\nP1,real,pancreas\nP2,synthetic,pancreas\n"


def _figure_table(tmp_path, answer_rows: str):
    """The Table-1 frame of FIGURE_KEY and answers given as CSV rows (without the header)."""
    from study.design import read_key
    from study.report import build_table, load_answers

    key_csv, answers_csv = tmp_path / "key.csv", tmp_path / "answers.csv"
    key_csv.write_text(FIGURE_KEY, encoding="utf-8")
    answers_csv.write_text("reader,case_id,answer,confidence,seconds,answered_at\n" + answer_rows, encoding="utf-8")
    return build_table(load_answers([answers_csv])[0], read_key(key_csv))


def test_figure_na_rate_has_no_bar(tmp_path):
    from study.report import figure_bars, render_figure

    # liver: one real case answered synthetic (sensitivity 0 %), one synthetic case answered unsure
    # (specificity n/a); pancreas: both right
    table = _figure_table(tmp_path, "R1,L1,synthetic,,1,\nR1,L2,unsure,,1,\nR1,P1,real,,1,\nR1,P2,synthetic,,1,\n")
    organs = list(dict.fromkeys(table.organ))
    assert organs == ["liver", "pancreas", "all"]

    (sens,) = figure_bars(table, "sensitivity")
    assert list(sens["na"]) == [False, False, False]
    assert sens["height"][0] == 0.0  # a genuine 0 % is a (zero-height) bar with its interval
    assert sens["yerr"][1, 0] > 0

    (spec,) = figure_bars(table, "specificity")
    assert list(spec["na"]) == [True, False, False]
    assert math.isnan(spec["height"][0]) and np.isnan(spec["yerr"][:, 0]).all()  # not 0
    assert list(spec["height"][1:]) == [100.0, 100.0]

    fig = render_figure(table)
    ax_sens, ax_spec, ax_acc = fig.axes[:3]
    assert [t.get_text() for t in ax_spec.texts] == ["n/a"]
    assert ax_spec.texts[0].get_position()[0] == pytest.approx(spec["x"][0])
    assert len(ax_spec.patches) == 2 and len(ax_sens.patches) == 3  # no bar for the n/a rate
    assert not ax_sens.texts and not ax_acc.texts
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["R1"]


# --------------------------------------------------------------------------------------------
# Output locations: export and report never overwrite by accident and never write into a study
# --------------------------------------------------------------------------------------------
@pytest.fixture
def answered_study(tmp_path, study_factory):
    """A reader package whose reader R1 answered both cases, and its key folder beside it."""
    study_dir, ids = study_factory(n=2, confidence=True)
    s = ReadingSession(study_dir, "R1")
    for answer in ("real", "synthetic"):
        s.show()
        s.answer(answer, confidence=3)
    s.close()
    key_dir = tmp_path / "study.key"
    key_dir.mkdir()
    (key_dir / "key.csv").write_text(f"case_id,truth,organ\n{ids[0]},real,liver\n{ids[1]},synthetic,liver\n",
                                     encoding="utf-8")
    return study_dir, key_dir


def test_export_refuses_existing_out_unless_force(tmp_path, answered_study, capsys):
    from backend.cli import main

    study_dir, key_dir = answered_study
    key_text = (key_dir / "key.csv").read_text(encoding="utf-8")
    assert main(["study", "export", str(study_dir), "--reader", "R1", "--out", str(key_dir / "key.csv")]) == 2
    err = capsys.readouterr().err.strip()
    assert "already exists" in err and "--force" in err and "\n" not in err
    assert (key_dir / "key.csv").read_text(encoding="utf-8") == key_text  # the key survives

    out = tmp_path / "r1.csv"
    out.write_text("old", encoding="utf-8")
    with pytest.raises(DiffTumorError, match="already exists"):
        export_answers(study_dir, "R1", out)
    assert out.read_text(encoding="utf-8") == "old"
    assert main(["study", "export", str(study_dir), "--reader", "R1", "--out", str(out), "--force"]) == 0
    assert len(pd.read_csv(out)) == 2


@pytest.mark.parametrize("where", [".", "cases", "answers", "cases/deeper"])
def test_export_refuses_out_inside_a_study(answered_study, capsys, where):
    from backend.cli import main

    study_dir, _ = answered_study
    folder = study_dir / where
    folder.mkdir(parents=True, exist_ok=True)
    before = sorted(p.relative_to(study_dir) for p in study_dir.rglob("*"))
    for force in ([], ["--force"]):
        assert main(["study", "export", str(study_dir), "--reader", "R1", "--out", str(folder / "r1.csv"), *force]) == 2
        err = capsys.readouterr().err.strip()
        assert "inside the study folder" in err and "that readers are given" in err and "\n" not in err
    assert sorted(p.relative_to(study_dir) for p in study_dir.rglob("*")) == before


def test_export_needs_out(answered_study):
    study_dir, _ = answered_study
    with pytest.raises(SystemExit):
        _parser().parse_args(["study", "export", str(study_dir), "--reader", "R1"])


@pytest.mark.parametrize("where", [".", "answers", "report"])
def test_report_refuses_out_inside_a_study(answered_study, capsys, where):
    from backend.cli import main

    study_dir, key_dir = answered_study
    out = study_dir / where
    for force in ([], ["--force"]):
        assert main(["study", "report", "--answers", str(study_dir), "--key", str(key_dir), "--out", str(out), *force]) == 2
        err = capsys.readouterr().err.strip()
        assert "inside the study folder" in err and "that readers are given" in err and "\n" not in err
    assert not any((study_dir / where / name).exists() for name in REPORT_FILES)
    assert not (study_dir / "report").exists()


def test_report_refuses_a_folder_with_other_files_unless_force(tmp_path, files, capsys):
    from backend.cli import main

    key, answers = files
    out = tmp_path / "results"
    out.mkdir()
    (out / "notes.txt").write_text("mine", encoding="utf-8")
    assert main(["study", "report", "--answers", str(answers), "--key", str(key), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "notes.txt" in err and "--force" in err and "\n" not in err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]

    (out / "notes.txt").unlink()
    (out / "old").mkdir()  # a folder is not a report file either
    with pytest.raises(DiffTumorError, match="other files than a previous report"):
        write_report([answers], key, out)

    write_report([answers], key, out, force=True)
    assert sorted(p.name for p in out.iterdir()) == sorted([*REPORT_FILES, "old"])


def test_report_rerun_replaces_a_previous_report(tmp_path, files):
    key, answers = files
    out = tmp_path / "report"
    first = write_report([answers], key, out)
    assert "R2" in first["table.csv"].read_text(encoding="utf-8")
    (out / "table.md").unlink()  # a partial previous report is still a previous report
    answers.write_text("\n".join(line for line in ANSWERS.splitlines() if not line.startswith("R2,")) + "\n",
                       encoding="utf-8")
    second = write_report([answers], key, out)  # no --force needed
    assert sorted(p.name for p in out.iterdir()) == sorted(REPORT_FILES)
    assert "R2" not in second["table.csv"].read_text(encoding="utf-8")
    assert "R2" not in second["imrmc.csv"].read_text(encoding="utf-8")
    assert second["table.md"].is_file()


def test_compress_help_warns_about_file_sizes():
    parser = _parser()
    create = parser._subparsers._group_actions[0].choices["study"]._subparsers._group_actions[0].choices["create"]
    text = " ".join(create.format_help().split())
    assert "can hint at the class" in text and "same size" in text


def test_errors_name_the_file_line_despite_blank_lines(tmp_path, files):
    key, answers = files
    lines = ANSWERS.splitlines()
    # blank and whitespace-only lines before the header and between rows; line 7 holds the bad answer
    text = "\n" + lines[0] + "\n" + lines[1] + "\n\n  \n" + lines[2] + "\n" + lines[3].replace("synthetic", "synth") + "\n"
    answers.write_text(text + "\n".join(lines[4:]) + "\n", encoding="utf-8")
    assert text.splitlines()[6].startswith("R1,L3,synth,")
    _report_fails(tmp_path, key, answers, r"answers.csv: line 7: answer 'synth'")


def test_imrmc_reader_count_matches_the_score_rows(tmp_path, files):
    """NR is checked against the readers in the data: a reader who only answered unsure has no row."""
    key, answers = files
    answers.write_text(ANSWERS + f"R3,L1,unsure,,1,{T}\nR3,P2,unsure,,1,{T}\n", encoding="utf-8")
    text = write_report([answers], key, tmp_path / "out")["imrmc.csv"].read_text(encoding="utf-8").splitlines()
    data = text[text.index("BEGIN DATA:") + 1:]
    readers = {r.split(",")[0] for r in data if not r.startswith("-1,")}
    assert readers == {"R1", "R2"} and "NR: 2" in text


@pytest.mark.parametrize("blank", ["", "all", "All"])
def test_key_mixing_cases_with_and_without_organ_is_refused(tmp_path, files, blank):
    """Unnamed cases got organ 'all', which collided with the pooled 'all' rows (pandas traceback)."""
    key, answers = files
    key.write_text(KEY.replace("P1,real,pancreas", f"P1,real,{blank}"), encoding="utf-8")
    _report_fails(tmp_path, key, answers, r"key.csv: 1 case\(s\) have no organ \(e.g. P1\) but the others have one "
                                          r"\(liver, pancreas\)")


def test_key_without_any_organ_reports_one_group(tmp_path, files):
    key, answers = files
    key.write_text("case_id,truth,organ\n" + "".join(",".join(line.split(",")[:2]) + ",\n" for line in KEY.splitlines()[1:]),
                   encoding="utf-8")
    table = pd.read_csv(write_report([answers], key, tmp_path / "out")["table.csv"])
    assert list(table.organ) == ["all", "all"] and list(table.n_real) == [3, 3]


def test_figure_na_labels_lie_inside_their_panel(tmp_path):
    """The last reader's "n/a" in the last organ was drawn right of the panel (beside the next one)."""
    from study.report import figure_bars, render_figure

    table = _figure_table(tmp_path, "R1,L1,real,,1,\nR1,L2,real,,1,\nR1,P1,real,,1,\nR1,P2,real,,1,\n"
                                    "R2,L1,unsure,,1,\nR2,P2,unsure,,1,\n")
    fig = render_figure(table)
    for ax, metric in zip(fig.axes[:3], ("sensitivity", "specificity", "accuracy")):
        lo, hi = ax.get_xlim()
        xs = np.concatenate([bar["x"] for bar in figure_bars(table, metric)])
        assert lo < xs.min() and xs.max() < hi
        assert all(lo < t.get_position()[0] < hi for t in ax.texts) and len(ax.texts) == 3


def test_organ_names_differing_in_case_are_one_organ(tmp_path, files):
    """'Liver' (synthetic) and 'liver' (real) were two organs: liver had no synthetic case, specificity n/a."""
    key, answers = files
    paths = write_report([answers], key, tmp_path / "lower")
    key.write_text(KEY.replace("L3,synthetic,liver", "L3,synthetic,Liver").replace("L4,synthetic,liver", "L4,synthetic,LIVER "),
                   encoding="utf-8")
    paths2 = write_report([answers], key, tmp_path / "mixed")
    assert paths2["table.csv"].read_bytes() == paths["table.csv"].read_bytes()
    assert paths2["table.md"].read_text(encoding="utf-8") == paths["table.md"].read_text(encoding="utf-8")


def test_each_reader_package_holds_only_its_own_answers_and_the_study_folder_collects_them(tmp_path, source_cases):
    from study.design import CaseSource, StudySettings, create_study

    real, syn = source_cases
    study = create_study([CaseSource(p, "real", "liver", m) for p, m in real],
                         [CaseSource(p, "synthetic", "liver", m) for p, m in syn], tmp_path / "study",
                         settings=StudySettings(readers=("R1", "R2"), seed=4, roi_size_mm=(12.0, 12.0, 12.0)))
    folder = study.root.parent
    for reader, answer in (("R1", "real"), ("R2", "synthetic")):
        s = ReadingSession(folder / reader, reader)  # each reader opens only their own package
        while not s.finished:
            s.show()
            s.answer(answer)
        s.close()
    for reader, other in (("R1", "R2"), ("R2", "R1")):
        files = [p for p in (folder / reader).rglob("*") if p.is_file()]
        assert sorted(p.relative_to(folder / reader).as_posix() for p in files if "answers" in p.parts) == \
            [f"answers/{reader}.sqlite"]
        meta = [p for p in files if "cases" not in p.parts]  # study.json and the answers (case files are voxels)
        assert not any(other.encode() in p.read_bytes() for p in meta)  # nothing of the other reader
    key = tmp_path / "study.key"
    table = pd.read_csv(write_report([folder], key, tmp_path / "all")["table.csv"]).set_index("reader")
    assert sorted(table.index) == ["R1", "R2"]  # the study folder collects every package's answers
    assert table.loc["R1", "sensitivity"] == 1.0 and table.loc["R2", "specificity"] == 1.0
    table = pd.read_csv(write_report([folder / "R1"], key, tmp_path / "r1")["table.csv"])
    assert list(table.reader) == ["R1"]  # a package sent back on its own
    sent = pd.read_csv(write_report([folder / "R2" / "answers" / "R2.sqlite"], key, tmp_path / "r2")["table.csv"])
    assert list(sent.reader) == ["R2"]  # or just the answers file


def test_unreadable_cases_are_reported_not_answered(tmp_path, study_factory):
    study_dir, ids = study_factory(n=3)
    s = ReadingSession(study_dir, "R1")
    s.show()
    s.answer("real")
    s.mark_unreadable("cases/K001.nii: case file is missing from the reader package")
    s.show()
    s.answer("synthetic")
    s.close()
    key = tmp_path / "key.csv"
    key.write_text(f"case_id,truth,organ\n{ids[0]},real,liver\n{ids[1]},real,liver\n{ids[2]},synthetic,liver\n",
                   encoding="utf-8")
    paths = write_report([study_dir], key, tmp_path / "out")
    summary = json.loads(paths["summary.json"].read_text(encoding="utf-8"))
    assert summary["unreadable"] == {"R1": [ids[1]]}
    row = pd.read_csv(paths["table.csv"]).iloc[0]
    assert (row.n_real, row.n_synthetic, row.n_unanswered) == (1, 1, 1)


def test_read_needs_a_reader_for_a_study_folder(tmp_path, source_cases, capsys):
    from backend.cli import main
    from study.design import CaseSource, StudySettings, create_study

    real, syn = source_cases
    create_study([CaseSource(p, "real", "liver", m) for p, m in real],
                 [CaseSource(p, "synthetic", "liver", m) for p, m in syn], tmp_path / "study",
                 settings=StudySettings(readers=("R1", "R2"), seed=4, roi_size_mm=(12.0, 12.0, 12.0)))
    assert main(["study", "read", str(tmp_path / "study")]) == 2
    err = capsys.readouterr().err.strip()
    assert "one package per reader (R1, R2); give --reader" in err and "\n" not in err
    assert main(["study", "read", str(tmp_path / "study" / "R2"), "--reader", "R1"]) == 2
    assert "reader 'R1': not in this study (readers: R2)" in capsys.readouterr().err
