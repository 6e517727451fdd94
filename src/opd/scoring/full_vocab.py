"""Full-vocabulary computations on the chunks of :mod:`opd.scoring.chunked`: ``score_full_logits`` (full
logits chunk by chunk), ``full_vocab_pair`` (a streamed full-vocabulary divergence of two models) and
``full_vocab_fused`` (that divergence's backward taken in the scoring pass). Same alignment, chunking
and float32 head as ``score``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch.utils.checkpoint import checkpoint

from opd.precision import compute_context
from opd.scoring.chunked import ScoreOutput, _fill, _logp_stats, _scatter, _slices
from opd.scoring.head import Head, aligned_positions, check_batch, check_ids_in_range, final_hidden, make_head


def score_full_logits(
    model: torch.nn.Module,
    input_ids_B_T: torch.Tensor,
    attention_mask_B_T: torch.Tensor,
    response_mask_B_T: torch.Tensor,
    *,
    temperature: float = 1.0,
    vocab_limit: int | None = None,
    grad: bool = False,
    chunk_size: int = 256,
    compute_dtype: str | torch.dtype | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Yield full-vocabulary logits of the response positions, one chunk at a time.

    Each item is ``(rows_N, cols_N, logits_N_V)`` with N ≤ ``chunk_size``: ``logits_N_V[i]`` is the float32
    logit vector z_t = post(W h_{t−1}) / τ (first ``vocab_limit`` columns) of the distribution predicting
    ``input_ids_B_T[rows_N[i], cols_N[i]]`` — same alignment as ``score``. Chunks run over the entries with
    ``response_mask_B_T == 1`` in row-major order, so two models scored with the same masks and
    ``chunk_size`` yield matching chunks (zip a teacher and a student to compute a full-vocab divergence).
    The backbone runs once, at the first ``next()``.

    Memory: one chunk×V tensor is created per step; with ``grad=False`` it is freed when you drop it.
    With ``grad=True`` the logits are differentiable and each chunk stays alive for as long as your loss
    graph refers to it, so a loss summed over all chunks before ``backward`` costs O(N·V) again. For the
    update pass prefer ``score(..., given_ids_B_T_K=..., grad=True)`` (checkpointed, O(chunk·V)), or
    reduce each chunk inside your own ``torch.utils.checkpoint``, or use ``full_vocab_pair``.
    ``compute_dtype`` as in ``score``.
    """
    check_batch(input_ids_B_T, attention_mask_B_T, response_mask_B_T, chunk_size)
    head, _ = make_head(model, temperature, vocab_limit)
    rows_N, tgt_N, src_N = aligned_positions(response_mask_B_T)
    if not rows_N.numel():
        return
    with torch.set_grad_enabled(grad), compute_context(model, compute_dtype):  # not held across yields
        hidden_B_T_H = final_hidden(model, input_ids_B_T, attention_mask_B_T)
        hidden_N_H = hidden_B_T_H[rows_N.to(hidden_B_T_H.device), src_N.to(hidden_B_T_H.device)]
        del hidden_B_T_H
    for sl in _slices(rows_N.numel(), chunk_size):
        with torch.set_grad_enabled(grad):
            logits_N_V = head.logits(hidden_N_H[sl])
        yield rows_N[sl], tgt_N[sl], logits_N_V


def _pair_heads(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    temperature: float,
    teacher_temperature: float,
    vocab_limit: int | None,
) -> tuple[Head, Head, int]:
    """The two models' float32 heads and their shared number of logit columns (ValueError if they differ)."""
    s_head, V = make_head(student, temperature, vocab_limit)
    t_head, Vt = make_head(teacher, teacher_temperature, vocab_limit)
    if Vt != V:
        raise ValueError(
            f"vocab_limit={vocab_limit!r}: the student scores {V} logit columns, the teacher {Vt}. "
            "Fix: pass the shared vocabulary size (opd.models.check_compatibility(...).vocab_limit)."
        )
    return s_head, t_head, V


def _pair_chunk(
    divergence: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    s_head: Head,
    t_head: Head,
    s_hidden_N_H: torch.Tensor,
    t_hidden_N_H: torch.Tensor,
) -> torch.Tensor:
    with torch.no_grad():
        t_logits_N_V = t_head.logits(t_hidden_N_H)
    return divergence(s_head.logits(s_hidden_N_H), t_logits_N_V)


