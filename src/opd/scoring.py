"""Per-position scoring of given token ids by a causal LM (student or teacher).

CONTRACT (implemented by the scoring helper; other modules rely on it):

Alignment: every output tensor is indexed like ``input_ids_B_T``: entry ``[b, t]`` is about the
distribution that predicts token ``t`` from the prefix ``< t`` (i.e. computed from the logits at
position ``t - 1``). Entries where ``response_mask_B_T`` is 0 are 0 (ids: 0). This shift is written
once, in this module.

``score(model, input_ids_B_T, attention_mask_B_T, response_mask_B_T, *, temperature=1.0, top_k=0,
        given_ids_B_T_K=None, entropy=True, chunk_size=256, vocab_limit=None, grad=False,
        compute_dtype=None) -> ScoreOutput``
- runs the model once to the final hidden state, then computes ``lm_head`` + float32 log-softmax in
  chunks of ``chunk_size`` positions, only over response positions, so peak extra memory is
  O(B·chunk·V), never a full B×T×V float32 tensor;
- ``temperature``: logits / temperature before log-softmax (OPD scores the student at its rollout
  temperature, the teacher at ``teacher_temperature``);
- ``compute_dtype``: run the backbone under ``torch.autocast`` in this dtype (float32 master weights,
  low-precision compute; see ``opd.precision``); None = the weights' own dtype. The head never is: the
  ``lm_head`` matmul, logits and log-softmax are float32 for every model dtype;
- ``vocab_limit``: restrict logits to the first ``vocab_limit`` columns (embedding tables padded past
  the tokenizer's vocabulary);
- ``top_k > 0``: also return the model's own top-k ids and their (full-vocab) log-probs;
- ``given_ids_B_T_K``: also return log-probs at these ids (e.g. the student's top-k ids for the teacher);
- ``entropy``: full-vocab entropy per position;
- ``grad=True``: keep the autograd graph (the update pass); chunks are recomputed in backward
  (activation checkpointing) so memory stays O(B·chunk·V).

``PolicyScorer(model, temperature=..., chunk_size=..., vocab_limit=..., compute_dtype=...)`` is the same
computation as a ``torch.nn.Module``: ``forward(input_ids_B_T, attention_mask_B_T, response_mask_B_T,
given_ids_B_T_K=None, *, top_k=0, entropy=False)`` returns ``score``'s ``ScoreOutput`` (with grad when
grad is enabled), so a DDP/FSDP wrapper around it sees the whole pass; ``forward(..., teacher=...,
divergence=...)`` returns ``full_vocab_pair``'s ``div_B_T``.

``full_vocab_pair(student, teacher, ..., divergence, *, temperature, teacher_temperature, ...) -> div_B_T``
streams a full-vocabulary divergence between two models the same way (both heads and the divergence
per chunk, checkpointed), so the exact-KL objective never holds an N×V tensor either.

IMPLEMENTATION NOTES

The maths. With final hidden state h_s at position s, head W and temperature τ,

    z_t = post(W h_{t-1}) / τ                    (float32 matmul of the upcast h and W, outside autocast;
                                                 ``post`` = the model's logit quirks below)
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

Position ids are the ones HF ``generate`` assigns to a left-padded batch,
``pos[b, t] = Σ_{s≤t} m[b, s] − 1`` and 0 where ``m[b, t] = 0`` (see ``left_pad_position_ids``), so
scoring a rollout reproduces the sampler's distribution (tested against ``generate``'s own logits).

Model quirks reproduced in ``post`` (read from ``model.config.get_text_config()``):
``final_logit_softcapping`` c (Gemma-2/3: z ← c·tanh(z/c)), ``logits_scaling`` s (Granite: z ← z/s) and
``logit_scale`` a (Cohere: z ← a·z). They are applied in float32 after the upcast (the HF forward
applies them in the model dtype, so bf16 values differ by rounding only). Any other post-processing
would make scoring silently wrong, so the first call on each model object checks this path against the
model's own ``forward`` on a 4-token input and raises if the logits differ (see ``check_head_path``).

``grad=True``: the backbone keeps its graph; each chunk's lm_head + log-softmax (and everything derived
from it) runs inside ``torch.utils.checkpoint``, so backward keeps only the chunk's hidden rows and
recomputes its logits. All float outputs (token, given, top-k log-probs and entropy) are then
differentiable; top-k ids are integers. ``grad=False`` runs everything under ``torch.no_grad()``.

What this module deliberately leaves out:
- no train/eval switching: dropout follows ``model.training`` (the one-time head check runs in eval);
- no micro-batching of the backbone: the caller sizes B×T; only the vocab-sized part is chunked;
- it calls the decoder and ``lm_head`` submodules directly (not ``model.forward``), so wrappers whose
  bookkeeping lives in the top-level forward (DDP's gradient-sync preparation, an FSDP root unit holding
  ``lm_head``) must wrap :class:`PolicyScorer` — whose ``forward`` is backbone + chunked head — rather
  than the bare model;
- no sequence packing (one sequence per row), no KV cache, no multimodal inputs.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from opd.precision import compute_context


@dataclass
class ScoreOutput:
    """Per-position quantities, float32, aligned with ``input_ids_B_T`` (see module docstring)."""

    token_logp_B_T: torch.Tensor
    topk_ids_B_T_K: torch.Tensor | None = None
    topk_logp_B_T_K: torch.Tensor | None = None
    given_logp_B_T_K: torch.Tensor | None = None
    entropy_B_T: torch.Tensor | None = None


# ----------------------------------------------------------------------------------------------------
# Alignment and positions


def aligned_positions(response_mask_B_T: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The scored entries and where their distributions come from — the one place the shift lives.

    Returns ``(rows_N, tgt_N, src_N)``: the N entries with ``response_mask_B_T == 1`` in row-major order,
    token ``input_ids[rows_N[i], tgt_N[i]]`` is scored with the logits (hidden state) at
    ``(rows_N[i], src_N[i])``, where ``src_N = tgt_N − 1`` because a causal LM's logits at position s
    predict token s + 1.
    """
    assert response_mask_B_T.dim() == 2, (
        f"response_mask_B_T must be (B, T), got {tuple(response_mask_B_T.shape)}"
    )
    rows_N, tgt_N = response_mask_B_T.nonzero(as_tuple=True)
    return rows_N, tgt_N, tgt_N - 1


