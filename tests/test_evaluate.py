"""opd.evaluate, the one evaluator (training, diagnose, lab, demo): avg@n / pass@n from the graded samples,
accuracy per group from the rows' metadata, seeded sampling, and the lab's thin wrapper agreeing with it."""

from __future__ import annotations

import pytest
import torch

from opd.data import PromptExample, PromptSet, load_prompts
from opd.evaluate import evaluate_accuracy, sample_responses
from opd.lab import prompt_rows
from opd.lab.evaluate import evaluate_model
from opd.models import load_model, load_tokenizer


@pytest.fixture(scope="module")
def lab_student():
    return load_model("lab:student"), load_tokenizer("lab:student")


def test_accuracy_and_groups_follow_the_graded_samples(lab_student):
    model, tok = lab_student
    prompts = load_prompts("lab:test", tok, limit=12, seed=0)
    assert {e.meta["difficulty"] for e in prompts.examples} == {"easy", "hard"}  # kept from the rows
    res = evaluate_accuracy(
        model, tok, prompts, temperature=1.0, n=3, max_new_tokens=64, progress=False, return_samples=True
    )
    assert res["n"] == 3 and res["num_prompts"] == 12 and len(res["samples"]) == 36
    correct = [s["correct"] for s in res["samples"]]  # prompt-major: prompt p, sample g at p * 3 + g
    per_prompt = [sum(correct[3 * p : 3 * p + 3]) / 3 for p in range(12)]
    assert res["per_prompt"] == per_prompt
    assert res["accuracy"] == pytest.approx(sum(per_prompt) / 12)
    assert res["pass@n"] == pytest.approx(sum(any(correct[3 * p : 3 * p + 3]) for p in range(12)) / 12)
    for d in ("easy", "hard"):
        accs = [a for e, a in zip(prompts.examples, per_prompt) if e.meta["difficulty"] == d]
        assert res["by_difficulty"][d] == pytest.approx(sum(accs) / len(accs))
    assert 0 < res["accuracy"] <= res["pass@n"] <= 1  # the lab student solves some of these
    assert res["generated_tokens"] == pytest.approx(res["response_length_mean"] * 36)
    # seeded: the same numbers whatever the global RNG state; greedy decodes once per prompt
    torch.manual_seed(123)
    again = evaluate_accuracy(model, tok, prompts, temperature=1.0, n=3, max_new_tokens=64, progress=False)
    assert again["per_prompt"] == res["per_prompt"]
    greedy = evaluate_accuracy(model, tok, prompts, n=3, max_new_tokens=64, progress=False)
    assert greedy["n"] == 1 and len(greedy["per_prompt"]) == 12


def test_lab_wrapper_is_the_same_evaluator(lab_student):
    model, tok = lab_student
    rows = prompt_rows("test")[195:207]  # easy and hard rows
    lab = evaluate_model(model, tok, rows, max_new_tokens=64, return_responses=True)
    prompts = load_prompts("lab:test", tok)
    subset = PromptSet([e for e in prompts.examples if 195 <= e.meta["row"] < 207], "lab:test")
    res = evaluate_accuracy(model, tok, subset, max_new_tokens=64, progress=False)
    assert lab["accuracy"] == res["accuracy"] and lab["by_difficulty"] == res["by_difficulty"]
    assert lab["n"] == 12 and set(lab["by_n_ops"]) == {str(r["n_ops"]) for r in rows}
    assert len(lab["responses"]) == 12 and sum(lab["correct"]) / 12 == lab["accuracy"]


def test_sample_responses_splits_calls_and_seeds_each(lab_student):
    model, tok = lab_student
    ids = [tok.encode(f"What is {i} + 1?") for i in range(5)]
    kw = dict(n=2, temperature=1.0, max_new_tokens=8, progress=False, seed=7)
    split = sample_responses(model, tok, ids, batch_size=4, **kw)  # calls of 2 prompts x 2 samples
    assert len(split.responses) == 10 and all(1 <= len(r) <= 8 for r in split.responses)
    # the call that starts at prompt 2 is seeded with seed + 2, whatever ran before it
    alone = sample_responses(model, tok, ids[2:4], batch_size=4, **(kw | {"seed": 9}))
    assert alone.responses == split.responses[4:8] and alone.truncated == split.truncated[4:8]
    assert split.generated_tokens == sum(len(r) for r in split.responses)
    assert len(split.truncated) == 10


def test_prompts_without_answers_are_a_clear_error(lab_student):
    model, tok = lab_student
    ex = PromptExample(text="hi", rendered="hi", input_ids=tok.encode("hi"))
    with pytest.raises(ValueError, match="carry no answers: set answer_field"):
        evaluate_accuracy(model, tok, PromptSet([ex], "p.jsonl"), progress=False)
