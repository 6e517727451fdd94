"""OPD's scoring passes and per-token rewards (the first half of a step of :mod:`opd.methods.opd`).

Two paths, the same update to float tolerance (tests/test_train.py):

- :func:`score_batch` — a no-grad scoring pass of the student and the teacher over the rollout batch
  (``scoring.score_pair``), then the rewards; :func:`opd.methods.opd.update` runs the student again with
  grad. Needed when ``ppo_epochs > 1`` (old log-probs are then fixed while the weights move), and used
  with ``fused_update=false``.
- :func:`fused_update` — ``ppo_epochs = 1`` and ``fused_update=true`` (the default), every objective and
  support: one student forward *with* grad per micro-batch gives the top-K ids, log-probs and entropy the
  rewards and metrics need and, detached, the old log-probs (on-policy, they equal the new ones); the
  teacher is scored at those ids, the micro-batch's advantages are built and its loss is backpropagated
  at once. The student runs once per step instead of twice, holding one micro-batch's graph at a time.
  With a teacher in this process its backbone goes first and keeps its response rows, and the student's
  pass (``scoring.score_backward``) builds each chunk's rewards and loss from the chunk's own scores and
  the teacher's (its head on the chunk's rows, ``scoring.teacher_rows``; the supports built from the
  teacher's top-K need those ids first: ``scoring.score_teacher_first``, then K weight rows per position
  for its log-probs at the chunk's student top-K); the loss's gradient at the chunk's log-probs gives
  its logits' gradient in closed form, so the student's head runs once (no checkpoint recompute in
  backward). A served teacher (no kept rows) is asked after the student's checkpointed pass instead. ``objective=full`` runs both models
  once per micro-batch (``scoring.full_vocab_fused``): the exact KL's backward is taken chunk by chunk
  from the same logits that give both models' scores, so neither the no-grad scoring passes nor the
  teacher re-run nor the checkpoint recompute of the two-pass path remain.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, fields

import torch

from opd import objectives as obj
from opd.config import OPDConfig
from opd.models import check_finite_logp
from opd.rollout import RolloutBatch
from opd.runtime import Runtime
from opd.scoring import (
    ChunkGrads,
    ChunkScores,
    PolicyScorer,
    ScoreOutput,
    cat_scores,
    score_pair,
    score_teacher,
    score_teacher_first,
    teacher_rows,
)

log = logging.getLogger("opd")


@dataclass
class ScoredBatch:
    """A rollout batch scored by both models, and its per-token rewards (all on the student's device).

    ``old_logp`` / ``advantages``: (B, T) for the sampled-token objective, (B, T, S) on the top-K
    support ``support_ids_B_T_S`` (entries with ``valid_B_T_S`` False are padding); None in full-vocabulary
    mode, whose loss is the exact KL computed with grad in the update. ``token_reward_B_T``: the logged
    per-token reward (``reward/mean``).
    """

    mask_B_T: torch.Tensor
    student: ScoreOutput
    teacher: ScoreOutput
    token_reward_B_T: torch.Tensor
    old_logp: torch.Tensor | None = None
    advantages: torch.Tensor | None = None
    support_ids_B_T_S: torch.Tensor | None = None
    valid_B_T_S: torch.Tensor | None = None


def score_batch(
    student: PolicyScorer,
    teacher: PolicyScorer,
    batch: RolloutBatch,
    cfg: OPDConfig,
    teacher_batch: RolloutBatch | None = None,
) -> tuple[ScoredBatch, dict[str, float]]:
    """No-grad scoring of a rollout batch by both models and the per-token rewards.

    ``student`` / ``teacher``: the scorers (each at its own temperature; the teacher's on its device,
    its outputs come back to the batch's). Returns the :class:`ScoredBatch` and the timings
    ``time/score_student`` / ``time/score_teacher`` (seconds). Done in micro-batches to bound memory.
    ``teacher_batch``: the responses after the teacher's own prompts (``teacher_prompt_template`` /
    ``teacher_system_prompt``, :func:`opd.rollout.relay_responses`), which the teacher scores instead of
    ``batch``; its outputs come back in ``batch``'s layout, so the rewards line up token for token.
    """
    mask = batch.response_mask_B_T.float()
    width = max(cfg.metrics_top_k, cfg.support_size if cfg.objective == "topk" else 0)
    # the student at ``temperature``: the distribution the rollout tokens were drawn from
    s_out, t_out, timings = score_pair(
        student, teacher, batch, cfg.micro_batch_size, width, teacher_batch=teacher_batch
    )
    check_finite_logp("student", cfg.student, s_out.token_logp_B_T, mask)  # before any update uses them
    check_finite_logp("teacher", cfg.teacher, t_out.token_logp_B_T, mask)

    if cfg.objective == "sampled":
        # the advantage is always k1 (k3 is not an advantage: docs/objectives.md); `estimator` picks
        # only the logged per-token reward
        scored = ScoredBatch(
            mask,
            s_out,
            t_out,
            token_reward_B_T=obj.sampled_token_rewards(
                s_out.token_logp_B_T, t_out.token_logp_B_T, mask, estimator=cfg.estimator
            ),
            old_logp=s_out.token_logp_B_T,
            advantages=obj.sampled_token_rewards(s_out.token_logp_B_T, t_out.token_logp_B_T, mask, "k1"),
        )
    elif cfg.objective == "topk":
        K = cfg.support_size
        s_ids, s_lp = s_out.topk_ids_B_T_K[..., :K], s_out.topk_logp_B_T_K[..., :K]
        t_ids, t_lp = t_out.topk_ids_B_T_K[..., :K], t_out.topk_logp_B_T_K[..., :K]
        s_at_t = None
        if cfg.support not in ("student", "intersection"):
            # the student's log-probs at the teacher's top-K ids need one more (no-grad) student pass
            t0 = time.perf_counter()
            s_at_t = _score_given(student, batch, t_ids, cfg)
            timings["time/score_student"] += time.perf_counter() - t0
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
        scored = ScoredBatch(
            mask,
            s_out,
            t_out,
            token_reward_B_T=topk.rewards.sum(-1),
            old_logp=topk.student_logp,
            advantages=topk.advantages,
            support_ids_B_T_S=topk.support_ids,
            valid_B_T_S=topk.valid,
        )
    else:  # full vocabulary: the loss is the exact KL, computed with grad in the update
        scored = ScoredBatch(mask, s_out, t_out, token_reward_B_T=t_out.token_logp_B_T - s_out.token_logp_B_T)
    return scored, timings


def _score_given(
    student: PolicyScorer, batch: RolloutBatch, ids_B_T_K: torch.Tensor, cfg: OPDConfig
) -> torch.Tensor:
    parts = []
    with torch.no_grad():
        for lo in range(0, batch.input_ids_B_T.shape[0], cfg.micro_batch_size):
            sl = slice(lo, lo + cfg.micro_batch_size)
            mb = batch.select(sl)
            o = student(mb.input_ids_B_T, mb.attention_mask_B_T, mb.response_mask_B_T, ids_B_T_K[sl])
            parts.append(o.given_logp_B_T_K)
    return torch.cat(parts)


def can_fuse(cfg: OPDConfig) -> bool:
    """Whether a step can score and update the student in one pass (:func:`fused_update`)."""
    return cfg.fused_update and cfg.ppo_epochs == 1


def reverse_kl(s_logits_N_V: torch.Tensor, t_logits_N_V: torch.Tensor) -> torch.Tensor:
    """The full-vocabulary objective's per-position KL(p‖q) of one chunk of logits (``obj.full_vocab_divergence``)."""
    ones = torch.ones(1, s_logits_N_V.shape[0], device=s_logits_N_V.device)
    return obj.full_vocab_divergence(s_logits_N_V[None], t_logits_N_V[None], ones, kind="reverse_kl")[0]


def _loss_coefficients(mask: torch.Tensor, mask_all: torch.Tensor, cfg: OPDConfig, total) -> torch.Tensor:
    """d(micro-batch loss × its weight)/d(per-token value): constants, since ``obj.aggregate`` is linear in
    the values (``obj.aggregation_weights``, its weights, depend on the mask only)."""
    w = obj.micro_batch_weight(mask, mask_all, cfg.loss_aggregation, total)
    return obj.aggregation_weights(mask, cfg.loss_aggregation) * w


def _check_finite_at(
    role: str, name: str, tok_1_n: torch.Tensor, at: tuple[torch.Tensor, torch.Tensor], shape: tuple[int, int]
) -> None:
    """:func:`opd.models.check_finite_logp` for one chunk's scored positions ``at`` (rows, columns) of a
    (B, T) micro-batch, so that a failure counts positions and sequences of the micro-batch, not of a
    flattened chunk. The (B, T) tensors are only built when the chunk has a non-finite value."""
    if bool(torch.isfinite(tok_1_n).all()):
        return
    logp_B_T = torch.zeros(shape, device=tok_1_n.device)
    mask_B_T = torch.zeros(shape, device=tok_1_n.device)
    logp_B_T[at] = tok_1_n[0].float()
    mask_B_T[at] = 1.0
    check_finite_logp(role, name, logp_B_T, mask_B_T)


def fused_update(
    student: PolicyScorer,
    teacher: PolicyScorer,
    batch: RolloutBatch,
    optimizer: torch.optim.Optimizer,
    cfg: OPDConfig,
    runtime: Runtime | None = None,
    teacher_batch: RolloutBatch | None = None,
) -> tuple[ScoredBatch, dict[str, float], float, float, int, dict[str, float]]:
    """Score, build rewards and update in one student pass per micro-batch (module docstring).

    Returns ``(scored, timings, loss, grad_norm, skipped, stats)`` as :func:`score_batch` followed by
    ``opd.update`` would: ``scored`` holds detached scorings and rewards for the metrics; ``timings`` has
    ``time/score_teacher`` and ``time/score_student`` = 0 (the student's forward and backward count as
    ``time/update``, measured by the caller; with ``objective=full`` the teacher's pass runs inside the
    pair's single pass and counts as ``time/update`` too). ``teacher_batch``: as in :func:`score_batch`."""
    mask_all = batch.response_mask_B_T.float()
    total = obj.loss_denominator(mask_all, cfg.loss_aggregation)
    if runtime is not None:
        total = runtime.sum({"n": total})["n"]
    K = cfg.support_size if cfg.objective == "topk" else 0
    width = max(cfg.metrics_top_k, K)
    teacher_first = cfg.objective == "topk" and cfg.support not in ("student", "intersection")
    params = [p for p in student.parameters() if p.requires_grad]
    parts_s, parts_t, rewards, clip_fracs = [], [], [], []
    t_teacher, total_loss = 0.0, 0.0
    optimizer.zero_grad(set_to_none=True)
    student.train()
    for lo in range(0, batch.input_ids_B_T.shape[0], cfg.micro_batch_size):
        sl = slice(lo, lo + cfg.micro_batch_size)
        mb, mask = batch.select(sl), mask_all[sl]
        tmb = None if teacher_batch is None else teacher_batch.select(sl)
        if cfg.objective == "full":
            # both models once, the exact KL's backward taken chunk by chunk inside (opd.scoring.full_vocab_fused)
            div, s_det, t = student(
                mb.input_ids_B_T,
                mb.attention_mask_B_T,
                mb.response_mask_B_T,
                top_k=width,
                teacher=teacher.model,
                divergence=obj.reverse_kl_from_logp,
                teacher_temperature=teacher.temperature,
                loss_weight_B_T=_loss_coefficients(mask, mask_all, cfg, total),
            )
            check_finite_logp("student", cfg.student, s_det.token_logp_B_T, mask)  # before the step
            check_finite_logp("teacher", cfg.teacher, t.token_logp_B_T, mask)
            if mask.sum() > 0:
                w = obj.micro_batch_weight(mask, mask_all, cfg.loss_aggregation, total)
                total_loss += float(obj.aggregate(div, mask, cfg.loss_aggregation)) * w
            parts_s.append(s_det)
            parts_t.append(t)
            rewards.append(t.token_logp_B_T - s_det.token_logp_B_T)
            continue
        if hasattr(teacher, "score_rescorable"):
            # a teacher in this process keeps its hidden rows and gives each chunk's scores during the
            # student's single pass, which takes the chunk's loss gradient from the logits that scored it
            t0 = time.perf_counter()
            if teacher_first:  # its top-K ids are the student pass's given ids: scored first, rescored later
                t_first, t_given = score_teacher_first(teacher, mb, width, teacher_mb=tmb)
                given = t_first.topk_ids_B_T_K[..., :K]

                def teacher_chunk(at, target_n, s_ids_n_W, t_first=t_first, t_given=t_given):
                    return (
                        t_first.token_logp_B_T[at],
                        t_first.topk_ids_B_T_K[at],
                        t_first.topk_logp_B_T_K[at],
                        t_given(s_ids_n_W, at=at),
                        t_first.entropy_B_T[at],
                    )
            else:  # its head on each chunk's rows, as score_teacher would (identical models: exact zeros)
                given, scores_at = None, teacher_rows(teacher, mb, teacher_mb=tmb)

                def teacher_chunk(at, target_n, s_ids_n_W, scores_at=scores_at):
                    return scores_at(at[0], at[1], target_n, s_ids_n_W, width)

            t_teacher += time.perf_counter() - t0
            s_det, t, reward, mb_loss, mb_clip, t_chunks = _one_pass(
                student, mb, mask, _loss_coefficients(mask, mask_all, cfg, total), given, teacher_chunk, cfg
            )
            t_teacher += t_chunks
            total_loss += mb_loss
            if mask.sum() > 0:
                clip_fracs.append(mb_clip)
            parts_s.append(s_det)
            parts_t.append(t)
            rewards.append(reward)
            continue
        # a served teacher (no kept hidden rows): the student's pass is checkpointed per chunk and the
        # loss backpropagated after the teacher's scoring (the head is recomputed in backward)
        t_given = None
        if teacher_first:
            # the teacher's top-K ids are needed by the student's pass: the teacher goes first, and gives
            # its log-probs at the student's top-K afterwards (a served teacher: a second scoring call)
            t0 = time.perf_counter()
            t_first, t_given = score_teacher_first(teacher, mb, width, teacher_mb=tmb)
            t_teacher += time.perf_counter() - t0
            given = t_first.topk_ids_B_T_K[..., :K]
        else:
            given = None
        # with grad, at ``temperature``
        s = student(
            mb.input_ids_B_T, mb.attention_mask_B_T, mb.response_mask_B_T, given, top_k=width, entropy=True
        )
        s_det = ScoreOutput(**{f.name: _detach(getattr(s, f.name)) for f in fields(ScoreOutput)})
        s_at_t, s_det.given_logp_B_T_K = s_det.given_logp_B_T_K, None  # as score_pair's student output
        t0 = time.perf_counter()
        with torch.no_grad():
            if teacher_first:
                t = t_first
                t.given_logp_B_T_K = t_given(s_det.topk_ids_B_T_K)
            else:
                t = score_teacher(teacher, mb, s_det.topk_ids_B_T_K, width, teacher_mb=tmb)
        t_teacher += time.perf_counter() - t0
        check_finite_logp("student", cfg.student, s_det.token_logp_B_T, mask)  # before its backward
        check_finite_logp("teacher", cfg.teacher, t.token_logp_B_T, mask)
        if cfg.objective == "sampled":
            reward = obj.sampled_token_rewards(
                s_det.token_logp_B_T, t.token_logp_B_T, mask, estimator=cfg.estimator
            )
            adv = obj.sampled_token_rewards(s_det.token_logp_B_T, t.token_logp_B_T, mask, "k1")
            new, old, valid = s.token_logp_B_T, s_det.token_logp_B_T, None
        else:
            topk = obj.topk_advantages(
                s_det.topk_ids_B_T_K[..., :K],
                s_det.topk_logp_B_T_K[..., :K],
                t.topk_ids_B_T_K[..., :K],
                t.topk_logp_B_T_K[..., :K],
                teacher_logp_at_student_B_T_K=t.given_logp_B_T_K[..., :K],
                student_logp_at_teacher_B_T_K=s_at_t,  # None for student / intersection
                mask_B_T=mask,
                support=cfg.support,
                weighting=cfg.weighting,
                renormalize=cfg.renormalize,
            )
            reward, adv, valid = topk.rewards.sum(-1), topk.advantages, topk.valid
            # the support's slots, with grad: the student's own top-K (student / intersection), its
            # log-probs at the teacher's top-K (teacher), or both in that order (union / symmetric_difference)
            if cfg.support in ("student", "intersection"):
                new = s.topk_logp_B_T_K[..., :K]
            elif cfg.support == "teacher":
                new = s.given_logp_B_T_K
            else:
                new = torch.cat([s.topk_logp_B_T_K[..., :K], s.given_logp_B_T_K], -1)
            old = topk.student_logp
        if mask.sum() > 0:
            w = obj.micro_batch_weight(mask, mask_all, cfg.loss_aggregation, total)
            loss, stats = obj.policy_gradient_loss(
                new,
                old,
                adv,
                mask,
                valid_B_T_S=valid,
                clip_eps=cfg.clip_eps,
                dual_clip=cfg.dual_clip,
                aggregation=cfg.loss_aggregation,
                token_weight_B_T=tis_weights(cfg, s_det.token_logp_B_T, mb, mask),
            )
            (loss * w).backward()
            total_loss += float(loss.detach()) * w
            clip_fracs.append(stats.get("clip_frac", 0.0))
        parts_s.append(s_det)
        parts_t.append(t)
        rewards.append(reward)
        del s, new
    norm, skipped = apply_gradients(params, optimizer, cfg, runtime)
    student.eval()
    scored = ScoredBatch(
        mask_all, cat_scores(parts_s), cat_scores(parts_t), token_reward_B_T=torch.cat(rewards)
    )
    timings = {"time/score_student": 0.0, "time/score_teacher": t_teacher}
    stats = {"clip_frac": sum(clip_fracs) / len(clip_fracs) if clip_fracs else 0.0}
    return scored, timings, total_loss, norm, skipped, stats


def _one_pass(
    student: PolicyScorer,
    mb: RolloutBatch,
    mask: torch.Tensor,
    coeff_B_T: torch.Tensor,
    given: torch.Tensor | None,
    teacher_chunk,
    cfg: OPDConfig,
) -> tuple[ScoreOutput, ScoreOutput, torch.Tensor, float, float, float]:
    """One micro-batch of the sampled-token or top-K fused step with a teacher in this process: the
    student's single pass (``scoring.score_backward``, ``given`` = the teacher's top-K ids for the
    teacher-first supports) builds each chunk's rewards, advantages and policy-gradient loss from that
    chunk's scores and the teacher's (``teacher_chunk(at, token_ids_n, student_topk_ids_n_W)`` -> the
    teacher's token log-probs, top-W ids and log-probs, log-probs at the student's top-W and entropy at
    the positions ``at``) and hands back the loss's gradient at its log-probs. The loss is
    ``Σ_{b,t} coeff_B_T · per_token_loss`` (``_loss_coefficients``: the micro-batch's aggregated loss × its
    weight), so a chunk's share is ``policy_gradient_loss`` of its positions with ``seq-mean-token-sum``
    over one row and the coefficients as token weights (times the importance weights with ``tis_cap``):
    the same function, value and gradient as the two-pass update.

    Returns ``(student scores, teacher scores, reward_B_T, loss, clip_frac, seconds in teacher_chunk)``
    with both scores detached and in ``score_pair``'s form."""
    K = cfg.support_size if cfg.objective == "topk" else 0
    width = max(cfg.metrics_top_k, K)
    teacher_first = given is not None
    B, T = mask.shape
    dev = mask.device
    w_shape = (B, T, width)
    t_bufs = [
        torch.zeros((B, T), device=dev),
        torch.zeros(w_shape, dtype=torch.long, device=dev) if width else None,
        torch.zeros(w_shape, device=dev) if width else None,
        torch.zeros(w_shape, device=dev) if width else None,
        torch.zeros((B, T), device=dev),
    ]
    reward_B_T = torch.zeros((B, T), device=dev)
    tis = cfg.tis_cap and mb.sampler_logprobs_B_T is not None
    acc = {"loss": 0.0, "clipped": 0.0, "kept": 0.0, "teacher": 0.0}

    def chunk_loss(c: ChunkScores) -> ChunkGrads:
        at = (c.rows_n, c.tgt_n)
        ones_1_n = torch.ones((1, c.rows_n.numel()), device=dev)
        s_tok_1_n = c.token_logp_n[None]
        t0 = time.perf_counter()
        t_n = teacher_chunk(at, mb.input_ids_B_T[at], c.topk_ids_n_K)
        acc["teacher"] += time.perf_counter() - t0
        for buf, values in zip(t_bufs, t_n):
            if buf is not None:
                buf[at] = values.to(dev)
        t_tok_1_n = t_bufs[0][at][None]
        _check_finite_at("student", cfg.student, s_tok_1_n, at, (B, T))  # before this chunk's backward
        _check_finite_at("teacher", cfg.teacher, t_tok_1_n, at, (B, T))
        weight_1_n = coeff_B_T[at][None]
        if tis:
            sampler_1_n = mb.sampler_logprobs_B_T[at][None]
            weight_1_n = weight_1_n * obj.truncated_is_weights(s_tok_1_n, sampler_1_n, ones_1_n, cfg.tis_cap)
        leaf_top = leaf_given = leaf_tok = None
        with torch.enable_grad():
            if cfg.objective == "sampled":
                reward = obj.sampled_token_rewards(s_tok_1_n, t_tok_1_n, ones_1_n, estimator=cfg.estimator)
                adv = obj.sampled_token_rewards(s_tok_1_n, t_tok_1_n, ones_1_n, "k1")
                leaf_tok = s_tok_1_n.clone().requires_grad_()
                new, old, valid = leaf_tok, s_tok_1_n, None
            else:
                topk = obj.topk_advantages(
                    c.topk_ids_n_K[None, :, :K],
                    c.topk_logp_n_K[None, :, :K],
                    t_bufs[1][at][None, :, :K],
                    t_bufs[2][at][None, :, :K],
                    teacher_logp_at_student_B_T_K=t_bufs[3][at][None, :, :K],
                    student_logp_at_teacher_B_T_K=c.given_logp_n_K[None] if teacher_first else None,
                    mask_B_T=ones_1_n,
                    support=cfg.support,
                    weighting=cfg.weighting,
                    renormalize=cfg.renormalize,
                )
                reward, adv, valid, old = topk.rewards.sum(-1), topk.advantages, topk.valid, topk.student_logp
                # the support's slots as in fused_update's served-teacher branch
                if cfg.support != "teacher":
                    leaf_top = c.topk_logp_n_K[None, :, :K].clone().requires_grad_()
                if teacher_first:
                    leaf_given = c.given_logp_n_K[None].clone().requires_grad_()
                new = torch.cat([x for x in (leaf_top, leaf_given) if x is not None], -1)
            loss, stats = obj.policy_gradient_loss(
                new,
                old,
                adv,
                ones_1_n,
                valid_B_T_S=valid,
                clip_eps=cfg.clip_eps,
                dual_clip=cfg.dual_clip,
                aggregation="seq-mean-token-sum",
                token_weight_B_T=weight_1_n,
            )
            leaves = [x for x in (leaf_tok, leaf_top, leaf_given) if x is not None]
            grads = iter(torch.autograd.grad(loss, leaves))
        reward_B_T[at] = reward[0].detach()
        kept = float(c.rows_n.numel() if valid is None else valid.sum())
        acc["loss"] += float(loss.detach())
        acc["clipped"] += stats["clip_frac"] * kept
        acc["kept"] += kept
        g_tok, g_top, g_given = (
            None if x is None else next(grads)[0] for x in (leaf_tok, leaf_top, leaf_given)
        )
        return g_tok, g_top, g_given

    s_det = student(
        mb.input_ids_B_T,
        mb.attention_mask_B_T,
        mb.response_mask_B_T,
        given,
        top_k=width,
        entropy=True,
        chunk_loss=chunk_loss,
    )
    s_det.given_logp_B_T_K = None  # as score_pair's student output
    t = ScoreOutput(
        token_logp_B_T=t_bufs[0],
        topk_ids_B_T_K=t_bufs[1],
        topk_logp_B_T_K=t_bufs[2],
        given_logp_B_T_K=t_bufs[3],
        entropy_B_T=t_bufs[4],
    )
    clip = acc["clipped"] / acc["kept"] if acc["kept"] else 0.0
    return s_det, t, reward_B_T, acc["loss"], clip, acc["teacher"]


def tis_weights(
    cfg: OPDConfig, trainer_logp_B_T: torch.Tensor, batch: RolloutBatch, mask_B_T: torch.Tensor
) -> torch.Tensor | None:
    """Truncated importance-sampling weights of ``batch``'s tokens (``tis_cap``), from the trainer's old
    log-probs of the sampled tokens and the sampler's (:func:`opd.objectives.truncated_is_weights`); None
    when ``tis_cap`` is off or the backend returned no log-probs of its own."""
    if not cfg.tis_cap or batch.sampler_logprobs_B_T is None:
        return None
    return obj.truncated_is_weights(trainer_logp_B_T, batch.sampler_logprobs_B_T, mask_B_T, cfg.tis_cap)


def apply_gradients(
    params: list[torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    cfg: OPDConfig,
    runtime: Runtime | None,
) -> tuple[float, int]:
    """Sum the accumulated gradients over processes, clip to ``grad_clip`` and step; a non-finite norm
    skips the step. Returns (grad norm, 1 if skipped else 0)."""
    if runtime is not None:
        runtime.all_reduce_grads(params)
    max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
    norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    if not math.isfinite(norm):
        optimizer.zero_grad(set_to_none=True)
        log.warning("non-finite gradient norm (%s): update skipped", norm)
        return norm, 1
    optimizer.step()
    return norm, 0


def _detach(x):
    return None if x is None else x.detach()
