"""The frame every training method shares — not a base class: plain functions a method's ``train``
calls in the order it reads best (STYLE.md §7: duplication over abstraction in the loop itself).

- :func:`run_processes` — the devices (and, under ``torchrun`` / ``accelerate launch``, the process
  group), then the run body on every process, rank 0 holding the locked run directory (:func:`open_run`:
  check and lock it, arm the stop signals);
- :func:`seed_everything`, :func:`make_optimizer`, :func:`make_scheduler`, :func:`clip_and_step` (the
  gradients summed over the processes, clipped, applied);
- :func:`load_models` — student + teacher on the :class:`opd.runtime.Runtime`'s devices, tokenizer
  compatibility checked first, the prompt-length cap both contexts allow;
- :func:`load_prompt_sets` — training and evaluation prompts with the length cap (drops are logged);
- :func:`evaluate_during_training`, :func:`make_alert_monitor`;
- (:mod:`opd.methods.loop` — the start of every method's loop: :func:`~opd.methods.loop.begin_process`,
  :func:`~opd.methods.loop.resume_checkpoint`, per-process seeds, the run directory claimed; and
  :class:`~opd.methods.loop.StepEnd`, the end of every step: evaluation, alerts, logging, progress bar,
  checkpoint, stop by signal / alert / budget; and the end of the run, rank-aware);
- :func:`write_config`, :func:`finish_interrupted`, :func:`finish_completed` (``summary.json``,
  the atomic ``final/`` save).

Metrics rows go through :class:`opd.tracking.MetricsLogger` (``metrics.jsonl``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from opd import evaluate
from opd.alerts import AlertConfig, AlertMonitor
from opd.config_io import to_dict
from opd.cost import CostMeter
from opd.data import PromptSet, load_prompts, prompt_texts, rendering
from opd.errors import ConfigError
from opd.models import (
    CompatReport,
    check_compatibility,
    load_model,
    load_tokenizer,
    prompt_token_cap,
    same_model_warning,
    save_model,
)
from opd.precision import compute_context
from opd.rollout import model_vocab_limit
from opd.rundir import RunDir, RunInterrupted, StopSignals, locked_run_dir, prepare_train_dir
from opd.runtime import Runtime

log = logging.getLogger("opd")


# --------------------------------------------------------------------------- run directory


@contextlib.contextmanager
def open_run(cfg: Any) -> Iterator[tuple[RunDir, StopSignals]]:
    """Lock ``cfg.output_dir`` for this run and apply the non-empty-directory rules (:mod:`opd.rundir`:
    one run per directory, a non-empty one only with ``resume``/``overwrite``, never an input's
    directory); SIGINT/SIGTERM are caught for the run (armed by :meth:`opd.methods.loop.StepEnd.start`)."""
    models = {"student": getattr(cfg, "student", ""), "teacher": getattr(cfg, "teacher", "")}
    data = {key: getattr(cfg, key, "") for key in ("prompts", "eval_prompts", "sft_data", "exclude_prompts")}
    with locked_run_dir(cfg.output_dir, models=models, data=data) as run, StopSignals() as stop:
        prepare_train_dir(run, to_dict(cfg), to_dict(type(cfg)()), resume=cfg.resume, overwrite=cfg.overwrite)
        yield run, stop


def run_processes(
    cfg: Any, body: Callable[[Any, Runtime, RunDir | None, StopSignals], dict], *, per_step: tuple[str, int]
) -> dict[str, Any]:
    """Resolve the devices (:meth:`Runtime.from_config`: under ``torchrun`` / ``accelerate launch`` it joins
    the process group), check that each process gets a share of a step's batch (``per_step``: the key
    and value of the global batch size), then run ``body(cfg, runtime, run, stop)`` on every process:
    on rank 0 inside the locked run directory (:func:`open_run`), on the others once rank 0 holds it
    (``run`` is None there). The process group is left at the end."""
    runtime = Runtime.from_config(cfg)
    try:
        key, size = per_step
        if runtime.world_size > size:
            raise ConfigError(
                f"{key}={size} with {runtime.world_size} processes: each process needs at least one item of "
                f"a step's batch; set {key} >= {runtime.world_size}"
            )
        if runtime.is_main:  # rank 0 checks and locks the run directory; the others wait for it
            with open_run(cfg) as (run, stop):
                runtime.barrier()
                return body(cfg, runtime, run, stop)
        runtime.barrier()
        with StopSignals() as stop:
            return body(cfg, runtime, None, stop)
    finally:
        runtime.close()


def write_config(out_dir: Path, cfg: Any) -> None:
    (out_dir / "config.json").write_text(json.dumps(to_dict(cfg), indent=1))


# --------------------------------------------------------------------------- seeding and optimisation


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def make_optimizer(model: torch.nn.Module, cfg: Any) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters (``lr``, ``adam_betas``, ``weight_decay``)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.adam_betas), weight_decay=cfg.weight_decay)


def clip_and_step(
    params: list[torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    grad_clip: float,
    runtime: Runtime | None = None,
) -> tuple[float, int]:
    """Sum the accumulated gradients over the processes (one all-reduce; a no-op in one process), clip
    their norm to ``grad_clip`` (0 = no clipping) and step; a non-finite norm skips the step. Returns
    (grad norm, 1 if skipped else 0)."""
    if runtime is not None:
        runtime.all_reduce_grads(params)
    norm = float(torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf")))
    if not math.isfinite(norm):
        optimizer.zero_grad(set_to_none=True)
        log.warning("non-finite gradient norm (%s): update skipped", norm)
        return norm, 1
    optimizer.step()
    return norm, 0


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: Any) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup, then constant or cosine decay to 0 at ``cfg.steps``. Stepped once per step."""

    def factor(step: int) -> float:
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.lr_schedule == "cosine":
            span = max(1, cfg.steps - cfg.warmup_steps)
            progress_ = min(1.0, (step - cfg.warmup_steps) / span)
            return 0.5 * (1.0 + math.cos(math.pi * progress_))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# --------------------------------------------------------------------------- models and prompts


