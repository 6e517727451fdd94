"""Chunked scoring: ``score`` (per-position log-probs, top-k, entropy) and ``score_backward`` (the same and
the backward of a loss of them, without recomputing the head); the full-vocabulary computations built on
the same chunks are in :mod:`opd.scoring.full_vocab`.

The maths. With final hidden state h_s at position s, head W and temperature τ,

    z_t = post(W h_{t-1}) / τ                    (float32 matmul of the upcast h and W, outside autocast;
                                                 ``post`` = the model's logit quirks, see head.py)
    log p_t(v) = z_t(v) − log Σ_u exp z_t(u)    (over the first ``vocab_limit`` columns, or all V)
    token_logp[b, t]  = log p_t(input_ids[b, t])
    entropy[b, t]     = −Σ_v p_t(v) log p_t(v)
    topk_*[b, t, :]   = the k largest log p_t(v) and their ids v (descending; full-vocab values, not
                        renormalised on the k ids)
    given_logp[b, t, k] = log p_t(given_ids[b, t, k])

A "chunk" is ``chunk_size`` scored positions of the whole batch, flattened row-major over the entries
where ``response_mask_B_T`` is 1 (padding is never scored), so one chunk holds at most two chunk×V
float32 tensors at a time (≈ 8 bytes × chunk × V; the entropy is a batched dot product, not a third
tensor): the bound is O(chunk·V), within the contract's O(B·chunk·V).

``grad=True``: the backbone keeps its graph; each chunk's lm_head + log-softmax (and everything derived
from it) runs inside ``torch.utils.checkpoint``, so backward keeps only the chunk's hidden rows and
recomputes its logits. All float outputs (token, given, top-k log-probs and entropy) are then
differentiable; top-k ids are integers. ``grad=False`` runs everything under ``torch.no_grad()``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch.utils.checkpoint import checkpoint

from opd.precision import compute_context
from opd.scoring.head import Head, aligned_positions, check_batch, check_ids_in_range, final_hidden, make_head


@dataclass
class ScoreOutput:
    """Per-position quantities, float32, aligned with ``input_ids_B_T`` (see :mod:`opd.scoring`)."""

    token_logp_B_T: torch.Tensor
    topk_ids_B_T_K: torch.Tensor | None = None
    topk_logp_B_T_K: torch.Tensor | None = None
    given_logp_B_T_K: torch.Tensor | None = None
    entropy_B_T: torch.Tensor | None = None


def _chunk_stats(
    head: Head,
    hidden_N_H: torch.Tensor,
    target_N: torch.Tensor,
    given_N_K: torch.Tensor | None,
    top_k: int,
    entropy: bool,
    lse: bool = False,
) -> tuple[torch.Tensor | None, ...]:
    """Per-chunk (token_logp_N, topk_ids_N_K, topk_logp_N_K, given_logp_N_K, entropy_N, lse_N), float32;
    ``lse_N`` (the log-normaliser log Σ_v exp z(v), for :class:`Rescorer`) only with ``lse=True``."""
    z_N_V = head.logits(hidden_N_H)
    lse_N = torch.logsumexp(z_N_V, dim=-1) if lse else None
    logp_N_V = torch.log_softmax(z_N_V, dim=-1)
    del z_N_V
    return (*_logp_stats(logp_N_V, target_N, given_N_K, top_k, entropy), lse_N)


def _logp_stats(
    logp_N_V: torch.Tensor, target_N: torch.Tensor, given_N_K: torch.Tensor | None, top_k: int, entropy: bool
) -> tuple[torch.Tensor | None, ...]:
    """(token_logp_N, topk_ids_N_K, topk_logp_N_K, given_logp_N_K, entropy_N) of one chunk's log-probs."""
    token_logp_N = logp_N_V.gather(-1, target_N.to(logp_N_V.device)[:, None]).squeeze(-1)
    given_logp_N_K = None if given_N_K is None else logp_N_V.gather(-1, given_N_K.to(logp_N_V.device))
    topk_logp_N_K = topk_ids_N_K = None
    if top_k:
        topk_logp_N_K, topk_ids_N_K = logp_N_V.topk(top_k, dim=-1)
    entropy_N = None
    if entropy:
        # H = −Σ_v p(v) log p(v) as a batched dot product: no third chunk×V temporary. Logits are finite
        # (lm_head output), so log p > −inf and 0·log 0 does not arise.
        entropy_N = -torch.matmul(logp_N_V.exp()[:, None, :], logp_N_V[:, :, None]).reshape(-1)
    return token_logp_N, topk_ids_N_K, topk_logp_N_K, given_logp_N_K, entropy_N


