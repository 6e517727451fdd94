"""On-policy distillation objectives as pure tensor functions (no models, no I/O).

Notation (docs/paper.md §1): at every student-visited prefix the student gives ``p_t(v)`` and the teacher
``q_t(v)`` over the shared vocabulary. OPD minimises ``Σ_t KL(p_t ‖ q_t)`` on the student's own samples,
through one of three granularities:

1. sampled-token: ``r_t = log q_t(ŷ_t) − log p_t(ŷ_t)`` for the sampled token (:func:`sampled_token_rewards`);
2. top-K: a support ``S_t`` (:func:`build_support`), weights ``w_t`` (:func:`support_weights`) and a
   reward per support token ``r_t(v) = w_t(v)·(log q_t(v) − log p_t(v))`` (:func:`topk_rewards`),
   turned into advantages by :func:`topk_advantages` (the composition the training loop uses);
3. full vocabulary: an exact divergence per position (:func:`full_vocab_divergence`).

The k1 rewards of 1. and the advantages of 2. drive a PPO-clipped policy-gradient loss
(:func:`policy_gradient_loss`); per-token values become one scalar through :func:`aggregate`. Which
per-state divergence each objective's expected update is the exact gradient of is written in
docs/objectives.md (and checked by tests/test_exact_gradients.py).

Axis suffixes: ``_B`` sequences, ``_T`` positions, ``_K`` top-K ids of one model, ``_S`` support
entries, ``_V`` vocabulary. Every ``[b, t]`` entry is about the distribution that predicts token ``t``
(the logits/tokens shift is done once, in scoring). Log-probs are full-vocabulary log-probs, computed
and returned in float32. Masks are 0/1 (bool, int or float); any non-zero entry counts as kept.

Outside OPD, :func:`group_advantages` gives the GRPO baseline its group-normalised advantages.

Deliberately left out: models and scoring (see ``scoring.py``), baselines / GAE / discounting /
entropy bonus / KL-to-reference terms (OPD uses none of them), chunking over positions (callers chunk),
and cross-process reduction (``aggregate`` normalises by the local token count only).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = [
    "AGGREGATIONS",
    "TopKAdvantages",
    "DIVERGENCES",
    "ESTIMATORS",
    "SUPPORTS",
    "WEIGHTINGS",
    "aggregate",
    "build_support",
    "full_vocab_divergence",
    "group_advantages",
    "policy_gradient_loss",
    "sampled_token_rewards",
    "renormalized_advantages",
    "support_weights",
    "topk_advantages",
    "topk_rewards",
]

SUPPORTS = ("student", "teacher", "intersection", "union", "symmetric_difference")
WEIGHTINGS = ("student_p", "teacher_p", "uniform")
AGGREGATIONS = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean")
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "tv")
ESTIMATORS = ("k1", "k3")

# Names used by the reference code, mapped to ours; only used to make error messages say the fix.
_REFERENCE_NAMES = {
    "only_stu": "student",
    "only_tch": "teacher",
    "union-intersection": "symmetric_difference",
    "none": "uniform",
}

# |log ratio| is clamped to this before exp in the PPO ratio (as in verl), so one stale token
# cannot overflow the loss; far outside the clip range, so it never changes a clipped objective.
_MAX_LOG_RATIO = 20.0


# --------------------------------------------------------------------------------------------------
# input checks: every error names the argument, the value seen and the fix
# --------------------------------------------------------------------------------------------------


def _check_choice(arg: str, value: str, choices: tuple[str, ...]) -> None:
    if value in choices:
        return
    hint = ""
    if value in _REFERENCE_NAMES and _REFERENCE_NAMES[value] in choices:
        hint = f" ({value!r} is the reference code's name for {_REFERENCE_NAMES[value]!r})"
    raise ValueError(f"{arg}={value!r} is not supported{hint}; use one of {choices}.")


def _check_rank(arg: str, tensor: torch.Tensor, axes: str) -> None:
    rank = len(axes.split("_"))
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"{arg} must be a torch.Tensor with axes {axes}, got {type(tensor).__name__}.")
    if tensor.dim() != rank:
        raise ValueError(
            f"{arg} must have rank {rank} (axes {axes}) but has shape {tuple(tensor.shape)}; "
            f"pass a tensor shaped [{', '.join(axes.split('_'))}]."
        )


def _check_shape(arg: str, tensor: torch.Tensor, shape: tuple[int, ...], like: str) -> None:
    if tuple(tensor.shape) != tuple(shape):
        raise ValueError(
            f"{arg} has shape {tuple(tensor.shape)} but must match {like} with shape {tuple(shape)}; "
            "pass tensors computed on the same batch, positions and support."
        )


def _check_mask(mask_B_T: torch.Tensor, shape_B_T: tuple[int, ...], like: str) -> torch.Tensor:
    _check_rank("mask_B_T", mask_B_T, "B_T")
    _check_shape("mask_B_T", mask_B_T, shape_B_T, f"the first two axes of {like}")
    return mask_B_T != 0


def _check_floating(arg: str, tensor: torch.Tensor) -> None:
    if not tensor.is_floating_point():
        raise ValueError(f"{arg} must be a floating-point tensor, got dtype {tensor.dtype}; pass log-probs.")


def _fill_invalid_rows_safe(x_B_T_S: torch.Tensor, valid_B_T_S: torch.Tensor) -> torch.Tensor:
    """``x`` with invalid entries at −inf, except rows with no valid entry, which become all 0.

    Feeding the result to softmax / logsumexp never produces NaN values or NaN gradients: a row of only
    −inf would (``exp(−inf − (−inf))``); callers zero those rows afterwards.
    """
    any_valid_B_T_1 = valid_B_T_S.any(dim=-1, keepdim=True)
    x_B_T_S = x_B_T_S.masked_fill(~valid_B_T_S, float("-inf"))
    return torch.where(any_valid_B_T_1, x_B_T_S, torch.zeros_like(x_B_T_S))


# --------------------------------------------------------------------------------------------------
# 1. sampled-token rewards
# --------------------------------------------------------------------------------------------------


def sampled_token_rewards(
    student_logp_B_T: torch.Tensor,
    teacher_logp_B_T: torch.Tensor,
    mask_B_T: torch.Tensor,
    estimator: str = "k1",
) -> torch.Tensor:
    """Per-token reward (a value estimate of ``−KL(p_t‖q_t)``) for the sampled token ``ŷ_t ~ p_t``.

    With the log-ratio ``ℓ_t = log q_t(ŷ_t) − log p_t(ŷ_t)``:

    - ``"k1"``: ``r_t = ℓ_t``. ``E_{v~p}[log q(v) − log p(v)] = −KL(p‖q)``: unbiased, but each sample
      can have either sign and a high variance. **The only estimator that is a valid advantage**: with
      ``A = ℓ`` (detached), ``E_{v~p}[−A(v) ∇log p(v)] = ∇KL(p‖q)`` exactly.
    - ``"k3"``: ``r_t = −((e^{ℓ_t} − 1) − ℓ_t)``. Since ``E_{v~p}[q(v)/p(v) − 1] = 0`` its expectation is
      also ``−KL(p‖q)``; every sample is ≤ 0 (``e^x − 1 ≥ x``) and the variance is low when p ≈ q.
      A good *value* estimate for logging, but NOT an advantage: ``E_{v~p}[−k3(v) ∇log p(v)]`` is
      ``∇KL(p‖q) − ∇KL(q‖p)`` (the ``q/p`` term contributes ``−Σ_v q(v)∇log p(v) = ∇KL(q‖p)`` with the
      wrong sign), which can point against the reverse-KL gradient. The training loop therefore always
      uses k1 as the advantage and only logs the configured estimator.

    Returns float32 ``rewards_B_T``, 0 where ``mask_B_T == 0``. Autograd flows through both inputs as
    written; ``policy_gradient_loss`` detaches advantages.
    """
    _check_rank("student_logp_B_T", student_logp_B_T, "B_T")
    _check_rank("teacher_logp_B_T", teacher_logp_B_T, "B_T")
    _check_shape("teacher_logp_B_T", teacher_logp_B_T, student_logp_B_T.shape, "student_logp_B_T")
    _check_floating("student_logp_B_T", student_logp_B_T)
    _check_floating("teacher_logp_B_T", teacher_logp_B_T)
    keep_B_T = _check_mask(mask_B_T, student_logp_B_T.shape, "student_logp_B_T")
    _check_choice("estimator", estimator, ESTIMATORS)

    # Masked entries are zeroed BEFORE exp, so padding values can never overflow or make NaN gradients.
    log_ratio_B_T = teacher_logp_B_T.float() - student_logp_B_T.float()
    log_ratio_B_T = torch.where(keep_B_T, log_ratio_B_T, torch.zeros_like(log_ratio_B_T))
    if estimator == "k1":
        return log_ratio_B_T
    # k3 = (q/p − 1) − log(q/p) ≥ 0; expm1 keeps precision when q ≈ p. Masked entries: expm1(0) − 0 = 0.
    return -(torch.expm1(log_ratio_B_T) - log_ratio_B_T)


# --------------------------------------------------------------------------------------------------
# 2. top-K: support, weights, rewards
# --------------------------------------------------------------------------------------------------


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
    _check_rank("student_topk_ids_B_T_K", student_topk_ids_B_T_K, "B_T_K")
    _check_rank("teacher_topk_ids_B_T_K", teacher_topk_ids_B_T_K, "B_T_K")
    _check_shape(
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
    _check_choice("support", support, SUPPORTS)

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
    _check_rank("student_logp_B_T_S", student_logp_B_T_S, "B_T_S")
    _check_rank("teacher_logp_B_T_S", teacher_logp_B_T_S, "B_T_S")
    _check_rank("valid_B_T_S", valid_B_T_S, "B_T_S")
    _check_shape("teacher_logp_B_T_S", teacher_logp_B_T_S, student_logp_B_T_S.shape, "student_logp_B_T_S")
    _check_shape("valid_B_T_S", valid_B_T_S, student_logp_B_T_S.shape, "student_logp_B_T_S")
    _check_floating("student_logp_B_T_S", student_logp_B_T_S)
    _check_floating("teacher_logp_B_T_S", teacher_logp_B_T_S)
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
    _check_choice("weighting", weighting, WEIGHTINGS)
    _check_choice("support", support, SUPPORTS)

    zeros_B_T_S = torch.zeros_like(student_logp_B_T_S, dtype=torch.float32)
    if weighting == "uniform":
        count_B_T_1 = valid_B_T_S.sum(dim=-1, keepdim=True).clamp_min(1).float()
        return torch.where(valid_B_T_S, 1.0 / count_B_T_1, zeros_B_T_S)

    logp_B_T_S = (student_logp_B_T_S if weighting == "student_p" else teacher_logp_B_T_S).float()
    if support == "symmetric_difference":
        safe_logp_B_T_S = torch.where(valid_B_T_S, logp_B_T_S, zeros_B_T_S)
        return torch.where(valid_B_T_S, safe_logp_B_T_S.exp(), zeros_B_T_S)
    weights_B_T_S = torch.softmax(_fill_invalid_rows_safe(logp_B_T_S, valid_B_T_S), dim=-1)
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
    _check_rank("weights_B_T_S", weights_B_T_S, "B_T_S")
    _check_shape("weights_B_T_S", weights_B_T_S, student_logp_B_T_S.shape, "student_logp_B_T_S")
    keep_B_T = _check_mask(mask_B_T, student_logp_B_T_S.shape[:2], "student_logp_B_T_S")
    keep_B_T_S = valid_B_T_S & keep_B_T.unsqueeze(-1)

    zeros_B_T_S = torch.zeros_like(student_logp_B_T_S, dtype=torch.float32)
    logp_B_T_S = torch.where(keep_B_T_S, student_logp_B_T_S.float(), zeros_B_T_S)
    logq_B_T_S = torch.where(keep_B_T_S, teacher_logp_B_T_S.float(), zeros_B_T_S)
    if renormalize:
        # log p̄ = log p − logsumexp_{u∈S_t} log p(u); rows with an empty support use a finite dummy.
        logp_B_T_S = logp_B_T_S - torch.logsumexp(_fill_invalid_rows_safe(logp_B_T_S, keep_B_T_S), -1, True)
        logq_B_T_S = logq_B_T_S - torch.logsumexp(_fill_invalid_rows_safe(logq_B_T_S, keep_B_T_S), -1, True)
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
    _check_rank("rewards_B_T_S", rewards_B_T_S, "B_T_S")
    _check_rank("student_logp_B_T_S", student_logp_B_T_S, "B_T_S")
    _check_rank("valid_B_T_S", valid_B_T_S, "B_T_S")
    _check_shape("student_logp_B_T_S", student_logp_B_T_S, rewards_B_T_S.shape, "rewards_B_T_S")
    _check_shape("valid_B_T_S", valid_B_T_S, rewards_B_T_S.shape, "rewards_B_T_S")
    _check_floating("rewards_B_T_S", rewards_B_T_S)
    _check_floating("student_logp_B_T_S", student_logp_B_T_S)
    valid_B_T_S = valid_B_T_S != 0
    keep_B_T = _check_mask(mask_B_T, student_logp_B_T_S.shape[:2], "student_logp_B_T_S")
    keep_B_T_S = valid_B_T_S & keep_B_T.unsqueeze(-1)
    zeros_B_T_S = torch.zeros_like(student_logp_B_T_S, dtype=torch.float32)
    logp_B_T_S = student_logp_B_T_S.detach().float()
    p_bar_B_T_S = torch.softmax(_fill_invalid_rows_safe(logp_B_T_S, keep_B_T_S), dim=-1)
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
    _check_choice("support", support, SUPPORTS)
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


# --------------------------------------------------------------------------------------------------
# 3. full-vocabulary divergences
# --------------------------------------------------------------------------------------------------


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
    _check_rank("student_logits_B_T_V", student_logits_B_T_V, "B_T_V")
    _check_rank("teacher_logits_B_T_V", teacher_logits_B_T_V, "B_T_V")
    if student_logits_B_T_V.shape[-1] != teacher_logits_B_T_V.shape[-1]:
        raise ValueError(
            f"vocabulary sizes differ: student_logits_B_T_V has V={student_logits_B_T_V.shape[-1]}, "
            f"teacher_logits_B_T_V has V={teacher_logits_B_T_V.shape[-1]}; OPD needs a shared tokenizer — "
            "slice both to the tokenizer's vocabulary (padded embedding rows) or pick a compatible teacher."
        )
    _check_shape(
        "teacher_logits_B_T_V", teacher_logits_B_T_V, student_logits_B_T_V.shape, "student_logits_B_T_V"
    )
    _check_floating("student_logits_B_T_V", student_logits_B_T_V)
    _check_floating("teacher_logits_B_T_V", teacher_logits_B_T_V)
    keep_B_T = _check_mask(mask_B_T, student_logits_B_T_V.shape[:2], "student_logits_B_T_V")
    _check_choice("kind", kind, DIVERGENCES)
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


# --------------------------------------------------------------------------------------------------
# aggregation and the policy-gradient loss
# --------------------------------------------------------------------------------------------------


def aggregate(values_B_T: torch.Tensor, mask_B_T: torch.Tensor, mode: str = "token-mean") -> torch.Tensor:
    """Reduce per-token values to a scalar; with ``m`` the 0/1 mask and ``n_b = Σ_t m[b,t]``:

    - ``token-mean``: ``Σ_{b,t} v·m / Σ_{b,t} m`` (every token weighs the same; long answers weigh more);
    - ``seq-mean-token-sum``: ``(1/|B'|) Σ_{b∈B'} Σ_t v·m`` with ``B' = {b : n_b ≥ 1}``;
    - ``seq-mean-token-mean``: ``(1/|B'|) Σ_{b∈B'} (Σ_t v·m) / n_b`` (every sequence weighs the same).

    Masked values are ignored even if they are NaN/inf. An all-masked input returns 0 (a 0-dim tensor
    still attached to the graph, with zero gradient, never NaN).
    """
    _check_rank("values_B_T", values_B_T, "B_T")
    keep_B_T = _check_mask(mask_B_T, values_B_T.shape, "values_B_T")
    _check_choice("mode", mode, AGGREGATIONS)

    masked_B_T = torch.where(keep_B_T, values_B_T, torch.zeros_like(values_B_T))
    count_B = keep_B_T.sum(dim=-1).to(masked_B_T.dtype)
    if mode == "token-mean":
        return masked_B_T.sum() / count_B.sum().clamp_min(1)
    seq_sum_B = masked_B_T.sum(dim=-1)
    num_seqs = (count_B > 0).sum().clamp_min(1).to(masked_B_T.dtype)
    if mode == "seq-mean-token-sum":
        return seq_sum_B.sum() / num_seqs
    return (seq_sum_B / count_B.clamp_min(1)).sum() / num_seqs


def policy_gradient_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask_B_T: torch.Tensor,
    valid_B_T_S: torch.Tensor | None = None,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    dual_clip: float | None = 3.0,
    aggregation: str = "token-mean",
) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO clipped surrogate with the OPD rewards as advantages (no baseline, no discount).

    ``logp``, ``old_logp`` and ``advantages`` are all ``_B_T`` (sampled token) or all ``_B_T_S``
    (support tokens; then ``valid_B_T_S`` marks the entries that count, default all). Per entry:

        ratio = exp(logp − old_logp)                   (log-ratio clamped to ±20)
        pg    = max(−A·ratio, −A·clip(ratio, 1 − ε_low, 1 + ε_high))
        pg    = min(pg, −A·c)   if A < 0               (dual clip, c = ``dual_clip`` > 1; None = off)

    At exact ties the unclipped branch is kept (full gradient). For ``_B_T_S`` inputs the per-token
    loss is ``Σ_{v∈S_t, valid} pg_t(v)``; per-token losses are reduced with :func:`aggregate`.
    ``old_logp`` and ``advantages`` are detached. With one update per rollout batch
    (``old_logp == logp.detach()``) the ratio is 1, no clipping fires and the gradient is
    ``−Σ_{t,v} A_t(v) ∇log p_t(v)`` with the aggregation's normalisation.

    Returns ``(loss, stats)`` with float stats over kept entries: ``clip_frac`` (the ε-clipped branch
    is active), ``dual_clip_frac`` (the dual clip caps the loss) and ``ratio_mean``.
    """
    if not isinstance(logp, torch.Tensor) or logp.dim() not in (2, 3):
        shape = tuple(logp.shape) if isinstance(logp, torch.Tensor) else type(logp).__name__
        raise ValueError(
            f"logp must have rank 2 (B_T, sampled token) or 3 (B_T_S, support tokens), got {shape}; "
            "pass per-token or per-support-token log-probs."
        )
    axes = "B_T" if logp.dim() == 2 else "B_T_S"
    _check_floating("logp", logp)
    for arg, tensor in (("old_logp", old_logp), ("advantages", advantages)):
        _check_rank(arg, tensor, axes)
        _check_shape(arg, tensor, logp.shape, "logp")
    keep_B_T = _check_mask(mask_B_T, logp.shape[:2], "logp")
    if logp.dim() == 2:
        if valid_B_T_S is not None:
            raise ValueError("valid_B_T_S was given but logp is 2-D (B_T); pass it only with B_T_S inputs.")
        keep = keep_B_T
    else:
        if valid_B_T_S is None:
            valid_B_T_S = torch.ones_like(logp, dtype=torch.bool)
        _check_rank("valid_B_T_S", valid_B_T_S, "B_T_S")
        _check_shape("valid_B_T_S", valid_B_T_S, logp.shape, "logp")
        keep = (valid_B_T_S != 0) & keep_B_T.unsqueeze(-1)
    if not (0.0 <= clip_eps < 1.0):
        raise ValueError(f"clip_eps must be in [0, 1), got {clip_eps!r}; the reference uses 0.2.")
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    if not (eps_high >= 0.0):
        raise ValueError(f"clip_eps_high must be >= 0 or None, got {clip_eps_high!r}; None reuses clip_eps.")
    if dual_clip is not None and not (dual_clip > 1.0):
        raise ValueError(f"dual_clip must be > 1 or None (off), got {dual_clip!r}; the reference uses 3.0.")
    _check_choice("aggregation", aggregation, AGGREGATIONS)

    zeros = torch.zeros_like(logp, dtype=torch.float32)
    log_ratio = torch.where(keep, logp.float() - old_logp.detach().float(), zeros)
    ratio = log_ratio.clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO).exp()
    adv = torch.where(keep, advantages.detach().float(), zeros)

    pg_unclipped = -adv * ratio
    pg_clipped = -adv * ratio.clamp(1.0 - clip_eps, 1.0 + eps_high)
    is_clipped = keep & (pg_clipped > pg_unclipped)
    pg = torch.where(is_clipped, pg_clipped, pg_unclipped)
    if dual_clip is not None:
        pg_cap = -adv * dual_clip
        is_dual = keep & (adv < 0) & (pg > pg_cap)
        pg = torch.where(is_dual, pg_cap, pg)
    else:
        is_dual = torch.zeros_like(keep)
    pg = torch.where(keep, pg, zeros)

    per_token_B_T = pg.sum(dim=-1) if logp.dim() == 3 else pg
    loss = aggregate(per_token_B_T, keep_B_T, aggregation)

    with torch.no_grad():
        n = keep.sum().clamp_min(1).float()
        stats = {
            "clip_frac": float(is_clipped.sum() / n),
            "dual_clip_frac": float(is_dual.sum() / n),
            "ratio_mean": float((ratio * keep).sum() / n),
        }
    return loss, stats