@dataclass
class Models:
    """A student/teacher pair on their devices, the student's tokenizer and what the pair allows."""

    student: torch.nn.Module
    teacher: torch.nn.Module | Any | None
    """None when the method runs without one (``cfg.teacher`` empty, e.g. SFT on an existing data file); a
    :class:`opd.remote.RemoteTeacher` for a served teacher (``teacher=http://...``, OPD only)."""
    tokenizer: Any
    compat: CompatReport
    max_prompt_tokens: int
    max_prompt_tokens_why: str | None
    lora: Any = None
    """The peft ``PeftModel`` around the student when ``lora_r > 0`` (``student`` is then its base model with
    the adapters injected: every pass and the optimiser see only what trains); None otherwise."""


def load_models(cfg: Any, runtime: Runtime, *, served_teacher: bool = False) -> Models:
    """Tokenizers and models (compatibility first, so a mismatch fails before any work). The student
    loads in float32 (master weights; ``student_dtype`` is its compute dtype, :mod:`opd.precision`) on
    ``runtime.device``, the teacher in ``teacher_dtype`` on ``runtime.teacher_device``, frozen. With an
    empty ``cfg.teacher`` (a method that does not need one) only the student loads. ``served_teacher``:
    the method accepts ``teacher=http://...``; ``Models.teacher`` is then a
    :class:`opd.remote.RemoteTeacher` (its tokenizer fingerprint checked against the student's)."""
    from opd.remote.client import is_remote

    if is_remote(cfg.teacher) and not served_teacher:
        raise ConfigError(
            f"teacher={cfg.teacher}: a served teacher works with opd train (OPD) only; this method needs the "
            "teacher's weights here. Fix: a local teacher (directory, .gguf or lab:<name>)"
        )
    trust = cfg.trust_remote_code
    tokenizer = load_tokenizer(cfg.student, trust_remote_code=trust)
    local_teacher = cfg.teacher and not is_remote(cfg.teacher)
    teacher_tokenizer = load_tokenizer(cfg.teacher, trust_remote_code=trust) if local_teacher else None
    student = load_model(cfg.student, dtype="float32", trust_remote_code=trust, device=runtime.device)
    lora = prepare_student(student, cfg)
    if is_remote(cfg.teacher):
        return _with_served_teacher(cfg, student, tokenizer, lora)
    if not cfg.teacher:
        cap, why = prompt_token_cap(cfg.max_prompt_tokens, cfg.max_new_tokens, student, None)
        if why:
            log.info("max_prompt_tokens=%d (%s)", cap, why)
        student.eval()
        return Models(
            student, None, tokenizer, CompatReport(model_vocab_limit(student, tokenizer)), cap, why, lora
        )
    teacher = load_model(
        cfg.teacher, dtype=cfg.teacher_dtype, trust_remote_code=trust, device=runtime.teacher_device
    )
    compat = check_compatibility(tokenizer, teacher_tokenizer, student, teacher)
    for w in compat.warnings + [same_model_warning(cfg.student, cfg.teacher, student, teacher)]:
        if w:
            log.warning(w)
    for note in compat.notes:
        log.info(note)
    # prompt + response must fit both models' context (positions past it are silently extrapolated)
    cap, why = prompt_token_cap(cfg.max_prompt_tokens, cfg.max_new_tokens, student, teacher)
    if why:
        log.info("max_prompt_tokens=%d (%s)", cap, why)
    teacher.eval()
    teacher.requires_grad_(False)
    student.eval()
    return Models(student, teacher, tokenizer, compat, cap, why, lora)


