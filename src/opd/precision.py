"""Compute precision of the student: float32 master weights, low-precision compute (autocast).

What ``student_dtype`` means (``OPDConfig.student_dtype``):

- the student's parameters are loaded and kept in float32 ("master weights"): AdamW updates them in
  float32, so an update of lr 1e-6 on a weight of 0.02 is not rounded away (in bfloat16, ``w − 1e-6 == w``
  for |w| above ~2.6e-4, so a bf16-weight student at the study's lr barely moves);
- its forward passes (rollouts, scoring, the update) run under ``torch.autocast(device, dtype)``: matrix
  multiplies of the backbone in ``student_dtype``, reductions and norms in float32, as autocast decides;
- the ``lm_head`` logits, log-softmax and everything after them are float32 (``opd.scoring`` computes the
  head outside autocast), so a bf16 logit's 0.125 quantisation step in [16, 32) never reaches a reward;
- ``final/`` and checkpoints hold the float32 master weights (nothing is rounded away at save time).

Known difference: rollouts sample from the autocast forward's own logits (HF ``generate`` runs the head
under autocast, so in ``student_dtype``); the scored log-probs use the float32 head on the same hidden
states, so the sampling and scored distributions differ by the head's rounding only (the usual
sampler/trainer mismatch, as with a separate inference engine). With ``student_dtype=float32`` they agree.

``float16`` is refused for the student: its gradients need loss scaling, which opd does not implement.
The teacher is never trained, so ``teacher_dtype`` is simply the dtype of its weights; its log-probs are
float32 as well.
"""

from __future__ import annotations

import contextlib

import torch

from opd.models import resolve_dtype


def model_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype of the model's first floating-point parameter (float32 if it has none)."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def compute_context(model: torch.nn.Module, compute_dtype: str | torch.dtype | None):
    """Context in which ``model`` computes in ``compute_dtype``.

    ``None`` or the model's own parameter dtype: a no-op context. Otherwise (float32 parameters, a lower
    compute dtype): ``torch.autocast`` on the parameters' device type.
    """
    if compute_dtype is None:
        return contextlib.nullcontext()
    dtype = resolve_dtype(compute_dtype)
    if dtype == model_dtype(model):
        return contextlib.nullcontext()
    device_type = next(model.parameters()).device.type
    return torch.autocast(device_type=device_type, dtype=dtype)
