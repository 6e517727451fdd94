"""From per-token values to one scalar: :func:`aggregate`, and the PPO-clipped policy-gradient loss
(:func:`policy_gradient_loss`) that the sampled-token and top-K advantages drive."""

from __future__ import annotations

import torch

from opd.objectives.checks import (
    AGGREGATIONS,
    check_choice,
    check_floating,
    check_mask,
    check_rank,
    check_shape,
)

# |log ratio| is clamped to this before exp in the PPO ratio (as in verl), so one stale token
# cannot overflow the loss; far outside the clip range, so it never changes a clipped objective.
_MAX_LOG_RATIO = 20.0


def aggregate(values_B_T: torch.Tensor, mask_B_T: torch.Tensor, mode: str = "token-mean") -> torch.Tensor:
    """Reduce per-token values to a scalar; with ``m`` the 0/1 mask and ``n_b = Σ_t m[b,t]``:

    - ``token-mean``: ``Σ_{b,t} v·m / Σ_{b,t} m`` (every token weighs the same; long answers weigh more);
    - ``seq-mean-token-sum``: ``(1/|B'|) Σ_{b∈B'} Σ_t v·m`` with ``B' = {b : n_b ≥ 1}``;
    - ``seq-mean-token-mean``: ``(1/|B'|) Σ_{b∈B'} (Σ_t v·m) / n_b`` (every sequence weighs the same).

    Masked values are ignored even if they are NaN/inf. An all-masked input returns 0 (a 0-dim tensor
    still attached to the graph, with zero gradient, never NaN).
    """
    check_rank("values_B_T", values_B_T, "B_T")
    keep_B_T = check_mask(mask_B_T, values_B_T.shape, "values_B_T")
    check_choice("mode", mode, AGGREGATIONS)

    masked_B_T = torch.where(keep_B_T, values_B_T, torch.zeros_like(values_B_T))
    count_B = keep_B_T.sum(dim=-1).to(masked_B_T.dtype)
    if mode == "token-mean":
        return masked_B_T.sum() / count_B.sum().clamp_min(1)
    seq_sum_B = masked_B_T.sum(dim=-1)
    num_seqs = (count_B > 0).sum().clamp_min(1).to(masked_B_T.dtype)
    if mode == "seq-mean-token-sum":
        return seq_sum_B.sum() / num_seqs
    return (seq_sum_B / count_B.clamp_min(1)).sum() / num_seqs


def aggregation_weights(mask_B_T: torch.Tensor, mode: str = "token-mean") -> torch.Tensor:
    """The constant per-token weights of :func:`aggregate`: ``aggregate(v, m, mode) = Σ_{b,t} w[b,t]·v[b,t]``
    for finite ``v`` (aggregation is linear in the values; the weights depend on the mask only), i.e. its
    gradient with respect to ``v``. With ``n_b = Σ_t m[b,t]`` and ``|B'|`` the rows with ``n_b ≥ 1``:
    ``m / max(Σ n_b, 1)`` (token-mean), ``m / max(|B'|, 1)`` (seq-mean-token-sum),
    ``m / (max(n_b, 1)·max(|B'|, 1))`` (seq-mean-token-mean). Float32 ``w_B_T``."""
    check_rank("mask_B_T", mask_B_T, "B_T")
    check_choice("mode", mode, AGGREGATIONS)
    m_B_T = (mask_B_T != 0).float()
    count_B = m_B_T.sum(-1)
    if mode == "token-mean":
        return m_B_T / count_B.sum().clamp_min(1)
    num_seqs = (count_B > 0).sum().clamp_min(1).float()
    if mode == "seq-mean-token-sum":
        return m_B_T / num_seqs
    return m_B_T / (count_B.clamp_min(1)[:, None] * num_seqs)


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
    token_weight_B_T: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO clipped surrogate with the OPD rewards as advantages (no baseline, no discount).

    ``logp``, ``old_logp`` and ``advantages`` are all ``_B_T`` (sampled token) or all ``_B_T_S``
    (support tokens; then ``valid_B_T_S`` marks the entries that count, default all). Per entry:

        ratio = exp(logp − old_logp)                   (log-ratio clamped to ±20)
        pg    = max(−A·ratio, −A·clip(ratio, 1 − ε_low, 1 + ε_high))
        pg    = min(pg, −A·c)   if A < 0               (dual clip, c = ``dual_clip`` > 1; None = off)

    At exact ties the unclipped branch is kept (full gradient). For ``_B_T_S`` inputs the per-token
    loss is ``Σ_{v∈S_t, valid} pg_t(v)``; ``token_weight_B_T`` (detached; None = 1) multiplies each
    position's loss (truncated importance sampling, :func:`opd.objectives.truncated_is_weights`); per-token
    losses are reduced with :func:`aggregate`.
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
    check_floating("logp", logp)
    for arg, tensor in (("old_logp", old_logp), ("advantages", advantages)):
        check_rank(arg, tensor, axes)
        check_shape(arg, tensor, logp.shape, "logp")
    keep_B_T = check_mask(mask_B_T, logp.shape[:2], "logp")
    if logp.dim() == 2:
        if valid_B_T_S is not None:
            raise ValueError("valid_B_T_S was given but logp is 2-D (B_T); pass it only with B_T_S inputs.")
        keep = keep_B_T
    else:
        if valid_B_T_S is None:
            valid_B_T_S = torch.ones_like(logp, dtype=torch.bool)
        check_rank("valid_B_T_S", valid_B_T_S, "B_T_S")
        check_shape("valid_B_T_S", valid_B_T_S, logp.shape, "logp")
        keep = (valid_B_T_S != 0) & keep_B_T.unsqueeze(-1)
    if not (0.0 <= clip_eps < 1.0):
        raise ValueError(f"clip_eps must be in [0, 1), got {clip_eps!r}; the reference uses 0.2.")
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    if not (eps_high >= 0.0):
        raise ValueError(f"clip_eps_high must be >= 0 or None, got {clip_eps_high!r}; None reuses clip_eps.")
    if dual_clip is not None and not (dual_clip > 1.0):
        raise ValueError(f"dual_clip must be > 1 or None (off), got {dual_clip!r}; the reference uses 3.0.")
    check_choice("aggregation", aggregation, AGGREGATIONS)

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
    if token_weight_B_T is not None:
        check_shape("token_weight_B_T", token_weight_B_T, logp.shape[:2], "logp's B_T")
        per_token_B_T = per_token_B_T * token_weight_B_T.detach().float()
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
    check_rank("rewards_P_G", rewards_P_G, "P_G")
    check_floating("rewards_P_G", rewards_P_G)
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


def micro_batch_weight(
    mask_mb_B_T: torch.Tensor, mask_all_B_T: torch.Tensor, aggregation: str, total: float | None = None
) -> float:
    """Scale of a micro-batch's aggregated loss so that the accumulated sum equals the aggregate over
    the whole rollout batch (token-mean: by token count; seq-mean-*: by the number of non-empty rows).
    ``total``: the denominator over all processes (:func:`loss_denominator` summed); default this batch's."""
    if total is None:
        total = loss_denominator(mask_all_B_T, aggregation)
    if total <= 0:
        return 0.0
    return loss_denominator(mask_mb_B_T, aggregation) / total


def loss_denominator(mask_B_T: torch.Tensor, aggregation: str) -> float:
    """What the batch loss is normalised by: response tokens (token-mean) or non-empty rows (seq-mean-*)."""
    if aggregation == "token-mean":
        return float(mask_B_T.sum())
    return float((mask_B_T.sum(-1) > 0).sum())