def _with_served_teacher(cfg: Any, student: torch.nn.Module, tokenizer: Any, lora: Any) -> Models:
    """:func:`load_models` for ``teacher=http://...``: the scoring client in place of a teacher model,
    scoring at the ids the student's tokenizer can produce (the fingerprints match, so they are the
    teacher's too)."""
    from opd.remote.client import RemoteTeacher

    vocab_limit = model_vocab_limit(student, tokenizer)
    teacher = RemoteTeacher(
        cfg.teacher,
        tokenizer,
        temperature=getattr(cfg, "teacher_temperature", 1.0),
        chunk_size=getattr(cfg, "score_chunk_size", 256),
        vocab_limit=vocab_limit,
        timeout=getattr(cfg, "teacher_timeout", 60.0),
        retries=getattr(cfg, "teacher_retries", 3),
    )
    for w in teacher.warnings:
        log.warning(w)
    info = teacher.info
    log.info(
        "served teacher %s: %s (%s on %s, %d parameters)",
        cfg.teacher,
        info.get("model"),
        info.get("dtype"),
        info.get("device"),
        teacher.num_parameters,
    )
    for key, served in (("teacher_dtype", info.get("dtype")), ("teacher_device", info.get("device"))):
        value = getattr(cfg, key, "")
        if value and served and not str(served).startswith(value):
            log.warning(
                "%s=%s does not apply to a served teacher: it scores in %s on %s (opd serve-teacher's "
                "--dtype / --device)",
                key,
                value,
                info.get("dtype"),
                info.get("device"),
            )
    cap, why = prompt_token_cap(cfg.max_prompt_tokens, cfg.max_new_tokens, student, teacher)
    if why:
        log.info("max_prompt_tokens=%d (%s)", cap, why)
    student.eval()
    return Models(student, teacher, tokenizer, CompatReport(vocab_limit, teacher.warnings), cap, why, lora)


def prepare_student(student: torch.nn.Module, cfg: Any) -> Any:
    """LoRA adapters (``lora_r > 0``) and activation checkpointing (``gradient_checkpointing``) on the
    student, as configured; returns the ``PeftModel`` or None."""
    lora = add_lora(student, cfg) if getattr(cfg, "lora_r", 0) else None
    if getattr(cfg, "gradient_checkpointing", False):
        # transformers 5.25 renamed it activation_checkpointing_enable (the old name warns)
        kwargs = {"use_reentrant": False}
        if hasattr(student, "activation_checkpointing_enable"):
            student.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            student.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return lora