def _fill(fields_N: list, sl: slice, values: tuple) -> None:
    """Write one chunk's ``_logp_stats`` into the N-entry buffers (None = not requested)."""
    for buf_N, v in zip(fields_N, values):
        if buf_N is not None and v is not None:
            buf_N[sl] = v


def _slices(N: int, chunk_size: int) -> list[slice]:
    """Consecutive slices of at most ``chunk_size`` entries covering range(N)."""
    return [slice(start, min(start + chunk_size, N)) for start in range(0, N, chunk_size)]


def _scatter(
    values_N: torch.Tensor, rows_N: torch.Tensor, tgt_N: torch.Tensor, B: int, T: int
) -> torch.Tensor:
    """Place per-entry values (N, ...) at (rows_N, tgt_N) of a zero (B, T, ...) tensor (differentiable)."""
    out = values_N.new_zeros((B, T, *values_N.shape[1:]))
    return out.index_put((rows_N.to(out.device), tgt_N.to(out.device)), values_N)


@dataclass
class Rescorer:
    """Log-probs at other ids for the positions a no-grad :func:`score_rescorable` call scored, without
    the vocabulary-wide head: it keeps the N scored hidden rows and their log-normalisers, so
    ``given(ids_B_T_K)[b, t, k] = z_t(ids[b, t, k]) − log Σ_v exp z_t(v)`` needs only the K weight rows
    per position (:meth:`Head.logits_at`). Same alignment and zeros as ``score``'s ``given_logp_B_T_K``."""

    head: Head
    hidden_N_H: torch.Tensor
    lse_N: torch.Tensor | None  # None: kept by :func:`keep_rows` (no head run yet): ``scores_at`` only
    rows_N: torch.Tensor
    tgt_N: torch.Tensor
    shape: tuple[int, int]
    width: int
    chunk_size: int
    device: torch.device
    _entry_B_T: torch.Tensor | None = field(default=None, repr=False)

    def given(self, ids_B_T_K: torch.Tensor) -> torch.Tensor:
        self._need_lse()
        B, T = self.shape
        assert ids_B_T_K.dim() == 3 and ids_B_T_K.shape[:2] == (B, T), (
            f"ids_B_T_K must be (B, T, K) = ({B}, {T}, K), got {tuple(ids_B_T_K.shape)}"
        )
        K = ids_B_T_K.shape[-1]
        N = self.rows_N.numel()
        if N == 0:
            return torch.zeros((B, T, K), dtype=torch.float32, device=self.device)
        ids_N_K = ids_B_T_K[self.rows_N, self.tgt_N].long()
        check_ids_in_range("ids_B_T_K", ids_N_K, self.width)
        ids_N_K = ids_N_K.to(self.hidden_N_H.device)
        out_N_K = torch.empty((N, K), dtype=torch.float32, device=self.hidden_N_H.device)
        with torch.no_grad():
            for sl in _slices(N, self.chunk_size):
                out_N_K[sl] = self.head.logits_at(self.hidden_N_H[sl], ids_N_K[sl]) - self.lse_N[sl, None]
        return _scatter(out_N_K, self.rows_N, self.tgt_N, B, T).to(self.device)

    def given_at(self, rows_n: torch.Tensor, cols_n: torch.Tensor, ids_n_K: torch.Tensor) -> torch.Tensor:
        """``given(ids)[rows_n, cols_n]`` for n scored entries only: (n, K) float32, on the hidden rows'
        device (a caller working chunk by chunk asks for its chunk's entries, not the whole batch)."""
        self._need_lse()
        entry_n = self._entries(rows_n, cols_n)
        check_ids_in_range("ids_n_K", ids_n_K, self.width)
        with torch.no_grad():
            z_n_K = self.head.logits_at(self.hidden_N_H[entry_n], ids_n_K.long().to(self.hidden_N_H.device))
            return z_n_K - self.lse_N[entry_n, None]

    def scores_at(
        self,
        rows_n: torch.Tensor,
        cols_n: torch.Tensor,
        target_n: torch.Tensor,
        given_n_K: torch.Tensor | None,
        top_k: int,
    ) -> tuple[torch.Tensor | None, ...]:
        """``score``'s values at n kept entries, from the full head on their kept rows: (token_logp_n,
        topk_ids_n_K, topk_logp_n_K, given_logp_n_K, entropy_n) of the tokens ``target_n`` and ids
        ``given_n_K``, computed exactly as ``score`` computes them (head, log-softmax, gather, top-k)."""
        entry_n = self._entries(rows_n, cols_n)
        dev = self.hidden_N_H.device
        check_ids_in_range("target_n", target_n, self.width)
        if given_n_K is not None:
            check_ids_in_range("given_n_K", given_n_K, self.width)
            given_n_K = given_n_K.long().to(dev)
        with torch.no_grad():
            logp_n_V = torch.log_softmax(self.head.logits(self.hidden_N_H[entry_n]), dim=-1)
            return _logp_stats(logp_n_V, target_n.long().to(dev), given_n_K, top_k, True)

    def _need_lse(self) -> None:
        if self.lse_N is None:
            raise ValueError(
                "Rescorer: kept by keep_rows (no head pass), so it has no log-normalisers for given()/given_at(). "
                "Fix: use scores_at(), or score_rescorable() for a rescorer that gives log-probs at K ids."
            )

    def _entries(self, rows_n: torch.Tensor, cols_n: torch.Tensor) -> torch.Tensor:
        B, T = self.shape
        if self._entry_B_T is None:  # (b, t) -> index of that entry among the N kept rows, −1 if none
            self._entry_B_T = torch.full((B, T), -1, dtype=torch.long)
            self._entry_B_T[self.rows_N.cpu(), self.tgt_N.cpu()] = torch.arange(self.rows_N.numel())
        entry_n = self._entry_B_T[rows_n.cpu(), cols_n.cpu()]
        if bool((entry_n < 0).any()):
            raise ValueError(
                f"rows_n/cols_n: {int((entry_n < 0).sum())} of {entry_n.numel()} positions were not scored by "
                "this rescorer's pass. Fix: ask only for response positions of the batch it scored."
            )
        return entry_n.to(self.hidden_N_H.device)


