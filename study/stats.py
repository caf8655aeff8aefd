"""Reader-study statistics as small pure functions, built in layers.

Layer 1 (one reading): :func:`count_answers` turns truths and answers into :class:`Counts`.
Layer 2 (rates): :func:`sensitivity`, :func:`specificity`, :func:`accuracy`, each with a
:func:`wilson_interval` and :func:`binomial_p_value` of accuracy against chance.
Layer 3 (across readings): :func:`fleiss_kappa` and :func:`roc_auc` from :func:`answer_score`.
Tables (pandas) are assembled only in :mod:`study.report`.

Conventions, as in the DiffTumor Visual Turing Test (Table 1): the *positive* class is a
**real** tumor. A reader calling a real tumor "real" is a true positive, calling a synthetic
tumor "real" a false positive. "Unsure" answers are counted but excluded from every rate and
interval. A rate with an empty denominator is ``nan`` (shown as "n/a" by :func:`format_percent`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal

import numpy as np

REAL = "real"
SYNTHETIC = "synthetic"
UNSURE = "unsure"
TRUTHS = (REAL, SYNTHETIC)
ANSWERS = (REAL, SYNTHETIC, UNSURE)
CONFIDENCE_LEVELS = 5  # confidence is an integer 1 (guess) .. 5 (certain)


@dataclass(frozen=True)
class Counts:
    """Confusion counts of one reader on one set of cases (positives = real tumors)."""

    tp: int = 0  # real called real
    fn: int = 0  # real called synthetic
    fp: int = 0  # synthetic called real
    tn: int = 0  # synthetic called synthetic
    unsure_real: int = 0  # real cases answered "unsure"
    unsure_synthetic: int = 0  # synthetic cases answered "unsure"

    @property
    def n_real(self) -> int:
        """Real cases read, unsure included."""
        return self.tp + self.fn + self.unsure_real

    @property
    def n_synthetic(self) -> int:
        """Synthetic cases read, unsure included."""
        return self.fp + self.tn + self.unsure_synthetic

    @property
    def n_unsure(self) -> int:
        return self.unsure_real + self.unsure_synthetic

    @property
    def n_decided(self) -> int:
        """Cases with a definite answer (the denominator of accuracy)."""
        return self.tp + self.fn + self.fp + self.tn

    def __add__(self, other: Counts) -> Counts:
        return Counts(*(a + b for a, b in zip(self._values(), other._values())))

    def _values(self) -> tuple[int, ...]:
        return (self.tp, self.fn, self.fp, self.tn, self.unsure_real, self.unsure_synthetic)


def count_answers(truths: Iterable[str], answers: Iterable[str]) -> Counts:
    """Confusion counts for paired ``truths`` (real|synthetic) and ``answers`` (real|synthetic|unsure)."""
    cells = {key: 0 for key in ("tp", "fn", "fp", "tn", "unsure_real", "unsure_synthetic")}
    table = {
        (REAL, REAL): "tp",
        (REAL, SYNTHETIC): "fn",
        (SYNTHETIC, REAL): "fp",
        (SYNTHETIC, SYNTHETIC): "tn",
        (REAL, UNSURE): "unsure_real",
        (SYNTHETIC, UNSURE): "unsure_synthetic",
    }
    truths, answers = list(truths), list(answers)
    if len(truths) != len(answers):
        raise ValueError(f"{len(truths)} truths but {len(answers)} answers")
    for truth, answer in zip(truths, answers):
        key = table.get((truth, answer))
        if key is None:
            raise ValueError(f"truth {truth!r} must be one of {TRUTHS}, answer {answer!r} one of {ANSWERS}")
        cells[key] += 1
    return Counts(**cells)


def _ratio(num: int, den: int) -> float:
    if den == 0:
        return math.nan
    return num / den


def sensitivity(c: Counts) -> float:
    """Real tumors called real: TP / (TP + FN); denominator = real cases with a definite answer.

    ``nan`` when the reader gave no definite answer on a real case (e.g. no real cases at all).
    """
    return _ratio(c.tp, c.tp + c.fn)


def specificity(c: Counts) -> float:
    """Synthetic tumors called synthetic: TN / (TN + FP); denominator = synthetic cases answered.

    ``nan`` when the reader gave no definite answer on a synthetic case.
    """
    return _ratio(c.tn, c.tn + c.fp)


def accuracy(c: Counts) -> float:
    """Correct answers: (TP + TN) / (TP + TN + FP + FN); denominator = all definite answers.

    ``nan`` when every answer was "unsure" (or there were no cases).
    """
    return _ratio(c.tp + c.tn, c.n_decided)


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion ``successes / n``.

    Well behaved at 0 and n (unlike the Wald interval). ``(nan, nan)`` when ``n == 0``.
    """
    if n == 0:
        return (math.nan, math.nan)
    if not 0 <= successes <= n:
        raise ValueError(f"successes={successes} must lie in [0, n={n}]")
    from scipy.stats import norm

    z = float(norm.ppf(0.5 + confidence / 2))
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    lo = 0.0 if successes == 0 else max(0.0, centre - half)  # exact bounds at the ends
    hi = 1.0 if successes == n else min(1.0, centre + half)
    return (lo, hi)


def sensitivity_interval(c: Counts, confidence: float = 0.95) -> tuple[float, float]:
    return wilson_interval(c.tp, c.tp + c.fn, confidence)


