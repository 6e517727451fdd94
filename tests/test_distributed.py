"""Data-parallel training with real processes: ``torchrun --nproc_per_node 2`` (gloo on CPU) gives the
weights and the metrics of a one-process run with the same global batch, and only rank 0 writes."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from opd.models import load_model, load_tokenizer
from opd.rollout import make_backend
from opd.tracking import read_metrics


def _args(tiny_pair, out):
    student, teacher, prompts = tiny_pair
    return [
        "train",
        f"student={student}",
        f"teacher={teacher}",
        f"prompts={prompts}",
        f"output_dir={out}",
        "steps=3",
        "prompts_per_step=4",
        "rollouts_per_prompt=2",
        "max_new_tokens=8",
        "micro_batch_size=3",
        "lr=1e-3",
        "weight_decay=0",
        "progress=false",
        "alerts=false",
        "rollout_seeding=per_prompt",
        "threads=1",
        "save_every=2",
    ]


def _run(cmd):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_two_processes_equal_one_process(tiny_pair, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    _run([sys.executable, "-m", "opd.cli", *_args(tiny_pair, one)])
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc = _run([*torchrun, "-m", "opd.cli", *_args(tiny_pair, two)])
    assert proc.stdout.count("opd: done") == 1  # rank 0 reports
    a, b = (
        load_file(str(one / "final" / "model.safetensors")),
        load_file(str(two / "final" / "model.safetensors")),
    )
    start = load_file(str(tiny_pair[0] / "model.safetensors"))
    assert max(float((a[k] - start[k]).abs().max()) for k in a) > 1e-4  # the run moved the weights
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5)
    r1, r2 = read_metrics(one / "metrics.jsonl"), read_metrics(two / "metrics.jsonl")
    assert [r["step"] for r in r2] == [1, 2, 3]  # one writer: each step once
    for x, y in zip(r1, r2):
        for key in ("loss/pg", "kl/sampled", "reward/mean", "overlap/ratio"):  # token means
            assert y[key] == pytest.approx(x[key], rel=1e-4, abs=1e-6), key
        assert y["cost/student_loss_tokens"] == x["cost/student_loss_tokens"]  # global counts
    assert sorted(p.name for p in (two / "checkpoints").iterdir()) == ["step-000002"]
    assert json.loads((two / "summary.json").read_text())["steps_done"] == 3


def test_per_prompt_seeding_does_not_depend_on_the_batch(tiny_pair):
    student = load_model(str(tiny_pair[0]))
    tok = load_tokenizer(str(tiny_pair[0]))
    prompts = [tok.encode(t) for t in ("What is 2 + 3?", "a", "a longer prompt here")]
    kw = dict(n=2, max_new_tokens=6, temperature=1.0, top_p=1.0, top_k=0, seed=None)
    whole = make_backend("hf", student, tok).generate(prompts, prompt_seeds=[11, 12, 13], **kw)
    alone = make_backend("hf", student, tok).generate(prompts[1:2], prompt_seeds=[12], **kw)
    resp = whole.input_ids_B_T[2:4, whole.prompt_len :]
    resp_alone = alone.input_ids_B_T[:, alone.prompt_len :]
    width = int(alone.response_mask_B_T.sum(-1).max())
    assert torch.equal(resp[:, :width], resp_alone[:, :width])
    assert torch.equal(whole.response_mask_B_T[2:4].sum(-1), alone.response_mask_B_T.sum(-1))


def test_two_process_resume_equals_an_uninterrupted_two_process_run(tiny_pair, tmp_path):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    full, part = tmp_path / "full", tmp_path / "part"
    _run([*torchrun, "-m", "opd.cli", *_args(tiny_pair, full)])
    _run([*torchrun, "-m", "opd.cli", *_args(tiny_pair, part)[:-1], "save_every=1", "steps=2"])
    _run([*torchrun, "-m", "opd.cli", *_args(tiny_pair, part)[:-1], "save_every=1", "resume=true"])
    a, b = (
        load_file(str(full / "final" / "model.safetensors")),
        load_file(str(part / "final" / "model.safetensors")),
    )
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    assert [r["step"] for r in read_metrics(part / "metrics.jsonl")] == [1, 2, 3]
