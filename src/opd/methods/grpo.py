"""GRPO: reinforcement learning with a verifiable 0/1 reward, the RL baseline next to OPD, one file.

What this file deliberately leaves out: a teacher (the reward is the grader, :mod:`opd.grading`, on
prompts with answers), a value function, an entropy bonus, and format or length rewards. The
KL-to-reference penalty is optional and off by default (``kl_coef = 0``: no reference copy is loaded). The run frame — run directory, seeding, optimiser and schedule, prompt loading,
evaluation, the end of a run — is :mod:`opd.methods.common`'s, shared with every method.

Each step:
  1. sample ``prompts_per_step`` prompts x G = ``rollouts_per_prompt`` student responses (the rollout
     backend from ``opd.rollout.make_backend``) at ``temperature``;
  2. grade each response against its prompt's answer: reward ``r ∈ {0, 1}`` (the last ``\\boxed{}``,
     :func:`opd.grading.grade`);
  3. group-normalised advantages, one per response, given to each of its tokens
     (:func:`opd.objectives.group_advantages`):
        A[p, g] = (r[p, g] − mean_g r[p, ·]) / (std_g r[p, ·] + eps)   (``scale_rewards=false``: no division,
     Dr. GRPO); a group whose G rewards are all equal has A = 0 and teaches nothing;
  4. ``ppo_epochs`` passes of the PPO-clipped policy-gradient loss
     (:func:`opd.objectives.policy_gradient_loss`, no dual clip) with ``ratio = π_θ(y_t)/π_old(y_t)``,
     plus, with ``kl_coef = β_KL > 0``, the penalty ``β_KL · k3_t`` to a frozen copy of the initial student
     π_ref, ``k3_t = π_ref(y_t)/π_θ(y_t) − log(π_ref(y_t)/π_θ(y_t)) − 1`` (DeepSeekMath's and TRL's form,
     differentiated as a loss), both aggregated over tokens (``loss_aggregation``, token-mean by
     default); every grad-carrying pass
     through the student's ``PolicyScorer``; then ``backend.sync_weights``. With ``ppo_epochs = 1`` the
     old log-probs are the update's own (detached), the ratio is 1 and the gradient is
     ``−Σ_t A ∇log π_θ(y_t)`` / (number of tokens);
  5. log the step (metrics.jsonl), checkpoint atomically every ``save_every`` steps.

Several processes (``torchrun`` / ``accelerate launch``, :mod:`opd.runtime`): every process draws the
same prompts and samples, grades and normalises the groups of its contiguous share of them (a group
never straddles two processes, so its advantages are exactly one process's); the loss is divided by the
global token (or row) count and the gradients summed across processes once per step. With
``rollout_seeding=per_prompt`` the rollouts do not depend on the number of processes, so N processes
make the update of one.

The student is scored at ``temperature`` (the distribution its tokens were drawn from), so the ratio
is on-policy; top-p / top-k rollouts are refused by the config as in OPD.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from opd import objectives as obj
from opd.config import DataConfig, ModelsConfig, OptimConfig, RolloutConfig, RunConfig, part_errors
from opd.config_io import _coerce_types, below, raise_errors, require_keys
from opd.cost import CostMeter, count_parameters, peak_memory_mb
from opd.errors import ConfigError
from opd.evaluate import grade_responses
from opd.methods.common import (
    clip_and_step,
    load_models,
    load_prompt_sets,
    make_optimizer,
    make_scheduler,
    run_processes,
)
from opd.methods.loop import StepEnd, begin_process, open_metrics_log
from opd.models import load_model
from opd.precision import compute_context
from opd.rollout import RolloutBackend, make_backend, prompt_seed
from opd.runtime import Runtime
from opd.sampler import PromptSampler
from opd.scoring import PolicyScorer

log = logging.getLogger("opd")


@dataclass
class GRPOConfig(RunConfig, OptimConfig, RolloutConfig, DataConfig, ModelsConfig):
    """GRPO run: the student trained on a 0/1 grader reward, no teacher (leave ``teacher`` empty).

    The shared parts (models, data, rollout, optimiser, run) are inherited; the fields below are GRPO's own.
    ``prompts`` must carry answers (``answer_field``); ``rollouts_per_prompt`` is the group size G.
    """

    output_dir: str = "runs/grpo"
    """Where metrics.jsonl, checkpoints and the final model go."""
    scale_rewards: bool = True
    """Divide the group-centred reward by the group's std (+ ``adv_eps``): GRPO. false: only centre (Dr. GRPO)."""
    adv_eps: float = 1e-4
    """Added to the group std before dividing (an all-equal group gets advantage 0 either way)."""
    loss_aggregation: str = "token-mean"
    """token-mean, seq-mean-token-sum or seq-mean-token-mean."""
    ppo_epochs: int = 1
    """Passes (optimiser steps) over each rollout batch; ratio clipping matters only when > 1."""
    clip_eps: float = 0.2
    """PPO ratio clip epsilon."""
    kl_coef: float = 0.0
    """Weight of the per-token KL penalty (k3 estimator) to a frozen copy of the initial student (TRL's GRPO ``beta``); 0 = off, no copy loaded."""
    score_chunk_size: int = 256
    """Positions per chunk when computing log-softmax (peak memory O(chunk * vocab))."""

    def __post_init__(self) -> None:
        _coerce_types(self)
        errs = part_errors(self)
        if self.teacher:
            errs.append(
                f"teacher={self.teacher!r}: GRPO learns from the grader's reward and loads no teacher; "
                "remove the teacher key (or use `opd train` / `opd gkd` to distil from it)"
            )
        if self.rollouts_per_prompt < 2:
            errs.append(
                f"rollouts_per_prompt={self.rollouts_per_prompt}: GRPO normalises rewards within a group of "
                "responses to one prompt, so it needs >= 2 (e.g. 8)"
            )
        if self.loss_aggregation not in obj.AGGREGATIONS:
            errs.append(
                f"loss_aggregation={self.loss_aggregation!r}: choose one of {', '.join(obj.AGGREGATIONS)}"
            )
        errs += below(self, ("ppo_epochs", "score_chunk_size"), 1)
        if not 0 < self.clip_eps < 1:
            errs.append(f"clip_eps={self.clip_eps}: must be in (0, 1); the usual value is 0.2")
        if self.kl_coef < 0:
            errs.append(f"kl_coef={self.kl_coef}: must be >= 0 (0 = no KL-to-reference penalty)")
        if self.adv_eps <= 0:
            errs.append(f"adv_eps={self.adv_eps}: must be > 0 (e.g. 1e-4)")
        raise_errors(errs)

    def check_runnable(self) -> None:
        """Rules that only matter when actually training (not when printing help or defaults)."""
        require_keys(self, ("student", "prompts"), "student=lab:student prompts=lab:train")


