"""``opd train fsdp=true``: the student sharded with FSDP2 over 2 gloo processes trains like one
unsharded process (weights and grad norms), resumes exactly, keeps its processes in lockstep when their
work differs, and refuses what it cannot run with a one-line error."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import accelerate_launch
from safetensors.torch import load_file

from opd.checkpoint import safe_torch_load
from opd.config import OPDConfig
from opd.errors import ConfigError
from opd.tracking import read_metrics

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def _args(tiny_pair, out, *extra):
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
        "micro_batch_size=3",  # 4 rows per process: micro-batches of 3 and 1
        "lr=1e-3",
        "weight_decay=0",
        "progress=false",
        "alerts=false",
        "rollout_seeding=per_prompt",
        "threads=1",
        *extra,
    ]


def _run(cmd, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _weights(run: Path) -> dict:
    return load_file(str(run / "final" / "model.safetensors"))


def _same_weights(a: dict, b: dict, atol: float) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol, msg=k)


def _same_rows(one: Path, two: Path, keys: list[str]) -> None:
    r1, r2 = read_metrics(one / "metrics.jsonl"), read_metrics(two / "metrics.jsonl")
    assert [r["step"] for r in r2] == [r["step"] for r in r1]  # rank 0 alone writes: each step once
    for x, y in zip(r1, r2):
        for key in keys:
            assert y[key] == pytest.approx(x[key], rel=1e-4, abs=1e-7), (y["step"], key)


@pytest.fixture(scope="module")
def fsdp_run(tiny_pair, tmp_path_factory):
    """A 3-step 2-process fsdp=true run (checkpoint at step 2) and its stdout."""
    two = tmp_path_factory.mktemp("fsdp") / "two"
    proc = _run([*TORCHRUN, "-m", "opd.cli", *_args(tiny_pair, two, "fsdp=true", "save_every=2")])
    return two, proc.stdout


def test_fsdp_two_processes_equal_one_process(tiny_pair, fsdp_run, tmp_path):
    """The fused update (top-K objective): the weights after 3 steps to 1e-5 and the gradient norm of
    every step to 1e-4 (AdamW is nearly invariant to the gradient's scale, so equal weights alone would
    not catch an averaged instead of summed reduction); a checkpoint and final/ written by rank 0."""
    one = tmp_path / "one"
    two, stdout = fsdp_run
    _run([sys.executable, "-m", "opd.cli", *_args(tiny_pair, one)])
    assert stdout.count("opd: done") == 1
    a, b = _weights(one), _weights(two)
    start = load_file(str(tiny_pair[0] / "model.safetensors"))
    assert max(float((a[k] - start[k]).abs().max()) for k in a) > 1e-4  # the run moved the weights
    _same_weights(a, b, atol=1e-5)
    _same_rows(one, two, ["grad_norm", "loss/pg", "kl/sampled", "cost/student_loss_tokens"])
    ckpt = two / "checkpoints" / "step-000002"
    state = safe_torch_load(ckpt / "optimizer.pt")  # the full optimiser state, plain tensors
    assert set(state["state"]) == set(a)  # keyed by parameter name (the tied head is the embedding)
    assert all(v["exp_avg"].shape == a[k].shape for k, v in state["state"].items())


def test_fsdp_two_pass_update_equal_one_process(tiny_pair, tmp_path):
    """The no-grad scoring passes and then ``ppo_epochs=2`` updates, with the exact full-vocabulary KL
    (its streamed pair of heads differentiated through the sharded scorer)."""
    one, two = tmp_path / "one", tmp_path / "two"
    extra = ("steps=2", "ppo_epochs=2", "objective=full")
    _run([sys.executable, "-m", "opd.cli", *_args(tiny_pair, one, *extra)])
    _run([*TORCHRUN, "-m", "opd.cli", *_args(tiny_pair, two, *extra, "fsdp=true")])
    _same_weights(_weights(one), _weights(two), atol=1e-5)
    _same_rows(one, two, ["grad_norm", "loss/pg", "kl/sampled"])


def test_fsdp_resume_equals_an_uninterrupted_run(tiny_pair, fsdp_run, tmp_path):
    """A run of 2 steps (a checkpoint every step: the full model and the full optimiser state), resumed by
    the same two processes to step 3: the weights of the uninterrupted 3-step run."""
    full, part = fsdp_run[0], tmp_path / "part"
    _run([*TORCHRUN, "-m", "opd.cli", *_args(tiny_pair, part, "fsdp=true", "save_every=1"), "steps=2"])
    proc = _run(
        [*TORCHRUN, "-m", "opd.cli", *_args(tiny_pair, part, "fsdp=true", "save_every=1", "resume=true")]
    )
    assert "resumed from" in proc.stderr + proc.stdout
    _same_weights(_weights(full), _weights(part), atol=1e-6)
    assert [r["step"] for r in read_metrics(part / "metrics.jsonl")] == [1, 2, 3]


def test_unequal_work_per_process_does_not_hang():
    """Different response lengths (one process stops generating at once) and a micro-batch with nothing
    to score on one process: tests/fsdp_worker.py finishes (no deadlock) with one-process gradients."""
    worker = Path(__file__).with_name("fsdp_worker.py")
    proc = _run([*TORCHRUN, str(worker)], timeout=300)
    assert "FSDP-LOCKSTEP-OK" in proc.stdout


@pytest.mark.parametrize(
    "override, fragment",
    [
        ({"lora_r": 4}, "fsdp=true with lora_r=4"),
        ({"rollout_backend": "vllm"}, "fsdp=true with rollout_backend=vllm"),
        ({"eval_every": 1, "eval_prompts": "lab:test"}, "fsdp=true with eval_every=1"),
    ],
)
def test_fsdp_refuses_what_it_cannot_run(override, fragment):
    with pytest.raises(ConfigError, match=fragment):
        OPDConfig(fsdp=True, **override)


def test_fsdp_needs_several_processes_and_equal_shares(tiny_pair, tmp_path):
    from opd.fsdp import check_fsdp
    from opd.methods.opd import train

    student, teacher, prompts = tiny_pair
    cfg = OPDConfig(student=str(student), teacher=str(teacher), prompts=str(prompts), fsdp=True)
    cfg.output_dir = str(tmp_path / "run")
    with pytest.raises(ConfigError, match="fsdp=true with 1 process"):
        train(cfg)  # one process: refused before the run directory is made
    assert not (tmp_path / "run").exists()
    with pytest.raises(ConfigError, match="prompts_per_step=6 is not divisible by the 4 processes"):
        check_fsdp(OPDConfig(fsdp=True, prompts_per_step=6), 4)
    check_fsdp(OPDConfig(fsdp=True, prompts_per_step=8), 4)


def test_an_accelerate_fsdp2_config_maps_onto_fsdp_true(monkeypatch):
    from opd.methods.sft import SFTConfig
    from opd.runtime import Runtime

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    Runtime.from_config(OPDConfig(device="cpu", fsdp=True))  # accepted (one process: no group to join)
    with pytest.raises(ConfigError, match="set fsdp=true"):
        Runtime.from_config(OPDConfig(device="cpu"))
    with pytest.raises(ConfigError, match="only opd train"):
        Runtime.from_config(SFTConfig(device="cpu"))
    for var, value, fragment in (
        ("FSDP_VERSION", "1", "fsdp_version: 2"),
        ("FSDP_OFFLOAD_PARAMS", "true", "fsdp_offload_params"),
        ("ACCELERATE_MIXED_PRECISION", "bf16", "student_dtype=bfloat16"),
    ):
        with monkeypatch.context() as m:
            m.setenv(var, value)
            with pytest.raises(ConfigError, match=fragment):
                Runtime.from_config(OPDConfig(device="cpu", fsdp=True))


def test_accelerate_launch_with_the_fsdp_config_equals_torchrun(tiny_pair, fsdp_run, tmp_path):
    """The docs' FSDP2 config (configs/accelerate/fsdp.yaml) plus fsdp=true, launched on this CPU: accelerate
    starts 2 processes with ACCELERATE_USE_FSDP / FSDP_VERSION=2 / FSDP_OFFLOAD_PARAMS=false /
    ACCELERATE_MIXED_PRECISION=no, opd accepts them, and the run ends with the torchrun fsdp=true run's
    weights and grad norms."""
    run = tmp_path / "accelerate"
    proc = _run(
        [
            *accelerate_launch("fsdp.yaml"),
            "-m",
            "opd.cli",
            *_args(tiny_pair, run, "fsdp=true", "save_every=2"),
        ]
    )
    assert "device cpu, 2 processes (rank 0)" in proc.stderr
    _same_weights(_weights(fsdp_run[0]), _weights(run), atol=1e-6)
    _same_rows(fsdp_run[0], run, ["grad_norm", "loss/pg", "kl/sampled"])


def test_accelerate_launch_cpu_with_fsdp_is_refused(tiny_pair, tmp_path):
    """``--cpu`` makes accelerate start one process without the FSDP variables: fsdp=true is refused with
    the fix (drop --cpu), before the run directory is made."""
    cmd = [
        *accelerate_launch("fsdp.yaml", "--cpu"),
        "-m",
        "opd.cli",
        *_args(tiny_pair, tmp_path / "r", "fsdp=true"),
    ]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert proc.returncode != 0
    assert "fsdp=true with 1 process: accelerate launch started a single process on the CPU" in proc.stderr
    assert "drop --cpu" in proc.stderr
    assert not (tmp_path / "r").exists()
