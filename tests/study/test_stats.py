"""Study statistics on small hand-computed tables (positives = real tumors)."""

from __future__ import annotations

import math
from decimal import Decimal

import pytest

from study import stats
from study.stats import (
    Counts,
    accuracy,
    accuracy_interval,
    accuracy_p_value,
    answer_score,
    binomial_p_value,
    count_answers,
    fleiss_kappa,
    format_percent,
    roc_auc,
    sensitivity,
    specificity,
    wilson_interval,
)

R, S, U = stats.REAL, stats.SYNTHETIC, stats.UNSURE


def test_counts_by_hand():
    c = count_answers([R, R, R, R, S, S, S], [R, R, S, U, R, S, U])
    assert (c.tp, c.fn, c.fp, c.tn, c.unsure_real, c.unsure_synthetic) == (2, 1, 1, 1, 1, 1)
    assert (c.n_real, c.n_synthetic, c.n_unsure, c.n_decided) == (4, 3, 2, 5)
    assert sensitivity(c) == pytest.approx(2 / 3)  # unsure excluded from the denominator
    assert specificity(c) == pytest.approx(1 / 2)
    assert accuracy(c) == pytest.approx(3 / 5)


def test_reader_with_no_real_cases():
    c = count_answers([S, S, S, S], [S, R, S, S])
    assert c.n_real == 0
    assert math.isnan(sensitivity(c))
    assert specificity(c) == pytest.approx(0.75)
    assert accuracy(c) == pytest.approx(0.75)
    assert all(math.isnan(v) for v in stats.sensitivity_interval(c))
    assert format_percent(sensitivity(c)) == "n/a"


def test_reader_who_answered_everything_real():
    c = count_answers([R, R, R, S, S], [R] * 5)
    assert sensitivity(c) == 1.0
    assert specificity(c) == 0.0
    assert accuracy(c) == pytest.approx(3 / 5)
    lo, hi = stats.specificity_interval(c)
    assert lo == 0.0 and 0 < hi < 1


def test_all_unsure_and_empty():
    c = count_answers([R, S], [U, U])
    assert c.n_unsure == 2 and c.n_decided == 0
    assert all(math.isnan(f(c)) for f in (sensitivity, specificity, accuracy))
    assert math.isnan(accuracy_p_value(c))
    assert all(math.isnan(v) for v in accuracy_interval(Counts()))


def test_bad_labels_raise():
    with pytest.raises(ValueError, match="maybe"):
        count_answers([R], ["maybe"])
    with pytest.raises(ValueError, match="1 truths but 2 answers"):
        count_answers([R], [R, S])


def test_wilson_interval_closed_forms():
    z2 = 1.959963984540054**2
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(z2 / (10 + z2))  # k = 0: upper = z^2 / (n + z^2)
    lo2, hi2 = wilson_interval(10, 10)
    assert hi2 == 1.0 and lo2 == pytest.approx(1 - hi)
    lo, hi = wilson_interval(89, 120)  # hand-computed: centre 0.734171, half-width 0.077456
    assert lo == pytest.approx(0.656715, abs=2e-6) and hi == pytest.approx(0.811626, abs=2e-6)
    with pytest.raises(ValueError, match=r"successes=11 must lie in \[0, n=10\]"):
        wilson_interval(11, 10)


def test_binomial_p_values():
    assert binomial_p_value(8, 10) == pytest.approx(112 / 1024)  # 2 * (1 + 10 + 45) / 2^10
    assert binomial_p_value(5, 10) == pytest.approx(1.0)
    assert math.isnan(binomial_p_value(0, 0))


def test_fleiss_kappa_by_hand():
    ratings = [[R, R, R], [S, S, S], [R, R, S], [R, S, S], [R, U, R], [S, None, S]]
    # complete cases only: table [3,0],[0,3],[2,1],[1,2] -> P_i 1,1,1/3,1/3; P_bar 2/3; p = .5,.5 -> P_e .5
    assert fleiss_kappa(ratings) == pytest.approx(1 / 3)
    assert fleiss_kappa([[R, R], [S, S]]) == pytest.approx(1.0)
    assert fleiss_kappa([[R, S], [S, R]]) == pytest.approx(-1.0)
    assert math.isnan(fleiss_kappa([[R, R], [R, R]]))  # one category only: P_e = 1
    assert math.isnan(fleiss_kappa([[R], [S]]))  # one reader
    assert math.isnan(fleiss_kappa([[U, R]]))  # no complete case


