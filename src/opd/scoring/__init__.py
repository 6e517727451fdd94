"""Per-position scoring of given token ids by a causal LM (student or teacher).

CONTRACT (implemented by this package; other modules rely on it):

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

``full_vocab_fused(student, teacher, ..., divergence, loss_weight_B_T, *, top_k, ...) -> (div_B_T, student
ScoreOutput, teacher ScoreOutput)`` is the on-policy single pass of both models: it backpropagates
``Σ loss_weight_B_T · div_B_T`` into the student itself (chunk by chunk, each head and log-softmax once, no
recompute; its ``divergence`` takes the two chunks' log-probs) and
returns both models' scores from the same logits (the fused full-vocabulary step of the training loop).

``score_backward(model, ..., chunk_loss, *, top_k, given_ids_B_T_K, ...) -> ScoreOutput`` is ``score`` plus
the backward of a loss that is a sum of per-position terms in the scored log-probs: ``chunk_loss`` gives
each chunk's ∂L/∂(token, top-k, given log-probs), the chunk's logit gradient follows in closed form
(scatter(g) − Σg·p) from the forward's own logits, so the head is never recomputed (the fused top-K and
sampled-token steps of the training loop).

``keep_rows(model, ...) -> Rescorer`` runs the backbone alone and keeps the N response rows;
``Rescorer.scores_at(rows_n, cols_n, ...)`` gives ``score``'s values at any n of those positions later (the
teacher scored chunk by chunk inside the student's ``score_backward`` pass; ``teacher_rows`` in a rollout
batch's layout).

``score_rescorable(model, ...) -> (ScoreOutput, Rescorer)`` is a no-grad ``score`` that keeps the N
scored hidden rows and log-normalisers, so ``Rescorer.given(ids_B_T_K)`` gives log-probs at ids known only
later from K weight rows per position (a teacher scored before the student's pass).

``score_pair(student, teacher, batch, micro_batch_size, width) -> (student ScoreOutput, teacher
ScoreOutput, timings)`` is the no-grad scoring of a rollout batch by two ``PolicyScorer`` modules,
micro-batch by micro-batch: the student's top-``width``, entropy and sampled-token log-probs, the
teacher's log-probs at the student's top-``width`` ids. The training loop and ``opd diagnose`` both
score through it.

Modules: ``head.py`` (the logits/tokens alignment, position ids, the float32 head and its one-time check
against the model's own forward, input checks), ``chunked.py`` (``score``, ``score_backward`` and
how they chunk), ``full_vocab.py`` (``score_full_logits``, ``full_vocab_pair``, ``full_vocab_fused``), ``scorer.py`` (``PolicyScorer`` and ``score_pair``). This package
is the public face: import from ``opd.scoring``.

What this package deliberately leaves out:
- no train/eval switching: dropout follows ``model.training`` (the one-time head check runs in eval);
- ``score`` does not micro-batch the backbone: the caller sizes B×T (``score_pair`` splits a rollout
  batch into micro-batches); only the vocab-sized part is chunked;
- it calls the decoder and ``lm_head`` submodules directly (not ``model.forward``), so wrappers whose
  bookkeeping lives in the top-level forward (DDP's gradient-sync preparation, an FSDP root unit holding
  ``lm_head``) must wrap :class:`PolicyScorer` — whose ``forward`` is backbone + chunked head — rather
  than the bare model;
- no sequence packing (one sequence per row), no KV cache, no multimodal inputs.
"""

from opd.scoring.chunked import (
    ChunkGrads,
    ChunkScores,
    Rescorer,
    ScoreOutput,
    keep_rows,
    score,
    score_backward,
    score_rescorable,
)
from opd.scoring.full_vocab import full_vocab_fused, full_vocab_pair, score_full_logits
from opd.scoring.head import aligned_positions, check_head_path, left_pad_position_ids
from opd.scoring.scorer import (
    PolicyScorer,
    cat_scores,
    score_pair,
    score_teacher,
    score_teacher_first,
    teacher_rows,
)

__all__ = [
    "ChunkGrads",
    "ChunkScores",
    "PolicyScorer",
    "Rescorer",
    "ScoreOutput",
    "aligned_positions",
    "check_head_path",
    "full_vocab_fused",
    "full_vocab_pair",
    "keep_rows",
    "left_pad_position_ids",
    "score",
    "score_backward",
    "score_full_logits",
    "cat_scores",
    "score_pair",
    "score_rescorable",
    "score_teacher",
    "score_teacher_first",
    "teacher_rows",
]
