"""On-policy distillation (OPD), one readable file.

What this file deliberately leaves out: value functions and baselines (the study uses none), reference-
model KL penalties, multi-turn rollouts, sequence packing, and distributed setup (``opd.runtime`` owns
devices and processes; ``fsdp=true`` shards the student with ``opd.fsdp``, whose ``ShardedScorer`` takes
the place of the ``PolicyScorer`` this loop scores through). The run
frame — run directory, seeding, optimiser and schedule, model and prompt loading, evaluation, the end
of a run — is :mod:`opd.methods.common`'s, shared with every method.

Each step:
  1. sample ``prompts_per_step`` prompts x ``rollouts_per_prompt`` student responses (the rollout
     backend from ``opd.rollout.make_backend``), moved to the student's device;
  2. score the responses with the student (its top-K, entropy, sampled-token log-probs; no grad) and the
     teacher (log-probs at the student's top-K ids, its own top-K, entropy; no grad) → :class:`ScoredBatch`;
  3. build per-token rewards (docs/paper.md §1): sampled-token ``log q - log p``; top-K
     ``w(v) (log q(v) - log p(v))`` on a support; or the exact full-vocabulary reverse KL;
  4. update the student with the policy-gradient loss (rewards used as advantages; no baseline, no
     discount, no KL-to-reference), micro-batches with gradient accumulation, ``ppo_epochs`` passes,
     every grad-carrying pass through the student's ``PolicyScorer``; then ``backend.sync_weights``;
  5. log the step (metrics.jsonl), check alerts, checkpoint atomically every ``save_every`` steps.

Temperature and precision. The student is scored at the distribution its rollout tokens were drawn
from: logits / ``temperature`` in every pass (rewards, old log-probs, the update's PPO ratio, metrics);
the teacher at ``teacher_temperature``. Top-p / top-k rollouts are refused by the config (they would be
off-policy for the scored objective). ``student_dtype`` is a compute dtype: the student's weights stay
float32 (AdamW master weights, saved as float32 in ``final/``) and its forwards run under autocast;
the head and everything after it are float32 (``opd.precision``). Full-vocabulary mode differentiates
the exact KL per micro-batch instead of using a policy gradient; it re-runs the teacher on each
micro-batch and streams both heads chunk by chunk (checkpointed), so no B x T x V tensor is ever kept.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from typing import Any

import numpy as np
import torch

from opd import fsdp
from opd import objectives as obj
from opd.config import OPDConfig
from opd.cost import CostMeter, count_parameters, peak_memory_mb
from opd.methods.common import (
    load_models,
    load_prompt_sets,
    make_alert_monitor,
    make_optimizer,
    make_scheduler,
    masked_mean,
    run_processes,
)
from opd.methods.loop import StepEnd, begin_process, open_metrics_log
from opd.methods.opd_scoring import (
    ScoredBatch,
    apply_gradients,
    can_fuse,
    fused_update,
    reverse_kl,
    score_batch,
    tis_weights,
)
from opd.metrics import mechanism_metrics
from opd.precision import compute_context
from opd.remote.client import RemoteTeacher
from opd.rollout import RolloutBackend, RolloutBatch, make_backend, prompt_seed, relay_responses
from opd.runtime import Runtime
from opd.sampler import PromptSampler
from opd.scoring import PolicyScorer

log = logging.getLogger("opd")


# --------------------------------------------------------------------------- update


def update(
    student: PolicyScorer,
    teacher: PolicyScorer,
    batch: RolloutBatch,
    scored: ScoredBatch,
    optimizer: torch.optim.Optimizer,
    cfg: OPDConfig,
    runtime: Runtime | None = None,
):
    """``ppo_epochs`` optimizer updates over the rollout batch, every grad-carrying student pass through
    the ``student`` scorer. With several processes the loss is normalised by the global token (or row)
    count and the accumulated gradients are summed across processes before clipping, so the update is
    the one a single process would make on the union of the batches. Returns (loss, grad_norm, skipped,
    stats); ``loss`` is this process's share of the global loss (the shares sum to it)."""
    mask_all = scored.mask_B_T
    total = obj.loss_denominator(mask_all, cfg.loss_aggregation)
    if runtime is not None:
        total = runtime.sum({"n": total})["n"]
    B = batch.input_ids_B_T.shape[0]
    params = [p for p in student.parameters() if p.requires_grad]
    losses, norms, skipped, clip_fracs = [], [], 0, []
    student.train()
    for _ in range(cfg.ppo_epochs):
        optimizer.zero_grad(set_to_none=True)
        total_loss = 0.0
        for lo in range(0, B, cfg.micro_batch_size):
            sl = slice(lo, lo + cfg.micro_batch_size)
            mb = batch.select(sl)
            mask = mask_all[sl]
            if mask.sum() == 0:
                # a sharded student still makes the pass's collectives (opd.fsdp.ShardedScorer's stand-in)
                if getattr(student, "lockstep", False):
                    student(mb.input_ids_B_T, mb.attention_mask_B_T, mb.response_mask_B_T * 0)
                continue
            w = obj.micro_batch_weight(mask, mask_all, cfg.loss_aggregation, total)
            if cfg.objective == "full":
                loss = _full_vocab_loss(student, teacher, mb, mask, cfg)
                stats = {}
            else:
                given = scored.support_ids_B_T_S[sl] if cfg.objective == "topk" else None
                out = student(mb.input_ids_B_T, mb.attention_mask_B_T, mb.response_mask_B_T, given)
                new_logp = out.given_logp_B_T_K if given is not None else out.token_logp_B_T
                loss, stats = obj.policy_gradient_loss(
                    new_logp,
                    scored.old_logp[sl],
                    scored.advantages[sl],
                    mask,
                    valid_B_T_S=scored.valid_B_T_S[sl] if given is not None else None,
                    clip_eps=cfg.clip_eps,
                    dual_clip=cfg.dual_clip,
                    aggregation=cfg.loss_aggregation,
                    token_weight_B_T=tis_weights(cfg, scored.student.token_logp_B_T[sl], mb, mask),
                )
            (loss * w).backward()
            total_loss += float(loss.detach()) * w
            if "clip_frac" in stats:
                clip_fracs.append(stats["clip_frac"])
        norm, was_skipped = apply_gradients(params, optimizer, cfg, runtime)
        skipped += was_skipped
        losses.append(total_loss)
        norms.append(norm)
    student.eval()
    stats = {"clip_frac": float(np.mean(clip_fracs)) if clip_fracs else 0.0}
    return float(np.mean(losses)), norms[-1], skipped, stats