def score(
    model: torch.nn.Module,
    input_ids_B_T: torch.Tensor,
    attention_mask_B_T: torch.Tensor,
    response_mask_B_T: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    given_ids_B_T_K: torch.Tensor | None = None,
    entropy: bool = True,
    chunk_size: int = 256,
    vocab_limit: int | None = None,
    grad: bool = False,
    compute_dtype: str | torch.dtype | None = None,
) -> ScoreOutput:
    """Score ``input_ids_B_T`` with ``model`` at response positions (see the module docstring).

    ``output[b, t]`` is about p_t = softmax(post(W h_{t−1}) / τ), the distribution that predicts token t;
    entries with ``response_mask_B_T[b, t] == 0`` are 0. Log-probs and entropy are float32 whatever the
    model dtype. With ``grad=True`` the float outputs are differentiable (chunks are checkpointed).
    ``compute_dtype``: run the backbone under autocast in this dtype (float32 master weights, e.g. a
    bf16 student; see ``opd.precision``); the head is float32 either way. None = the weights' dtype.
    If nothing is marked as response, zeros are returned without running the model.
    """
    return _score(
        model,
        input_ids_B_T,
        attention_mask_B_T,
        response_mask_B_T,
        temperature=temperature,
        top_k=top_k,
        given_ids_B_T_K=given_ids_B_T_K,
        entropy=entropy,
        chunk_size=chunk_size,
        vocab_limit=vocab_limit,
        grad=grad,
        compute_dtype=compute_dtype,
    )[0]


def keep_rows(
    model: torch.nn.Module,
    input_ids_B_T: torch.Tensor,
    attention_mask_B_T: torch.Tensor,
    response_mask_B_T: torch.Tensor,
    *,
    temperature: float = 1.0,
    chunk_size: int = 256,
    vocab_limit: int | None = None,
    compute_dtype: str | torch.dtype | None = None,
) -> Rescorer:
    """The no-grad backbone pass of ``score`` alone: a :class:`Rescorer` holding the N response rows of the
    final hidden state (no head run yet), whose ``scores_at`` gives chunks of ``score``'s values later (a
    teacher scored chunk by chunk inside the student's pass, its head once per position)."""
    head, V, rows_N, tgt_N, src_N, _, _ = _prepare(
        model,
        input_ids_B_T,
        attention_mask_B_T,
        response_mask_B_T,
        temperature,
        0,
        None,
        chunk_size,
        vocab_limit,
    )
    B, T = input_ids_B_T.shape
    hidden_N_H = torch.zeros((0, 1), device=input_ids_B_T.device)
    if rows_N.numel():
        with torch.no_grad(), compute_context(model, compute_dtype):
            hidden_B_T_H = final_hidden(model, input_ids_B_T, attention_mask_B_T)
            hidden_N_H = hidden_B_T_H[rows_N.to(hidden_B_T_H.device), src_N.to(hidden_B_T_H.device)]
    return Rescorer(head, hidden_N_H, None, rows_N, tgt_N, (B, T), V, chunk_size, input_ids_B_T.device)


