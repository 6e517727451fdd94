"""On-policy distillation (OPD), one readable file.

Each step:
  1. sample ``prompts_per_step`` prompts x ``rollouts_per_prompt`` student responses (rollout backend);
  2. score the responses with the student (its top-K, entropy, sampled-token log-probs; no grad) and the
     teacher (log-probs at the student's top-K ids, its own top-K, entropy; no grad);
  3. build per-token rewards (docs/paper.md §1): sampled-token ``log q - log p``; top-K
     ``w(v) (log q(v) - log p(v))`` on a support; or the exact full-vocabulary reverse KL;
  4. update the student with the policy-gradient loss (rewards used as advantages; no baseline, no
     discount, no KL-to-reference), micro-batches with gradient accumulation, ``ppo_epochs`` passes;
  5. log the step (metrics.jsonl), check alerts, checkpoint atomically every ``save_every`` steps.

Temperature and precision. The student is scored at the distribution its rollout tokens were drawn
from: logits / ``temperature`` in every pass (rewards, old log-probs, the update's PPO ratio, metrics);
the teacher at ``teacher_temperature``. Top-p / top-k rollouts are refused by the config (they would be
off-policy for the scored objective). ``student_dtype`` is a compute dtype: the student's weights stay
float32 (AdamW master weights, saved as float32 in ``final/``) and its forwards run under autocast;
the head and everything after it are float32 (``opd.precision``).

What this file deliberately leaves out: value functions and baselines (the study uses none), reference-
model KL penalties, multi-turn rollouts, sequence packing, and distributed setup (the same code runs
under ``accelerate launch`` via a later accelerate integration). Full-vocabulary mode differentiates
the exact KL per micro-batch instead of using a policy gradient; it re-runs the teacher on each
micro-batch and streams both heads chunk by chunk (checkpointed), so no B x T x V tensor is ever kept.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from opd import objectives as obj
from opd.checkpoint import load_newest_checkpoint, save_checkpoint
from opd.config import OPDConfig, to_dict
from opd.tracking import MetricsLogger, progress

log = logging.getLogger("opd")


# --------------------------------------------------------------------------- set-up helpers


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: OPDConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup, then constant or cosine decay to 0 at ``cfg.steps``. Stepped once per OPD step."""

    def factor(step: int) -> float:
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.lr_schedule == "cosine":
            span = max(1, cfg.steps - cfg.warmup_steps)
            progress_ = min(1.0, (step - cfg.warmup_steps) / span)
            return 0.5 * (1.0 + math.cos(math.pi * progress_))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> float:
    n = mask.sum()
    return float((x * mask).sum() / n) if n > 0 else 0.0


def micro_batch_weight(mask_mb_B_T: torch.Tensor, mask_all_B_T: torch.Tensor, aggregation: str) -> float:
    """Scale of a micro-batch's aggregated loss so that the accumulated sum equals the aggregate over
    the whole rollout batch (token-mean: by token count; seq-mean-*: by the number of non-empty rows)."""
    if aggregation == "token-mean":
        total = mask_all_B_T.sum()
        return float(mask_mb_B_T.sum() / total) if total > 0 else 0.0
    total = (mask_all_B_T.sum(-1) > 0).sum()
    return float((mask_mb_B_T.sum(-1) > 0).sum() / total) if total > 0 else 0.0


# --------------------------------------------------------------------------- scoring + rewards