def _full_vocab_loss(student: PolicyScorer, teacher: PolicyScorer, mb: RolloutBatch, mask, cfg: OPDConfig):
    """Exact per-token KL(p||q) over the whole vocabulary, p at ``temperature``, q at ``teacher_temperature``.

    Streamed by ``opd.scoring.full_vocab_pair`` (through the student scorer's forward): teacher no-grad,
    each position chunk's heads + KL checkpointed and recomputed in backward, so no B x T x V tensor is kept.
    """

    per_token = student(
        mb.input_ids_B_T,
        mb.attention_mask_B_T,
        mb.response_mask_B_T,
        teacher=teacher.model,
        divergence=reverse_kl,
        teacher_temperature=teacher.temperature,
    )
    return obj.aggregate(per_token, mask, cfg.loss_aggregation)


# --------------------------------------------------------------------------- the training run


def engine_options(cfg, longest_prompt: int) -> dict[str, Any]:
    """What a rollout engine with its own weights (``rollout_backend=vllm``) needs from the config."""
    return dict(
        dtype=cfg.student_dtype,
        max_model_len=longest_prompt + cfg.max_new_tokens,
        gpu_memory_utilization=cfg.vllm_gpu_memory_utilization,
        enforce_eager=cfg.vllm_enforce_eager,
        seed=cfg.seed,
    )