def left_pad_position_ids(attention_mask_B_T: torch.Tensor) -> torch.Tensor:
    """Position ids as HF ``generate`` assigns them: ``pos[b, t] = Σ_{s≤t} m[b, s] − 1``, 0 where m = 0.

    For a left-padded row the first real token gets position 0 whatever the padding length.
    """
    assert attention_mask_B_T.dim() == 2, (
        f"attention_mask_B_T must be (B, T), got {tuple(attention_mask_B_T.shape)}"
    )
    position_ids_B_T = attention_mask_B_T.long().cumsum(-1) - 1
    return position_ids_B_T.masked_fill(attention_mask_B_T == 0, 0)


# ----------------------------------------------------------------------------------------------------
# Backbone and head


def _backbone(model: torch.nn.Module) -> torch.nn.Module:
    """The decoder stack that returns the final (normed) hidden state, generic over HF causal LMs."""
    decoder = model.get_decoder() if callable(getattr(model, "get_decoder", None)) else None
    if decoder is None or decoder is model:
        decoder = getattr(model, getattr(model, "base_model_prefix", "") or "_", None)
    if not isinstance(decoder, torch.nn.Module) or decoder is model:
        raise TypeError(
            f"model: cannot find the decoder of {type(model).__name__} (get_decoder() and "
            f"base_model_prefix={getattr(model, 'base_model_prefix', None)!r} gave none). "
            "Fix: pass a Hugging Face *ForCausalLM model."
        )
    return decoder


