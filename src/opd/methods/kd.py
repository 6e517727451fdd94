"""Word-level knowledge distillation (``opd kd``), one readable file.

The off-policy, full-distribution baseline (Hinton et al. 2015; Kim & Rush 2016's word-level KD): on
fixed, teacher-forced sequences — gold solutions from a dataset field (``response_field``) or the cached
teacher outputs of an SFT run (``sft_data=RUN/teacher_data.jsonl``) — the student matches the teacher's
next-token distribution at every response position, over the whole vocabulary:

    L = τ² · (1 / Σ_b |y_b|) Σ_b Σ_{t ∈ y_b} KL(q_t^τ ‖ p_t^τ),
    KL(q‖p) = Σ_v q(v) (log q(v) − log p(v)),   p^τ = softmax(z_student / τ),  q^τ = softmax(z_teacher / τ).

Both distributions are taken at the same temperature τ (``kd_temperature``), and the loss is scaled by
τ²: the gradient of the KL with respect to the student's logits is (p^τ − q^τ)/τ, whose size shrinks
like 1/τ² as τ grows (Hinton et al. 2015, §2), so the τ² factor keeps the gradient scale, and thus the
learning rate, comparable across temperatures. At τ = 1 it is the plain forward KL.

Only response positions carry loss (prompt tokens and padding never do); the sequences are the same
whatever the student does (off-policy: unlike OPD, the student never samples). The full-vocabulary KL
is streamed by :func:`opd.scoring.full_vocab_pair` through the student's :class:`opd.scoring.PolicyScorer`
(both heads and the KL per chunk of ``score_chunk_size`` positions, checkpointed), so no B x T x V tensor
is kept beyond one chunk; the teacher runs without grad on each micro-batch. fp32 master weights with
``student_dtype`` autocast, AdamW, micro-batches with gradient accumulation, as in SFT and OPD.

Several processes (``torchrun`` / ``accelerate launch``, :mod:`opd.runtime`): every process draws the
same global batch and trains on its contiguous share, the loss divided by the global batch's token
count and the gradients summed across processes once per step, so N processes make the update of one.

What this file deliberately leaves out: sequence-level KD by beam search, mixing the KD loss with a
hard-label NLL term, and teachers with another tokenizer (the KL needs one shared vocabulary).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import torch

from opd import objectives as obj
from opd.config import DataConfig, ModelsConfig, OptimConfig, RunConfig, part_errors
from opd.config_io import _coerce_types, below, raise_errors, require_keys
from opd.cost import CostMeter, count_parameters, peak_memory_mb
from opd.errors import ConfigError
from opd.methods.common import (
    clip_and_step,
    load_models,
    load_prompt_sets,
    make_optimizer,
    make_scheduler,
    run_processes,
)
from opd.methods.loop import StepEnd, begin_process, open_metrics_log
from opd.rollout import RolloutBatch
from opd.runtime import Runtime
from opd.sampler import PromptSampler
from opd.scoring import PolicyScorer
from opd.teacher_data import ForcedSequence, collate, field_sequences, read_sequences

log = logging.getLogger("opd")


@dataclass
class KDConfig(RunConfig, OptimConfig, DataConfig, ModelsConfig):
    """Word-level KD of the student toward the teacher on fixed sequences (gold solutions or SFT data).

    The shared parts (models, data, optimiser, run) are inherited; the fields below are KD's own. The
    alert keys of the run part are OPD's (its failure signatures) and are not checked here.
    """

    output_dir: str = "runs/kd"
    """Where metrics.jsonl, checkpoints and the final model go."""
    steps: int = 100
    """Number of optimizer steps, each on ``batch_size`` sequences (epochs: steps x batch_size / sequences)."""

    # --- the sequences ---
    response_field: str = ""
    """Field of the prompt rows holding a gold solution to distil on (dotted paths allowed; e.g. solution_a for lab prompts); or use sft_data."""
    sft_data: str = ""
    """Distil on the cached teacher outputs of an SFT run (its teacher_data.jsonl) instead; then leave prompts empty."""
    max_new_tokens: int = 256
    """Longest response trained on (longer sequences are dropped and counted); also the evaluation length."""

    # --- the objective ---
    kd_temperature: float = 1.0
    """τ: both teacher and student distributions are softmax(logits / τ); the loss is τ² · KL(q‖p) (docs/baselines.md)."""

    # --- batching ---
    batch_size: int = 16
    """Sequences per optimizer step (gradients accumulated over micro_batch_size chunks)."""
    score_chunk_size: int = 256
    """Positions per chunk of the streamed full-vocabulary KL (peak memory O(chunk * vocab))."""

    def __post_init__(self) -> None:
        _coerce_types(self)
        errs = part_errors(self)
        if self.stop_on_alert:
            errs.append(
                "stop_on_alert=true: the alerts watch OPD's failure signatures (overlap, entropy gap), which "
                "KD does not measure; leave stop_on_alert=false"
            )
        errs += below(self, ("max_new_tokens", "batch_size", "score_chunk_size"), 1)
        if not (self.kd_temperature > 0 and math.isfinite(self.kd_temperature)):
            errs.append(f"kd_temperature={self.kd_temperature}: must be a finite number > 0 (1.0 = plain KL)")
        if self.response_field and self.sft_data:
            errs.append(
                f"response_field={self.response_field!r} and sft_data={self.sft_data!r}: choose one source of "
                "sequences (gold solutions of the prompts, or an SFT run's teacher data)"
            )
        if self.sft_data and self.prompts:
            errs.append(
                f"sft_data={self.sft_data!r} with prompts={self.prompts!r}: the sequences come from the file; "
                "leave prompts empty"
            )
        raise_errors(errs)

    def check_runnable(self) -> None:
        """Rules that only matter when actually training (not when printing help or defaults)."""
        if not (self.response_field or self.sft_data):
            raise ConfigError(
                "no sequences to distil on: set response_field=FIELD (a gold solution in each prompt row, "
                "e.g. response_field=solution_a prompts=lab:train) or sft_data=RUN/teacher_data.jsonl"
            )
        need = ("student", "teacher") + (() if self.sft_data else ("prompts",))
        require_keys(
            self,
            need,
            "student=lab:student teacher=lab:teacher-a-plus prompts=lab:train response_field=solution_a",
        )


# --------------------------------------------------------------------------- the loss


def forward_kl_N(student_logits_N_V: torch.Tensor, teacher_logits_N_V: torch.Tensor) -> torch.Tensor:
    """KL(q‖p) per position of one chunk, q = softmax(teacher logits), p = softmax(student logits) (the
    logits arrive already divided by τ)."""
    ones_1_N = torch.ones(1, student_logits_N_V.shape[0], device=student_logits_N_V.device)
    return obj.full_vocab_divergence(
        student_logits_N_V[None], teacher_logits_N_V[None], ones_1_N, kind="forward_kl"
    )[0]


def kd_loss(
    student: PolicyScorer, teacher: torch.nn.Module, batch: RolloutBatch, total_tokens: float
) -> tuple[torch.Tensor, float]:
    """``(loss, kl_sum)`` for one micro-batch: ``τ² · Σ KL(q^τ‖p^τ) / total_tokens`` over its response
    positions (τ = ``student.temperature``; the teacher at the same τ, no grad) and the unscaled KL sum.
    Dividing by the whole step's token count makes the micro-batches' losses add up to the step's mean."""
    tau = student.temperature
    kl_B_T = student(
        batch.input_ids_B_T,
        batch.attention_mask_B_T,
        batch.response_mask_B_T,
        teacher=teacher,
        divergence=forward_kl_N,
        teacher_temperature=tau,
    )
    kl_sum = (kl_B_T * batch.response_mask_B_T).sum()
    return tau**2 * kl_sum / total_tokens, float(kl_sum.detach())