def full_vocab_pair(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    input_ids_B_T: torch.Tensor,
    attention_mask_B_T: torch.Tensor,
    response_mask_B_T: torch.Tensor,
    divergence: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    *,
    temperature: float = 1.0,
    teacher_temperature: float = 1.0,
    vocab_limit: int | None = None,
    chunk_size: int = 256,
    grad: bool = False,
    compute_dtype: str | torch.dtype | None = None,
) -> torch.Tensor:
    """Per-position ``divergence(student_logits_N_V, teacher_logits_N_V) -> div_N`` over the full vocabulary.

    Returns float32 ``div_B_T`` aligned like ``score`` (0 where ``response_mask_B_T`` is 0). Logits are
    z/τ with the student's ``temperature`` and the teacher's ``teacher_temperature``, float32.

    Memory: both backbones run once (the teacher without grad); only the N response rows of their final
    hidden states are kept (O(N·H)). The vocabulary-sized part is streamed, ``chunk_size`` positions at a
    time: each chunk's two heads and the divergence run inside ``torch.utils.checkpoint``, which keeps the
    two chunk×H hidden slices and recomputes both heads in backward. So no N×V tensor of either model
    exists at any time, with or without ``grad``; the peak extra is a few chunk×V float32 tensors. The
    price is one more head matmul per model and chunk in backward.
    Gradients reach only the student (the teacher head runs under ``no_grad``).
    """
    check_batch(input_ids_B_T, attention_mask_B_T, response_mask_B_T, chunk_size)
    s_head, t_head, V = _pair_heads(student, teacher, temperature, teacher_temperature, vocab_limit)
    B, T = input_ids_B_T.shape
    rows_N, tgt_N, src_N = aligned_positions(response_mask_B_T)
    check_ids_in_range("input_ids_B_T", input_ids_B_T[rows_N, tgt_N], V)
    N = rows_N.numel()
    if N == 0:
        return torch.zeros((B, T), dtype=torch.float32, device=input_ids_B_T.device)
    with torch.no_grad():
        t_hidden_B_T_H = final_hidden(teacher, input_ids_B_T, attention_mask_B_T)
        t_hidden_N_H = t_hidden_B_T_H[rows_N.to(t_hidden_B_T_H.device), src_N.to(t_hidden_B_T_H.device)]
        del t_hidden_B_T_H
    with torch.set_grad_enabled(grad):
        with compute_context(student, compute_dtype):
            s_hidden_B_T_H = final_hidden(student, input_ids_B_T, attention_mask_B_T)
        s_hidden_N_H = s_hidden_B_T_H[rows_N.to(s_hidden_B_T_H.device), src_N.to(s_hidden_B_T_H.device)]
        del s_hidden_B_T_H
        pieces = []
        for sl in _slices(N, chunk_size):
            args = (divergence, s_head, t_head, s_hidden_N_H[sl], t_hidden_N_H[sl].to(s_hidden_N_H.device))
            if grad:
                pieces.append(checkpoint(_pair_chunk, *args, use_reentrant=False))
            else:
                pieces.append(_pair_chunk(*args))
        div_N = torch.cat(pieces).float()
    return _scatter(div_N, rows_N, tgt_N, B, T).to(input_ids_B_T.device)


