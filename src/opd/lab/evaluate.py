"""Accuracy of a lab model on lab prompt rows: a thin use of :mod:`opd.evaluate` (the one evaluator).

The prompt is rendered exactly as at OPD time (the tokenizer's chat template with the generation
prompt), generation stops at the tokenizer's stop tokens (``<|im_end|>``), and answers are graded with
:func:`opd.grading.grade`; results per ``difficulty`` and ``n_ops`` come from the rows' metadata.
"""

from __future__ import annotations

import time

from opd.data import PromptExample, PromptSet
from opd.evaluate import evaluate_accuracy, sample_responses


def _prompt_set(tokenizer, prompts: list[str], rows: list[dict] | None = None) -> PromptSet:
    examples = []
    for i, text in enumerate(prompts):
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
        )
        row = rows[i] if rows is not None else {}
        meta = {"row": i, **{k: row[k] for k in ("difficulty", "n_ops") if k in row}}
        examples.append(
            PromptExample(
                text=text,
                rendered=rendered,
                input_ids=tokenizer.encode(rendered, add_special_tokens=False),
                answer=row.get("answer"),
                meta=meta,
            )
        )
    return PromptSet(examples, source="lab rows")


def generate_responses(
    model,
    tokenizer,
    prompts: list[str],
    *,
    temperature: float = 0.0,
    max_new_tokens: int = 96,
    batch_size: int = 128,
    seed: int = 0,
) -> list[str]:
    """One response per prompt (greedy when ``temperature == 0``), in the order of ``prompts``."""
    ps = _prompt_set(tokenizer, prompts)
    gens = sample_responses(
        model,
        tokenizer,
        [e.input_ids for e in ps.examples],
        temperature=temperature,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        seed=seed,
        progress=False,
    )
    return [tokenizer.decode(ids, skip_special_tokens=True) for ids in gens.responses]


def evaluate_model(
    model,
    tokenizer,
    rows: list[dict],
    *,
    temperature: float = 0.0,
    max_new_tokens: int = 96,
    batch_size: int = 128,
    seed: int = 0,
    return_responses: bool = False,
) -> dict:
    """Accuracy of ``model`` on lab ``rows`` (each with ``prompt`` and ``answer``), overall and per group.

    Returns ``{"accuracy", "n", "by_difficulty", "by_n_ops", "seconds"}`` (plus ``"responses"`` and
    ``"correct"`` when ``return_responses``); greedy when ``temperature == 0``, else one sample per row.
    """
    if not rows:
        raise ValueError("evaluate_model: rows is empty; pass e.g. opd.lab.prompt_rows('test')")
    t0 = time.perf_counter()
    res = evaluate_accuracy(
        model,
        tokenizer,
        _prompt_set(tokenizer, [r["prompt"] for r in rows], rows),
        temperature=temperature,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        seed=seed,
        progress=False,
        return_samples=return_responses,
        group_by=("difficulty", "n_ops"),
    )
    result = {
        "accuracy": res["accuracy"],
        "n": res["num_prompts"],
        "by_difficulty": res.get("by_difficulty", {}),
        "by_n_ops": res.get("by_n_ops", {}),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    if return_responses:
        result["responses"] = [s["response"] for s in res["samples"]]
        result["correct"] = [s["correct"] for s in res["samples"]]
    return result