def add_lora(student: torch.nn.Module, cfg: Any) -> Any:
    """Inject LoRA adapters (``lora_r``, ``lora_alpha``, ``lora_dropout``, ``lora_target_modules``) into
    ``student`` in place with peft and freeze everything else; returns the ``PeftModel`` (for saving the
    adapter). The student module keeps its class, so scoring, sampling and checkpoints are unchanged."""
    try:
        from peft import LoraConfig, get_peft_model  # optional extra
    except ImportError:
        raise ConfigError(
            f"lora_r={cfg.lora_r} needs the peft package: pip install 'opd[peft]' (or set lora_r=0)"
        ) from None
    targets = cfg.lora_target_modules.strip()
    target_modules = (
        targets if targets == "all-linear" else [t.strip() for t in targets.split(",") if t.strip()]
    )
    lora_cfg = LoraConfig(
        r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, target_modules=target_modules
    )
    try:
        peft_model = get_peft_model(student, lora_cfg)
    except ValueError as e:
        raise ConfigError(
            f"lora_target_modules={cfg.lora_target_modules!r}: {str(e).splitlines()[0]} "
            "Fix: all-linear, or names of the student's linear layers (e.g. q_proj,v_proj)"
        ) from None
    trainable = sum(p.numel() for p in student.parameters() if p.requires_grad)
    total = sum(p.numel() for p in student.parameters())
    log.info(
        "LoRA r=%d: %d of %d student parameters train (%.2f%%)",
        cfg.lora_r,
        trainable,
        total,
        100 * trainable / total,
    )
    return peft_model


def load_prompt_sets(cfg: Any, models: Models) -> tuple[PromptSet | None, PromptSet | None]:
    """The training prompts (None when ``cfg.prompts`` is empty: a method training on a data file) and
    (when ``eval_every``) the evaluation prompts, rendered with the student's tokenizer; prompts over the
    length cap are dropped and counted (``data.load_prompts`` logs it), and so are training prompts whose
    text is in ``cfg.exclude_prompts`` (never evaluation prompts). ``eval_limit`` takes a seeded
    random subset, not the first rows. With ``cfg.teacher_prompt_template`` / ``teacher_system_prompt``
    the training prompts also carry the teacher's rendering (``PromptExample.teacher_input_ids``)."""

    def prompt_set(source: str, **kw: Any) -> PromptSet:
        return load_prompts(
            source,
            models.tokenizer,
            **rendering(cfg),
            max_prompt_tokens=models.max_prompt_tokens,
            max_prompt_tokens_why=models.max_prompt_tokens_why,
            **kw,
        )

    exclude = prompt_texts(cfg.exclude_prompts) if getattr(cfg, "exclude_prompts", "") else None
    # the teacher's own rendering of the training prompts (OPD's teacher_prompt_template / _system_prompt)
    teacher_kw = {k: getattr(cfg, k, None) for k in ("teacher_prompt_template", "teacher_system_prompt")}
    prompts = prompt_set(cfg.prompts, exclude=exclude, **teacher_kw) if cfg.prompts else None
    eval_set = None
    if cfg.eval_every:
        eval_set = prompt_set(
            cfg.eval_prompts, limit=cfg.eval_limit or None, seed=cfg.seed if cfg.eval_limit else None
        )
    return prompts, eval_set


# --------------------------------------------------------------------------- during the run