# --------------------------------------------------------------------------------------------------
# group-relative advantages (the GRPO baseline, methods/grpo.py)
# --------------------------------------------------------------------------------------------------


def group_advantages(rewards_P_G: torch.Tensor, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """GRPO's group-normalised advantage of each of the ``G`` responses to each of ``P`` prompts:

        A[p, g] = (r[p, g] − mean_g r[p, ·]) / (std_g r[p, ·] + eps)     (``scale=True``, GRPO)
        A[p, g] =  r[p, g] − mean_g r[p, ·]                               (``scale=False``, Dr. GRPO)

    ``std`` is the sample standard deviation (Bessel's correction, ``G − 1`` in the denominator, as TRL's
    GRPO trainer computes it), so ``G ≥ 2``. A group whose rewards are all equal gets advantage exactly 0
    (it carries no learning signal). Returns float32 ``adv_P_G``.
    """
    _check_rank("rewards_P_G", rewards_P_G, "P_G")
    _check_floating("rewards_P_G", rewards_P_G)
    if rewards_P_G.shape[1] < 2:
        raise ValueError(
            f"rewards_P_G has G={rewards_P_G.shape[1]} response(s) per prompt; group normalisation needs "
            "G >= 2 (set rollouts_per_prompt >= 2)."
        )
    if not (isinstance(eps, (int, float)) and eps > 0):
        raise ValueError(f"eps must be > 0, got {eps!r}; use e.g. 1e-4.")
    r_P_G = rewards_P_G.float()
    centred_P_G = r_P_G - r_P_G.mean(dim=1, keepdim=True)
    if not scale:
        return centred_P_G
    return centred_P_G / (r_P_G.std(dim=1, keepdim=True) + eps)
