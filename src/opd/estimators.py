"""Accuracy estimators over sampled responses: avg@k, the unbiased pass@k, standard errors, and the
summary of per-sample prediction records that ``opd eval``, ``opd grade`` and ``opd compare`` share.

n samples per prompt, c of them correct, P prompts:

- ``avg@k`` (k = n): the mean over prompts of ``c / n``; its standard error is the sample standard
  deviation of the per-prompt ``c / n`` over prompts (ddof 1) divided by ``sqrt(P)``;
- ``pass@k``: the mean over prompts of the unbiased estimator of Chen et al. (2021),
  ``1 - C(n - c, k) / C(n, k)``; reported at k = n and at every power of two up to n in ``pass_at``;
- ``overall`` pools every prompt of every benchmark (each prompt weighs the same).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

from opd.grading import extract_boxed, grade
from opd.tracking import progress as progress_bar

# ---------------------------------------------------------------------------------------------------------
# estimators
# ---------------------------------------------------------------------------------------------------------


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one prompt with ``c`` correct among ``n`` samples (Chen et al., 2021):
    ``1 - C(n - c, k) / C(n, k)``, the chance that ``k`` of the ``n`` drawn without replacement include a
    correct one. Exact integer binomials, one division."""
    if not 0 <= c <= n:
        raise ValueError(f"pass_at_k: c={c} correct out of n={n} samples; need 0 <= c <= n")
    if not 1 <= k <= n:
        raise ValueError(f"pass_at_k: k={k} with n={n} samples; need 1 <= k <= n")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def mean_stderr(xs: Sequence[float]) -> tuple[float, float | None]:
    """Mean and standard error (sample std, ddof 1, over ``sqrt(len)``); the error is None below 2 values."""
    if not xs:
        raise ValueError("mean_stderr: no values")
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return m, None
    var = sum((x - m) ** 2 for x in xs) / (len(xs) - 1)
    return m, math.sqrt(var / len(xs))


def _powers_of_two(n: int) -> list[int]:
    ks, k = [], 1
    while k < n:
        ks.append(k)
        k *= 2
    return [*ks, n]


def summarize(records: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Accuracy and response statistics of prediction records (keys of :data:`PREDICTION_KEYS`).

    Records are grouped into prompts by ``(model, benchmark, id)``; every prompt must have the same
    number of samples n, which is the k of ``avg@k`` and ``pass@k`` (module docstring). Returns
    ``avg@k``, ``avg@k_stderr``, ``pass@k``, ``pass@k_stderr``, ``pass_at`` (``{k: pass@k}`` at powers of two),
    ``k``, ``n_prompts``, ``n_samples``, ``mean_length``, ``truncated_rate``, ``no_answer_rate``.
    """
    records = list(records)
    if not records:
        raise ValueError("summarize: no prediction records")
    prompts: dict[tuple, list[bool]] = {}
    for r in records:
        prompts.setdefault((r["model"], r["benchmark"], r["id"]), []).append(bool(r["correct"]))
    sizes = {len(v) for v in prompts.values()}
    if len(sizes) != 1:
        raise ValueError(
            f"predictions: prompts have different sample counts {sorted(sizes)}; avg@k and pass@k need the "
            "same n for every prompt: re-run opd eval, or remove the incomplete prompts"
        )
    n = sizes.pop()
    counts = [sum(v) for v in prompts.values()]
    avg, avg_se = mean_stderr([c / n for c in counts])
    pass_at = {str(k): mean_stderr([pass_at_k(n, c, k) for c in counts])[0] for k in _powers_of_two(n)}
    pk, pk_se = mean_stderr([pass_at_k(n, c, n) for c in counts])
    return {
        "avg@k": avg,
        "avg@k_stderr": avg_se,
        "pass@k": pk,
        "pass@k_stderr": pk_se,
        "pass_at": pass_at,
        "k": n,
        "n_prompts": len(prompts),
        "n_samples": len(records),
        "mean_length": sum(r["length"] for r in records) / len(records),
        "truncated_rate": sum(bool(r["truncated"]) for r in records) / len(records),
        "no_answer_rate": sum(not r["has_answer"] for r in records) / len(records),
    }


def metrics_from_predictions(records: Iterable[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """``{model: {"benchmarks": {name: summarize(...)}, "overall": summarize(all)}}`` of prediction records
    (models and benchmarks in the order they first appear)."""
    by_model: dict[str, dict[str, list[dict]]] = {}
    for r in records:
        by_model.setdefault(r["model"], {}).setdefault(r["benchmark"], []).append(r)
    return {
        model: {
            "benchmarks": {name: summarize(rs) for name, rs in benches.items()},
            "overall": summarize(r for rs in benches.values() for r in rs),
        }
        for model, benches in by_model.items()
    }


def regrade(records: Iterable[dict[str, Any]], *, progress: bool = True) -> list[dict[str, Any]]:
    """Copies of prediction records with ``correct`` and ``has_answer`` recomputed from ``response`` and
    ``answer`` by the current grader (:func:`opd.grading.grade`, :func:`opd.grading.extract_boxed`)."""
    records = list(records)
    out = []
    for r in progress_bar(records, desc="grade", enabled=progress, unit="resp"):
        out.append(
            {
                **r,
                "correct": bool(grade(r["response"], r["answer"])),
                "has_answer": _has_answer(r["response"]),
            }
        )
    return out


def _has_answer(response: str) -> bool:
    return extract_boxed(response) is not None