def score_rescorable(
    model: torch.nn.Module,
    input_ids_B_T: torch.Tensor,
    attention_mask_B_T: torch.Tensor,
    response_mask_B_T: torch.Tensor,
    **kwargs,
) -> tuple[ScoreOutput, Rescorer]:
    """No-grad ``score(...)`` (same keyword arguments, no ``grad``) and a :class:`Rescorer` that gives the
    same positions' log-probs at ids known only later (a teacher scored before the student's pass gives
    its log-probs at the student's top-k afterwards without a second vocabulary-wide head)."""
    if kwargs.pop("grad", False):
        raise ValueError("score_rescorable: grad=True is not supported (the rescorer is no-grad).")
    with torch.no_grad():
        out, rescorer = _score(
            model, input_ids_B_T, attention_mask_B_T, response_mask_B_T, keep=True, **kwargs
        )
    return out, rescorer


@dataclass
class ChunkScores:
    """One chunk of :func:`score_backward`: ``n`` scored entries at ``(rows_n, tgt_n)`` of the batch (the
    alignment of :func:`aligned_positions`) and their detached float32 scores, as ``score`` defines them."""

    rows_n: torch.Tensor
    tgt_n: torch.Tensor
    token_logp_n: torch.Tensor
    topk_ids_n_K: torch.Tensor | None
    topk_logp_n_K: torch.Tensor | None
    given_ids_n_K: torch.Tensor | None
    given_logp_n_K: torch.Tensor | None
    entropy_n: torch.Tensor | None


# ∂L/∂ of a chunk's (token_logp_n, topk_logp_n_K, given_logp_n_K); None = 0. The top-k gradient may have
# fewer columns than top_k: it is then about the first ones.
ChunkGrads = tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]