def specificity_interval(c: Counts, confidence: float = 0.95) -> tuple[float, float]:
    return wilson_interval(c.tn, c.tn + c.fp, confidence)


def accuracy_interval(c: Counts, confidence: float = 0.95) -> tuple[float, float]:
    return wilson_interval(c.tp + c.tn, c.n_decided, confidence)


def binomial_p_value(successes: int, n: int, chance: float = 0.5) -> float:
    """Exact two-sided binomial test of ``successes / n`` against ``chance``; ``nan`` when n == 0.

    Used on accuracy: a small p-value means the reader tells real from synthetic better (or
    worse) than a coin flip.
    """
    if n == 0:
        return math.nan
    from scipy.stats import binomtest

    return float(binomtest(successes, n, chance, alternative="two-sided").pvalue)


def accuracy_p_value(c: Counts) -> float:
    return binomial_p_value(c.tp + c.tn, c.n_decided)


def fleiss_kappa(ratings: Sequence[Sequence[str | None]]) -> float:
    """Fleiss' kappa of agreement between readers on real-vs-synthetic.

    ``ratings[i][j]`` is reader j's answer on case i (``real``, ``synthetic``, ``unsure`` or
    ``None`` for unanswered). Fleiss' kappa needs the same number of ratings per case, so only
    **complete cases** are used: cases that every reader answered with real or synthetic;
    cases with an unsure or missing answer are dropped. kappa = (P_bar - P_e) / (1 - P_e) with
    P_bar the mean per-case agreement and P_e the chance agreement from the pooled category
    proportions. ``nan`` with fewer than 2 readers, no complete case, or P_e == 1 (every
    answer in one category, agreement undefined).
    """
    rows = [list(r) for r in ratings]
    n_readers = len(rows[0]) if rows else 0
    if any(len(r) != n_readers for r in rows):
        raise ValueError("every case needs one rating per reader (use None for unanswered)")
    if n_readers < 2:
        return math.nan
    complete = [r for r in rows if all(a in TRUTHS for a in r)]
    if not complete:
        return math.nan
    m = n_readers
    # counts per case and category: (n_cases, 2)
    table = np.array([[r.count(REAL), r.count(SYNTHETIC)] for r in complete], dtype=float)
    p_cat = table.sum(axis=0) / (len(complete) * m)
    p_case = (np.sum(table * table, axis=1) - m) / (m * (m - 1))
    p_bar = float(p_case.mean())
    p_e = float(np.sum(p_cat * p_cat))
    if math.isclose(p_e, 1.0):
        return math.nan
    return (p_bar - p_e) / (1 - p_e)


def answer_score(answer: str, confidence: int | None) -> float:
    """Ordinal "this tumor is real" score on a 1..10 scale, for ROC analysis.

    A real answer with confidence c (1..5) scores 5 + c (6..10); a synthetic answer with
    confidence c scores 6 - c (5..1). So "certainly synthetic" = 1 < ... < 5 = "guess synthetic"
    < 6 = "guess real" < ... < 10 = "certainly real". Without a confidence the score is binary:
    real 1, synthetic 0. Unsure answers have no score (``nan``) and are left out of the AUC.
    """
    if answer == UNSURE:
        return math.nan
    if answer not in TRUTHS:
        raise ValueError(f"answer {answer!r} must be one of {ANSWERS}")
    if confidence is None:
        return 1.0 if answer == REAL else 0.0
    if not 1 <= int(confidence) <= CONFIDENCE_LEVELS:
        raise ValueError(f"confidence {confidence!r} must be 1..{CONFIDENCE_LEVELS}")
    return float(5 + confidence) if answer == REAL else float(6 - confidence)


def roc_auc(truths: Sequence[str], scores: Sequence[float]) -> float:
    """Area under the empirical ROC curve (positives = real), ties counted one half.

    Equals the Mann-Whitney probability P(score of a real case > score of a synthetic case).
    Cases with a ``nan`` score are left out. ``nan`` when no real or no synthetic case remains.
    """
    t = np.asarray(truths)
    s = np.asarray(scores, dtype=float)
    keep = ~np.isnan(s)
    pos, neg = s[keep & (t == REAL)], s[keep & (t == SYNTHETIC)]
    if pos.size == 0 or neg.size == 0:
        return math.nan
    greater = (pos[:, None] > neg[None, :]).sum()
    ties = (pos[:, None] == neg[None, :]).sum()
    return float((greater + 0.5 * ties) / (pos.size * neg.size))


def round_half_up(value: float, digits: int = 1) -> str:
    """``value`` with ``digits`` decimals, ties rounded away from zero (76.25 -> "76.3", -0.5 -> "-1").

    The float's shortest repr is taken as the exact decimal, so a value that prints as a tie is one.
    """
    return str(Decimal(repr(float(value))).quantize(Decimal(1).scaleb(-digits), rounding=ROUND_HALF_UP))


def format_percent(value: float, digits: int = 1) -> str:
    """A fraction as a percentage with ``digits`` decimals, rounded half up; nan -> "n/a".

    Half up, as readers and the paper expect: 183/240 = 76.25 % -> "76.3" (Python's round-half-to-even
    would print 76.2). A ratio whose percentage ends exactly on a 5 (k/240, k/8, ...) is a tie and goes
    up; 0.7417 -> "74.2".
    """
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return round_half_up(float(Decimal(repr(float(value))) * 100), digits)