def test_answer_score_and_auc():
    assert [answer_score(S, c) for c in (5, 4, 3, 2, 1)] == [1, 2, 3, 4, 5]
    assert [answer_score(R, c) for c in (1, 2, 3, 4, 5)] == [6, 7, 8, 9, 10]
    assert answer_score(R, None) == 1.0 and answer_score(S, None) == 0.0
    assert math.isnan(answer_score(U, 3))
    with pytest.raises(ValueError, match="confidence 6 must be 1..5"):
        answer_score(R, 6)
    # pairs (real, synthetic): 10>5, 10>6, 6>5, 6=6 (half) -> 3.5 / 4
    assert roc_auc([R, R, S, S], [10, 6, 5, 6]) == pytest.approx(0.875)
    assert roc_auc([R, R, S, S, R], [10, 6, 5, 6, math.nan]) == pytest.approx(0.875)
    assert math.isnan(roc_auc([S, S], [1, 2]))


# Table 1 of the DiffTumor paper (Visual Turing Test): per organ 120 real + 120 synthetic cases, readers R1-R4.
# The printed percentages (sensitivity = real called real, specificity = synthetic called synthetic,
# accuracy over 240), exactly as in the paper; "100" is printed without a decimal there.
TABLE1_PRINTED = {
    ("R1", "liver"): ("98.3", "31.7", "65.0"), ("R2", "liver"): ("99.2", "53.3", "76.3"),
    ("R3", "liver"): ("100", "39.2", "69.6"), ("R4", "liver"): ("100", "45.8", "72.9"),
    ("R1", "pancreas"): ("96.7", "22.5", "59.6"), ("R2", "pancreas"): ("100", "44.2", "72.1"),
    ("R3", "pancreas"): ("100", "34.2", "67.1"), ("R4", "pancreas"): ("98.3", "38.8", "68.3"),
    ("R1", "kidney"): ("95.8", "36.7", "66.3"), ("R2", "kidney"): ("98.3", "55.0", "76.7"),
    ("R3", "kidney"): ("99.2", "40.8", "70.0"), ("R4", "kidney"): ("97.5", "51.7", "74.6"),
}
# The whole counts behind them: (real called real, synthetic called synthetic), each out of 120.
TABLE1_COUNTS = {
    ("R1", "liver"): (118, 38), ("R2", "liver"): (119, 64), ("R3", "liver"): (120, 47), ("R4", "liver"): (120, 55),
    ("R1", "pancreas"): (116, 27), ("R2", "pancreas"): (120, 53), ("R3", "pancreas"): (120, 41),
    ("R4", "pancreas"): (118, 46),
    ("R1", "kidney"): (115, 44), ("R2", "kidney"): (118, 66), ("R3", "kidney"): (119, 49), ("R4", "kidney"): (117, 62),
}
# Pancreas R4's specificity is printed 38.8, which no count out of 120 gives (46 -> 38.3, 47 -> 39.2). Its
# printed accuracy 68.3 = (118 + 46) / 240 fixes the count at 46, so the paper's 38.8 is a misprint of 38.3.
TABLE1_MISPRINTS = {("R4", "pancreas", 1): ("38.8", "38.3")}


def _printed(cell: tuple[str, str], index: int) -> str:
    """The paper's cell with one decimal ("100" -> "100.0"), corrected where it is a known misprint."""
    text = TABLE1_PRINTED[cell][index]
    printed, corrected = TABLE1_MISPRINTS.get((*cell, index), (text, text))
    assert printed == text
    return f"{float(corrected):.1f}"


@pytest.mark.parametrize("cell", sorted(TABLE1_COUNTS))
def test_table1_percentages_to_one_decimal(cell):
    """Every one of the paper's 36 printed cells from its whole counts, rounded half up as printed
    (183/240 = 76.25 -> 76.3 and 159/240 = 66.25 -> 66.3, where round-half-to-even would print 76.2, 66.2)."""
    tp, tn = TABLE1_COUNTS[cell]
    truths = [R] * 120 + [S] * 120
    answers = [R] * tp + [S] * (120 - tp) + [S] * tn + [R] * (120 - tn)
    c = count_answers(truths, answers)
    assert (c.n_real, c.n_synthetic, c.tp, c.tn) == (120, 120, tp, tn)
    got = tuple(format_percent(f(c)) for f in (sensitivity, specificity, accuracy))
    assert got == tuple(_printed(cell, i) for i in range(3))


def test_table1_misprint_is_no_whole_count():
    assert all(format_percent(k / 120) != "38.8" for k in range(121))
    assert format_percent((118 + 46) / 240) == "68.3" and format_percent((118 + 47) / 240) == "68.8"


@pytest.mark.parametrize("num, den, text", [(183, 240, "76.3"), (159, 240, "66.3"), (1, 8, "12.5"), (1, 16, "6.3"),
                                            (3, 16, "18.8"), (0, 5, "0.0"), (5, 5, "100.0"), (2, 3, "66.7")])
def test_percentages_round_half_up(num, den, text):
    assert format_percent(num / den) == text
    assert format_percent(num / den, digits=0) == str(int(Decimal(100 * num) / den + Decimal("0.5")))