def train(cfg: OPDConfig) -> dict[str, Any]:
    """Run OPD as configured. Returns the run summary (also written to ``output_dir/summary.json``).

    The devices are resolved first (``opd.runtime``: ``device=cuda`` without a GPU fails here), then the
    run directory is checked and locked (:func:`opd.methods.common.open_run`). SIGINT/SIGTERM during
    training stop at the next step boundary: a checkpoint and ``summary.json`` (``interrupted``) are
    written and :class:`opd.rundir.RunInterrupted` is raised; ``resume=true`` continues exactly.
    """
    cfg.check_runnable()
    if cfg.fsdp:  # before the run directory is touched (the launcher's WORLD_SIZE, as opd.runtime reads it)
        fsdp.check_fsdp(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    return run_processes(cfg, _train, per_step=("prompts_per_step", cfg.prompts_per_step))


def _train(cfg: OPDConfig, runtime: Runtime, run, stop) -> dict[str, Any]:
    out_dir = begin_process(cfg, runtime)  # one seed on every process: any random init (LoRA) must agree

    models = load_models(cfg, runtime, served_teacher=True)
    student, tokenizer, vocab_limit = models.student, models.tokenizer, models.compat.vocab_limit
    n_student = count_parameters(student)
    if cfg.fsdp:  # weights, gradients and AdamW state sharded across the processes (opd.fsdp)
        fsdp.shard_student(student)
    prompts, eval_set = load_prompt_sets(cfg, models)
    sampler = PromptSampler(prompts, seed=cfg.seed)
    backend = make_backend(
        cfg.rollout_backend,
        student,
        tokenizer,
        batch_size=cfg.rollout_batch_size or None,
        vocab_limit=vocab_limit,
        engine_options=engine_options(cfg, max(len(e.input_ids) for e in prompts.examples)),
    )
    if cfg.fsdp:
        backend.share_prefill = False  # its decoder-only prefill runs only on some batches: not in lockstep
    # every student and teacher pass goes through these modules (fsdp=true: the sharded student's scorer)
    student_scorer = (fsdp.ShardedScorer if cfg.fsdp else PolicyScorer)(
        student,
        temperature=cfg.temperature,
        chunk_size=cfg.score_chunk_size,
        vocab_limit=vocab_limit,
        compute_dtype=cfg.student_dtype,
    )
    # a served teacher (teacher=http://...) is its own scorer: the same call, over HTTP (opd.remote)
    served = isinstance(models.teacher, RemoteTeacher)
    teacher_scorer = (
        models.teacher
        if served
        else PolicyScorer(
            models.teacher,
            temperature=cfg.teacher_temperature,
            chunk_size=cfg.score_chunk_size,
            vocab_limit=vocab_limit,
        )
    )
    optimizer = make_optimizer(student, cfg)
    scheduler = make_scheduler(optimizer, cfg)
    if cfg.fsdp:
        fsdp.reshard_before_steps(student, optimizer)
    n_teacher = models.teacher.num_parameters if served else count_parameters(models.teacher)
    cost = CostMeter(n_student, n_teacher)
    metrics_log = open_metrics_log(cfg, runtime, out_dir)
    monitor = make_alert_monitor(cfg)

    ends = StepEnd.open(
        "opd",
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
        postfix=lambda row: dict(
            loss=f"{row['loss/pg']:.4f}",
            kl=f"{row['kl/sampled']:.3f}",
            ovl=f"{row.get('overlap/ratio', float('nan')):.3f}",
        ),
        monitor=monitor,
        sharded=cfg.fsdp,
    )
    if ends.resumed.state is not None:
        backend.sync_weights(student)  # an engine with its own copy (vLLM) started on the old weights
    ends.start()  # step 0 of the accuracy curve; from here a signal stops at a step boundary
    for step in range(ends.start_step + 1, cfg.steps + 1):
        row = opd_step(
            student_scorer,
            teacher_scorer,
            backend,
            prompts,
            sampler,
            optimizer,
            scheduler,
            cfg,
            runtime,
            step,
            cost=cost,
        )
        row["skipped_steps"] = ends.count_skipped(row.pop("_skipped"))
        if ends.end_of_step(step, row):
            break
    if hasattr(backend, "close"):  # an engine process of its own (vLLM): shut it down now, not at exit
        backend.close()
    return ends.finish(lora=models.lora)


def opd_step(
    student: PolicyScorer,
    teacher: PolicyScorer,
    backend: RolloutBackend,
    prompts,
    sampler: PromptSampler,
    optimizer: torch.optim.Optimizer,
    scheduler,
    cfg: OPDConfig,
    runtime: Runtime,
    step: int,
    *,
    cost: CostMeter,
) -> dict[str, Any]:
    """One OPD step (rollout → scoring → rewards → update → weight sync → metrics). Returns the metrics row.

    ``student`` / ``teacher``: the scorers (``student.model`` is the trained model the backend samples).
    """
    t_step = time.perf_counter()
    idx = sampler.next_batch(cfg.prompts_per_step)  # the step's global batch, the same on every process
    slots = runtime.shard(list(range(len(idx))))  # this process's share
    prompt_seeds = (
        [prompt_seed(cfg.seed, step, j) for j in slots] if cfg.rollout_seeding == "per_prompt" else None
    )
    t0 = time.perf_counter()
    # a sharded student keeps its root (embeddings, head) gathered for the whole rollout (opd.fsdp)
    sampling = student.sampling() if hasattr(student, "sampling") else contextlib.nullcontext()
    with compute_context(student.model, cfg.student_dtype), sampling:
        batch = backend.generate(
            [prompts.examples[idx[j]].input_ids for j in slots],
            n=cfg.rollouts_per_prompt,
            max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            top_k=cfg.sample_top_k,
            seed=None,
            prompt_seeds=prompt_seeds,
        )
    batch = batch.to(runtime.device)  # the student's device; the teacher scorer moves its own inputs
    t_rollout = time.perf_counter() - t0
    teacher_batch = None  # teacher_prompt_template / teacher_system_prompt: the teacher reads its own prompts
    if prompts.examples[idx[slots[0]]].teacher_input_ids is not None:
        teacher_batch = relay_responses(
            batch,
            [
                prompts.examples[idx[j]].teacher_input_ids
                for j in slots
                for _ in range(cfg.rollouts_per_prompt)
            ],
        )

    lr = scheduler.get_last_lr()[0]
    fused = can_fuse(cfg)
    if fused:  # one student pass: scoring, rewards and the update per micro-batch (opd_scoring.py)
        t0 = time.perf_counter()
        scored, score_times, loss, grad_norm, skipped, upd_stats = fused_update(
            student, teacher, batch, optimizer, cfg, runtime, teacher_batch=teacher_batch
        )
        t0 += score_times["time/score_teacher"]  # the teacher's share is timed on its own
    else:
        scored, score_times = score_batch(student, teacher, batch, cfg, teacher_batch=teacher_batch)
        t0 = time.perf_counter()
        loss, grad_norm, skipped, upd_stats = update(student, teacher, batch, scored, optimizer, cfg, runtime)
    mask, s, t = scored.mask_B_T, scored.student, scored.teacher
    scheduler.step()
    # rollouts are drawn only at the start of a step, so one sync after the step's optimiser update(s)
    # is "after every optimiser step" as far as sampling can tell (HF: a no-op, it shares the module)
    backend.sync_weights(student.model)
    t_update = time.perf_counter() - t0

    mk = cfg.metrics_top_k
    # an engine with its own weights and kernels (vLLM): how far its log-probs are from the trainer's
    rollout_rows = (
        {}
        if batch.sampler_logprobs_B_T is None
        else obj.sampler_mismatch(s.token_logp_B_T, batch.sampler_logprobs_B_T, mask)
    )
    mech = mechanism_metrics(
        s.topk_ids_B_T_K[..., :mk],
        s.topk_logp_B_T_K[..., :mk],
        t.topk_ids_B_T_K[..., :mk],
        t.given_logp_B_T_K[..., :mk],
        s.entropy_B_T,
        t.entropy_B_T,
        mask,
        position_chunk=cfg.metrics_position_chunk,
    )
    n_tokens = int(mask.sum())
    seq_tokens = int(batch.attention_mask_B_T.sum())
    t_seq_tokens = seq_tokens if teacher_batch is None else int(teacher_batch.attention_mask_B_T.sum())
    extra_student_pass = cfg.objective == "topk" and cfg.support not in ("student", "intersection")
    teacher_reruns = cfg.ppo_epochs if cfg.objective == "full" and not fused else 0
    spent = dict(
        student_prefill_tokens=seq_tokens - int(batch.response_lengths_B.sum()),
        student_generated_tokens=int(batch.response_lengths_B.sum()),
        student_forward_tokens=0 if fused else seq_tokens * (2 if extra_student_pass else 1),
        # full vocabulary, two-pass: the teacher is run again on each micro-batch of each update pass
        teacher_forward_tokens=t_seq_tokens * (1 + teacher_reruns),
        student_train_tokens=seq_tokens * cfg.ppo_epochs,
        student_loss_tokens=n_tokens * cfg.ppo_epochs,
    )
    cost.add(**runtime.sum(spent))  # the counts of all processes: the same meter everywhere
    step_time = time.perf_counter() - t_step
    row: dict[str, Any] = {
        "step": step,
        "loss/pg": loss,
        "reward/mean": masked_mean(scored.token_reward_B_T, mask),
        "kl/sampled": masked_mean(s.token_logp_B_T - t.token_logp_B_T, mask),
        "grad_norm": grad_norm,
        "lr": lr,
        "clip_frac": upd_stats["clip_frac"],
        "response/length_mean": float(batch.response_lengths_B.float().mean()),
        "response/truncated_frac": float(batch.truncated_B.float().mean()),
        **mech,
        **rollout_rows,
        "time/rollout": t_rollout,
        **score_times,
        "time/update": t_update,
        "time/step": step_time,
        "throughput/tokens_per_s": n_tokens / step_time if step_time > 0 else 0.0,
        **cost.row(),
        "memory/peak_mb": peak_memory_mb(runtime.device),
        "_skipped": skipped,
    }
    cost_keys = {k for k in row if k.startswith("cost/")}  # already global
    return runtime.reduce_row(
        row,
        weight=n_tokens,  # token means (reward, KL, mechanism metrics) stay token means over all processes
        sums={"loss/pg"},
        maxima={"memory/peak_mb", "_skipped", "time/step"} | cost_keys,
    )