def kd_step(
    student: PolicyScorer,
    teacher: torch.nn.Module,
    sequences: list[ForcedSequence],
    optimizer: torch.optim.Optimizer,
    *,
    pad_id: int,
    micro_batch_size: int,
    grad_clip: float,
    device: torch.device | str,
    total_tokens: float | None = None,
    runtime: Runtime | None = None,
) -> dict[str, float]:
    """One optimiser step of KD on ``sequences`` (micro-batches, gradient accumulation, clipping; skipped
    when the gradient norm is not finite). Returns ``loss/kd`` (τ²-scaled), ``kl/forward`` (mean
    KL(q^τ‖p^τ) per response token), ``grad_norm``, ``tokens`` and ``skipped``.

    Data parallel: ``sequences`` is this process's share, ``total_tokens`` the whole batch's response
    tokens (default: those of ``sequences``) and ``runtime`` sums the gradients over the processes;
    ``loss/kd`` and ``kl/forward`` are then this process's shares of the batch's means."""
    total = float(sum(len(s.response_ids) for s in sequences)) if total_tokens is None else total_tokens
    params = [p for p in student.parameters() if p.requires_grad]
    student.train()
    optimizer.zero_grad(set_to_none=True)
    loss_sum = kl_sum = 0.0
    for lo in range(0, len(sequences), micro_batch_size):
        mb = collate(sequences[lo : lo + micro_batch_size], pad_id).to(device)
        loss, kl = kd_loss(student, teacher, mb, total)
        loss.backward()
        loss_sum += float(loss.detach())
        kl_sum += kl
    norm, skipped = clip_and_step(params, optimizer, grad_clip, runtime)
    student.eval()
    return {
        "loss/kd": loss_sum,
        "kl/forward": kl_sum / total,
        "grad_norm": norm,
        "tokens": total,
        "skipped": skipped,
    }


