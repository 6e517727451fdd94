"""Granularity 2, top-K: a support ``S_t`` of token ids, weights ``w_t`` on it, a reward per support
token ``r_t(v) = w_t(v)·(log q_t(v) − log p_t(v))``, and the advantages the training loop uses
(:func:`topk_advantages` composes them). Inputs are full-vocabulary log-probs gathered at the ids."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from opd.objectives.checks import (
    SUPPORTS,
    WEIGHTINGS,
    check_choice,
    check_floating,
    check_mask,
    check_rank,
    check_shape,
    fill_invalid_rows_safe,
)


def _is_member(query_B_T_K: torch.Tensor, keys_B_T_K: torch.Tensor) -> torch.Tensor:
    """``member[b, t, k] = query[b, t, k] ∈ {keys[b, t, :]}``.

    Sort + binary search: O(K log K) time and O(K) memory per position; the broadcast comparison
    ``(query[..., :, None] == keys[..., None, :]).any(-1)`` would need B·T·K² booleans.
    """
    sorted_keys_B_T_K, _ = keys_B_T_K.sort(dim=-1)
    query_B_T_K = query_B_T_K.contiguous()
    pos_B_T_K = torch.searchsorted(sorted_keys_B_T_K.contiguous(), query_B_T_K)
    pos_B_T_K = pos_B_T_K.clamp_max(sorted_keys_B_T_K.shape[-1] - 1)
    return sorted_keys_B_T_K.gather(-1, pos_B_T_K) == query_B_T_K


def build_support(
    student_topk_ids_B_T_K: torch.Tensor,
    teacher_topk_ids_B_T_K: torch.Tensor,
    support: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Support set ``S_t`` as ids plus a validity mask: ``(support_ids_B_T_S, valid_B_T_S)``.

    With ``S^p = TopK(p_t)`` (student ids) and ``S^q = TopK(q_t)`` (teacher ids):

    ============================  ====  =====================  ==========================================
    support (reference name)      S     ids                    valid
    ============================  ====  =====================  ==========================================
    ``student`` (only_stu)        K     S^p                    all
    ``teacher`` (only_tch)        K     S^q                    all
    ``intersection``              K     S^p                    v ∈ S^q            (S^p ∩ S^q)
    ``union``                     2K    cat(S^p, S^q)          cat(all, v ∉ S^p)  (S^p ∪ S^q, no repeats)
    ``symmetric_difference``      2K    cat(S^p, S^q)          cat(v ∉ S^q, v ∉ S^p)
    (union-intersection)
    ============================  ====  =====================  ==========================================

    Ids of invalid entries are real token ids (so they can be gathered), they just carry no weight.
    Both models must score every support id: the student's full-vocab log-probs at all of them, and
    the teacher's likewise. Ids must be distinct within one model's top-K.
    """
    check_rank("student_topk_ids_B_T_K", student_topk_ids_B_T_K, "B_T_K")
    check_rank("teacher_topk_ids_B_T_K", teacher_topk_ids_B_T_K, "B_T_K")
    check_shape(
        "teacher_topk_ids_B_T_K",
        teacher_topk_ids_B_T_K,
        student_topk_ids_B_T_K.shape,
        "student_topk_ids_B_T_K",
    )
    for arg, ids in (
        ("student_topk_ids_B_T_K", student_topk_ids_B_T_K),
        ("teacher_topk_ids_B_T_K", teacher_topk_ids_B_T_K),
    ):
        if ids.is_floating_point() or ids.dtype == torch.bool:
            raise ValueError(f"{arg} must hold integer token ids, got dtype {ids.dtype}; pass topk indices.")
    if student_topk_ids_B_T_K.shape[-1] < 1:
        raise ValueError(
            "student_topk_ids_B_T_K has K=0 support ids; top_k = 0 means sampled-token OPD: "
            "use sampled_token_rewards instead of a support."
        )
    check_choice("support", support, SUPPORTS)

    stu_ids_B_T_K = student_topk_ids_B_T_K.long()
    tch_ids_B_T_K = teacher_topk_ids_B_T_K.long()
    if support == "student":
        return stu_ids_B_T_K, torch.ones_like(stu_ids_B_T_K, dtype=torch.bool)
    if support == "teacher":
        return tch_ids_B_T_K, torch.ones_like(tch_ids_B_T_K, dtype=torch.bool)

    stu_in_tch_B_T_K = _is_member(stu_ids_B_T_K, tch_ids_B_T_K)
    if support == "intersection":
        return stu_ids_B_T_K, stu_in_tch_B_T_K

    tch_in_stu_B_T_K = _is_member(tch_ids_B_T_K, stu_ids_B_T_K)
    ids_B_T_S = torch.cat([stu_ids_B_T_K, tch_ids_B_T_K], dim=-1)
    if support == "union":
        valid_B_T_S = torch.cat([torch.ones_like(stu_in_tch_B_T_K), ~tch_in_stu_B_T_K], dim=-1)
    else:  # symmetric_difference
        valid_B_T_S = torch.cat([~stu_in_tch_B_T_K, ~tch_in_stu_B_T_K], dim=-1)
    return ids_B_T_S, valid_B_T_S


