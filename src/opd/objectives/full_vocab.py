"""Granularity 3, the full vocabulary: an exact divergence per position between the two models'
distributions (reverse KL, forward KL, generalized JSD, total variation)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from opd.objectives.checks import (
    DIVERGENCES,
    check_choice,
    check_floating,
    check_mask,
    check_rank,
    check_shape,
)


def _kl_V(loga_B_T_V: torch.Tensor, logb_B_T_V: torch.Tensor, detach_log_ratio: bool = False) -> torch.Tensor:
    """``KL(a‖b) = Σ_v a(v)(log a(v) − log b(v))`` over the last axis, with ``0·log 0 = 0``.

    The ``where`` sits on the log-difference (not the product) so a token with ``a(v) = 0`` (e.g. a
    −inf padded logit in both models) gives neither a NaN value nor a NaN gradient.

    ``detach_log_ratio`` (used when ``a`` is the student and ``b`` a fixed teacher): the gradient
    ``Σ ∇a·(log a − log b) + Σ a ∇log a`` has a second term ``∇Σ a = 0``; dropping it (stop-gradient on
    the log-ratio) keeps the value and the exact gradient but makes the gradient exactly 0, not ~1e-9,
    when ``a == b`` — which matters because Adam turns rounding noise into full-size steps.
    """
    a_B_T_V = loga_B_T_V.exp()
    diff_B_T_V = torch.where(a_B_T_V > 0, loga_B_T_V - logb_B_T_V, torch.zeros_like(loga_B_T_V))
    if detach_log_ratio:
        diff_B_T_V = diff_B_T_V.detach()
    return (a_B_T_V * diff_B_T_V).sum(dim=-1)


def reverse_kl_from_logp(student_logp_N_V: torch.Tensor, teacher_logp_N_V: torch.Tensor) -> torch.Tensor:
    """``KL(p‖q) = Σ_v p(v)(log p(v) − log q(v))`` per row from log-probs already normalised (the last axis
    is the vocabulary): ``full_vocab_divergence(kind="reverse_kl")`` of the logits they came from, without
    a second log-softmax. Gradients reach only the student (the teacher is detached; the log-ratio is
    stop-gradient as in ``_kl_V``). Returns float32 ``div_N``."""
    check_floating("student_logp_N_V", student_logp_N_V)
    check_shape("teacher_logp_N_V", teacher_logp_N_V, student_logp_N_V.shape, "student_logp_N_V")
    return _kl_V(student_logp_N_V.float(), teacher_logp_N_V.detach().float(), detach_log_ratio=True)


def full_vocab_divergence(
    student_logits_B_T_V: torch.Tensor,
    teacher_logits_B_T_V: torch.Tensor,
    mask_B_T: torch.Tensor,
    kind: str = "reverse_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Exact per-position divergence between ``p = softmax(student/τ)`` and ``q = softmax(teacher/τ)``.

    - ``reverse_kl``: ``KL(p‖q) = Σ_v p(v)(log p(v) − log q(v))`` — the OPD objective;
    - ``forward_kl``: ``KL(q‖p) = Σ_v q(v)(log q(v) − log p(v))`` — word-level KD;
    - ``jsd``: generalized JSD of GKD / TRL, with the mixture ``m = β·q + (1−β)·p``,
      ``JSD_β = β·KL(q‖m) + (1−β)·KL(p‖m)`` for ``0 < β < 1``. As ``β → 0``, ``JSD_β / β → KL(q‖p)``
      and as ``β → 1``, ``JSD_β / (1−β) → KL(p‖q)``, but ``JSD_β`` itself → 0 at both ends; so, as in
      TRL, the endpoints are defined explicitly: ``β = 0`` returns forward KL, ``β = 1`` reverse KL
      (the function is discontinuous there, on purpose). ``β = 0.5`` is the symmetric JSD.
    - ``tv``: total variation ``½ Σ_v |p(v) − q(v)|``.

    Both models' logits are divided by ``temperature``; computed in float32 via ``log_softmax``.
    Returns float32 ``div_B_T``, 0 where masked (logits at masked positions must still be finite).
    Gradients reach only the student: the teacher logits are detached. Memory is O(B·T·V): chunk
    positions upstream for long sequences.
    """
    check_rank("student_logits_B_T_V", student_logits_B_T_V, "B_T_V")
    check_rank("teacher_logits_B_T_V", teacher_logits_B_T_V, "B_T_V")
    if student_logits_B_T_V.shape[-1] != teacher_logits_B_T_V.shape[-1]:
        raise ValueError(
            f"vocabulary sizes differ: student_logits_B_T_V has V={student_logits_B_T_V.shape[-1]}, "
            f"teacher_logits_B_T_V has V={teacher_logits_B_T_V.shape[-1]}; OPD needs a shared tokenizer — "
            "slice both to the tokenizer's vocabulary (padded embedding rows) or pick a compatible teacher."
        )
    check_shape(
        "teacher_logits_B_T_V", teacher_logits_B_T_V, student_logits_B_T_V.shape, "student_logits_B_T_V"
    )
    check_floating("student_logits_B_T_V", student_logits_B_T_V)
    check_floating("teacher_logits_B_T_V", teacher_logits_B_T_V)
    keep_B_T = check_mask(mask_B_T, student_logits_B_T_V.shape[:2], "student_logits_B_T_V")
    check_choice("kind", kind, DIVERGENCES)
    if not (isinstance(temperature, (int, float)) and temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}; use e.g. 1.0.")
    if kind == "jsd" and not (isinstance(beta, (int, float)) and 0.0 <= beta <= 1.0):
        raise ValueError(
            f"beta must be in [0, 1] for kind='jsd', got {beta!r}; 0 = forward KL, 1 = reverse KL."
        )

    logp_B_T_V = F.log_softmax(student_logits_B_T_V.float() / temperature, dim=-1)
    logq_B_T_V = F.log_softmax(teacher_logits_B_T_V.detach().float() / temperature, dim=-1)

    if kind == "reverse_kl" or (kind == "jsd" and beta == 1.0):
        div_B_T = _kl_V(logp_B_T_V, logq_B_T_V, detach_log_ratio=True)
    elif kind == "forward_kl" or (kind == "jsd" and beta == 0.0):
        div_B_T = _kl_V(logq_B_T_V, logp_B_T_V)
    elif kind == "jsd":
        # log m = logsumexp(log q + log β, log p + log(1−β)), stable for any logits. The floor keeps a
        # token that is −inf in both models (m = 0) from making a NaN gradient in logaddexp.
        floor = torch.finfo(torch.float32).min
        logm_B_T_V = torch.logaddexp(
            logq_B_T_V.clamp_min(floor) + math.log(beta), logp_B_T_V.clamp_min(floor) + math.log1p(-beta)
        )
        div_B_T = beta * _kl_V(logq_B_T_V, logm_B_T_V) + (1.0 - beta) * _kl_V(logp_B_T_V, logm_B_T_V)
    else:  # tv
        div_B_T = 0.5 * (logp_B_T_V.exp() - logq_B_T_V.exp()).abs().sum(dim=-1)
    return torch.where(keep_B_T, div_B_T, torch.zeros_like(div_B_T))