# --------------------------------------------------------------------------- rewards and update


def rewards_and_advantages(
    tokenizer, batch, answers: list[str], cfg: GRPOConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """Grade every response (``reward_B``, 0/1 float) and the group-normalised advantage of each row
    (``adv_B``); rows are prompt-major (row = p·G + g, the rollout CONTRACT)."""
    G = cfg.rollouts_per_prompt
    responses = [
        batch.input_ids_B_T[b][batch.response_mask_B_T[b] > 0].tolist()
        for b in range(batch.input_ids_B_T.shape[0])
    ]
    truths = [answers[int(p)] for p in batch.prompt_index_B]
    reward_B = torch.tensor([float(c) for c in grade_responses(tokenizer, responses, truths)])
    adv_B = obj.group_advantages(reward_B.view(-1, G), scale=cfg.scale_rewards, eps=cfg.adv_eps).view(-1)
    return reward_B, adv_B


def update(
    student: PolicyScorer,
    batch,
    adv_B: torch.Tensor,
    optimizer,
    cfg: GRPOConfig,
    reference: PolicyScorer | None = None,
    runtime: Runtime | None = None,
):
    """``ppo_epochs`` optimiser updates of the clipped policy-gradient loss over the rollout batch, each
    token of row b carrying the advantage ``adv_B[b]``; with ``reference`` (when ``kl_coef > 0``) plus
    ``kl_coef`` times the aggregated k3 KL estimate to it. Returns (loss, grad_norm, skipped, stats) with
    stats ``clip_frac`` and ``kl/ref`` (the mean k3 of the first pass; 0 without a reference). With several
    processes (``runtime``) the loss is divided by the global token (or row) count and the gradients are
    summed across processes before clipping; ``loss`` and ``kl/ref`` are then this process's shares."""
    mask_all = batch.response_mask_B_T
    total = obj.loss_denominator(mask_all, cfg.loss_aggregation)
    n_tokens = float(mask_all.sum())
    if runtime is not None:
        totals = runtime.sum({"n": total, "tokens": n_tokens})
        total, n_tokens = totals["n"], totals["tokens"]
    B = batch.input_ids_B_T.shape[0]
    adv_B_T = adv_B.to(mask_all.device)[:, None] * mask_all
    micro = [slice(lo, lo + cfg.micro_batch_size) for lo in range(0, B, cfg.micro_batch_size)]
    old_logp_B_T = None
    if cfg.ppo_epochs > 1:  # the ratio's denominator: the policy that sampled, before any update
        old_logp_B_T = _token_logp(student, batch, micro)
    ref_logp_B_T = _token_logp(reference, batch, micro) if reference is not None else None
    params = [p for p in student.parameters() if p.requires_grad]
    losses, norms, clip_fracs, skipped, kl_sum = [], [], [], 0, 0.0
    student.train()
    for epoch in range(cfg.ppo_epochs):
        optimizer.zero_grad(set_to_none=True)
        loss_sum = 0.0
        for sl in micro:
            mb, mask = batch.select(sl), mask_all[sl]
            if mask.sum() == 0:
                continue
            w = obj.micro_batch_weight(mask, mask_all, cfg.loss_aggregation, total)
            logp = student(mb.input_ids_B_T, mb.attention_mask_B_T, mb.response_mask_B_T).token_logp_B_T
            old = old_logp_B_T[sl] if old_logp_B_T is not None else logp.detach()
            loss, stats = obj.policy_gradient_loss(
                logp,
                old,
                adv_B_T[sl],
                mask,
                clip_eps=cfg.clip_eps,
                dual_clip=None,
                aggregation=cfg.loss_aggregation,
            )
            if ref_logp_B_T is not None:
                # k3 = r − log r − 1 with r = π_ref/π_θ (>= 0); sampled_token_rewards' k3 is its negative
                k3_B_T = -obj.sampled_token_rewards(logp, ref_logp_B_T[sl], mask, estimator="k3")
                loss = loss + cfg.kl_coef * obj.aggregate(k3_B_T, mask, cfg.loss_aggregation)
                if epoch == 0:
                    kl_sum += float((k3_B_T.detach() * mask).sum())
            (loss * w).backward()
            loss_sum += float(loss.detach()) * w
            clip_fracs.append(stats["clip_frac"])
        norm, was_skipped = clip_and_step(params, optimizer, cfg.grad_clip, runtime)
        skipped += was_skipped
        losses.append(loss_sum)
        norms.append(norm)
    student.eval()
    stats = {
        "clip_frac": float(np.mean(clip_fracs)) if clip_fracs else 0.0,
        "kl/ref": kl_sum / max(1.0, n_tokens),
    }
    return float(np.mean(losses)), norms[-1], skipped, stats


def _token_logp(scorer: PolicyScorer, batch, micro: list[slice]) -> torch.Tensor:
    """No-grad sampled-token log-probs ``logp_B_T`` of ``scorer``'s model, micro-batch by micro-batch."""
    parts = []
    with torch.no_grad():
        for sl in micro:
            mb = batch.select(sl)
            parts.append(scorer(mb.input_ids_B_T, mb.attention_mask_B_T, mb.response_mask_B_T).token_logp_B_T)
    return torch.cat(parts)


# --------------------------------------------------------------------------- the training run


def train(cfg: GRPOConfig) -> dict[str, Any]:
    """Run GRPO as configured. Returns the run summary (also written to ``output_dir/summary.json``).

    Same run contract as ``opd train``: devices first, then the locked run directory; SIGINT/SIGTERM
    stop at the next step boundary with a checkpoint; ``resume=true`` continues exactly.
    """
    cfg.check_runnable()
    return run_processes(cfg, _train, per_step=("prompts_per_step", cfg.prompts_per_step))


def _train(cfg: GRPOConfig, runtime: Runtime, run, stop) -> dict[str, Any]:
    out_dir = begin_process(cfg, runtime)

    models = load_models(cfg, runtime)  # no teacher: the student alone
    student, tokenizer, vocab_limit = models.student, models.tokenizer, models.compat.vocab_limit
    prompts, eval_set = load_prompt_sets(cfg, models)
    answers = [e.answer for e in prompts.examples]
    if any(a is None for a in answers):
        n_missing = sum(a is None for a in answers)
        raise ConfigError(
            f"prompts={cfg.prompts!r}: {n_missing} of {len(answers)} prompts have no answer "
            f"(answer_field={cfg.answer_field!r}); GRPO's reward grades against it. Fix: set answer_field to "
            "the ground-truth field, or drop the rows without one"
        )
    sampler = PromptSampler(prompts, seed=cfg.seed)
    backend = make_backend(
        cfg.rollout_backend,
        student,
        tokenizer,
        batch_size=cfg.rollout_batch_size or None,
        vocab_limit=vocab_limit,
    )
    student_scorer = PolicyScorer(
        student,
        temperature=cfg.temperature,
        chunk_size=cfg.score_chunk_size,
        vocab_limit=vocab_limit,
        compute_dtype=cfg.student_dtype,
    )
    reference = None
    if cfg.kl_coef > 0:  # a frozen copy of the initial student (reloaded from cfg.student on resume)
        ref_model = load_model(
            cfg.student, dtype="float32", trust_remote_code=cfg.trust_remote_code, device=runtime.device
        )
        ref_model.eval()
        ref_model.requires_grad_(False)
        reference = PolicyScorer(
            ref_model,
            temperature=cfg.temperature,
            chunk_size=cfg.score_chunk_size,
            vocab_limit=vocab_limit,
            compute_dtype=cfg.student_dtype,
        )
    optimizer = make_optimizer(student, cfg)
    scheduler = make_scheduler(optimizer, cfg)
    cost = CostMeter(count_parameters(student), teacher_params=0)
    metrics_log = open_metrics_log(cfg, runtime, out_dir)

    ends = StepEnd.open(
        "grpo",
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
        postfix=lambda row: dict(loss=f"{row['loss/pg']:.4f}", reward=f"{row['reward/mean']:.3f}"),
    )
    ends.start()  # step 0 of the accuracy curve; from here a signal stops at a step boundary
    for step in range(ends.start_step + 1, cfg.steps + 1):
        row = grpo_step(
            student_scorer,
            reference,
            backend,
            tokenizer,
            prompts,
            answers,
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


def grpo_step(
    student: PolicyScorer,
    reference: PolicyScorer | None,
    backend: RolloutBackend,
    tokenizer,
    prompts,
    answers: list[str],
    sampler: PromptSampler,
    optimizer: torch.optim.Optimizer,
    scheduler,
    cfg: GRPOConfig,
    runtime: Runtime,
    step: int,
    cost: CostMeter,
) -> dict[str, Any]:
    """One GRPO step (rollout → grade → group advantages → update → weight sync). Returns the metrics row."""
    t_step = time.perf_counter()
    idx = sampler.next_batch(cfg.prompts_per_step)  # the step's global batch, the same on every process
    slots = runtime.shard(list(range(len(idx))))  # this process's prompts: whole groups
    t0 = time.perf_counter()
    with compute_context(student.model, cfg.student_dtype):
        batch = backend.generate(
            [prompts.examples[idx[j]].input_ids for j in slots],
            n=cfg.rollouts_per_prompt,
            max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            top_k=cfg.sample_top_k,
            seed=None,
            prompt_seeds=[prompt_seed(cfg.seed, step, j) for j in slots]
            if cfg.rollout_seeding == "per_prompt"
            else None,
        )
    t_rollout = time.perf_counter() - t0
    # prompt_index_B indexes the step's prompt list; map it to the answers of the chosen prompts
    reward_B, adv_B = rewards_and_advantages(tokenizer, batch, [answers[idx[j]] for j in slots], cfg)
    batch = batch.to(runtime.device)

    t0 = time.perf_counter()
    lr = scheduler.get_last_lr()[0]
    loss, grad_norm, skipped, stats = update(student, batch, adv_B, optimizer, cfg, reference, runtime)
    scheduler.step()
    backend.sync_weights(student.model)
    t_update = time.perf_counter() - t0

    n_tokens = int(batch.response_mask_B_T.sum())
    seq_tokens = int(batch.attention_mask_B_T.sum())
    spent = dict(
        student_prefill_tokens=seq_tokens - int(batch.response_lengths_B.sum()),
        student_generated_tokens=int(batch.response_lengths_B.sum()),
        # no-grad student-size passes: the old log-probs (ppo_epochs > 1), the reference (kl_coef > 0)
        student_forward_tokens=seq_tokens * (int(cfg.ppo_epochs > 1) + int(reference is not None)),
        student_train_tokens=seq_tokens * cfg.ppo_epochs,
        student_loss_tokens=n_tokens * cfg.ppo_epochs,
    )
    cost.add(**runtime.sum(spent))  # the counts of all processes: the same meter everywhere
    groups_P_G = reward_B.view(-1, cfg.rollouts_per_prompt)
    reward_std = float(reward_B.std(correction=0))
    if runtime.world_size > 1:  # the std of all processes' rewards, from their sums
        m = runtime.sum({"n": reward_B.numel(), "r": float(reward_B.sum()), "r2": float((reward_B**2).sum())})
        reward_std = max(0.0, m["r2"] / m["n"] - (m["r"] / m["n"]) ** 2) ** 0.5
    step_time = time.perf_counter() - t_step
    row = {
        "step": step,
        "loss/pg": loss,
        "reward/mean": float(reward_B.mean()),
        "reward/std": reward_std,
        "reward/zero_adv_group_frac": float((groups_P_G == groups_P_G[:, :1]).all(dim=1).float().mean()),
        "adv/abs_mean": float(adv_B.abs().mean()),
        "grad_norm": grad_norm,
        "lr": lr,
        "clip_frac": stats["clip_frac"],
        "kl/ref": stats["kl/ref"],
        "response/length_mean": float(batch.response_lengths_B.float().mean()),
        "response/truncated_frac": float(batch.truncated_B.float().mean()),
        "time/rollout": t_rollout,
        "time/update": t_update,
        "time/step": step_time,
        **cost.row(),
        "memory/peak_mb": peak_memory_mb(runtime.device),
        "_skipped": skipped,
    }
    # per-response means weighted by this process's rows (every process has whole groups of G); the
    # loss and KL shares add up; the rest is global (the same on every process) or a maximum
    per_row = {
        "reward/mean",
        "reward/zero_adv_group_frac",
        "adv/abs_mean",
        "clip_frac",
        "response/length_mean",
        "response/truncated_frac",
        "time/rollout",
        "time/update",
    }
    shares = {"loss/pg", "kl/ref"}
    return runtime.reduce_row(
        row, weight=batch.input_ids_B_T.shape[0], sums=shares, maxima=set(row) - per_row - shares
    )
