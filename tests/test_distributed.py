"""Data-parallel training with real processes: ``torchrun --nproc_per_node 2`` (gloo on CPU) gives the
weights and the metrics of a one-process run with the same global batch, and only rank 0 writes — for
OPD and for every baseline (sft, kd, gkd, grpo) and the cold start."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ACCELERATE_CONFIGS, REPO, accelerate_launch
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


# --------------------------------------------------------------------------- the baselines and the cold start

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def _one_and_two(tmp_path, method: str, args: list[str], final: str = "final"):
    """Run ``opd METHOD ARGS`` in one process and in two; return both run directories after checking
    that the run moved the weights and both ended with the same ones (max |Δw| ≤ 1e-5)."""
    one, two = tmp_path / "one", tmp_path / "two"
    _run([sys.executable, "-m", "opd.cli", method, *args, f"output_dir={one}"])
    proc = _run([*TORCHRUN, "-m", "opd.cli", method, *args, f"output_dir={two}"])
    assert proc.stdout.count("opd: done") == 1  # rank 0 reports
    a = load_file(str(one / final / "model.safetensors"))
    b = load_file(str(two / final / "model.safetensors"))
    start = _start_weights(args)
    assert max(float((a[k] - start[k]).abs().max()) for k in a) > 1e-4  # the run moved the weights
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5, msg=k)
    return one, two


def _start_weights(args: list[str]) -> dict:
    from opd.lab import resolve

    student = next(a.split("=", 1)[1] for a in args if a.startswith("student="))
    directory = resolve(student).directory if student.startswith("lab:") else Path(student)
    return load_file(str(directory / "model.safetensors"))


def _same_rows(one, two, keys, rel=1e-4):
    r1, r2 = read_metrics(one / "metrics.jsonl"), read_metrics(two / "metrics.jsonl")
    assert [r["step"] for r in r2] == [r["step"] for r in r1]  # one writer: each step once
    for x, y in zip(r1, r2):
        for key in keys:
            assert y[key] == pytest.approx(x[key], rel=rel, abs=1e-6), (y["step"], key)


COMMON = ["steps=3", "weight_decay=0", "progress=false", "threads=1", "seed=0"]


def test_sft_two_processes_equal_one(tmp_path):
    """Stage 1's generate calls are dealt out to the two processes and gathered in order (the same
    teacher data as one process), stage 2 trains on the shares of each batch."""
    args = [
        "student=lab:student",
        "teacher=lab:teacher-a-plus",
        "prompts=lab:train",
        "num_prompts=8",
        "generation_batch_size=4",  # two generate calls: one per process
        "max_new_tokens=64",
        "batch_size=4",
        "micro_batch_size=1",
        "warmup_steps=1",
        "lr=3e-4",
        "save_every=2",
        *COMMON,
    ]
    one, two = _one_and_two(tmp_path, "sft", args)
    assert (one / "teacher_data.jsonl").read_text() == (two / "teacher_data.jsonl").read_text()
    _same_rows(
        one, two, ["loss/nll", "grad_norm", "cost/student_loss_tokens", "cost/teacher_generated_tokens"]
    )
    assert sorted(p.name for p in (two / "checkpoints").iterdir()) == ["step-000002"]


def test_kd_two_processes_equal_one(tiny_pair, tmp_path):
    student, teacher, prompts = tiny_pair
    args = [f"student={student}", f"teacher={teacher}", f"prompts={prompts}", "response_field=answer"]
    args += ["batch_size=6", "micro_batch_size=2", "lr=3e-3", *COMMON]
    one, two = _one_and_two(tmp_path, "kd", args)
    _same_rows(one, two, ["loss/kd", "kl/forward", "grad_norm", "cost/student_loss_tokens"])


def test_gkd_two_processes_equal_one(tiny_pair, tmp_path):
    """λ = 0.5 with seed 0 mixes fixed responses (step 1) and the student's own samples (steps 2, 3)."""
    student, teacher, prompts = tiny_pair
    args = [f"student={student}", f"teacher={teacher}", f"prompts={prompts}", "response_field=answer"]
    args += ["lmbda=0.5", "prompts_per_step=4", "rollouts_per_prompt=2", "max_new_tokens=8"]
    args += ["micro_batch_size=3", "lr=1e-3", "rollout_seeding=per_prompt", *COMMON]
    one, two = _one_and_two(tmp_path, "gkd", args)
    _same_rows(one, two, ["loss/gkd", "data/on_policy", "response/length_mean", "cost/student_loss_tokens"])
    assert [r["data/on_policy"] for r in read_metrics(two / "metrics.jsonl")] == [0, 1, 1]


def test_grpo_two_processes_equal_one(tmp_path):
    """Each process samples and normalises whole groups (2 prompts x 4 responses each)."""
    args = ["student=lab:student", "prompts=lab:train", "prompts_per_step=4", "rollouts_per_prompt=4"]
    args += ["max_new_tokens=48", "micro_batch_size=3", "lr=3e-4", "rollout_seeding=per_prompt", *COMMON]
    one, two = _one_and_two(tmp_path, "grpo", args)
    _same_rows(one, two, ["loss/pg", "reward/mean", "reward/std", "adv/abs_mean", "cost/student_loss_tokens"])
    assert any(r["adv/abs_mean"] > 0 for r in read_metrics(one / "metrics.jsonl"))  # something to learn