def _final_hidden(
    model: torch.nn.Module, input_ids_B_T: torch.Tensor, attention_mask_B_T: torch.Tensor
) -> torch.Tensor:
    """Final hidden state h_B_T_H of the backbone, with left-padding-consistent position ids.

    The inputs go to the device of the model's input embeddings (a teacher may live on another device
    than the batch); the hidden state stays there.
    """
    device = model.get_input_embeddings().weight.device
    input_ids_B_T, attention_mask_B_T = input_ids_B_T.to(device), attention_mask_B_T.to(device)
    out = _backbone(model)(
        input_ids=input_ids_B_T,
        attention_mask=attention_mask_B_T,
        position_ids=left_pad_position_ids(attention_mask_B_T),
        use_cache=False,
    )
    hidden_B_T_H = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    assert hidden_B_T_H.shape[:2] == input_ids_B_T.shape, (
        f"backbone returned hidden states of shape {tuple(hidden_B_T_H.shape)} for input {tuple(input_ids_B_T.shape)}"
    )
    return hidden_B_T_H


@dataclass(frozen=True)
class _Head:
    """z = post(lm_head(h))[:vocab_limit] / temperature, in float32. ``post`` = the model's logit quirks."""

    lm_head: torch.nn.Module
    softcap: float | None
    scale: float
    temperature: float
    vocab_limit: int | None

    def logits(self, hidden_N_H: torch.Tensor) -> torch.Tensor:
        # float32 head whatever the model dtype or an enclosing autocast: bf16 logits in [16, 32) would be
        # quantised to 0.125. A plain Linear head multiplies only its first vocab_limit rows.
        with torch.autocast(device_type=hidden_N_H.device.type, enabled=False):
            if isinstance(self.lm_head, torch.nn.Linear):
                w_V_H, b_V = self.lm_head.weight, self.lm_head.bias
                if self.vocab_limit is not None:
                    w_V_H = w_V_H[: self.vocab_limit]
                    b_V = None if b_V is None else b_V[: self.vocab_limit]
                z_N_V = torch.nn.functional.linear(
                    hidden_N_H.float(), w_V_H.float(), None if b_V is None else b_V.float()
                )
            else:
                z_N_V = self.lm_head(hidden_N_H)
                if self.vocab_limit is not None:
                    z_N_V = z_N_V[..., : self.vocab_limit]
                z_N_V = z_N_V.float()
        if self.scale != 1.0:
            z_N_V = z_N_V * self.scale
        if self.softcap is not None:
            z_N_V = torch.tanh(z_N_V / self.softcap) * self.softcap
        if self.temperature != 1.0:
            z_N_V = z_N_V / self.temperature
        return z_N_V


def _logit_quirks(model: torch.nn.Module) -> tuple[float | None, float]:
    """(softcap, scale) from the config: Gemma-2/3 softcapping, Granite ``logits_scaling``, Cohere ``logit_scale``."""
    config = model.config
    if callable(getattr(config, "get_text_config", None)):
        config = config.get_text_config()
    softcap = getattr(config, "final_logit_softcapping", None)
    scale = 1.0
    if getattr(config, "logits_scaling", None) is not None:
        scale /= float(config.logits_scaling)
    if getattr(config, "logit_scale", None) is not None:
        scale *= float(config.logit_scale)
    return (float(softcap) if softcap else None), scale