def _check_support_inputs(
    student_logp_B_T_S: torch.Tensor,
    teacher_logp_B_T_S: torch.Tensor,
    valid_B_T_S: torch.Tensor,
) -> torch.Tensor:
    check_rank("student_logp_B_T_S", student_logp_B_T_S, "B_T_S")
    check_rank("teacher_logp_B_T_S", teacher_logp_B_T_S, "B_T_S")
    check_rank("valid_B_T_S", valid_B_T_S, "B_T_S")
    check_shape("teacher_logp_B_T_S", teacher_logp_B_T_S, student_logp_B_T_S.shape, "student_logp_B_T_S")
    check_shape("valid_B_T_S", valid_B_T_S, student_logp_B_T_S.shape, "student_logp_B_T_S")
    check_floating("student_logp_B_T_S", student_logp_B_T_S)
    check_floating("teacher_logp_B_T_S", teacher_logp_B_T_S)
    return valid_B_T_S != 0


def support_weights(
    student_logp_B_T_S: torch.Tensor,
    teacher_logp_B_T_S: torch.Tensor,
    valid_B_T_S: torch.Tensor,
    weighting: str,
    support: str,
) -> torch.Tensor:
    """Weights ``w_t(v)`` on the support, float32, 0 on invalid entries.

    Inputs are FULL-vocabulary log-probs gathered at the support ids. For ``v ∈ S_t`` (valid entries):

    - ``student_p``: ``w_t(v) = p_t(v) / Σ_{u∈S_t} p_t(u)`` (softmax of the log-probs over S_t);
    - ``teacher_p``: ``w_t(v) = q_t(v) / Σ_{u∈S_t} q_t(u)``;
    - ``uniform`` (reference name "none"): ``w_t(v) = 1 / |S_t|``, on every support.

    Exception, as in the reference code: for ``support == "symmetric_difference"`` the ``student_p`` /
    ``teacher_p`` weights are the RAW probabilities ``p_t(v)`` / ``q_t(v)``, not renormalised on S_t.
    ``uniform`` stays ``1/|S_t|`` there, where the reference gives every entry weight 1 (so its update is
    ``|S_t|`` times ours at that position; docs/objectives.md). Rows with an empty support get all-zero
    weights (no NaN in values or gradients).
    """
    valid_B_T_S = _check_support_inputs(student_logp_B_T_S, teacher_logp_B_T_S, valid_B_T_S)
    check_choice("weighting", weighting, WEIGHTINGS)
    check_choice("support", support, SUPPORTS)

    zeros_B_T_S = torch.zeros_like(student_logp_B_T_S, dtype=torch.float32)
    if weighting == "uniform":
        count_B_T_1 = valid_B_T_S.sum(dim=-1, keepdim=True).clamp_min(1).float()
        return torch.where(valid_B_T_S, 1.0 / count_B_T_1, zeros_B_T_S)

    logp_B_T_S = (student_logp_B_T_S if weighting == "student_p" else teacher_logp_B_T_S).float()
    if support == "symmetric_difference":
        safe_logp_B_T_S = torch.where(valid_B_T_S, logp_B_T_S, zeros_B_T_S)
        return torch.where(valid_B_T_S, safe_logp_B_T_S.exp(), zeros_B_T_S)
    weights_B_T_S = torch.softmax(fill_invalid_rows_safe(logp_B_T_S, valid_B_T_S), dim=-1)
    return torch.where(valid_B_T_S, weights_B_T_S, zeros_B_T_S)