def test_coldstart_two_processes_equal_one(tmp_path):
    """Both stages in one process group: the SFT stage's final model and then the OPD stage's."""
    args = ["student=lab:student", "teacher=lab:teacher-b-plus", "prompts=lab:train-hard"]
    args += ["sft_num_prompts=8", "sft_generation_batch_size=4", "sft_steps=2", "sft_batch_size=4"]
    args += ["sft_warmup_steps=1", "sft_lr=3e-4", "prompts_per_step=2", "rollouts_per_prompt=2"]
    args += ["max_new_tokens=48", "micro_batch_size=2", "lr=3e-4", "rollout_seeding=per_prompt", *COMMON]
    args = [a for a in args if a != "steps=3"] + ["steps=2"]
    one, two = _one_and_two(tmp_path, "coldstart", args, final="opd/final")
    for stage in ("sft", "opd"):
        assert [r["step"] for r in read_metrics(two / stage / "metrics.jsonl")] == [1, 2]
    a = load_file(str(one / "sft" / "final" / "model.safetensors"))
    b = load_file(str(two / "sft" / "final" / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5, msg=k)
    assert json.loads((two / "summary.json").read_text())["steps_done"] == 2


def test_gkd_two_process_resume_equals_an_uninterrupted_two_process_run(tiny_pair, tmp_path):
    """A baseline resumed by the same two processes (checkpoint read by both, rank 0's metrics cut
    after it) ends with the weights of an uninterrupted two-process run."""
    student, teacher, prompts = tiny_pair
    args = [f"student={student}", f"teacher={teacher}", f"prompts={prompts}", "response_field=answer"]
    args += ["lmbda=0.5", "prompts_per_step=4", "rollouts_per_prompt=2", "max_new_tokens=8"]
    args += ["micro_batch_size=3", "lr=1e-3", "rollout_seeding=per_prompt", "save_every=1", *COMMON]
    full, part = tmp_path / "full", tmp_path / "part"
    _run([*TORCHRUN, "-m", "opd.cli", "gkd", *args, f"output_dir={full}"])
    _run([*TORCHRUN, "-m", "opd.cli", "gkd", *args, f"output_dir={part}", "steps=2"])
    _run([*TORCHRUN, "-m", "opd.cli", "gkd", *args, f"output_dir={part}", "resume=true"])
    a = load_file(str(full / "final" / "model.safetensors"))
    b = load_file(str(part / "final" / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
    assert [r["step"] for r in read_metrics(part / "metrics.jsonl")] == [1, 2, 3]


@pytest.mark.parametrize("var", ["ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"])
def test_an_accelerate_sharding_config_is_refused(var, monkeypatch):
    from opd.config import OPDConfig
    from opd.errors import ConfigError
    from opd.runtime import Runtime

    monkeypatch.setenv(var, "true")
    with pytest.raises(ConfigError, match="MULTI_GPU"):
        Runtime.from_config(OPDConfig(device="cpu"))


# ------------------------------------------------------------------ accelerate launch (the README's command)


def test_accelerate_launch_with_the_ddp_config_equals_one_process(tiny_pair, tmp_path):
    """The docs' data-parallel config (distributed_type: MULTI_GPU), launched on this CPU: accelerate starts
    2 processes through torchrun, they join a gloo group, and the run ends with the weights of one process."""
    one, two = tmp_path / "one", tmp_path / "two"
    _run([sys.executable, "-m", "opd.cli", *_args(tiny_pair, one)])
    proc = _run([*accelerate_launch("ddp.yaml"), "-m", "opd.cli", *_args(tiny_pair, two)])
    assert "device cpu, 2 processes (rank 0)" in proc.stderr
    assert proc.stdout.count("opd: done") == 1  # rank 0 reports
    a, b = (load_file(str(run / "final" / "model.safetensors")) for run in (one, two))
    start = load_file(str(tiny_pair[0] / "model.safetensors"))
    assert max(float((a[k] - start[k]).abs().max()) for k in a) > 1e-4  # the run moved the weights
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5, msg=k)
    assert [r["step"] for r in read_metrics(two / "metrics.jsonl")] == [1, 2, 3]  # one writer


def test_the_docs_show_the_shipped_accelerate_configs():
    """docs/scaling.md quotes configs/accelerate/*.yaml verbatim, so the tested files are the documented ones."""
    docs = (REPO / "docs" / "scaling.md").read_text()
    configs = sorted(ACCELERATE_CONFIGS.glob("*.yaml"))
    assert [c.name for c in configs] == ["ddp.yaml", "fsdp.yaml"]
    for config in configs:
        assert f"```yaml\n{config.read_text()}```" in docs, (
            f"{config.name} differs from its copy in docs/scaling.md"
        )


def test_a_single_cpu_process_from_accelerate_launch_is_warned_about(monkeypatch, caplog):
    """``accelerate launch --cpu`` (or a MULTI_CPU config) starts one process with ACCELERATE_USE_CPU and no
    WORLD_SIZE: the run goes on in one process, with a warning that says how to get N."""
    from opd.config import OPDConfig
    from opd.runtime import Runtime

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    with caplog.at_level("WARNING", logger="opd"):
        assert Runtime.from_config(OPDConfig(device="cpu")).world_size == 1
    assert "drop --cpu" in caplog.text
    caplog.clear()
    monkeypatch.delenv("ACCELERATE_USE_CPU")
    Runtime.from_config(OPDConfig(device="cpu"))  # a plain single process: no warning
    assert "accelerate" not in caplog.text


def test_python_dash_m_opd_is_the_opd_command():
    """``-m opd`` (the issue's ``accelerate launch -m opd train ...``) runs the same CLI as ``-m opd.cli``."""
    a = subprocess.run([sys.executable, "-m", "opd", "train", "--help"], capture_output=True, text=True)
    b = subprocess.run([sys.executable, "-m", "opd.cli", "train", "--help"], capture_output=True, text=True)
    assert a.returncode == 0 and a.stdout == b.stdout and a.stdout.startswith("usage: opd train")