# model → number of logit columns its own forward returns (after a successful check_head_path)
_CHECKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def check_head_path(model: torch.nn.Module) -> int:
    """Check that backbone + ``lm_head`` + known quirks reproduce ``model(...).logits``; return their width.

    Runs once per model object (cached): a no-grad forward of token ids 0..3 in eval mode (the train/eval
    flags are restored), compared with ``max|ours − theirs| / max|theirs|`` ≤ 1e-4 (fp32) or 3e-2 (half
    precision). Raises ``RuntimeError`` naming the model class if the two differ, i.e. the model
    post-processes logits in a way this module does not reproduce.
    """
    if model in _CHECKED:
        return _CHECKED[model]
    softcap, scale = _logit_quirks(model)
    head = _Head(model.get_output_embeddings(), softcap, scale, 1.0, None)
    device = model.get_input_embeddings().weight.device
    ids_1_T = torch.arange(4, device=device).unsqueeze(0)
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            raw_1_T_V = model(input_ids=ids_1_T, use_cache=False).logits
            theirs_T_V = raw_1_T_V[0].float()
            ours_T_V = head.logits(_final_hidden(model, ids_1_T, torch.ones_like(ids_1_T))[0])
    finally:
        for m, training in modes:
            m.training = training
    if not bool(torch.isfinite(theirs_T_V).all()):
        from opd.models import NonFiniteModelError

        raise NonFiniteModelError(
            f"model ({type(model).__name__}): its own forward returns non-finite (NaN/inf) logits on a 4-token "
            "probe, so every log-prob would be NaN. Fix: check its weights (opd.models.check_finite_weights) "
            "and dtype (float16 overflows easily; use float32 or bfloat16)."
        )
    native_width = int(theirs_T_V.shape[-1])
    width = min(native_width, ours_T_V.shape[-1])
    theirs_T_V, ours_T_V = theirs_T_V[:, :width], ours_T_V[:, :width].to(theirs_T_V.device)
    err = ((ours_T_V - theirs_T_V).abs().max() / theirs_T_V.abs().max().clamp_min(1e-6)).item()
    tol = 1e-4 if raw_1_T_V.dtype in (torch.float32, torch.float64) else 3e-2
    if not err <= tol:
        raise RuntimeError(
            f"model: scoring's backbone+lm_head path does not reproduce {type(model).__name__}.forward logits "
            f"(relative max error {err:.3g} > {tol}); the model post-processes logits in a way opd.scoring "
            "does not know. Fix: add the quirk to opd.scoring._logit_quirks (and a test)."
        )
    _CHECKED[model] = native_width
    return native_width


def _make_head(model: torch.nn.Module, temperature: float, vocab_limit: int | None) -> tuple[_Head, int]:
    """Validated head and the number of vocabulary columns V it scores over."""
    if not (isinstance(temperature, (int, float)) and temperature > 0 and temperature != float("inf")):
        raise ValueError(
            f"temperature={temperature!r}: must be a finite number > 0. Fix: use 1.0 for the plain model."
        )
    lm_head = model.get_output_embeddings()
    if lm_head is None:
        raise TypeError(
            f"model: {type(model).__name__}.get_output_embeddings() is None. Fix: pass a *ForCausalLM model."
        )
    native_width = check_head_path(model)
    if vocab_limit is not None and not (isinstance(vocab_limit, int) and 1 <= vocab_limit <= native_width):
        raise ValueError(
            f"vocab_limit={vocab_limit!r}: must be an int in [1, {native_width}] (the model's logit width). "
            "Fix: pass len(tokenizer) or None."
        )
    softcap, scale = _logit_quirks(model)
    width = vocab_limit or native_width  # also trims a head wider than the model's own forward returns
    return _Head(lm_head, softcap, scale, float(temperature), width), width


# ----------------------------------------------------------------------------------------------------
# Input checks


