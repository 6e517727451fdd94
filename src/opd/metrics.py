"""Token-level mechanism metrics of on-policy distillation (docs/paper.md §3), from scoring outputs.

Pure tensor functions: no models, no gradients, no global state. The inputs are what student and
teacher scoring return for the student's own rollouts (see ``opd.scoring``), all aligned per position
``[b, t]`` and float32; ``mask_B_T`` marks response tokens. Notation, at a response position t:

- ``p_t``, ``q_t``: student and teacher next-token distributions over the full vocabulary;
- ``S^p_t = TopK(p_t)``, ``S^q_t = TopK(q_t)``, ``I_t = S^p_t ∩ S^q_t`` (k = K, default 16);
- ``p̄_t(v) = p_t(v) / Σ_{u∈I_t} p_t(u)`` and ``q̄_t`` likewise: both renormalised on ``I_t``;
- ``H(p_t) = −Σ_v p_t(v) log p_t(v)`` (full vocabulary, computed by scoring).

Per position (``mechanism_tensors``):

- overlap ratio            ``|I_t| / k``                                              (Eq. 6)
- overlap advantage        ``(1/|I_t|) Σ_{v∈I_t} p̄_t(v) (log q̄_t(v) − log p̄_t(v))``  (Eq. 7, ≤ 0)
- verl overlap advantage   ``(1/|I_t|) Σ_{v∈I_t} −q_t(v) (log q_t(v) − log p_t(v))``  (raw q, p)
- overlap masses           ``Σ_{v∈I_t} p_t(v)`` and ``Σ_{v∈I_t} q_t(v)``
- entropy gap              ``|H(q_t) − H(p_t)|``
- extreme tokens           with the top-k advantage of the default objective (student support,
  student_p weights) ``a_t(v) = p_t(v)/Σ_{u∈S^p_t} p_t(u) · (log q_t(v) − log p_t(v))``: the tokens
  ``v⁺_t = argmax_{v∈I_t} a_t(v)`` and ``v⁻_t = argmin_{v∈I_t} a_t(v)``, and ``a``, ``p``, ``q`` at each
  (the reference code's ``val-extrema/*_intersection`` metrics, computed the same way in every mode)

Batch metrics (``mechanism_metrics``) are token means: every response token of the batch has the same
weight (long responses weigh more than short ones, as in "token-mean" loss aggregation).

Rules for empty sets (never NaN):

- a metric whose set of positions is empty is OMITTED from the returned dict (an all-masked batch
  returns ``{}``), so plots never show an invented 0;
- ``|I_t| = 0``: the two overlap advantages and the extreme tokens are undefined at t; such positions
  are EXCLUDED from the mean of ``overlap/adv``, ``overlap/adv_verl`` and ``extreme/*`` (their
  per-position tensors hold 0 there and ``adv_valid_B_T`` is False). They still count in ``overlap/ratio`` (as 0) and in the masses (as 0),
  so a run that loses its overlap shows it in those metrics, which docs/paper.md §3 says to read together.

Response position of a token: ``t − t_first(b)``, the offset from the first response token of its row
(for a contiguous response, the index of the token within the response). Per-chunk metrics group
positions into ``[c·n, (c+1)·n)`` with ``n = position_chunk`` and are reported only for chunks that
hold at least one response token, named ``<metric>@<c·n>-<(c+1)·n>``.

Deliberately left out: gradient norms and policy-gradient losses (the update logs them), any model
forward pass (scoring does it), and tensors with a vocabulary axis (k ≪ V is all the metrics need:
the teacher's log-probs at the student's top-k ids cover every ``v ∈ I_t``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "MechanismTensors",
    "mechanism_metrics",
    "mechanism_tensors",
    "position_profile",
    "response_positions",
]


@dataclass
class MechanismTensors:
    """Per-position mechanism quantities, float32 ``[B, T]``; 0 wherever not defined.

    Attributes:
        overlap_count_B_T: ``|I_t|`` (as float).
        overlap_ratio_B_T: ``|I_t| / k``.
        overlap_adv_B_T: Eq. 7 term ``(1/|I_t|) Σ_{v∈I_t} p̄ (log q̄ − log p̄)``; 0 where ``|I_t| = 0``.
        overlap_adv_verl_B_T: ``(1/|I_t|) Σ_{v∈I_t} −q (log q − log p)``; 0 where ``|I_t| = 0``.
        mass_student_B_T: ``Σ_{v∈I_t} p_t(v)``.
        mass_teacher_B_T: ``Σ_{v∈I_t} q_t(v)``.
        student_entropy_B_T: ``H(p_t)``.
        teacher_entropy_B_T: ``H(q_t)``.
        entropy_gap_B_T: ``|H(q_t) − H(p_t)|``.
        max_adv_B_T, p_at_max_adv_B_T, q_at_max_adv_B_T: ``a_t(v⁺_t)``, ``p_t(v⁺_t)``, ``q_t(v⁺_t)`` with
            ``v⁺_t = argmax_{v∈I_t} a_t(v)`` (first on ties); 0 where ``|I_t| = 0``.
        min_adv_B_T, p_at_min_adv_B_T, q_at_min_adv_B_T: the same at ``v⁻_t = argmin_{v∈I_t} a_t(v)``.
        mask_B_T: bool, response positions.
        adv_valid_B_T: bool, response positions with ``|I_t| > 0`` (where the advantages are defined).
        position_B_T: long, response position ``t − t_first(b)``; 0 outside the response.
        k: top-k size.
    """

    overlap_count_B_T: torch.Tensor
    overlap_ratio_B_T: torch.Tensor
    overlap_adv_B_T: torch.Tensor
    overlap_adv_verl_B_T: torch.Tensor
    mass_student_B_T: torch.Tensor
    mass_teacher_B_T: torch.Tensor
    student_entropy_B_T: torch.Tensor
    teacher_entropy_B_T: torch.Tensor
    entropy_gap_B_T: torch.Tensor
    max_adv_B_T: torch.Tensor
    p_at_max_adv_B_T: torch.Tensor
    q_at_max_adv_B_T: torch.Tensor
    min_adv_B_T: torch.Tensor
    p_at_min_adv_B_T: torch.Tensor
    q_at_min_adv_B_T: torch.Tensor
    mask_B_T: torch.Tensor
    adv_valid_B_T: torch.Tensor
    position_B_T: torch.Tensor
    k: int


def _check_shape(name: str, x: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(x.shape) != shape:
        raise ValueError(
            f"{name} has shape {tuple(x.shape)}, expected {shape}; all scoring outputs must be aligned "
            "per position with mask_B_T (see opd.scoring)."
        )


def _check_finite(name: str, x: torch.Tensor, mask_B_T: torch.Tensor) -> None:
    bad = ~torch.isfinite(x) & (mask_B_T if x.dim() == 2 else mask_B_T[..., None])
    if bool(bad.any()):
        raise ValueError(
            f"{name} has {int(bad.sum())} non-finite values at response positions; log-probs and "
            "entropies must be finite float32 (check the scoring temperature and vocab_limit)."
        )


def response_positions(mask_B_T: torch.Tensor) -> torch.Tensor:
    """Response position ``t − t_first(b)`` of every token (long ``[B, T]``; 0 outside the response).

    ``t_first(b)`` is the first column where ``mask_B_T[b]`` is set; rows without response tokens are 0.
    """
    if mask_B_T.dim() != 2:
        raise ValueError(f"mask_B_T must be 2-D [B, T], got shape {tuple(mask_B_T.shape)}.")
    mask_B_T = mask_B_T > 0
    T = mask_B_T.shape[1]
    t_T = torch.arange(T, device=mask_B_T.device)
    first_B = torch.where(mask_B_T, t_T, T).min(dim=1).values
    return torch.where(mask_B_T, t_T - first_B[:, None], 0)


def mechanism_tensors(
    student_topk_ids_B_T_K: torch.Tensor,
    student_topk_logp_B_T_K: torch.Tensor,
    teacher_topk_ids_B_T_K: torch.Tensor,
    teacher_logp_at_student_topk_B_T_K: torch.Tensor,
    student_entropy_B_T: torch.Tensor,
    teacher_entropy_B_T: torch.Tensor,
    mask_B_T: torch.Tensor,
) -> MechanismTensors:
    """Per-position overlap, overlap advantages, masses and entropies (formulas: module docstring).

    Args:
        student_topk_ids_B_T_K: student's own top-k token ids (distinct within a position).
        student_topk_logp_B_T_K: full-vocabulary ``log p_t`` at those ids.
        teacher_topk_ids_B_T_K: teacher's own top-k token ids, same k.
        teacher_logp_at_student_topk_B_T_K: full-vocabulary ``log q_t`` at the student's top-k ids.
        student_entropy_B_T, teacher_entropy_B_T: full-vocabulary entropies ``H(p_t)``, ``H(q_t)``.
        mask_B_T: response positions (bool or 0/1); everything else is ignored and zeroed.

    Membership ``v ∈ S^q_t`` is found by sorting the teacher's ids and binary search, so memory stays
    O(B·T·K) (no K×K comparison tensor).
    """
    if student_topk_ids_B_T_K.dim() != 3:
        raise ValueError(
            f"student_topk_ids_B_T_K must be 3-D [B, T, K], got shape {tuple(student_topk_ids_B_T_K.shape)}."
        )
    B, T, K = student_topk_ids_B_T_K.shape
    if K < 1:
        raise ValueError("student_topk_ids_B_T_K has K = 0; score both models with top_k >= 1.")
    _check_shape("student_topk_logp_B_T_K", student_topk_logp_B_T_K, (B, T, K))
    _check_shape("teacher_topk_ids_B_T_K", teacher_topk_ids_B_T_K, (B, T, K))
    _check_shape("teacher_logp_at_student_topk_B_T_K", teacher_logp_at_student_topk_B_T_K, (B, T, K))
    _check_shape("student_entropy_B_T", student_entropy_B_T, (B, T))
    _check_shape("teacher_entropy_B_T", teacher_entropy_B_T, (B, T))
    _check_shape("mask_B_T", mask_B_T, (B, T))
    mask_B_T = mask_B_T > 0
    for name, x in (
        ("student_topk_logp_B_T_K", student_topk_logp_B_T_K),
        ("teacher_logp_at_student_topk_B_T_K", teacher_logp_at_student_topk_B_T_K),
        ("student_entropy_B_T", student_entropy_B_T),
        ("teacher_entropy_B_T", teacher_entropy_B_T),
    ):
        _check_finite(name, x, mask_B_T)
    sorted_student_B_T_K = student_topk_ids_B_T_K.sort(dim=-1).values
    dup_B_T = (sorted_student_B_T_K[..., 1:] == sorted_student_B_T_K[..., :-1]).any(dim=-1) & mask_B_T
    if bool(dup_B_T.any()):
        raise ValueError(
            f"student_topk_ids_B_T_K repeats a token id at {int(dup_B_T.sum())} response positions; "
            "top-k ids must be distinct (is k larger than the vocabulary?)."
        )

    # v ∈ S^q_t for each student top-k id v: binary search in the sorted teacher ids.
    teacher_sorted_B_T_K = teacher_topk_ids_B_T_K.sort(dim=-1).values.contiguous()
    idx_B_T_K = torch.searchsorted(teacher_sorted_B_T_K, student_topk_ids_B_T_K.contiguous())
    found_B_T_K = teacher_sorted_B_T_K.gather(-1, idx_B_T_K.clamp(max=K - 1)) == student_topk_ids_B_T_K
    in_I_B_T_K = found_B_T_K & mask_B_T[..., None]

    maskf_B_T = mask_B_T.float()
    count_B_T = in_I_B_T_K.float().sum(-1)
    adv_valid_B_T = count_B_T > 0
    logp_B_T_K = student_topk_logp_B_T_K.float()
    logq_B_T_K = teacher_logp_at_student_topk_B_T_K.float()
    zeros_B_T_K = torch.zeros_like(logp_B_T_K)
    p_in_B_T_K = torch.where(in_I_B_T_K, logp_B_T_K.exp(), zeros_B_T_K)
    q_in_B_T_K = torch.where(in_I_B_T_K, logq_B_T_K.exp(), zeros_B_T_K)

    # Eq. 7: renormalise on I_t in log space; off-I_t entries are -inf before the logsumexp and are
    # replaced by 0 afterwards, so 0·(-inf) never appears.
    neg_inf_B_T_K = torch.full_like(logp_B_T_K, float("-inf"))
    logp_I_B_T_K = torch.where(in_I_B_T_K, logp_B_T_K, neg_inf_B_T_K)
    logq_I_B_T_K = torch.where(in_I_B_T_K, logq_B_T_K, neg_inf_B_T_K)
    logp_bar_B_T_K = torch.where(
        in_I_B_T_K, logp_I_B_T_K - logp_I_B_T_K.logsumexp(-1, keepdim=True), zeros_B_T_K
    )
    logq_bar_B_T_K = torch.where(
        in_I_B_T_K, logq_I_B_T_K - logq_I_B_T_K.logsumexp(-1, keepdim=True), zeros_B_T_K
    )
    safe_count_B_T = count_B_T.clamp(min=1.0)
    adv_term_B_T_K = torch.where(
        in_I_B_T_K, logp_bar_B_T_K.exp() * (logq_bar_B_T_K - logp_bar_B_T_K), zeros_B_T_K
    )
    overlap_adv_B_T = adv_term_B_T_K.sum(-1) / safe_count_B_T
    verl_term_B_T_K = torch.where(in_I_B_T_K, -q_in_B_T_K * (logq_B_T_K - logp_B_T_K), zeros_B_T_K)
    overlap_adv_verl_B_T = verl_term_B_T_K.sum(-1) / safe_count_B_T

    # Extreme tokens: per position, the max / min top-K advantage over I_t (as the reference logs them).
    # a_t(v) = p_t(v) / Σ_{u∈S^p_t} p_t(u) · (log q_t(v) − log p_t(v)); the softmax over all K student ids
    # is that weight (masked rows are finite: their values are never read).
    safe_logp_B_T_K = torch.where(mask_B_T[..., None], logp_B_T_K, zeros_B_T_K)
    safe_logq_B_T_K = torch.where(mask_B_T[..., None], logq_B_T_K, zeros_B_T_K)
    topk_adv_B_T_K = torch.softmax(safe_logp_B_T_K, dim=-1) * (safe_logq_B_T_K - safe_logp_B_T_K)
    extremes = []
    for pick, fill in ((torch.argmax, float("-inf")), (torch.argmin, float("inf"))):
        idx_B_T_1 = pick(torch.where(in_I_B_T_K, topk_adv_B_T_K, fill), dim=-1, keepdim=True)
        for values_B_T_K in (topk_adv_B_T_K, safe_logp_B_T_K.exp(), safe_logq_B_T_K.exp()):
            at_B_T = values_B_T_K.gather(-1, idx_B_T_1).squeeze(-1)
            extremes.append(torch.where(adv_valid_B_T, at_B_T, torch.zeros_like(at_B_T)))

    h_p_B_T = torch.where(mask_B_T, student_entropy_B_T.float(), 0.0)
    h_q_B_T = torch.where(mask_B_T, teacher_entropy_B_T.float(), 0.0)
    return MechanismTensors(
        overlap_count_B_T=count_B_T,
        overlap_ratio_B_T=count_B_T / K,
        overlap_adv_B_T=overlap_adv_B_T,
        overlap_adv_verl_B_T=overlap_adv_verl_B_T,
        mass_student_B_T=p_in_B_T_K.sum(-1),
        mass_teacher_B_T=q_in_B_T_K.sum(-1),
        student_entropy_B_T=h_p_B_T,
        teacher_entropy_B_T=h_q_B_T,
        entropy_gap_B_T=(h_q_B_T - h_p_B_T).abs() * maskf_B_T,
        max_adv_B_T=extremes[0],
        p_at_max_adv_B_T=extremes[1],
        q_at_max_adv_B_T=extremes[2],
        min_adv_B_T=extremes[3],
        p_at_min_adv_B_T=extremes[4],
        q_at_min_adv_B_T=extremes[5],
        mask_B_T=mask_B_T,
        adv_valid_B_T=adv_valid_B_T,
        position_B_T=response_positions(mask_B_T),
        k=K,
    )


def _masked_mean(values_B_T: torch.Tensor, mask_B_T: torch.Tensor) -> float | None:
    """Mean of ``values_B_T`` over ``mask_B_T`` (float64 accumulation), or None if the mask is empty."""
    n = int(mask_B_T.sum())
    if n == 0:
        return None
    return float(torch.where(mask_B_T, values_B_T, 0.0).double().sum() / n)


def position_profile(
    values_B_T: torch.Tensor,
    mask_B_T: torch.Tensor,
    bin_size: int,
    positions_B_T: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean of ``values_B_T`` by response-position bin: ``(starts_C, means_C, counts_C)``.

    Bin c holds the tokens with response position in ``[c·bin_size, (c+1)·bin_size)``; the mean is
    ``Σ values / count`` over the tokens of the bin where ``mask_B_T`` is set. Only bins with
    ``count > 0`` are returned (so ``means_C`` has no NaN), in increasing order of ``starts_C``.

    Args:
        values_B_T: per-position values (e.g. ``MechanismTensors.overlap_ratio_B_T``).
        mask_B_T: which positions count (bool or 0/1).
        bin_size: positions per bin, > 0.
        positions_B_T: response positions; default ``response_positions(mask_B_T)``. Pass
            ``MechanismTensors.position_B_T`` when ``mask_B_T`` is a subset of the response (e.g.
            ``adv_valid_B_T``) so positions still count from the first response token.

    Returns:
        ``starts_C`` (long), ``means_C`` (float32), ``counts_C`` (long); all empty for an empty mask.
    """
    if values_B_T.dim() != 2:
        raise ValueError(f"values_B_T must be 2-D [B, T], got shape {tuple(values_B_T.shape)}.")
    _check_shape("mask_B_T", mask_B_T, tuple(values_B_T.shape))
    if bin_size < 1:
        raise ValueError(f"bin_size must be a positive number of positions, got {bin_size}.")
    mask_B_T = mask_B_T > 0
    if positions_B_T is None:
        positions_B_T = response_positions(mask_B_T)
    _check_shape("positions_B_T", positions_B_T, tuple(values_B_T.shape))
    bins_N = (positions_B_T[mask_B_T] // bin_size).long()
    vals_N = values_B_T[mask_B_T].double()
    if bins_N.numel() == 0:
        empty = torch.zeros(0, dtype=torch.long, device=values_B_T.device)
        return empty, torch.zeros(0, dtype=torch.float32, device=values_B_T.device), empty.clone()
    n_bins = int(bins_N.max()) + 1
    counts_C = torch.zeros(n_bins, dtype=torch.long, device=values_B_T.device).index_add_(
        0, bins_N, torch.ones_like(bins_N)
    )
    sums_C = torch.zeros(n_bins, dtype=torch.float64, device=values_B_T.device).index_add_(0, bins_N, vals_N)
    keep_C = counts_C > 0
    starts_C = torch.arange(n_bins, device=values_B_T.device)[keep_C] * bin_size
    means_C = (sums_C[keep_C] / counts_C[keep_C]).float()
    return starts_C, means_C, counts_C[keep_C]


def mechanism_metrics(
    student_topk_ids_B_T_K: torch.Tensor,
    student_topk_logp_B_T_K: torch.Tensor,
    teacher_topk_ids_B_T_K: torch.Tensor,
    teacher_logp_at_student_topk_B_T_K: torch.Tensor,
    student_entropy_B_T: torch.Tensor,
    teacher_entropy_B_T: torch.Tensor,
    mask_B_T: torch.Tensor,
    *,
    position_chunk: int | None = 256,
) -> dict[str, float]:
    """The mechanism metrics of docs/paper.md §3 for one batch, as ``{stable name: float}``.

    Names (token means over response positions; formulas in the module docstring and docs/metrics.md):
    ``overlap/ratio``, ``overlap/adv`` and ``overlap/adv_verl`` (over positions with ``|I_t| > 0``),
    ``overlap/mass_student``, ``overlap/mass_teacher``, ``entropy/student``, ``entropy/teacher``,
    ``entropy/gap`` = mean_t ``|H(q_t) − H(p_t)|``, ``entropy/gap_of_means`` =
    ``|mean_t H(q_t) − mean_t H(p_t)|``, and, for every position chunk ``[s, e)`` holding a response
    token, ``overlap/ratio@s-e``, ``entropy/student@s-e``, ``entropy/teacher@s-e``.

    ``extreme/max_adv``, ``extreme/p_at_max_adv``, ``extreme/q_at_max_adv``, ``extreme/min_adv``,
    ``extreme/p_at_min_adv``, ``extreme/q_at_min_adv``: per position, the token of ``I_t`` with the largest
    (smallest) top-K advantage ``a_t`` (module docstring), its advantage and both probabilities, averaged
    over positions with ``|I_t| > 0``. They depend only on the scoring outputs, so they are the same
    numbers in every objective mode and in diagnose.

    A metric with no positions to average over is omitted (an all-masked batch gives ``{}``).
    ``position_chunk=None`` turns the per-chunk metrics off.
    """
    mt = mechanism_tensors(
        student_topk_ids_B_T_K,
        student_topk_logp_B_T_K,
        teacher_topk_ids_B_T_K,
        teacher_logp_at_student_topk_B_T_K,
        student_entropy_B_T,
        teacher_entropy_B_T,
        mask_B_T,
    )
    return mechanism_means(mt, position_chunk=position_chunk)


def mechanism_means(mt: MechanismTensors, *, position_chunk: int | None = 256) -> dict[str, float]:
    """:func:`mechanism_metrics` of already computed :func:`mechanism_tensors` (for a caller that also
    needs the per-position tensors: the tensors are then computed once)."""
    if position_chunk is not None and position_chunk < 1:
        raise ValueError(
            f"position_chunk must be a positive number of positions (or None to disable), got {position_chunk}."
        )
    out: dict[str, float] = {}

    def put(name: str, value: float | None) -> None:
        if value is not None:
            out[name] = value

    m = mt.mask_B_T
    put("overlap/ratio", _masked_mean(mt.overlap_ratio_B_T, m))
    put("overlap/adv", _masked_mean(mt.overlap_adv_B_T, mt.adv_valid_B_T))
    put("overlap/adv_verl", _masked_mean(mt.overlap_adv_verl_B_T, mt.adv_valid_B_T))
    put("overlap/mass_student", _masked_mean(mt.mass_student_B_T, m))
    put("overlap/mass_teacher", _masked_mean(mt.mass_teacher_B_T, m))
    h_p = _masked_mean(mt.student_entropy_B_T, m)
    h_q = _masked_mean(mt.teacher_entropy_B_T, m)
    put("entropy/student", h_p)
    put("entropy/teacher", h_q)
    put("entropy/gap", _masked_mean(mt.entropy_gap_B_T, m))
    if h_p is not None and h_q is not None:
        out["entropy/gap_of_means"] = abs(h_q - h_p)

    for name, values_B_T in (
        ("extreme/max_adv", mt.max_adv_B_T),
        ("extreme/p_at_max_adv", mt.p_at_max_adv_B_T),
        ("extreme/q_at_max_adv", mt.q_at_max_adv_B_T),
        ("extreme/min_adv", mt.min_adv_B_T),
        ("extreme/p_at_min_adv", mt.p_at_min_adv_B_T),
        ("extreme/q_at_min_adv", mt.q_at_min_adv_B_T),
    ):
        put(name, _masked_mean(values_B_T, mt.adv_valid_B_T))

    if position_chunk is not None:
        for name, values_B_T in (
            ("overlap/ratio", mt.overlap_ratio_B_T),
            ("entropy/student", mt.student_entropy_B_T),
            ("entropy/teacher", mt.teacher_entropy_B_T),
        ):
            starts_C, means_C, _ = position_profile(values_B_T, m, position_chunk, mt.position_B_T)
            for start, mean in zip(starts_C.tolist(), means_C.tolist()):
                out[f"{name}@{start}-{start + position_chunk}"] = mean
    return out
