"""The model's side of scoring: where each scored distribution comes from, and its float32 logits.

- :func:`aligned_positions` — the one place the logits/tokens shift lives;
- :func:`left_pad_position_ids` — position ids as HF ``generate`` assigns them;
- :func:`final_hidden` — the backbone's final hidden state (on the model's device);
- :class:`Head` / :func:`make_head` — ``z = post(W h) / τ`` in float32, validated once per model by
  :func:`check_head_path`;
- :func:`check_batch` / :func:`check_ids_in_range` — the input checks every scoring function runs.

Position ids are the ones HF ``generate`` assigns to a left-padded batch,
``pos[b, t] = Σ_{s≤t} m[b, s] − 1`` and 0 where ``m[b, t] = 0`` (see ``left_pad_position_ids``), so
scoring a rollout reproduces the sampler's distribution (tested against ``generate``'s own logits).

Model quirks reproduced in ``post`` (read from ``model.config.get_text_config()``):
``final_logit_softcapping`` c (Gemma-2/3: z ← c·tanh(z/c)), ``logits_scaling`` s (Granite: z ← z/s) and
``logit_scale`` a (Cohere: z ← a·z). They are applied in float32 after the upcast (the HF forward
applies them in the model dtype, so bf16 values differ by rounding only). Any other post-processing
would make scoring silently wrong, so the first call on each model object checks this path against the
model's own ``forward`` on a 4-token input and raises if the logits differ (see ``check_head_path``).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

from opd.models import NonFiniteModelError

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


def backbone(model: torch.nn.Module) -> torch.nn.Module:
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


def final_hidden(
    model: torch.nn.Module, input_ids_B_T: torch.Tensor, attention_mask_B_T: torch.Tensor
) -> torch.Tensor:
    """Final hidden state h_B_T_H of the backbone, with left-padding-consistent position ids.

    The inputs go to the device of the model's input embeddings (a teacher may live on another device
    than the batch); the hidden state stays there.
    """
    device = model.get_input_embeddings().weight.device
    input_ids_B_T, attention_mask_B_T = input_ids_B_T.to(device), attention_mask_B_T.to(device)
    out = backbone(model)(
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
class Head:
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
        return self._post(z_N_V)

    def logits_at(self, hidden_N_H: torch.Tensor, ids_N_K: torch.Tensor) -> torch.Tensor:
        """``logits(hidden_N_H)`` at the columns ``ids_N_K`` only (row n's ids for row n), float32.

        A plain Linear head multiplies just the K weight rows each position needs (O(N·K·H), not
        O(N·V·H)); the quirks in ``post`` are elementwise, so applying them after the gather is exact. Any
        other head computes the full row and gathers."""
        with torch.autocast(device_type=hidden_N_H.device.type, enabled=False):
            if not isinstance(self.lm_head, torch.nn.Linear):
                return self.logits(hidden_N_H).gather(-1, ids_N_K)
            w_N_K_H = self.lm_head.weight[ids_N_K].float()
            z_N_K = torch.matmul(w_N_K_H, hidden_N_H.float()[:, :, None]).squeeze(-1)
            if self.lm_head.bias is not None:
                z_N_K = z_N_K + self.lm_head.bias[ids_N_K].float()
        return self._post(z_N_K)

    def _post(self, z: torch.Tensor) -> torch.Tensor:
        if self.scale != 1.0:
            z = z * self.scale
        if self.softcap is not None:
            z = torch.tanh(z / self.softcap) * self.softcap
        if self.temperature != 1.0:
            z = z / self.temperature
        return z


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
    head = Head(model.get_output_embeddings(), softcap, scale, 1.0, None)
    device = model.get_input_embeddings().weight.device
    ids_1_T = torch.arange(4, device=device).unsqueeze(0)
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            raw_1_T_V = model(input_ids=ids_1_T, use_cache=False).logits
            theirs_T_V = raw_1_T_V[0].float()
            ours_T_V = head.logits(final_hidden(model, ids_1_T, torch.ones_like(ids_1_T))[0])
    finally:
        for m, training in modes:
            m.training = training
    if not bool(torch.isfinite(theirs_T_V).all()):
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
            "does not know. Fix: add the quirk to opd.scoring.head._logit_quirks (and a test)."
        )
    _CHECKED[model] = native_width
    return native_width


def make_head(model: torch.nn.Module, temperature: float, vocab_limit: int | None) -> tuple[Head, int]:
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
    return Head(lm_head, softcap, scale, float(temperature), width), width


# ----------------------------------------------------------------------------------------------------
# Input checks


def check_batch(
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


def check_ids_in_range(name: str, ids: torch.Tensor, width: int) -> None:
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= width):
        raise ValueError(
            f"{name}: ids at response positions must lie in [0, {width}) (the scored vocabulary), "
            f"got min {int(ids.min())}, max {int(ids.max())}. Fix: check the tokenizer pairing or vocab_limit."
        )