def _check_batch(
    input_ids_B_T: torch.Tensor,
    attention_mask_B_T: torch.Tensor,
    response_mask_B_T: torch.Tensor,
    chunk_size: int,
) -> None:
    assert input_ids_B_T.dim() == 2, f"input_ids_B_T must be (B, T), got {tuple(input_ids_B_T.shape)}"
    for name, m in (("attention_mask_B_T", attention_mask_B_T), ("response_mask_B_T", response_mask_B_T)):
        assert m.shape == input_ids_B_T.shape, (
            f"{name} has shape {tuple(m.shape)}, input_ids_B_T {tuple(input_ids_B_T.shape)}"
        )
        if ((m != 0) & (m != 1)).any():
            raise ValueError(f"{name}: must hold only 0/1 values (bool, integer or float); got other values.")
    if input_ids_B_T.is_floating_point():
        raise ValueError(f"input_ids_B_T: must be integer token ids, got dtype {input_ids_B_T.dtype}.")
    if not (isinstance(chunk_size, int) and chunk_size >= 1):
        raise ValueError(
            f"chunk_size={chunk_size!r}: must be an int ≥ 1. Fix: use 256 (positions per chunk)."
        )
    n_first = int((response_mask_B_T[:, 0] != 0).sum()) if response_mask_B_T.shape[1] else 0
    if n_first:
        raise ValueError(
            f"response_mask_B_T: {n_first} rows mark position 0 as response, but token 0 has no prefix and "
            "nothing predicts it. Fix: a response starts after at least one prompt token."
        )
    outside = (response_mask_B_T != 0) & (attention_mask_B_T == 0)
    if outside.any():
        raise ValueError(
            f"response_mask_B_T: {int(outside.sum())} response positions have attention_mask_B_T == 0 "
            f"(first at (b, t) = {tuple(outside.nonzero()[0].tolist())}). Fix: response_mask = response_mask & attention_mask."
        )


def _check_ids_in_range(name: str, ids: torch.Tensor, width: int) -> None:
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= width):
        raise ValueError(
            f"{name}: ids at response positions must lie in [0, {width}) (the scored vocabulary), "
            f"got min {int(ids.min())}, max {int(ids.max())}. Fix: check the tokenizer pairing or vocab_limit."
        )


# ----------------------------------------------------------------------------------------------------
# Scoring