def full_vocab_fused(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    input_ids_B_T: torch.Tensor,
    attention_mask_B_T: torch.Tensor,
    response_mask_B_T: torch.Tensor,
    divergence: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    loss_weight_B_T: torch.Tensor,
    *,
    top_k: int = 0,
    temperature: float = 1.0,
    teacher_temperature: float = 1.0,
    vocab_limit: int | None = None,
    chunk_size: int = 256,
    compute_dtype: str | torch.dtype | None = None,
) -> tuple[torch.Tensor, ScoreOutput, ScoreOutput]:
    """One pass of both models that scores them *and* backpropagates ``Σ_{b,t} loss_weight_B_T · div_B_T``.

    ``divergence(student_logp_N_V, teacher_logp_N_V) -> div_N`` takes the chunk's *log-probs* (each model's
    log-softmax runs once per chunk and serves both its scores and the divergence; e.g.
    ``opd.objectives.reverse_kl_from_logp``), unlike :func:`full_vocab_pair`'s, which takes logits. The
    weights are the loss's constant per-token coefficients (an aggregation of per-token values is linear
    in them). The student's parameters get their ``.grad`` accumulated here, so the caller does not call
    ``backward``. Also returns the two
    models' no-grad ``score``-style outputs from the same logits: token log-probs, top-``top_k`` ids and
    log-probs, entropy, and the teacher's log-probs at the student's top-``top_k`` ids
    (``given_logp_B_T_K``), i.e. what ``score_pair`` gives, without running either model again.
    Returns ``(div_B_T detached, student ScoreOutput, teacher ScoreOutput)``.

    How: the teacher's backbone runs once without grad, the student's once with grad; only their N
    response rows are kept. Per chunk of ``chunk_size`` positions the student's head and log-softmax run on
    a detached copy of its hidden rows with grad, the divergence's backward is taken at once (into the
    head's weights and that chunk's hidden-row gradient), and the chunk's vocabulary-sized tensors are
    freed. At the end
    the hidden-row gradients go through the backbone in one ``backward``. Each head thus runs once
    forward (no checkpoint recompute) and no N×V tensor exists; the peak extra is a few chunk×V float32
    tensors (logits, log-probs and the divergence's saved tensors of one chunk).
    """
    check_batch(input_ids_B_T, attention_mask_B_T, response_mask_B_T, chunk_size)
    s_head, t_head, V = _pair_heads(student, teacher, temperature, teacher_temperature, vocab_limit)
    if not (isinstance(top_k, int) and 0 <= top_k <= V):
        raise ValueError(f"top_k={top_k!r}: must be an int in [0, {V}] (0 = no top-k). Fix: use 16 or 0.")
    assert loss_weight_B_T.shape == input_ids_B_T.shape, (
        f"loss_weight_B_T has shape {tuple(loss_weight_B_T.shape)}, input_ids_B_T {tuple(input_ids_B_T.shape)}"
    )
    B, T = input_ids_B_T.shape
    device = input_ids_B_T.device
    rows_N, tgt_N, src_N = aligned_positions(response_mask_B_T)
    target_N = input_ids_B_T[rows_N, tgt_N]
    check_ids_in_range("input_ids_B_T", target_N, V)
    N = rows_N.numel()
    k_shape = (top_k,) if top_k else None
    if N == 0:

        def zeros(shape, dtype=torch.float32):
            return None if shape is None else torch.zeros((B, T, *shape), dtype=dtype, device=device)

        s_out = ScoreOutput(zeros(()), zeros(k_shape, torch.long), zeros(k_shape), None, zeros(()))
        t_out = ScoreOutput(zeros(()), zeros(k_shape, torch.long), zeros(k_shape), zeros(k_shape), zeros(()))
        return zeros(()), s_out, t_out
    with torch.no_grad():
        t_hidden_B_T_H = final_hidden(teacher, input_ids_B_T, attention_mask_B_T)
        t_hidden_N_H = t_hidden_B_T_H[rows_N.to(t_hidden_B_T_H.device), src_N.to(t_hidden_B_T_H.device)]
        del t_hidden_B_T_H
    with compute_context(student, compute_dtype):
        s_hidden_B_T_H = final_hidden(student, input_ids_B_T, attention_mask_B_T)
    s_hidden_N_H = s_hidden_B_T_H[rows_N.to(s_hidden_B_T_H.device), src_N.to(s_hidden_B_T_H.device)]
    del s_hidden_B_T_H
    dev = s_hidden_N_H.device
    weight_N = loss_weight_B_T.detach().to(dev)[rows_N.to(dev), tgt_N.to(dev)].float()
    target_N = target_N.to(dev)

    def buf(shape, dtype=torch.float32):
        return None if shape is None else torch.empty((N, *shape), dtype=dtype, device=dev)

    s_f = [buf(()), buf(k_shape, torch.long), buf(k_shape), None, buf(())]
    t_f = [buf(()), buf(k_shape, torch.long), buf(k_shape), buf(k_shape), buf(())]
    div_N = buf(())
    grad_N_H = torch.empty_like(s_hidden_N_H)
    for sl in _slices(N, chunk_size):
        h_c_H = s_hidden_N_H[sl].detach().requires_grad_(s_hidden_N_H.requires_grad)
        with torch.enable_grad():  # each model's log-softmax once: the divergence takes log-probs
            s_logp_c_V = torch.log_softmax(s_head.logits(h_c_H), dim=-1)
        with torch.no_grad():
            _fill(s_f, sl, _logp_stats(s_logp_c_V.detach(), target_N[sl], None, top_k, True))
            t_logp_c_V = torch.log_softmax(t_head.logits(t_hidden_N_H[sl].to(dev)), dim=-1)
            given_c_K = s_f[1][sl] if top_k else None  # the teacher at the student's top-k
            _fill(t_f, sl, _logp_stats(t_logp_c_V, target_N[sl], given_c_K, top_k, True))
        with torch.enable_grad():
            div_c = divergence(s_logp_c_V, t_logp_c_V).float()
            del s_logp_c_V, t_logp_c_V
            div_N[sl] = div_c.detach()
            if div_c.requires_grad:
                (div_c * weight_N[sl]).sum().backward()
        if h_c_H.grad is not None:
            grad_N_H[sl] = h_c_H.grad
        else:
            grad_N_H[sl] = 0
        del div_c, h_c_H
    if s_hidden_N_H.requires_grad:
        s_hidden_N_H.backward(grad_N_H)

    def out(f):
        return [None if x is None else _scatter(x, rows_N, tgt_N, B, T).to(device) for x in f]

    return _scatter(div_N, rows_N, tgt_N, B, T).to(device), ScoreOutput(*out(s_f)), ScoreOutput(*out(t_f))
