"""Accuracy evaluation of a model on prompts with answers (the start of the evaluation suite).

``evaluate_accuracy`` samples ``n`` responses per prompt (greedy when ``temperature == 0``) with the
same rollout backend as training, grades each with :func:`opd.grading.grade` (last ``\\boxed{}``,
normalised match, math-verify fallback) and reports avg@n accuracy and pass@n.
"""

from __future__ import annotations

from typing import Any

import torch


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
) -> dict[str, Any]:
    """avg@n accuracy, pass@n and mean response length of ``model`` on ``prompt_set`` (needs answers)."""
    from opd.grading import grade
    from opd.rollout import HFGenerateBackend, stop_token_ids
    from opd.tracking import progress as bar

    examples = [e for e in prompt_set.examples if e.answer is not None]
    if not examples:
        raise ValueError(
            f"evaluation prompts {prompt_set.source!r} carry no answers: set answer_field to the ground-truth field"
        )
    if temperature == 0:
        n = 1
    backend = HFGenerateBackend(model, tokenizer, stop_token_ids(tokenizer), batch_size=batch_size)
    correct = torch.zeros(len(examples), n)
    lengths, truncated, samples = [], [], []
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    with bar(total=len(examples), desc="eval", enabled=progress, unit="prompt") as pbar:
        for lo in range(0, len(examples), batch_size):
            chunk = examples[lo : lo + batch_size]
            s = None if gen is None else int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
            batch = backend.generate(
                [e.input_ids for e in chunk],
                n=n,
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                top_p=top_p,
                top_k=0,
                seed=s,
            )
            for row in range(batch.input_ids_B_T.shape[0]):
                p, g = divmod(row, n)
                resp_ids = batch.input_ids_B_T[row][batch.response_mask_B_T[row] > 0].tolist()
                text = tokenizer.decode(resp_ids, skip_special_tokens=True)
                ok = grade(text, chunk[p].answer)
                correct[lo + p, g] = float(ok)
                lengths.append(len(resp_ids))
                truncated.append(bool(batch.truncated_B[row]))
                if return_samples:
                    samples.append(
                        {"prompt": chunk[p].text, "response": text, "answer": chunk[p].answer, "correct": ok}
                    )
            pbar.update(len(chunk))
    res = {
        "accuracy": float(correct.mean()),
        "pass@n": float(correct.max(1).values.mean()),
        "n": n,
        "num_prompts": len(examples),
        "response_length_mean": sum(lengths) / max(1, len(lengths)),
        "truncated_frac": sum(truncated) / max(1, len(truncated)),
        "per_prompt": correct.mean(1).tolist(),
    }
    if return_samples:
        res["samples"] = samples
    return res