def _chunk_stats(
    head: _Head,
    hidden_N_H: torch.Tensor,
    target_N: torch.Tensor,
    given_N_K: torch.Tensor | None,
    top_k: int,
    entropy: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Per-chunk (token_logp_N, topk_ids_N_K, topk_logp_N_K, given_logp_N_K, entropy_N), float32."""
    logp_N_V = torch.log_softmax(head.logits(hidden_N_H), dim=-1)
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


def _slices(N: int, chunk_size: int) -> list[slice]:
    """Consecutive slices of at most ``chunk_size`` entries covering range(N)."""
    return [slice(start, min(start + chunk_size, N)) for start in range(0, N, chunk_size)]


def _scatter(
    values_N: torch.Tensor, rows_N: torch.Tensor, tgt_N: torch.Tensor, B: int, T: int
) -> torch.Tensor:
    """Place per-entry values (N, ...) at (rows_N, tgt_N) of a zero (B, T, ...) tensor (differentiable)."""
    out = values_N.new_zeros((B, T, *values_N.shape[1:]))
    return out.index_put((rows_N.to(out.device), tgt_N.to(out.device)), values_N)


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
    _check_batch(input_ids_B_T, attention_mask_B_T, response_mask_B_T, chunk_size)
    B, T = input_ids_B_T.shape
    head, V = _make_head(model, temperature, vocab_limit)
    if not (isinstance(top_k, int) and 0 <= top_k <= V):
        raise ValueError(f"top_k={top_k!r}: must be an int in [0, {V}] (0 = no top-k). Fix: use 16 or 0.")
    rows_N, tgt_N, src_N = aligned_positions(response_mask_B_T)
    target_N = input_ids_B_T[rows_N, tgt_N]
    _check_ids_in_range("input_ids_B_T", target_N, V)
    given_N_K = None
    if given_ids_B_T_K is not None:
        assert given_ids_B_T_K.dim() == 3 and given_ids_B_T_K.shape[:2] == (B, T), (
            f"given_ids_B_T_K must be (B, T, K) = ({B}, {T}, K), got {tuple(given_ids_B_T_K.shape)}"
        )
        if given_ids_B_T_K.is_floating_point():
            raise ValueError(f"given_ids_B_T_K: must be integer ids, got dtype {given_ids_B_T_K.dtype}.")
        given_N_K = given_ids_B_T_K[rows_N, tgt_N].long()
        _check_ids_in_range("given_ids_B_T_K", given_N_K, V)

    K_given = 0 if given_N_K is None else given_N_K.shape[-1]
    specs = (  # (dtype, per-entry shape) of each _chunk_stats field, None when not requested
        (torch.float32, ()),
        (torch.long, (top_k,)) if top_k else None,
        (torch.float32, (top_k,)) if top_k else None,
        (torch.float32, (K_given,)) if given_N_K is not None else None,
        (torch.float32, ()) if entropy else None,
    )
    N = rows_N.numel()
    device = input_ids_B_T.device
    if N == 0:
        fields = [
            None if sp is None else torch.zeros((B, T, *sp[1]), dtype=sp[0], device=device) for sp in specs
        ]
    else:
        with torch.set_grad_enabled(grad):
            with compute_context(model, compute_dtype):
                hidden_B_T_H = _final_hidden(model, input_ids_B_T, attention_mask_B_T)
            hidden_N_H = hidden_B_T_H[rows_N.to(hidden_B_T_H.device), src_N.to(hidden_B_T_H.device)]
            del hidden_B_T_H

            def chunk_args(sl: slice) -> tuple:
                given = None if given_N_K is None else given_N_K[sl]
                return head, hidden_N_H[sl], target_N[sl], given, top_k, entropy

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
                    for buf_N, values in zip(fields_N, _chunk_stats(*chunk_args(sl))):
                        if buf_N is not None:
                            buf_N[sl] = values
        fields = [None if f is None else _scatter(f, rows_N, tgt_N, B, T).to(device) for f in fields_N]
    return ScoreOutput(
        token_logp_B_T=fields[0],
        topk_ids_B_T_K=fields[1],
        topk_logp_B_T_K=fields[2],
        given_logp_B_T_K=fields[3],
        entropy_B_T=fields[4],
    )


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
    _check_batch(input_ids_B_T, attention_mask_B_T, response_mask_B_T, chunk_size)
    head, _ = _make_head(model, temperature, vocab_limit)
    rows_N, tgt_N, src_N = aligned_positions(response_mask_B_T)
    if not rows_N.numel():
        return
    with torch.set_grad_enabled(grad), compute_context(model, compute_dtype):  # not held across yields
        hidden_B_T_H = _final_hidden(model, input_ids_B_T, attention_mask_B_T)
        hidden_N_H = hidden_B_T_H[rows_N.to(hidden_B_T_H.device), src_N.to(hidden_B_T_H.device)]
        del hidden_B_T_H
    for sl in _slices(rows_N.numel(), chunk_size):
        with torch.set_grad_enabled(grad):
            logits_N_V = head.logits(hidden_N_H[sl])
        yield rows_N[sl], tgt_N[sl], logits_N_V


def _pair_chunk(
    divergence: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    s_head: _Head,
    t_head: _Head,
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
    _check_batch(input_ids_B_T, attention_mask_B_T, response_mask_B_T, chunk_size)
    s_head, V = _make_head(student, temperature, vocab_limit)
    t_head, Vt = _make_head(teacher, teacher_temperature, vocab_limit)
    if Vt != V:
        raise ValueError(
            f"vocab_limit={vocab_limit!r}: the student scores {V} logit columns, the teacher {Vt}. "
            "Fix: pass the shared vocabulary size (opd.models.check_compatibility(...).vocab_limit)."
        )
    B, T = input_ids_B_T.shape
    rows_N, tgt_N, src_N = aligned_positions(response_mask_B_T)
    _check_ids_in_range("input_ids_B_T", input_ids_B_T[rows_N, tgt_N], V)
    N = rows_N.numel()
    if N == 0:
        return torch.zeros((B, T), dtype=torch.float32, device=input_ids_B_T.device)
    with torch.no_grad():
        t_hidden_B_T_H = _final_hidden(teacher, input_ids_B_T, attention_mask_B_T)
        t_hidden_N_H = t_hidden_B_T_H[rows_N.to(t_hidden_B_T_H.device), src_N.to(t_hidden_B_T_H.device)]
        del t_hidden_B_T_H
    with torch.set_grad_enabled(grad):
        with compute_context(student, compute_dtype):
            s_hidden_B_T_H = _final_hidden(student, input_ids_B_T, attention_mask_B_T)
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


# ----------------------------------------------------------------------------------------------------
# The module a distributed wrapper wraps


class PolicyScorer(torch.nn.Module):
    """``score`` / ``full_vocab_pair`` of one model as a ``torch.nn.Module`` (a DDP/FSDP wrapper wraps this).

    The per-model settings are fixed at construction: ``temperature`` (logits / τ), ``chunk_size``,
    ``vocab_limit`` and ``compute_dtype`` (as in :func:`score`). ``forward`` keeps the autograd graph
    exactly when grad is enabled (``torch.is_grad_enabled()``), so the loop's update passes differentiate
    through it and its no-grad scoring passes run under ``torch.no_grad()``. The wrapped model is the
    submodule ``model``, so ``parameters()`` are its parameters.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        temperature: float = 1.0,
        chunk_size: int = 256,
        vocab_limit: int | None = None,
        compute_dtype: str | torch.dtype | None = None,
    ):
        super().__init__()
        self.model = model
        self.temperature = temperature
        self.chunk_size = chunk_size
        self.vocab_limit = vocab_limit
        self.compute_dtype = compute_dtype

    def forward(
        self,
        input_ids_B_T: torch.Tensor,
        attention_mask_B_T: torch.Tensor,
        response_mask_B_T: torch.Tensor,
        given_ids_B_T_K: torch.Tensor | None = None,
        *,
        top_k: int = 0,
        entropy: bool = False,
        teacher: torch.nn.Module | None = None,
        divergence: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        teacher_temperature: float = 1.0,
    ) -> ScoreOutput | torch.Tensor:
        """``score(self.model, ...)`` → ScoreOutput; with ``teacher`` and ``divergence``: the streamed
        full-vocabulary ``divergence(student_logits, teacher_logits)`` per position (``div_B_T``, the
        teacher at ``teacher_temperature``, no grad to it) as :func:`full_vocab_pair` computes it."""
        grad = torch.is_grad_enabled()
        if teacher is not None or divergence is not None:
            if teacher is None or divergence is None or given_ids_B_T_K is not None or top_k or entropy:
                raise ValueError(
                    "PolicyScorer.forward: the full-vocabulary pair needs both teacher= and divergence= and "
                    "no given_ids_B_T_K / top_k / entropy. Fix: call it with exactly those two."
                )
            return full_vocab_pair(
                self.model,
                teacher,
                input_ids_B_T,
                attention_mask_B_T,
                response_mask_B_T,
                divergence,
                temperature=self.temperature,
                teacher_temperature=teacher_temperature,
                vocab_limit=self.vocab_limit,
                chunk_size=self.chunk_size,
                grad=grad,
                compute_dtype=self.compute_dtype,
            )
        return score(
            self.model,
            input_ids_B_T,
            attention_mask_B_T,
            response_mask_B_T,
            temperature=self.temperature,
            top_k=top_k,
            given_ids_B_T_K=given_ids_B_T_K,
            entropy=entropy,
            chunk_size=self.chunk_size,
            vocab_limit=self.vocab_limit,
            grad=grad,
            compute_dtype=self.compute_dtype,
        )