# --------------------------------------------------------------------------- the training run


def train(cfg: KDConfig) -> dict[str, Any]:
    """Run word-level KD as configured. Returns the run summary (also in ``output_dir/summary.json``).
    Interrupts and ``resume=true`` as in OPD."""
    cfg.check_runnable()
    return run_processes(cfg, _train, per_step=("batch_size", cfg.batch_size))


def _train(cfg: KDConfig, runtime: Runtime, run, stop) -> dict[str, Any]:
    out_dir = begin_process(cfg, runtime)

    models = load_models(cfg, runtime)
    student, teacher, tokenizer = models.student, models.teacher, models.tokenizer
    prompts, eval_set = load_prompt_sets(cfg, models)
    if cfg.sft_data:
        sequences = read_sequences(cfg.sft_data, models.compat.vocab_limit)
    else:
        sequences = field_sequences(prompts, tokenizer, cfg.response_field, cfg.use_chat_template)
    kept = [s for s in sequences if len(s.response_ids) <= cfg.max_new_tokens]
    if len(kept) < len(sequences):
        log.info(
            "kd: dropped %d sequences longer than max_new_tokens=%d",
            len(sequences) - len(kept),
            cfg.max_new_tokens,
        )
    if not kept:
        raise ValueError(f"kd: every sequence is longer than max_new_tokens={cfg.max_new_tokens}; raise it")
    sequences = kept
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    student_scorer = PolicyScorer(
        student,
        temperature=cfg.kd_temperature,
        chunk_size=cfg.score_chunk_size,
        vocab_limit=models.compat.vocab_limit,
        compute_dtype=cfg.student_dtype,
    )
    sampler = PromptSampler(sequences, seed=cfg.seed)
    optimizer = make_optimizer(student, cfg)
    scheduler = make_scheduler(optimizer, cfg)
    cost = CostMeter(count_parameters(student), count_parameters(teacher))
    metrics_log = open_metrics_log(cfg, runtime, out_dir)

    ends = StepEnd.open(
        "kd",
        cfg,
        runtime,
        run,
        stop,
        out_dir,
        student,
        tokenizer,
        optimizer,
        scheduler,
        eval_set,
        metrics_log,
        cost,
        sampler,
        postfix=lambda row: dict(kl=f"{row['kl/forward']:.4f}"),
        reseed=False,  # KD samples nothing
    )
    ends.start()  # step 0 of the accuracy curve; from here a signal stops at a step boundary
    for step in range(ends.start_step + 1, cfg.steps + 1):
        t_step = time.perf_counter()
        batch = [sequences[i] for i in sampler.next_batch(cfg.batch_size)]  # the same on every process
        lr = scheduler.get_last_lr()[0]
        out = kd_step(
            student_scorer,
            teacher,
            runtime.shard(batch),  # this process's share
            optimizer,
            pad_id=pad_id,
            micro_batch_size=cfg.micro_batch_size,
            grad_clip=cfg.grad_clip,
            device=runtime.device,
            total_tokens=float(sum(len(s.response_ids) for s in batch)),
            runtime=runtime,
        )
        scheduler.step()
        seq_tokens = sum(len(s.prompt_ids) + len(s.response_ids) for s in batch)
        cost.add(
            teacher_forward_tokens=seq_tokens,
            student_train_tokens=seq_tokens,
            student_loss_tokens=out["tokens"],
        )
        step_time = time.perf_counter() - t_step
        row: dict[str, Any] = {
            "step": step,
            "loss/kd": out["loss/kd"],
            "kl/forward": out["kl/forward"],
            "grad_norm": out["grad_norm"],
            "lr": lr,
            "response/length_mean": out["tokens"] / len(batch),
            "skipped_steps": ends.count_skipped(out["skipped"]),
            "epoch": sampler.epoch + sampler.position / sampler.size,
            "time/step": step_time,
            **cost.row(),
            "memory/peak_mb": peak_memory_mb(runtime.device),
        }
        # the loss and KL shares add up; every other entry is the whole batch's already, but memory and time
        shares = {"loss/kd", "kl/forward"}
        row = runtime.reduce_row(row, sums=shares, maxima=set(row) - shares)
        row["throughput/tokens_per_s"] = out["tokens"] / row["time/step"] if row["time/step"] > 0 else 0.0
        if ends.end_of_step(step, row):
            break
    return ends.finish(
        lora=models.lora,
        extra={
            "sequences": {
                "source": cfg.sft_data or f"{cfg.prompts}:{cfg.response_field}",
                "count": len(sequences),
            }
        },
    )
