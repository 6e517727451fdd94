"""GKD: generalized knowledge distillation (Agarwal et al. 2024, "On-Policy Distillation of Language
Models: Learning from Self-Generated Mistakes"), the distillation baseline next to OPD, one file.

Configured as TRL's ``GKDTrainer`` is, so results are comparable: ``beta`` (β), ``lmbda`` (λ),
``temperature``, ``seq_kd``, with TRL's defaults (β = 0.5, λ = 0.5, τ = 0.9).

What this file deliberately leaves out: the policy-gradient machinery (GKD differentiates the exact
divergence, so there are no rewards, advantages, old log-probs or PPO epochs: one optimiser step per
batch), sampled-token or top-K approximations of the divergence, and alerts (the OPD failure signatures
are about its rewards). The run frame is :mod:`opd.methods.common`'s, shared with every method.

The loss. At every response position t of a batch, with the student ``p_t = softmax(z^s_t / τ)`` and
the teacher ``q_t = softmax(z^q_t / τ)`` over the full vocabulary (the same τ for both, as TRL),
``m_t = β·q_t + (1 − β)·p_t`` and

    JSD_β(t) = β·KL(q_t ‖ m_t) + (1 − β)·KL(p_t ‖ m_t)          for 0 < β < 1
    JSD_0(t) = KL(q_t ‖ p_t)   forward KL (what word-level KD minimises; mode-covering)
    JSD_1(t) = KL(p_t ‖ q_t)   reverse KL (what OPD minimises; mode-seeking)

(``objectives.full_vocab_divergence(kind="jsd")``; TRL's ``generalized_jsd_loss`` has the same endpoints
and mixture), averaged over the batch's response tokens (``loss_aggregation=token-mean``, TRL's
"batchmean" over the non-masked labels). It is streamed in position chunks through the student's
``PolicyScorer`` (``scoring.full_vocab_pair``: the teacher without grad, each chunk's heads and
divergence checkpointed), so no B x T x V tensor is ever kept.

Each step:
  1. ``prompts_per_step`` prompts; with probability λ (one draw per step, as TRL draws per batch) the
     responses are the student's own samples (``rollouts_per_prompt`` each, at ``temperature``, through
     ``make_backend``); otherwise the fixed sequences: with ``seq_kd=true`` samples of the teacher (TRL's
     sequence-level KD), else one fixed response per prompt read from the prompt rows'
     ``response_field`` (gold solutions, or a cached teacher-output JSONL with prompt / response fields);
  2. one optimiser step on the streamed JSD_β, micro-batches with gradient accumulation; then
     ``backend.sync_weights``;
  3. log the step (metrics.jsonl), checkpoint atomically every ``save_every`` steps.

Several processes (``torchrun`` / ``accelerate launch``, :mod:`opd.runtime`): every process draws the
same prompts and the same λ coin, builds the responses of its contiguous share of the prompts, and the
divergence is divided by the global token (or row) count with the gradients summed across processes once
per step; with ``rollout_seeding=per_prompt`` the sampled responses do not depend on the number of
processes, so N processes make the update of one.

The draw of step s is ``random.Random(f"opd-gkd:{seed}:{s}")``, so a resumed run mixes exactly as the
uninterrupted one. A fixed response is tokenised without special tokens and ends with the end-of-turn
token (``<|im_end|>`` etc., or EOS without one); a longer one is cut at ``max_new_tokens`` (flagged
truncated).
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from typing import Any

import torch

from opd import objectives as obj
from opd.config import DataConfig, ModelsConfig, OptimConfig, RolloutConfig, RunConfig, part_errors
from opd.config_io import _coerce_types, below, raise_errors, require_keys
from opd.cost import CostMeter, count_parameters, peak_memory_mb
from opd.data import _MISSING, PromptSet, _get_field
from opd.datafiles import read_rows
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
from opd.precision import compute_context
from opd.rollout import (
    RolloutBackend,
    RolloutBatch,
    fixed_batch,
    make_backend,
    prompt_seed,
)
from opd.runtime import Runtime
from opd.sampler import PromptSampler
from opd.scoring import PolicyScorer
from opd.teacher_data import end_of_response_id

log = logging.getLogger("opd")


@dataclass
class GKDConfig(RunConfig, OptimConfig, RolloutConfig, DataConfig, ModelsConfig):
    """GKD run: the generalized JSD between teacher and student on a λ-mix of student samples and fixed
    sequences. The shared parts (models, data, rollout, optimiser, run) are inherited; the fields below
    are GKD's own (plus TRL's defaults for ``temperature`` and ``rollouts_per_prompt``)."""

    output_dir: str = "runs/gkd"
    """Where metrics.jsonl, checkpoints and the final model go."""
    temperature: float = 0.9
    """Sampling temperature of the student (and, with seq_kd, the teacher) and the τ both models' logits are divided by in the loss (TRL's default 0.9)."""
    rollouts_per_prompt: int = 1
    """Samples per prompt on on-policy (and seq_kd) steps; a fixed-data step uses each prompt's one response."""
    beta: float = 0.5
    """β of the generalized JSD: 0 = forward KL(teacher‖student), 1 = reverse KL(student‖teacher) (TRL's convention), 0.5 = symmetric JSD."""
    lmbda: float = 0.5
    """λ: probability that a step trains on the student's own samples (drawn once per step); otherwise on the fixed sequences. 1 = fully on-policy, 0 = fixed sequences only."""
    seq_kd: bool = False
    """Fixed sequences are samples of the teacher at ``temperature`` (sequence-level KD) instead of ``response_field``."""
    response_field: str = ""
    """Field of the prompt rows holding the fixed response (dotted paths allowed): a gold solution (``solution_a`` on lab prompts) or a cached teacher output (a JSONL with prompt / response fields). Needed when lmbda < 1 and not seq_kd."""
    loss_aggregation: str = "token-mean"
    """token-mean (TRL's batchmean over response tokens), seq-mean-token-sum or seq-mean-token-mean."""
    score_chunk_size: int = 256
    """Positions per chunk of the streamed divergence (peak memory O(chunk * vocab))."""

    def __post_init__(self) -> None:
        _coerce_types(self)
        errs = part_errors(self)
        for key in ("beta", "lmbda"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                errs.append(f"{key}={getattr(self, key)}: must be in [0, 1]")
        if self.loss_aggregation not in obj.AGGREGATIONS:
            errs.append(
                f"loss_aggregation={self.loss_aggregation!r}: choose one of {', '.join(obj.AGGREGATIONS)}"
            )
        errs += below(self, ("score_chunk_size",), 1)
        raise_errors(errs)

    def check_runnable(self) -> None:
        """Rules that only matter when actually training (not when printing help or defaults)."""
        require_keys(
            self,
            ("student", "teacher", "prompts"),
            "student=lab:student teacher=lab:teacher-a-plus prompts=lab:train",
        )
        if self.lmbda < 1 and not self.seq_kd and not self.response_field:
            raise ConfigError(
                f"lmbda={self.lmbda} < 1 needs fixed sequences: set response_field to the field holding a "
                "response (e.g. response_field=solution_a on lab prompts), or seq_kd=true to sample them from "
                "the teacher, or lmbda=1 for on-policy only"
            )


# --------------------------------------------------------------------------- the fixed sequences


def load_fixed_responses(cfg: GKDConfig, prompts: PromptSet, tokenizer) -> list[list[int]]:
    """Token ids of each prompt's fixed response (``response_field`` of its source row), ending with
    :func:`opd.teacher_data.end_of_response_id` (the end-of-turn marker, else EOS) and cut at ``max_new_tokens``. ConfigError naming the row when one is missing."""
    rows = read_rows(cfg.prompts)
    eot = end_of_response_id(tokenizer, use_chat_template=True)
    out = []
    for ex in prompts.examples:
        i = ex.meta["row"]
        value = _get_field(rows[i], cfg.response_field)  # a dotted path walks nested dicts
        value = None if value is _MISSING else value
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(
                f"prompts={cfg.prompts!r} row {i}: response_field={cfg.response_field!r} is "
                f"{'missing' if value is None else repr(value)[:60]}; every training row needs a non-empty "
                f"response text there (fields of this row: {', '.join(map(str, rows[i]))})"
            )
        ids = tokenizer.encode(value, add_special_tokens=False)
        if not ids or ids[-1] != eot:
            ids.append(eot)
        out.append(ids[: cfg.max_new_tokens])
    return out


def on_policy_step(seed: int, step: int, lmbda: float) -> bool:
    """λ's draw for ``step``: True (student samples) with probability ``lmbda``; a function of the seed and
    the step only, so a resumed run draws as the uninterrupted one."""
    return random.Random(f"opd-gkd:{seed}:{step}").random() < lmbda


# --------------------------------------------------------------------------- the loss and the update


def generalized_jsd(beta: float):
    """``divergence(student_logits_N_V, teacher_logits_N_V) -> jsd_N`` for ``scoring.full_vocab_pair``:
    JSD_β per position (logits already divided by τ by the scorers)."""

    def divergence(s_logits_N_V: torch.Tensor, t_logits_N_V: torch.Tensor) -> torch.Tensor:
        ones = torch.ones(1, s_logits_N_V.shape[0], device=s_logits_N_V.device)
        return obj.full_vocab_divergence(s_logits_N_V[None], t_logits_N_V[None], ones, kind="jsd", beta=beta)[
            0
        ]

    return divergence


def update(
    student: PolicyScorer,
    teacher: PolicyScorer,
    batch: RolloutBatch,
    optimizer,
    cfg: GKDConfig,
    runtime: Runtime | None = None,
):
    """One optimiser step on the aggregated JSD_β of the batch (streamed per micro-batch and position
    chunk). Returns (loss, grad_norm, skipped). With several processes (``runtime``) the loss is divided
    by the global token (or row) count and the gradients are summed across processes before clipping;
    ``loss`` is then this process's share of the global loss."""
    mask_all = batch.response_mask_B_T
    total = obj.loss_denominator(mask_all, cfg.loss_aggregation)
    if runtime is not None:
        total = runtime.sum({"n": total})["n"]
    B = batch.input_ids_B_T.shape[0]
    divergence = generalized_jsd(cfg.beta)
    params = [p for p in student.parameters() if p.requires_grad]
    student.train()
    optimizer.zero_grad(set_to_none=True)
    loss_sum = 0.0
    for lo in range(0, B, cfg.micro_batch_size):
        sl = slice(lo, lo + cfg.micro_batch_size)
        mb, mask = batch.select(sl), mask_all[sl]
        if mask.sum() == 0:
            continue
        w = obj.micro_batch_weight(mask, mask_all, cfg.loss_aggregation, total)
        div_B_T = student(
            mb.input_ids_B_T,
            mb.attention_mask_B_T,
            mb.response_mask_B_T,
            teacher=teacher.model,
            divergence=divergence,
            teacher_temperature=teacher.temperature,
        )
        loss = obj.aggregate(div_B_T, mask, cfg.loss_aggregation)
        (loss * w).backward()
        loss_sum += float(loss.detach()) * w
    norm, skipped = clip_and_step(params, optimizer, cfg.grad_clip, runtime)
    student.eval()
    return loss_sum, norm, skipped


# --------------------------------------------------------------------------- the training run


def train(cfg: GKDConfig) -> dict[str, Any]:
    """Run GKD as configured. Returns the run summary (also written to ``output_dir/summary.json``).

    Same run contract as ``opd train``: devices first, then the locked run directory; SIGINT/SIGTERM
    stop at the next step boundary with a checkpoint; ``resume=true`` continues exactly.
    """
    cfg.check_runnable()
    return run_processes(cfg, _train, per_step=("prompts_per_step", cfg.prompts_per_step))


def _train(cfg: GKDConfig, runtime: Runtime, run, stop) -> dict[str, Any]:
    out_dir = begin_process(cfg, runtime)

    models = load_models(cfg, runtime)
    student, tokenizer, vocab_limit = models.student, models.tokenizer, models.compat.vocab_limit
    prompts, eval_set = load_prompt_sets(cfg, models)
    fixed = load_fixed_responses(cfg, prompts, tokenizer) if cfg.lmbda < 1 and not cfg.seq_kd else None
    sampler = PromptSampler(prompts, seed=cfg.seed)
    backends = {
        "student": make_backend(
            cfg.rollout_backend,
            student,
            tokenizer,
            batch_size=cfg.rollout_batch_size or None,
            vocab_limit=vocab_limit,
        )
    }
    if cfg.seq_kd and cfg.lmbda < 1:
        backends["teacher"] = make_backend(
            cfg.rollout_backend,
            models.teacher,
            tokenizer,
            batch_size=cfg.rollout_batch_size or None,
            vocab_limit=vocab_limit,
        )
    # every grad-carrying student pass goes through this module (a DDP/FSDP wrapper would wrap it)
    student_scorer = PolicyScorer(
        student,
        temperature=cfg.temperature,
        chunk_size=cfg.score_chunk_size,
        vocab_limit=vocab_limit,
        compute_dtype=cfg.student_dtype,
    )
    teacher_scorer = PolicyScorer(
        models.teacher, temperature=cfg.temperature, chunk_size=cfg.score_chunk_size, vocab_limit=vocab_limit
    )
    optimizer = make_optimizer(student, cfg)
    scheduler = make_scheduler(optimizer, cfg)
    cost = CostMeter(count_parameters(student), count_parameters(models.teacher))
    metrics_log = open_metrics_log(cfg, runtime, out_dir)

    ends = StepEnd.open(
        "gkd",
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
        postfix=lambda row: dict(loss=f"{row['loss/gkd']:.4f}", on_policy=row["data/on_policy"]),
    )
    ends.start()  # step 0 of the accuracy curve; from here a signal stops at a step boundary
    for step in range(ends.start_step + 1, cfg.steps + 1):
        row = gkd_step(
            student_scorer,
            teacher_scorer,
            backends,
            tokenizer,
            prompts,
            fixed,
            sampler,
            optimizer,
            scheduler,
            cfg,
            runtime,
            step,
            cost,
        )
        row["skipped_steps"] = ends.count_skipped(row.pop("_skipped"))
        if ends.end_of_step(step, row):
            break
    return ends.finish(lora=models.lora)


def gkd_step(
    student: PolicyScorer,
    teacher: PolicyScorer,
    backends: dict[str, RolloutBackend],
    tokenizer,
    prompts: PromptSet,
    fixed: list[list[int]] | None,
    sampler: PromptSampler,
    optimizer: torch.optim.Optimizer,
    scheduler,
    cfg: GKDConfig,
    runtime: Runtime,
    step: int,
    cost: CostMeter,
) -> dict[str, Any]:
    """One GKD step (choose the data by λ → batch → one update on JSD_β → weight sync). Returns the row."""
    t_step = time.perf_counter()
    idx = sampler.next_batch(cfg.prompts_per_step)  # the step's global batch, the same on every process
    slots = runtime.shard(list(range(len(idx))))  # this process's share
    prompt_ids = [prompts.examples[idx[j]].input_ids for j in slots]
    prompt_seeds = (
        [prompt_seed(cfg.seed, step, j) for j in slots] if cfg.rollout_seeding == "per_prompt" else None
    )
    on_policy = on_policy_step(cfg.seed, step, cfg.lmbda)
    source = "student" if on_policy else ("teacher" if cfg.seq_kd else "fixed")
    t0 = time.perf_counter()
    if source == "fixed":
        eot = end_of_response_id(tokenizer, use_chat_template=True)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eot
        batch = fixed_batch(prompt_ids, [fixed[idx[j]] for j in slots], stop_ids=[eot], pad_id=int(pad))
    else:
        sampler_model = student.model if on_policy else teacher.model
        with compute_context(sampler_model, cfg.student_dtype if on_policy else None):
            batch = backends[source].generate(
                prompt_ids,
                n=cfg.rollouts_per_prompt,
                max_new_tokens=cfg.max_new_tokens,
                temperature=cfg.temperature,
                top_p=cfg.top_p,
                top_k=cfg.sample_top_k,
                seed=None,
                prompt_seeds=prompt_seeds,
            )
    batch = batch.to(runtime.device)
    t_data = time.perf_counter() - t0

    t0 = time.perf_counter()
    lr = scheduler.get_last_lr()[0]
    loss, grad_norm, skipped = update(student, teacher, batch, optimizer, cfg, runtime)
    scheduler.step()
    backends["student"].sync_weights(student.model)
    t_update = time.perf_counter() - t0

    n_tokens = int(batch.response_mask_B_T.sum())
    seq_tokens = int(batch.attention_mask_B_T.sum())
    generated = int(batch.response_lengths_B.sum())
    spent = dict(
        teacher_forward_tokens=seq_tokens,  # the teacher's no-grad pass inside the streamed divergence
        student_train_tokens=seq_tokens,
        student_loss_tokens=n_tokens,
    )
    if source == "student":
        spent.update(student_prefill_tokens=seq_tokens - generated, student_generated_tokens=generated)
    elif source == "teacher":
        spent.update(teacher_prefill_tokens=seq_tokens - generated, teacher_generated_tokens=generated)
    cost.add(**runtime.sum(spent))  # the counts of all processes: the same meter everywhere
    step_time = time.perf_counter() - t_step
    row = {
        "step": step,
        "loss/gkd": loss,
        "data/on_policy": int(on_policy),
        "grad_norm": grad_norm,
        "lr": lr,
        "response/length_mean": float(batch.response_lengths_B.float().mean()),
        "response/truncated_frac": float(batch.truncated_B.float().mean()),
        "time/data": t_data,
        "time/update": t_update,
        "time/step": step_time,
        **cost.row(),
        "memory/peak_mb": peak_memory_mb(runtime.device),
        "_skipped": skipped,
    }
    # per-sequence means weighted by this process's rows; the loss shares add up; the rest is global
    # (the same on every process) or a maximum (time, memory)
    per_row = {"response/length_mean", "response/truncated_frac", "time/data", "time/update"}
    return runtime.reduce_row(
        row, weight=batch.input_ids_B_T.shape[0], sums={"loss/gkd"}, maxima=set(row) - per_row - {"loss/gkd"}
    )
