"""Tests for opd.grading: boxed extraction, normalisation, grading order, math-verify fallback."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from opd.grading import _math_verify_equal, extract_boxed, grade, grade_batch, normalize_answer

BENCHMARKS = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "benchmarks"


# ---------------------------------------------------------------------------------------------------------
# extract_boxed
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        (r"so \boxed{\frac{1}{2}}.", r"\frac{1}{2}"),
        (r"\boxed{\left\{ 1, \frac{2}{3} \right\}}", r"\left\{ 1, \frac{2}{3} \right\}"),
        (r"first \boxed{3}, then \boxed{4}", "4"),  # last box wins
        (r"\fbox{7}", "7"),
        (r"\boxed{1} then \fbox{2}", "2"),
        (r"The answer is $\boxed 5$.", "5"),
        (r"\boxed {12}", "12"),
        (r"\boxed{\{1,2\}}", r"\{1,2\}"),  # escaped braces do not count
        (r"\boxed{\boxed{9}}", "9"),
        ("no box here: 5", None),
        (r"\boxed{}", None),
        (r"\boxed{3} and later \boxed{\frac{1}{", None),  # unclosed last box: truncated response
        (r"\boxedfoo{3}", None),
    ],
)
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


# ---------------------------------------------------------------------------------------------------------
# normalize_answer
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("142.0", "142"),
        ("142.", "142"),
        (".0000672", "0.0000672"),
        ("-0.50", "-0.5"),
        ("+3", "3"),
        (r"\dfrac{3}{4}", r"\frac{3}{4}"),
        (r"\frac34", r"\frac{3}{4}"),
        (r"\frac 59", r"\frac{5}{9}"),
        (r"11\sqrt2", r"11\sqrt{2}"),
        (r"10,\!080", "10080"),
        ("1,000,000", "1000000"),
        (r"\$32,\!348", "32348"),
        (r"90^\circ", "90"),
        (r"30^{\circ}", "30"),
        (r"50\%", "50"),
        (r"5.4 \text{ cents}", "5.4"),
        (r"864 \mbox{ inches}^2", "864"),
        (r"\frac{270}7\text{ degrees}", r"\frac{270}{7}"),
        (r"\text{Evelyn}", "Evelyn"),
        (r"\text{(C)}", "C"),
        (r"\left( 3, \frac{\pi}{2} \right)", r"(3,\frac{\pi}{2})"),
        ("x=5", "5"),
        (r"x \in [-2,7]", "[-2,7]"),
        ("3, 5, 7", "3,5,7"),
        (r"\begin{pmatrix} -1 \\ 0 \end{pmatrix}", r"\begin{pmatrix}-1\\0\end{pmatrix}"),
        (r"\boxed{12}", "12"),
        ("$12$", "12"),
    ],
)
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


def test_normalize_is_idempotent():
    for raw in [
        "142.0",
        r"\left( 3, \frac{\pi}{2} \right)",
        r"10,\!080",
        r"\dfrac{17}{50}",
        r"5.4 \text{ cents}",
    ]:
        once = normalize_answer(raw)
        assert normalize_answer(once) == once


# ---------------------------------------------------------------------------------------------------------
# grade
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "response, truth",
    [
        (r"thus \boxed{\frac{1}{2}}", "0.5"),  # numeric check
        (r"\boxed{0.5}", r"\frac{1}{2}"),
        (r"\boxed{\dfrac{3}{4}}", r"\frac34"),
        (r"\boxed{142}", "142.0"),
        (r"\boxed{142.00}", "142"),
        (r"\boxed{1.8}", r"1\frac{4}{5}"),
        (r"\boxed{10080}", r"10,\!080"),
        (r"\boxed{90}", r"90^\circ"),
        (r"\boxed{[1, 3)}", "[1,3)"),  # interval, via string
        (r"\boxed{(3,\frac{\pi}{2})}", r"\left( 3, \frac{\pi}{2} \right)"),  # tuple
        (r"\boxed{(-\infty, 0] \cup (1, \infty)}", r"(-\infty,0]\cup(1,\infty)"),
        (r"\boxed{\frac{\sqrt{3}}{3}}", r"\frac{1}{\sqrt{3}}"),  # symbolic, via math-verify
        (r"\boxed{\sqrt{3}/3}", r"\frac{\sqrt{3}}{3}"),
        (r"\boxed{(1,2]}", r"\left( 1, 2 \right]"),
        (r"\boxed{[2,5]}", r"2 \le x \le 5"),  # interval vs relation, via math-verify
        (r"\boxed{\{1, 2\}}", r"\{2, 1\}"),  # set order does not matter
        (r"\boxed{x^2+2x+1}", "(x+1)^2"),
        (r"\boxed 5", "5"),
        (r"\boxed{5}", r"\boxed{5}"),  # a boxed ground truth is unboxed
    ],
)
def test_grade_true(response, truth):
    assert grade(response, truth) is True


@pytest.mark.parametrize(
    "response, truth",
    [
        ("The answer is 5.", "5"),  # no box
        (r"\boxed{4}", "5"),
        (r"\boxed{5} wait, actually \boxed{6}", "5"),  # last box wins
        (r"\boxed{0.3333}", r"\frac{1}{3}"),  # two plain numbers: the numeric check is final
        (r"\boxed{(1,2)}", "[1,2]"),  # open vs closed interval
        (r"\boxed{(2,1)}", "(1,2)"),  # tuple order matters
        (r"\boxed{}", "5"),
        (r"\boxed{\frac{1}{", "0.5"),  # unclosed
        (r"\boxed{5}", ""),
    ],
)
def test_grade_false(response, truth):
    assert grade(response, truth) is False


def test_grade_survives_math_verify_garbage():
    assert grade(r"\boxed{\frac{}{}\sqrt{{{}", r"\int_0^1 x \, dx") is False
    assert grade(r"\boxed{\left(}", r"\right)") is False


def test_grade_batch():
    assert grade_batch([r"\boxed{1}", r"\boxed{2}", "none"], ["1", "3", "1"]) == [True, False, False]
    with pytest.raises(ValueError, match="2 responses but 1 ground truths"):
        grade_batch(["a", "b"], ["1"])


def test_grade_off_main_thread_uses_math_verify_without_signals():
    # math-verify's SIGALRM timeouts fail off the main thread; grading there must still work.
    results: list[bool] = []
    cases = [(r"\boxed{\frac{\sqrt{3}}{3}}", r"\frac{1}{\sqrt{3}}"), (r"\boxed{[2,5]}", r"2 \le x \le 5")]

    def work():
        results.extend(grade(r, t) for r, t in cases)
        results.append(grade(r"\boxed{(1,2)}", "[1,2]"))

    t = threading.Thread(target=work)
    t.start()
    t.join()
    assert results == [True, True, False]


# ---------------------------------------------------------------------------------------------------------
# real benchmarks: every ground truth, boxed, grades True against itself
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["aime24", "amc23", "math500"])
def test_benchmark_ground_truths_grade_true(name):
    path = BENCHMARKS / f"{name}.parquet"
    if not path.exists():
        pytest.skip(f"{path} not present (shared benchmark data is optional)")
    import pyarrow.parquet as pq

    rows = pq.read_table(path).to_pylist()
    truths = [r["reward_model"]["ground_truth"] for r in rows]
    assert len(truths) == {"aime24": 30, "amc23": 83, "math500": 500}[name]
    failed = [(i, gt) for i, gt in enumerate(truths) if not grade(f"So the answer is $\\boxed{{{gt}}}$.", gt)]
    assert failed == [], f"{name}: ground truths that do not grade against themselves: {failed}"
    # The math-verify fallback alone also accepts every ground truth (it can parse all of them).
    mv_failed = [(i, gt) for i, gt in enumerate(truths) if not _math_verify_equal(gt, gt)]
    assert mv_failed == [], f"{name}: math-verify cannot match these ground truths to themselves: {mv_failed}"
    if name in ("aime24", "amc23"):  # integer answers, e.g. "142.0", graded against a bare integer
        assert all(grade(f"\\boxed{{{int(float(gt))}}}", gt) for gt in truths)