def score_batch(student, teacher, batch, cfg: OPDConfig, vocab_limit: int) -> dict[str, Any]:
    """No-grad scoring of a rollout batch by both models and the per-token rewards.

    Returns a dict of tensors: ``mask`` (B,T), ``student``/``teacher`` ScoreOutputs, and for the
    objective: ``old_logp`` and ``advantages`` ((B,T) sampled-token, (B,T,S) top-K) plus
    ``support_ids``/``valid`` for top-K. Done in micro-batches to bound memory.
    """
    from opd.models import check_finite_logp
    from opd.scoring import ScoreOutput, score

    mask = batch.response_mask_B_T.float()
    mk = cfg.metrics_top_k
    width = max(mk, cfg.top_k if cfg.objective == "topk" else 0)
    parts_s, parts_t = [], []
    t_student = t_teacher = 0.0
    B = batch.input_ids_B_T.shape[0]
    with torch.no_grad():
        for lo in range(0, B, cfg.micro_batch_size):
            mb = batch.select(slice(lo, lo + cfg.micro_batch_size))
            t0 = time.perf_counter()
            s = score(
                student,
                mb.input_ids_B_T,
                mb.attention_mask_B_T,
                mb.response_mask_B_T,
                temperature=cfg.temperature,  # the distribution the rollout tokens were drawn from
                top_k=width,
                entropy=True,
                chunk_size=cfg.score_chunk_size,
                vocab_limit=vocab_limit,
                compute_dtype=cfg.student_dtype,
            )
            t1 = time.perf_counter()
            t = score(
                teacher,
                mb.input_ids_B_T,
                mb.attention_mask_B_T,
                mb.response_mask_B_T,
                temperature=cfg.teacher_temperature,
                top_k=width,
                given_ids_B_T_K=s.topk_ids_B_T_K,
                entropy=True,
                chunk_size=cfg.score_chunk_size,
                vocab_limit=vocab_limit,
            )
            t_student += t1 - t0
            t_teacher += time.perf_counter() - t1
            parts_s.append(s)
            parts_t.append(t)
    s_out = ScoreOutput(
        **{k: _cat([getattr(p, k) for p in parts_s]) for k in ScoreOutput.__dataclass_fields__}
    )
    t_out = ScoreOutput(
        **{k: _cat([getattr(p, k) for p in parts_t]) for k in ScoreOutput.__dataclass_fields__}
    )
    check_finite_logp("student", cfg.student, s_out.token_logp_B_T, mask)  # before any update uses them
    check_finite_logp("teacher", cfg.teacher, t_out.token_logp_B_T, mask)
    out: dict[str, Any] = {"mask": mask, "student": s_out, "teacher": t_out}

    if cfg.objective == "sampled":
        out["old_logp"] = s_out.token_logp_B_T
        # the advantage is always k1 (k3 is not an advantage: docs/objectives.md); `estimator` picks
        # only the logged per-token reward
        out["advantages"] = obj.sampled_token_rewards(s_out.token_logp_B_T, t_out.token_logp_B_T, mask, "k1")
        out["token_reward"] = obj.sampled_token_rewards(
            s_out.token_logp_B_T, t_out.token_logp_B_T, mask, estimator=cfg.estimator
        )
    elif cfg.objective == "topk":
        K = cfg.top_k
        s_ids, s_lp = s_out.topk_ids_B_T_K[..., :K], s_out.topk_logp_B_T_K[..., :K]
        t_ids, t_lp = t_out.topk_ids_B_T_K[..., :K], t_out.topk_logp_B_T_K[..., :K]
        s_at_t = None
        if cfg.support not in ("student", "intersection"):
            # the student's log-probs at the teacher's top-K ids need one more (no-grad) student pass
            t0 = time.perf_counter()
            s_at_t = _score_given(student, batch, t_ids, cfg, vocab_limit, cfg.temperature, cfg.student_dtype)
            t_student += time.perf_counter() - t0
        topk = obj.topk_advantages(
            s_ids,
            s_lp,
            t_ids,
            t_lp,
            teacher_logp_at_student_B_T_K=t_out.given_logp_B_T_K[..., :K],
            student_logp_at_teacher_B_T_K=s_at_t,  # None for student / intersection
            mask_B_T=mask,
            support=cfg.support,
            weighting=cfg.weighting,
            renormalize=cfg.renormalize,
        )
        out.update(
            support_ids=topk.support_ids,
            valid=topk.valid,
            old_logp=topk.student_logp,
            advantages=topk.advantages,
            token_reward=topk.rewards.sum(-1),
        )
    else:  # full vocabulary: the loss is the exact KL, computed with grad in the update
        out["token_reward"] = t_out.token_logp_B_T - s_out.token_logp_B_T
    out["time/score_student"], out["time/score_teacher"] = t_student, t_teacher
    return out