def score_backward(
    model: torch.nn.Module,
    input_ids_B_T: torch.Tensor,
    attention_mask_B_T: torch.Tensor,
    response_mask_B_T: torch.Tensor,
    chunk_loss: Callable[[ChunkScores], ChunkGrads],
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    given_ids_B_T_K: torch.Tensor | None = None,
    entropy: bool = True,
    chunk_size: int = 256,
    vocab_limit: int | None = None,
    compute_dtype: str | torch.dtype | None = None,
) -> ScoreOutput:
    """``score(...)`` and the backward of a loss of its log-probs in one pass, each head row projected once.

    For a loss L that is a sum over scored positions of terms in that position's token, top-k and given
    log-probs (the policy-gradient losses: their aggregation is linear, with coefficients that depend on
    the mask only), ``chunk_loss(ChunkScores) -> (g_token_n, g_topk_n_K, g_given_n_K)`` returns the
    chunk's ∂L/∂ of those log-probs. With log p(v) = z(v) − log Σ_u exp z(u),

        ∂L/∂z = Σ_e g_e (onehot(v_e) − p) = scatter_add(g at the ids v_e) − (Σ_e g_e) · p

    (e runs over the position's token, top-k and given entries), so each chunk's logits get their
    gradient from the same forward that scored them; it goes through the head (into its weights and the
    chunk's hidden-row gradient) at once, and the chunk's vocabulary-sized tensors are freed. At the end
    the hidden-row gradients go through the backbone in one ``backward``. The parameters' ``.grad`` are
    accumulated here; the caller does not call ``backward``. Unlike ``score(grad=True)`` (a checkpoint
    per chunk, which recomputes the head, log-softmax, top-k and entropy in backward) nothing is
    recomputed; the peak extra is about three chunk×V float32 tensors (logits, log-probs, gradient).

    Returns the detached ``ScoreOutput`` (same values as ``score`` with these arguments). ``chunk_loss``
    is called once per chunk in order, with grad enabled as the caller has it.
    """
    head, V, rows_N, tgt_N, src_N, target_N, given_N_K = _prepare(
        model,
        input_ids_B_T,
        attention_mask_B_T,
        response_mask_B_T,
        temperature,
        top_k,
        given_ids_B_T_K,
        chunk_size,
        vocab_limit,
    )
    B, T = input_ids_B_T.shape
    device = input_ids_B_T.device
    K_given = 0 if given_N_K is None else given_N_K.shape[-1]
    specs = (
        (torch.float32, ()),
        (torch.long, (top_k,)) if top_k else None,
        (torch.float32, (top_k,)) if top_k else None,
        (torch.float32, (K_given,)) if given_N_K is not None else None,
        (torch.float32, ()) if entropy else None,
    )
    N = rows_N.numel()
    if N == 0:
        zeros = [
            None if sp is None else torch.zeros((B, T, *sp[1]), dtype=sp[0], device=device) for sp in specs
        ]
        return ScoreOutput(*zeros)
    with compute_context(model, compute_dtype):
        hidden_B_T_H = final_hidden(model, input_ids_B_T, attention_mask_B_T)
    dev = hidden_B_T_H.device
    hidden_N_H = hidden_B_T_H[rows_N.to(dev), src_N.to(dev)]
    del hidden_B_T_H
    target_N = target_N.to(dev)
    given_N_K = None if given_N_K is None else given_N_K.to(dev)
    fields_N = [None if sp is None else torch.empty((N, *sp[1]), dtype=sp[0], device=dev) for sp in specs]
    grad_N_H = torch.zeros_like(hidden_N_H) if hidden_N_H.requires_grad else None
    for sl in _slices(N, chunk_size):
        h_c_H = hidden_N_H[sl].detach().requires_grad_(hidden_N_H.requires_grad)
        with torch.enable_grad():
            z_c_V = head.logits(h_c_H)
        given_c_K = None if given_N_K is None else given_N_K[sl]
        with torch.no_grad():
            logp_c_V = torch.log_softmax(z_c_V.detach(), dim=-1)
            stats = _logp_stats(logp_c_V, target_N[sl], given_c_K, top_k, entropy)
            _fill(fields_N, sl, stats)
        g_token, g_topk, g_given = chunk_loss(
            ChunkScores(rows_N[sl], tgt_N[sl], stats[0], stats[1], stats[2], given_c_K, stats[3], stats[4])
        )
        with torch.no_grad():
            parts = [
                (g, ids)
                for g, ids in ((g_token, target_N[sl, None]), (g_topk, stats[1]), (g_given, given_c_K))
                if g is not None
            ]
            if not parts or not z_c_V.requires_grad:
                continue
            dz_c_V = logp_c_V.exp_()  # p, in place: the log-probs are no longer needed
            del logp_c_V
            g_n_E = [g.reshape(g.shape[0], -1).float().to(dev) for g, _ in parts]
            dz_c_V.mul_(-sum(g.sum(-1) for g in g_n_E)[:, None])
            for g, (_, ids) in zip(g_n_E, parts):
                dz_c_V.scatter_add_(-1, ids[:, : g.shape[-1]], g)
        z_c_V.backward(dz_c_V)
        del z_c_V, dz_c_V
        if grad_N_H is not None and h_c_H.grad is not None:
            grad_N_H[sl] = h_c_H.grad
    if grad_N_H is not None:
        hidden_N_H.backward(grad_N_H)
    return ScoreOutput(
        *[None if f is None else _scatter(f, rows_N, tgt_N, B, T).to(device) for f in fields_N]
    )


def _prepare(
    model: torch.nn.Module,
    input_ids_B_T: torch.Tensor,
    attention_mask_B_T: torch.Tensor,
    response_mask_B_T: torch.Tensor,
    temperature: float,
    top_k: int,
    given_ids_B_T_K: torch.Tensor | None,
    chunk_size: int,
    vocab_limit: int | None,
) -> tuple:
    """The checks every ``score`` variant runs, and what they share: ``(head, V, rows_N, tgt_N, src_N,
    target_N, given_N_K)`` (the scored entries as :func:`aligned_positions` gives them, their token ids
    and given ids)."""
    check_batch(input_ids_B_T, attention_mask_B_T, response_mask_B_T, chunk_size)
    B, T = input_ids_B_T.shape
    head, V = make_head(model, temperature, vocab_limit)
    if not (isinstance(top_k, int) and 0 <= top_k <= V):
        raise ValueError(f"top_k={top_k!r}: must be an int in [0, {V}] (0 = no top-k). Fix: use 16 or 0.")
    rows_N, tgt_N, src_N = aligned_positions(response_mask_B_T)
    target_N = input_ids_B_T[rows_N, tgt_N]
    check_ids_in_range("input_ids_B_T", target_N, V)
    given_N_K = None
    if given_ids_B_T_K is not None:
        assert given_ids_B_T_K.dim() == 3 and given_ids_B_T_K.shape[:2] == (B, T), (
            f"given_ids_B_T_K must be (B, T, K) = ({B}, {T}, K), got {tuple(given_ids_B_T_K.shape)}"
        )
        if given_ids_B_T_K.is_floating_point():
            raise ValueError(f"given_ids_B_T_K: must be integer ids, got dtype {given_ids_B_T_K.dtype}.")
        given_N_K = given_ids_B_T_K[rows_N, tgt_N].long()
        check_ids_in_range("given_ids_B_T_K", given_N_K, V)
    return head, V, rows_N, tgt_N, src_N, target_N, given_N_K