def topk_rewards(
    student_logp_B_T_S: torch.Tensor,
    teacher_logp_B_T_S: torch.Tensor,
    weights_B_T_S: torch.Tensor,
    valid_B_T_S: torch.Tensor,
    mask_B_T: torch.Tensor,
    renormalize: bool = False,
) -> torch.Tensor:
    """Reward per support token, float32 ``rewards_B_T_S``; 0 where invalid or masked.

    ``renormalize=False`` (default, the reference code): with full-vocab log-probs,
        ``r_t(v) = w_t(v) · (log q_t(v) − log p_t(v))``.
    These rewards ARE the advantages (:func:`topk_advantages`). With ``student_p`` weights,
    ``−Σ_{v∈S_t} r_t(v) ∇log p_t(v)`` is the exact reverse-KL gradient
    ``∇KL(p_t‖q_t) = Σ_v p_t(v)(log p_t(v) − log q_t(v)) ∇log p_t(v)`` truncated to S_t and divided by
    ``Σ_{u∈S_t} p_t(u)``; with K = V it is exact. K = 1 is not degenerate here.

    ``renormalize=True`` (paper Eq. 5): p and q are first renormalised on the valid support,
        ``p̄_t(v) = p_t(v) / Σ_{u∈S_t} p_t(u)``, ``q̄_t(v) = q_t(v) / Σ_{u∈S_t} q_t(u)``,
        ``r_t(v) = w_t(v) · (log q̄_t(v) − log p̄_t(v))``,
    so with ``student_p`` weights (``w = p̄``) ``Σ_{v∈S_t} r_t(v) = −KL(p̄_t‖q̄_t)`` (the logged reward).
    These rewards are NOT advantages: used with ``∇log p`` (not ``∇log p̄``) they give
    ``∇KL(p̄‖q̄) + KL(p̄‖q̄)·∇log Σ_{u∈S_t} p_t(u)``, which pushes mass out of the support. Turn them
    into advantages with :func:`renormalized_advantages`. With K = 1 every renormalised reward is 0.
    """
    valid_B_T_S = _check_support_inputs(student_logp_B_T_S, teacher_logp_B_T_S, valid_B_T_S)
    check_rank("weights_B_T_S", weights_B_T_S, "B_T_S")
    check_shape("weights_B_T_S", weights_B_T_S, student_logp_B_T_S.shape, "student_logp_B_T_S")
    keep_B_T = check_mask(mask_B_T, student_logp_B_T_S.shape[:2], "student_logp_B_T_S")
    keep_B_T_S = valid_B_T_S & keep_B_T.unsqueeze(-1)

    zeros_B_T_S = torch.zeros_like(student_logp_B_T_S, dtype=torch.float32)
    logp_B_T_S = torch.where(keep_B_T_S, student_logp_B_T_S.float(), zeros_B_T_S)
    logq_B_T_S = torch.where(keep_B_T_S, teacher_logp_B_T_S.float(), zeros_B_T_S)
    if renormalize:
        # log p̄ = log p − logsumexp_{u∈S_t} log p(u); rows with an empty support use a finite dummy.
        logp_B_T_S = logp_B_T_S - torch.logsumexp(fill_invalid_rows_safe(logp_B_T_S, keep_B_T_S), -1, True)
        logq_B_T_S = logq_B_T_S - torch.logsumexp(fill_invalid_rows_safe(logq_B_T_S, keep_B_T_S), -1, True)
    rewards_B_T_S = weights_B_T_S.float() * (logq_B_T_S - logp_B_T_S)
    return torch.where(keep_B_T_S, rewards_B_T_S, zeros_B_T_S)