def _score_given(
    model, batch, ids_B_T_K, cfg: OPDConfig, vocab_limit: int, temperature: float, compute_dtype: str
) -> torch.Tensor:
    from opd.scoring import score

    parts = []
    with torch.no_grad():
        for lo in range(0, batch.input_ids_B_T.shape[0], cfg.micro_batch_size):
            sl = slice(lo, lo + cfg.micro_batch_size)
            mb = batch.select(sl)
            o = score(
                model,
                mb.input_ids_B_T,
                mb.attention_mask_B_T,
                mb.response_mask_B_T,
                temperature=temperature,
                entropy=False,
                given_ids_B_T_K=ids_B_T_K[sl],
                chunk_size=cfg.score_chunk_size,
                vocab_limit=vocab_limit,
                compute_dtype=compute_dtype,
            )
            parts.append(o.given_logp_B_T_K)
    return torch.cat(parts)


def _cat(xs: list) -> Any:
    return None if xs[0] is None else torch.cat(xs)


# --------------------------------------------------------------------------- update


def update(student, teacher, batch, scored: dict[str, Any], optimizer, cfg: OPDConfig, vocab_limit: int):
    """``ppo_epochs`` optimizer updates over the rollout batch. Returns (loss, grad_norm, skipped, stats)."""
    from opd.scoring import score

    mask_all = scored["mask"]
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
                continue
            w = micro_batch_weight(mask, mask_all, cfg.loss_aggregation)
            if cfg.objective == "full":
                loss = _full_vocab_loss(student, teacher, mb, mask, cfg, vocab_limit)
                stats = {}
            else:
                given = scored["support_ids"][sl] if cfg.objective == "topk" else None
                out = score(
                    student,
                    mb.input_ids_B_T,
                    mb.attention_mask_B_T,
                    mb.response_mask_B_T,
                    temperature=cfg.temperature,
                    given_ids_B_T_K=given,
                    entropy=False,
                    grad=True,
                    chunk_size=cfg.score_chunk_size,
                    vocab_limit=vocab_limit,
                    compute_dtype=cfg.student_dtype,
                )
                new_logp = out.given_logp_B_T_K if given is not None else out.token_logp_B_T
                loss, stats = obj.policy_gradient_loss(
                    new_logp,
                    scored["old_logp"][sl],
                    scored["advantages"][sl],
                    mask,
                    valid_B_T_S=scored["valid"][sl] if given is not None else None,
                    clip_eps=cfg.clip_eps,
                    dual_clip=cfg.dual_clip,
                    aggregation=cfg.loss_aggregation,
                )
            (loss * w).backward()
            total_loss += float(loss.detach()) * w
            if "clip_frac" in stats:
                clip_fracs.append(stats["clip_frac"])
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        if not math.isfinite(norm):
            optimizer.zero_grad(set_to_none=True)
            skipped += 1
            log.warning("non-finite gradient norm (%s): update skipped", norm)
        else:
            optimizer.step()
        losses.append(total_loss)
        norms.append(norm)
    student.eval()
    stats = {"clip_frac": float(np.mean(clip_fracs)) if clip_fracs else 0.0}
    return float(np.mean(losses)), norms[-1], skipped, stats


def _full_vocab_loss(student, teacher, mb, mask, cfg, vocab_limit):
    """Exact per-token KL(p||q) over the whole vocabulary, p at ``temperature``, q at ``teacher_temperature``.

    Streamed by ``opd.scoring.full_vocab_pair``: teacher no-grad, each position chunk's heads + KL
    checkpointed and recomputed in backward, so no B x T x V tensor is kept.
    """
    from opd.scoring import full_vocab_pair

    def reverse_kl(s_logits_N_V, t_logits_N_V):
        ones = torch.ones(1, s_logits_N_V.shape[0], device=s_logits_N_V.device)
        return obj.full_vocab_divergence(s_logits_N_V[None], t_logits_N_V[None], ones, kind="reverse_kl")[0]

    per_token = full_vocab_pair(
        student,
        teacher,
        mb.input_ids_B_T,
        mb.attention_mask_B_T,
        mb.response_mask_B_T,
        reverse_kl,
        temperature=cfg.temperature,
        teacher_temperature=cfg.teacher_temperature,
        vocab_limit=vocab_limit,
        chunk_size=cfg.score_chunk_size,
        grad=True,
        compute_dtype=cfg.student_dtype,
    )
    return obj.aggregate(per_token, mask, cfg.loss_aggregation)


