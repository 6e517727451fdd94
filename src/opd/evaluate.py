"""Accuracy evaluation: the one evaluator used by training, ``opd diagnose``, the lab and the demo.

:func:`evaluate_accuracy` samples ``n`` responses per prompt of a :class:`~opd.data.PromptSet` (greedy,
one decode per prompt, when ``temperature == 0``) with the same rollout backend as training, grades each
with :func:`opd.grading.grade` (last ``\\boxed{}``, normalised match, math-verify fallback) and reports
avg@n accuracy, pass@n, response lengths, the truncated fraction and, for every ``group_by`` key present
in the prompts' row metadata (``PromptExample.meta``, e.g. ``difficulty``), the accuracy per group.

The two parts it is built from are public for callers that grade something other than a prompt set
(``opd diagnose`` grades teacher and student completions of the student's own prefixes):

- :func:`sample_responses` — ``n`` responses per prompt in ``generate`` calls of about ``batch_size``
  rows; the call starting at prompt ``i`` is seeded with ``seed + i``, so results do not depend on what
  else runs in the process;
- :func:`grade_responses` — decode (special tokens skipped) and grade each response against its answer.

Accuracies are computed in Python floats: avg@n of a prompt is ``correct / n``, the accuracy the mean
of those over prompts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from opd.grading import grade
from opd.rollout import make_backend, stop_token_ids
from opd.tracking import progress as progress_bar

__all__ = ["Generations", "evaluate_accuracy", "grade_responses", "sample_responses"]


@dataclass
class Generations:
    """``n`` responses per prompt, prompt-major (row ``p * n + g``), response ids without the prompt."""

    responses: list[list[int]]
    truncated: list[bool]
    """True where no stop token came within ``max_new_tokens``."""

    @property
    def generated_tokens(self) -> int:
        return sum(len(r) for r in self.responses)


def sample_responses(
    model,
    tokenizer,
    prompt_ids: Sequence[list[int]],
    *,
    n: int = 1,
    temperature: float = 0.0,
    top_p: float = 1.0,
    max_new_tokens: int = 256,
    batch_size: int = 64,
    seed: int | None = 0,
    stop_ids: list[int] | None = None,
    vocab_limit: int | None = None,
    progress: bool = True,
    desc: str = "eval",
) -> Generations:
    """``n`` responses per prompt (one decode copied ``n`` times when greedy) from ``model``.

    Generation stops at ``stop_ids`` (default: the tokenizer's, :func:`opd.rollout.stop_token_ids`) and
    never samples ids ``>= vocab_limit``. Calls hold ``batch_size // n`` prompts (all ``batch_size``
    when greedy); the call starting at prompt ``i`` uses seed ``seed + i`` (``None``: unseeded).
    """
    stops = stop_token_ids(tokenizer) if stop_ids is None else stop_ids
    backend = make_backend(
        "hf", model, tokenizer, stop_ids=stops, batch_size=batch_size, vocab_limit=vocab_limit
    )
    per_call = max(1, batch_size // (1 if temperature == 0 else n))
    out = Generations([], [])
    with progress_bar(total=len(prompt_ids) * n, desc=desc, enabled=progress, unit="seq") as bar:
        for lo in range(0, len(prompt_ids), per_call):
            chunk = list(prompt_ids[lo : lo + per_call])
            batch = backend.generate(
                chunk,
                n=n,
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                top_p=top_p,
                top_k=0,
                seed=None if seed is None else seed + lo,
            )
            for row in range(batch.input_ids_B_T.shape[0]):
                out.responses.append(batch.input_ids_B_T[row][batch.response_mask_B_T[row] > 0].tolist())
                out.truncated.append(bool(batch.truncated_B[row]))
            bar.update(len(chunk) * n)
    return out


def grade_responses(
    tokenizer, responses: Sequence[list[int]], answers: Sequence[str | None]
) -> list[bool | None]:
    """Grade each response (ids, decoded without special tokens) against its answer; None where no answer."""
    return [
        None if ans is None else bool(grade(tokenizer.decode(ids, skip_special_tokens=True), ans))
        for ids, ans in zip(responses, answers, strict=True)
    ]


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else 0.0


def evaluate_accuracy(
    model,
    tokenizer,
    prompt_set,
    *,
    temperature: float = 0.0,
    top_p: float = 1.0,
    n: int = 1,
    max_new_tokens: int = 256,
    batch_size: int = 64,
    seed: int | None = 0,
    progress: bool = True,
    return_samples: bool = False,
    group_by: Sequence[str] = ("difficulty",),
    stop_ids: list[int] | None = None,
    vocab_limit: int | None = None,
    desc: str = "eval",
) -> dict[str, Any]:
    """avg@n accuracy, pass@n and response statistics of ``model`` on the prompts of ``prompt_set`` that
    carry an answer (at least one must).

    Returns ``accuracy`` (avg@n), ``pass@n``, ``n`` (1 when greedy), ``num_prompts``,
    ``response_length_mean``, ``truncated_frac``, ``generated_tokens``, ``per_prompt`` (avg@n of each
    graded prompt, in order), ``by_<key>`` (``{group: accuracy}``, sorted) for each ``group_by`` key that
    some prompt's ``meta`` holds, and ``samples`` (prompt, response, answer, correct) when
    ``return_samples``. ``stop_ids`` / ``vocab_limit``: see :func:`sample_responses`.
    """
    examples = [e for e in prompt_set.examples if e.answer is not None]
    if not examples:
        raise ValueError(
            f"evaluation prompts {prompt_set.source!r} carry no answers: set answer_field to the ground-truth field"
        )
    if temperature == 0:
        n = 1
    gens = sample_responses(
        model,
        tokenizer,
        [e.input_ids for e in examples],
        n=n,
        temperature=temperature,
        top_p=top_p,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        seed=seed,
        stop_ids=stop_ids,
        vocab_limit=vocab_limit,
        progress=progress,
        desc=desc,
    )
    correct = grade_responses(tokenizer, gens.responses, [e.answer for e in examples for _ in range(n)])
    per_prompt = [sum(correct[p * n : (p + 1) * n]) / n for p in range(len(examples))]
    res: dict[str, Any] = {
        "accuracy": _mean(per_prompt),
        "pass@n": _mean([float(any(correct[p * n : (p + 1) * n])) for p in range(len(examples))]),
        "n": n,
        "num_prompts": len(examples),
        "response_length_mean": _mean([len(r) for r in gens.responses]),
        "truncated_frac": _mean(gens.truncated),
        "generated_tokens": gens.generated_tokens,
        "per_prompt": per_prompt,
    }
    for key in group_by:
        groups: dict[str, list[float]] = {}
        for e, acc in zip(examples, per_prompt, strict=True):
            if key in e.meta:
                groups.setdefault(str(e.meta[key]), []).append(acc)
        if groups:
            res[f"by_{key}"] = {g: _mean(v) for g, v in sorted(groups.items())}
    if return_samples:
        res["samples"] = [
            {
                "prompt": examples[row // n].text,
                "response": tokenizer.decode(ids, skip_special_tokens=True),
                "answer": examples[row // n].answer,
                "correct": correct[row],
            }
            for row, ids in enumerate(gens.responses)
        ]
    return res