def renormalized_advantages(
    rewards_B_T_S: torch.Tensor,
    student_logp_B_T_S: torch.Tensor,
    valid_B_T_S: torch.Tensor,
    mask_B_T: torch.Tensor,
) -> torch.Tensor:
    """Advantages for ``renormalize=True`` rewards: ``A_t(v) = r_t(v) − p̄_t(v) · Σ_{u∈S_t} r_t(u)``.

    ``rewards_B_T_S`` are ``topk_rewards(..., renormalize=True)``, i.e. ``r = w·(log q̄ − log p̄)``, and
    ``p̄_t = p_t / Σ_{u∈S_t} p_t(u)``. Since ``∇log p̄(v) = ∇log p(v) − Σ_u p̄(u)∇log p(u)``, the
    subtracted term routes the gradient through the support normaliser, so ``−Σ_v A_t(v)∇log p_t(v)`` is
    exactly the gradient of the renormalised divergence (the weights held at their current values):

    - ``student_p`` (``w = p̄``): ``A = p̄·(log q̄ − log p̄ + KL(p̄‖q̄))`` and the update is ``∇KL(p̄_t‖q̄_t)``
      (paper Eq. 5), exactly — the per-position ``KL(p̄‖q̄)`` is a constant, like a baseline;
    - ``teacher_p`` (``w = q̄``) / ``uniform`` (``w = 1/|S|``): ``∇ ½ Σ_{v∈S_t} w(v)(log p̄ − log q̄)²``.

    Σ_v A_t(v) = 0 at every position, so log ``rewards`` (not these) as the reward. Not defined for raw
    (un-normalised) weights: the training config rejects ``renormalize`` with ``symmetric_difference``.
    Returns float32 ``advantages_B_T_S``, 0 where invalid or masked.
    """
    check_rank("rewards_B_T_S", rewards_B_T_S, "B_T_S")
    check_rank("student_logp_B_T_S", student_logp_B_T_S, "B_T_S")
    check_rank("valid_B_T_S", valid_B_T_S, "B_T_S")
    check_shape("student_logp_B_T_S", student_logp_B_T_S, rewards_B_T_S.shape, "rewards_B_T_S")
    check_shape("valid_B_T_S", valid_B_T_S, rewards_B_T_S.shape, "rewards_B_T_S")
    check_floating("rewards_B_T_S", rewards_B_T_S)
    check_floating("student_logp_B_T_S", student_logp_B_T_S)
    valid_B_T_S = valid_B_T_S != 0
    keep_B_T = check_mask(mask_B_T, student_logp_B_T_S.shape[:2], "student_logp_B_T_S")
    keep_B_T_S = valid_B_T_S & keep_B_T.unsqueeze(-1)
    zeros_B_T_S = torch.zeros_like(student_logp_B_T_S, dtype=torch.float32)
    logp_B_T_S = student_logp_B_T_S.detach().float()
    p_bar_B_T_S = torch.softmax(fill_invalid_rows_safe(logp_B_T_S, keep_B_T_S), dim=-1)
    rewards_B_T_S = torch.where(keep_B_T_S, rewards_B_T_S.detach().float(), zeros_B_T_S)
    advantages_B_T_S = rewards_B_T_S - p_bar_B_T_S * rewards_B_T_S.sum(dim=-1, keepdim=True)
    return torch.where(keep_B_T_S, advantages_B_T_S, zeros_B_T_S)