# --------------------------------------------------------------------------- the training run


def train(cfg: OPDConfig) -> dict[str, Any]:
    """Run OPD as configured. Returns the run summary (also written to ``output_dir/summary.json``).

    The run directory is checked and locked first (:mod:`opd.rundir`: one run per directory, a
    non-empty one only with ``resume``/``overwrite``, never an input's directory). SIGINT/SIGTERM during
    training stop at the next step boundary: a checkpoint and ``summary.json`` (``interrupted``) are
    written and :class:`opd.rundir.RunInterrupted` is raised; ``resume=true`` continues exactly.
    """
    from opd.rundir import StopSignals, locked_run_dir, prepare_train_dir

    cfg.check_runnable()
    models = {"student": cfg.student, "teacher": cfg.teacher}
    data = {"prompts": cfg.prompts, "eval_prompts": cfg.eval_prompts}
    with locked_run_dir(cfg.output_dir, models=models, data=data) as run, StopSignals() as stop:
        prepare_train_dir(run, to_dict(cfg), to_dict(OPDConfig()), resume=cfg.resume, overwrite=cfg.overwrite)
        return _train(cfg, run, stop)


def _train(cfg: OPDConfig, run, stop) -> dict[str, Any]:
    from opd.data import PromptSampler, load_prompts
    from opd.models import (
        check_compatibility,
        load_model,
        load_tokenizer,
        prompt_token_cap,
        same_model_warning,
        save_model,
    )
    from opd.rollout import HFGenerateBackend, stop_token_ids
    from opd.rundir import RunInterrupted

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out_dir = Path(cfg.output_dir)
    seed_everything(cfg.seed)

    # -- models and tokenizers; compatibility first, so a mismatch fails before any work
    tokenizer = load_tokenizer(cfg.student, trust_remote_code=cfg.trust_remote_code)
    teacher_tokenizer = load_tokenizer(cfg.teacher, trust_remote_code=cfg.trust_remote_code)
    # float32 master weights; cfg.student_dtype is the compute dtype (autocast), see opd.precision
    student = load_model(cfg.student, dtype="float32", trust_remote_code=cfg.trust_remote_code)
    teacher = load_model(cfg.teacher, dtype=cfg.teacher_dtype, trust_remote_code=cfg.trust_remote_code)
    compat = check_compatibility(tokenizer, teacher_tokenizer, student, teacher)
    for w in compat.warnings + [same_model_warning(cfg.student, cfg.teacher, student, teacher)]:
        if w:
            log.warning(w)
    for note in compat.notes:
        log.info(note)
    # prompt + response must fit both models' context (positions past it are silently extrapolated)
    max_prompt_tokens, cap_why = prompt_token_cap(cfg.max_prompt_tokens, cfg.max_new_tokens, student, teacher)
    if cap_why:
        log.info("max_prompt_tokens=%d (%s)", max_prompt_tokens, cap_why)
    teacher.eval()
    teacher.requires_grad_(False)
    student.eval()

    def prompt_set(source: str, **kw):
        # data.load_prompts logs how many overlong prompts it dropped
        return load_prompts(
            source,
            tokenizer,
            prompt_field=cfg.prompt_field,
            answer_field=cfg.answer_field,
            prompt_template=cfg.prompt_template,
            use_chat_template=cfg.use_chat_template,
            chat_template_kwargs=cfg.chat_template_kwargs,
            max_prompt_tokens=max_prompt_tokens,
            max_prompt_tokens_why=cap_why,
            **kw,
        )

    prompts = prompt_set(cfg.prompts)
    eval_set = None
    if cfg.eval_every:  # a random (not the first) subset when limited
        eval_set = prompt_set(
            cfg.eval_prompts, limit=cfg.eval_limit or None, seed=cfg.seed if cfg.eval_limit else None
        )
    sampler = PromptSampler(prompts, seed=cfg.seed)
    backend = HFGenerateBackend(
        student,
        tokenizer,
        stop_token_ids(tokenizer),
        batch_size=cfg.rollout_batch_size or None,
        vocab_limit=compat.vocab_limit,
    )

    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params, lr=cfg.lr, betas=tuple(cfg.adam_betas), weight_decay=cfg.weight_decay
    )
    scheduler = make_scheduler(optimizer, cfg)

    metrics_log = MetricsLogger(out_dir / "metrics.jsonl")
    monitor = None
    if cfg.alerts:
        from opd.alerts import AlertConfig, AlertMonitor

        monitor = AlertMonitor(AlertConfig(**{**cfg.alert_thresholds, "stop_on_alert": cfg.stop_on_alert}))

    start_step, skipped_total = 0, 0
    if cfg.resume:
        found = load_newest_checkpoint(out_dir, model=student, optimizer=optimizer, scheduler=scheduler)
        if found is None:
            log.warning("resume=true but no complete checkpoint in %s: starting from scratch", out_dir)
        else:
            ckpt, state = found
            start_step = state["step"]
            skipped_total = state.get("skipped_steps", 0)
            sampler.load_state_dict(state["sampler"])
            if monitor is not None and "alerts" in state:
                monitor.load_state_dict(state["alerts"])
            log.info("resumed from %s (step %d)", ckpt, start_step)
    run.clear_previous_run()  # overwrite=true: only now that models and data have loaded
    metrics_log.truncate_after(start_step)
    (out_dir / "config.json").write_text(json.dumps(to_dict(cfg), indent=1))

    if eval_set is not None and start_step == 0:  # the starting point of the accuracy curve
        metrics_log.log({"step": 0, **evaluate_during_training(student, tokenizer, eval_set, cfg)})
    history: list[dict[str, Any]] = []
    run_t0 = time.perf_counter()
    stopped_by_alert = None
    bar = progress(total=cfg.steps, initial=start_step, desc="opd", enabled=cfg.progress, unit="step")
    interrupted = None
    stop.arm()  # from here a first SIGINT/SIGTERM stops at the step boundary with a checkpoint

    def checkpoint(step: int) -> Path:
        return save_checkpoint(
            out_dir,
            step,
            model=student,
            tokenizer=tokenizer,
            optimizer=optimizer,
            scheduler=scheduler,
            keep=cfg.keep_checkpoints,
            state={
                "sampler": sampler.state_dict(),
                "skipped_steps": skipped_total,
                "alerts": monitor.state_dict() if monitor is not None else None,
            },
        )

    for step in range(start_step + 1, cfg.steps + 1):
        row = opd_step(
            student, teacher, backend, prompts, sampler, optimizer, scheduler, cfg, compat.vocab_limit, step
        )
        skipped_total += row.pop("_skipped")
        row["skipped_steps"] = skipped_total
        if eval_set is not None and (step % cfg.eval_every == 0 or step == cfg.steps):
            row.update(evaluate_during_training(student, tokenizer, eval_set, cfg))
        if monitor is not None:
            for name, msg in monitor.update(step, row).items():
                row[name] = msg
                bar.write(f"[opd] ALERT step {step}: {msg}")
        metrics_log.log(row)
        history.append(row)
        bar.set_postfix(
            loss=f"{row['loss/pg']:.4f}",
            kl=f"{row['kl/sampled']:.3f}",
            ovl=f"{row.get('overlap/ratio', float('nan')):.3f}",
        )
        bar.update(1)
        saved = None
        if cfg.save_every and step % cfg.save_every == 0 and step < cfg.steps:
            saved = checkpoint(step)
        if stop.requested and step < cfg.steps:
            interrupted = {"signal": stop.requested, "checkpoint": str(saved or checkpoint(step))}
            bar.write(
                f"[opd] {stop.requested}: stopped after step {step}, checkpoint {interrupted['checkpoint']}"
            )
            break
        if monitor is not None and monitor.should_stop:
            stopped_by_alert = step
            bar.write(f"[opd] stop_on_alert: stopping after step {step}")
            break
    bar.close()
    metrics_log.close()
    loop_time = time.perf_counter() - run_t0
    if interrupted is not None:
        summary = {
            "output_dir": str(out_dir),
            "final_model": None,
            "steps_done": step,
            "skipped_steps": skipped_total,
            "loop_time_s": loop_time,
            "interrupted": interrupted["signal"],
            "checkpoint": interrupted["checkpoint"],
            "resume": "rerun with resume=true and the same output_dir to continue",
            "last": history[-1] if history else {},
        }
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
        raise RunInterrupted(interrupted["signal"], summary)

    final_dir = out_dir / "final"
    save_model(student, tokenizer, final_dir)  # atomic; the float32 masters
    summary = {
        "output_dir": str(out_dir),
        "final_model": str(final_dir),
        "steps_done": history[-1]["step"] if history else start_step,
        "skipped_steps": skipped_total,
        "loop_time_s": loop_time,
        "wall_time_s": time.perf_counter() - run_t0,
        "stopped_by_alert": stopped_by_alert,
        "last": history[-1] if history else {},
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    return summary


def opd_step(
    student,
    teacher,
    backend,
    prompts,
    sampler,
    optimizer,
    scheduler,
    cfg: OPDConfig,
    vocab_limit: int,
    step: int,
) -> dict[str, Any]:
    """One OPD step (rollout → scoring → rewards → update → metrics). Returns the metrics row."""
    from opd.metrics import mechanism_metrics
    from opd.precision import compute_context

    t_step = time.perf_counter()
    idx = sampler.next_batch(cfg.prompts_per_step)
    t0 = time.perf_counter()
    with compute_context(student, cfg.student_dtype):
        batch = backend.generate(
            [prompts.examples[i].input_ids for i in idx],
            n=cfg.rollouts_per_prompt,
            max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            top_k=cfg.rollout_top_k,
            seed=None,
        )
    t_rollout = time.perf_counter() - t0

    scored = score_batch(student, teacher, batch, cfg, vocab_limit)
    mask = scored["mask"]
    s, t = scored["student"], scored["teacher"]

    t0 = time.perf_counter()
    lr = scheduler.get_last_lr()[0]
    loss, grad_norm, skipped, upd_stats = update(student, teacher, batch, scored, optimizer, cfg, vocab_limit)
    scheduler.step()
    t_update = time.perf_counter() - t0

    mk = cfg.metrics_top_k
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
    step_time = time.perf_counter() - t_step
    row: dict[str, Any] = {
        "step": step,
        "loss/pg": loss,
        "reward/mean": masked_mean(scored["token_reward"], mask),
        "kl/sampled": masked_mean(s.token_logp_B_T - t.token_logp_B_T, mask),
        "grad_norm": grad_norm,
        "lr": lr,
        "clip_frac": upd_stats["clip_frac"],
        "response/length_mean": float(batch.response_lengths_B.float().mean()),
        "response/truncated_frac": float(batch.truncated_B.float().mean()),
        **mech,
        "time/rollout": t_rollout,
        "time/score_student": scored["time/score_student"],
        "time/score_teacher": scored["time/score_teacher"],
        "time/update": t_update,
        "time/step": step_time,
        "throughput/tokens_per_s": n_tokens / step_time if step_time > 0 else 0.0,
        "_skipped": skipped,
    }
    return row


def evaluate_during_training(model, tokenizer, eval_set, cfg: OPDConfig) -> dict[str, float]:
    """avg@n accuracy (n = eval_samples; 1 when greedy) at eval_temperature / eval_top_p, and pass@n."""
    from opd.evaluate import evaluate_accuracy
    from opd.precision import compute_context

    with compute_context(model, cfg.student_dtype):
        res = evaluate_accuracy(
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
