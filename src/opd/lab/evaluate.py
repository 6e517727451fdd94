"""Fast accuracy of a lab model on lab prompt rows (batched HF ``generate``, last-``\\boxed{}`` grading).

The prompt is rendered exactly as at OPD time (the tokenizer's chat template with the generation
prompt), generation stops at the tokenizer's EOS (``<|im_end|>``), and answers are graded with
:func:`opd.grading.grade`. Rows are grouped by prompt length so left padding stays small.
"""

from __future__ import annotations

import time
from collections import defaultdict

import torch


def _grade(response: str, answer: str) -> bool:
    from opd.grading import grade

    return bool(grade(response, answer))


@torch.no_grad()
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
    ids = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False
        )
        for p in prompts
    ]
    ids = [tokenizer.encode(t, add_special_tokens=False) for t in ids]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    out: list[str] = [""] * len(ids)
    pad = tokenizer.pad_token_id
    eos = tokenizer.eos_token_id
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    for lo in range(0, len(order), batch_size):
        chunk = order[lo : lo + batch_size]
        T = max(len(ids[i]) for i in chunk)
        input_ids = torch.full((len(chunk), T), pad, dtype=torch.long)
        attention = torch.zeros((len(chunk), T), dtype=torch.long)
        for r, i in enumerate(chunk):
            input_ids[r, T - len(ids[i]) :] = torch.tensor(ids[i])
            attention[r, T - len(ids[i]) :] = 1
        kwargs = dict(do_sample=False)
        if temperature > 0:
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
            kwargs = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0)
        seqs = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention.to(device),
            max_new_tokens=max_new_tokens,
            eos_token_id=eos,
            pad_token_id=pad,
            **kwargs,
        )
        for r, i in enumerate(chunk):
            resp = seqs[r, T:].tolist()
            if eos in resp:
                resp = resp[: resp.index(eos)]
            resp = [t for t in resp if t != pad]
            out[i] = tokenizer.decode(resp, skip_special_tokens=False)
    model.train(was_training)
    return out


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
    responses = generate_responses(
        model,
        tokenizer,
        [r["prompt"] for r in rows],
        temperature=temperature,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        seed=seed,
    )
    correct = [_grade(resp, r["answer"]) for resp, r in zip(responses, rows)]
    groups: dict[str, dict] = {"by_difficulty": defaultdict(list), "by_n_ops": defaultdict(list)}
    for r, c in zip(rows, correct):
        if "difficulty" in r:
            groups["by_difficulty"][r["difficulty"]].append(c)
        if "n_ops" in r:
            groups["by_n_ops"][str(r["n_ops"])].append(c)
    result = {
        "accuracy": sum(correct) / len(correct),
        "n": len(correct),
        **{g: {k: sum(v) / len(v) for k, v in sorted(d.items())} for g, d in groups.items()},
        "seconds": round(time.perf_counter() - t0, 2),
    }
    if return_responses:
        result["responses"] = responses
        result["correct"] = correct
    return result