def _score(
    model: torch.nn.Module,
    input_ids_B_T: torch.Tensor,
    attention_mask_B_T: torch.Tensor,
    response_mask_B_T: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    given_ids_B_T_K: torch.Tensor | None = None,
    entropy: bool = True,
    chunk_size: int = 256,
    vocab_limit: int | None = None,
    grad: bool = False,
    compute_dtype: str | torch.dtype | None = None,
    keep: bool = False,
) -> tuple[ScoreOutput, Rescorer | None]:
    head, V, rows_N, tgt_N, src_N, target_N, given_N_K = _prepare(
        model,
        input_ids_B_T,
        attention_mask_B_T,
        response_mask_B_T,
        temperature,
        top_k,
        given_ids_B_T_K,
        chunk_size,
        vocab_limit,
    )
    B, T = input_ids_B_T.shape
    K_given = 0 if given_N_K is None else given_N_K.shape[-1]
    specs = (  # (dtype, per-entry shape) of each _chunk_stats field, None when not requested
        (torch.float32, ()),
        (torch.long, (top_k,)) if top_k else None,
        (torch.float32, (top_k,)) if top_k else None,
        (torch.float32, (K_given,)) if given_N_K is not None else None,
        (torch.float32, ()) if entropy else None,
        (torch.float32, ()) if keep else None,  # lse_N
    )
    N = rows_N.numel()
    device = input_ids_B_T.device
    hidden_N_H = None
    if N == 0:
        fields = [
            None if sp is None else torch.zeros((B, T, *sp[1]), dtype=sp[0], device=device) for sp in specs
        ]
        fields_N = [None] * len(specs)
    else:
        with torch.set_grad_enabled(grad):
            with compute_context(model, compute_dtype):
                hidden_B_T_H = final_hidden(model, input_ids_B_T, attention_mask_B_T)
            hidden_N_H = hidden_B_T_H[rows_N.to(hidden_B_T_H.device), src_N.to(hidden_B_T_H.device)]
            del hidden_B_T_H

            def chunk_args(sl: slice) -> tuple:
                given = None if given_N_K is None else given_N_K[sl]
                return head, hidden_N_H[sl], target_N[sl], given, top_k, entropy, keep

            if grad:
                pieces = [
                    checkpoint(_chunk_stats, *chunk_args(sl), use_reentrant=False)
                    for sl in _slices(N, chunk_size)
                ]
                fields_N = [
                    None if sp is None else torch.cat([p[i] for p in pieces]) for i, sp in enumerate(specs)
                ]
            else:
                # Write into buffers allocated up front: per-chunk outputs kept alive between chunks pin the
                # CPU heap above each freed chunk×V block (glibc), and RSS then grew with the chunk count.
                fields_N = [
                    None if sp is None else torch.empty((N, *sp[1]), dtype=sp[0], device=hidden_N_H.device)
                    for sp in specs
                ]
                for sl in _slices(N, chunk_size):
                    _fill(fields_N, sl, _chunk_stats(*chunk_args(sl)))
        fields = [None if f is None else _scatter(f, rows_N, tgt_N, B, T).to(device) for f in fields_N[:5]]
    out = ScoreOutput(
        token_logp_B_T=fields[0],
        topk_ids_B_T_K=fields[1],
        topk_logp_B_T_K=fields[2],
        given_logp_B_T_K=fields[3],
        entropy_B_T=fields[4],
    )
    if not keep:
        return out, None
    if hidden_N_H is None:
        hidden_N_H = torch.zeros((0, 1), device=device)
        fields_N[5] = torch.zeros((0,), device=device)
    rescorer = Rescorer(head, hidden_N_H, fields_N[5], rows_N, tgt_N, (B, T), V, chunk_size, device)
    return out, rescorer