@dataclass
class TopKAdvantages:
    """What the update of a top-K objective needs, all ``_B_T_S`` (S = K or 2K).

    ``support_ids``: token ids of the support slots (long); ``valid``: bool, slots that count;
    ``student_logp`` / ``teacher_logp``: full-vocabulary log-probs at those ids (``student_logp`` is the
    ``old_logp`` of the PPO ratio); ``rewards``: ``topk_rewards`` (sum over S = the logged per-token
    reward); ``advantages``: what ``policy_gradient_loss`` gets.
    """

    support_ids: torch.Tensor
    valid: torch.Tensor
    student_logp: torch.Tensor
    teacher_logp: torch.Tensor
    rewards: torch.Tensor
    advantages: torch.Tensor


def topk_advantages(
    student_topk_ids_B_T_K: torch.Tensor,
    student_topk_logp_B_T_K: torch.Tensor,
    teacher_topk_ids_B_T_K: torch.Tensor,
    teacher_topk_logp_B_T_K: torch.Tensor,
    teacher_logp_at_student_B_T_K: torch.Tensor,
    student_logp_at_teacher_B_T_K: torch.Tensor | None,
    mask_B_T: torch.Tensor,
    support: str = "student",
    weighting: str = "student_p",
    renormalize: bool = False,
) -> TopKAdvantages:
    """The top-K objective of the training loop: support, log-probs on it, weights, rewards, advantages.

    Inputs are full-vocabulary log-probs: each model's own top-K (ids and log-probs), the teacher at the
    student's ids and the student at the teacher's ids (``None`` is allowed for ``student`` and
    ``intersection``, which only use the student's ids). Slots follow :func:`build_support`; the
    advantages are ``topk_rewards`` themselves (``renormalize=False``) or
    :func:`renormalized_advantages` of them (``renormalize=True``, not with ``symmetric_difference``).
    """
    check_choice("support", support, SUPPORTS)
    if renormalize and support == "symmetric_difference":
        raise ValueError(
            "renormalize=True is not defined for support='symmetric_difference' (its weights are raw "
            "probabilities, not renormalised on the support); use renormalize=False or another support."
        )
    support_ids_B_T_S, valid_B_T_S = build_support(student_topk_ids_B_T_K, teacher_topk_ids_B_T_K, support)
    if support in ("student", "intersection"):
        s_sup_B_T_S, t_sup_B_T_S = student_topk_logp_B_T_K, teacher_logp_at_student_B_T_K
    else:
        if student_logp_at_teacher_B_T_K is None:
            raise ValueError(
                f"support={support!r} needs student_logp_at_teacher_B_T_K (the student's log-probs at the "
                "teacher's top-K ids); score the student at teacher_topk_ids_B_T_K and pass them."
            )
        if support == "teacher":
            s_sup_B_T_S, t_sup_B_T_S = student_logp_at_teacher_B_T_K, teacher_topk_logp_B_T_K
        else:  # union / symmetric_difference: slots = cat(student ids, teacher ids)
            s_sup_B_T_S = torch.cat([student_topk_logp_B_T_K, student_logp_at_teacher_B_T_K], -1)
            t_sup_B_T_S = torch.cat([teacher_logp_at_student_B_T_K, teacher_topk_logp_B_T_K], -1)
    weights_B_T_S = support_weights(s_sup_B_T_S, t_sup_B_T_S, valid_B_T_S, weighting, support)
    rewards_B_T_S = topk_rewards(s_sup_B_T_S, t_sup_B_T_S, weights_B_T_S, valid_B_T_S, mask_B_T, renormalize)
    advantages_B_T_S = rewards_B_T_S
    if renormalize:
        advantages_B_T_S = renormalized_advantages(rewards_B_T_S, s_sup_B_T_S, valid_B_T_S, mask_B_T)
    return TopKAdvantages(
        support_ids=support_ids_B_T_S,
        valid=valid_B_T_S,
        student_logp=s_sup_B_T_S,
        teacher_logp=t_sup_B_T_S,
        rewards=rewards_B_T_S,
        advantages=advantages_B_T_S,
    )