def evaluate_during_training(model, tokenizer, eval_set, cfg: Any) -> dict[str, float]:
    """avg@n accuracy (n = eval_samples; 1 when greedy) at eval_temperature / eval_top_p, and pass@n."""
    with compute_context(model, cfg.student_dtype):
        res = evaluate.evaluate_accuracy(
            model,
            tokenizer,
            eval_set,
            temperature=cfg.eval_temperature,
            top_p=cfg.eval_top_p,
            n=cfg.eval_samples,
            max_new_tokens=cfg.max_new_tokens,
            progress=False,
        )
    return {"eval/accuracy": res["accuracy"], "eval/pass@n": res["pass@n"], "eval/samples": res["n"]}


def make_alert_monitor(cfg: Any) -> AlertMonitor | None:
    if not cfg.alerts:
        return None
    return AlertMonitor(AlertConfig(**{**cfg.alert_thresholds, "stop_on_alert": cfg.stop_on_alert}))


def budget_spent(cfg: Any, cost: CostMeter) -> bool:
    """True once the run's compute budget (``budget_unit`` / ``budget``) is reached; every method checks it
    after each step and stops there (so methods compared at equal budget overshoot by at most one step,
    and the summary records the exact amount spent)."""
    if cfg.budget_unit == "none":
        return False
    spent = cost.flops() if cfg.budget_unit == "flops" else cost.counts[cfg.budget_unit]
    return spent >= cfg.budget


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> float:
    n = mask.sum()
    return float((x * mask).sum() / n) if n > 0 else 0.0


# --------------------------------------------------------------------------- the end of a run


def finish_interrupted(
    out_dir: Path,
    signal: str,
    checkpoint: str,
    *,
    steps_done: int,
    skipped_steps: int,
    loop_time: float,
    history: list[dict[str, Any]],
) -> None:
    """Write ``summary.json`` for a run stopped by a signal (no final model) and raise RunInterrupted."""
    summary = {
        "output_dir": str(out_dir),
        "final_model": None,
        "steps_done": steps_done,
        "skipped_steps": skipped_steps,
        "loop_time_s": loop_time,
        "interrupted": signal,
        "checkpoint": checkpoint,
        "resume": "rerun with resume=true and the same output_dir to continue",
        "last": history[-1] if history else {},
    }
    _write_summary(out_dir, summary)
    raise RunInterrupted(signal, summary)


def finish_completed(
    out_dir: Path,
    model,
    tokenizer,
    *,
    steps_done: int,
    skipped_steps: int,
    loop_time: float,
    run_t0: float,
    stopped_by_alert: int | None,
    history: list[dict[str, Any]],
    cost: CostMeter | None = None,
    stopped_by_budget: int | None = None,
    lora: Any = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Save ``final/`` atomically (float32 master weights + tokenizer), write and return the summary
    (``extra``: a method's own entries, e.g. SFT's teacher-data counts).

    With LoRA (``lora``: the PeftModel): ``final/`` holds the merged model (loads like any model) and
    ``final/adapter`` the adapter alone (``PeftModel.from_pretrained(base, final/adapter)``)."""
    final_dir = out_dir / "final"
    if lora is not None:
        adapter_tmp = out_dir / ".tmp-adapter"
        shutil.rmtree(adapter_tmp, ignore_errors=True)
        lora.save_pretrained(adapter_tmp)  # before merging: merging removes the adapter layers
        model = lora.merge_and_unload()
        save_model(model, tokenizer, final_dir)
        os.replace(adapter_tmp, final_dir / "adapter")
    else:
        save_model(
            model, tokenizer, final_dir
        )  # atomic (temporary sibling, then rename); the float32 masters
    summary = {
        "output_dir": str(out_dir),
        "final_model": str(final_dir),
        "steps_done": steps_done,
        "skipped_steps": skipped_steps,
        "loop_time_s": loop_time,
        "wall_time_s": time.perf_counter() - run_t0,
        "stopped_by_alert": stopped_by_alert,
        "stopped_by_budget": stopped_by_budget,
        "cost": cost.row() if cost is not None else None,
        "last": history[-1] if history else {},
        **(extra or {}),
    }
    _write_summary(out_dir, summary)
    return summary


def _write_summary(out_dir: Path, summary: dict[str, Any]) -> None:
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
