"""Per-position scoring of given token ids by a causal LM (student or teacher).

CONTRACT (implemented by the scoring helper; other modules rely on it):

Alignment: every output tensor is indexed like ``input_ids_B_T``: entry ``[b, t]`` is about the
distribution that predicts token ``t`` from the prefix ``< t`` (i.e. computed from the logits at
position ``t - 1``). Entries where ``response_mask_B_T`` is 0 are 0 (ids: 0). This shift is written
once, in this module.

``score(model, input_ids_B_T, attention_mask_B_T, response_mask_B_T, *, temperature=1.0, top_k=0,
        given_ids_B_T_K=None, entropy=True, chunk_size=256, vocab_limit=None, grad=False)
   -> ScoreOutput``
- runs the model once to the final hidden state, then computes ``lm_head`` + float32 log-softmax in
  chunks of ``chunk_size`` positions, only over response positions, so peak extra memory is
  O(B·chunk·V), never a full B×T×V float32 tensor;
- ``temperature``: logits / temperature before log-softmax;
- ``vocab_limit``: restrict logits to the first ``vocab_limit`` columns (embedding tables padded past
  the tokenizer's vocabulary);
- ``top_k > 0``: also return the model's own top-k ids and their (full-vocab) log-probs;
- ``given_ids_B_T_K``: also return log-probs at these ids (e.g. the student's top-k ids for the teacher);
- ``entropy``: full-vocab entropy per position;
- ``grad=True``: keep the autograd graph (the update pass); chunks are recomputed in backward
  (activation checkpointing) so memory stays O(B·chunk·V).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ScoreOutput:
    """Per-position quantities, float32, aligned with ``input_ids_B_T`` (see module docstring)."""

    token_logp_B_T: torch.Tensor
    topk_ids_B_T_K: torch.Tensor | None = None
    topk_logp_B_T_K: torch.Tensor | None = None
    given_logp_B_T_K: torch.Tensor | None = None
    entropy_B_T: torch.Tensor | None = None
