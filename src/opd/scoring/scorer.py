"""The module a distributed wrapper wraps (:class:`PolicyScorer`), and the no-grad scoring of a rollout
batch by a student and a teacher scorer, micro-batch by micro-batch (:func:`score_pair`)."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from opd.rollout import RolloutBatch, shift_positions
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
from opd.scoring.full_vocab import full_vocab_fused, full_vocab_pair


class PolicyScorer(torch.nn.Module):
    """``score`` / ``full_vocab_pair`` of one model as a ``torch.nn.Module`` (a DDP/FSDP wrapper wraps this).

    The per-model settings are fixed at construction: ``temperature`` (logits / τ), ``chunk_size``,
    ``vocab_limit`` and ``compute_dtype`` (as in :func:`score`). ``forward`` keeps the autograd graph
    exactly when grad is enabled (``torch.is_grad_enabled()``), so the loop's update passes differentiate
    through it and its no-grad scoring passes run under ``torch.no_grad()``. The wrapped model is the
    submodule ``model``, so ``parameters()`` are its parameters. The ``loss_weight_B_T`` path
    (:func:`full_vocab_fused`) takes its backward inside ``forward``, so gradients must be reduced across
    processes after it by hand (``Runtime.all_reduce_grads``, as the loop does), not by a wrapper's
    backward hooks.
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
        loss_weight_B_T: torch.Tensor | None = None,
        chunk_loss: Callable[[ChunkScores], ChunkGrads] | None = None,
    ) -> ScoreOutput | torch.Tensor | tuple[torch.Tensor, ScoreOutput, ScoreOutput]:
        """``score(self.model, ...)`` → ScoreOutput; with ``teacher`` and ``divergence``: the streamed
        full-vocabulary ``divergence(student_logits, teacher_logits)`` per position (``div_B_T``, the
        teacher at ``teacher_temperature``, no grad to it) as :func:`full_vocab_pair` computes it; with
        ``loss_weight_B_T`` as well: :func:`full_vocab_fused` (``divergence`` then takes log-probs;
        backpropagates the weighted divergence itself and returns ``(div_B_T, student ScoreOutput,
        teacher ScoreOutput)`` with top-``top_k``); with
        ``chunk_loss``: :func:`score_backward` (scores, and backpropagates the loss whose per-chunk
        gradients ``chunk_loss`` returns; detached ``ScoreOutput``)."""
        grad = torch.is_grad_enabled()
        if chunk_loss is not None:
            if teacher is not None or divergence is not None or loss_weight_B_T is not None:
                raise ValueError(
                    "PolicyScorer.forward: chunk_loss= does not combine with teacher= / divergence= / "
                    "loss_weight_B_T=. Fix: pass chunk_loss with the score arguments only."
                )
            return score_backward(
                self.model,
                input_ids_B_T,
                attention_mask_B_T,
                response_mask_B_T,
                chunk_loss,
                temperature=self.temperature,
                top_k=top_k,
                given_ids_B_T_K=given_ids_B_T_K,
                entropy=entropy,
                chunk_size=self.chunk_size,
                vocab_limit=self.vocab_limit,
                compute_dtype=self.compute_dtype,
            )
        if loss_weight_B_T is not None:
            if teacher is None or divergence is None or given_ids_B_T_K is not None:
                raise ValueError(
                    "PolicyScorer.forward: loss_weight_B_T needs teacher= and divergence= and no "
                    "given_ids_B_T_K. Fix: call it with those (and top_k=)."
                )
            return full_vocab_fused(
                self.model,
                teacher,
                input_ids_B_T,
                attention_mask_B_T,
                response_mask_B_T,
                divergence,
                loss_weight_B_T,
                top_k=top_k,
                temperature=self.temperature,
                teacher_temperature=teacher_temperature,
                vocab_limit=self.vocab_limit,
                chunk_size=self.chunk_size,
                compute_dtype=self.compute_dtype,
            )
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

    def keep_rows(
        self, input_ids_B_T: torch.Tensor, attention_mask_B_T: torch.Tensor, response_mask_B_T: torch.Tensor
    ) -> Rescorer:
        """No-grad :func:`keep_rows` of the model with this scorer's settings."""
        return keep_rows(
            self.model,
            input_ids_B_T,
            attention_mask_B_T,
            response_mask_B_T,
            temperature=self.temperature,
            chunk_size=self.chunk_size,
            vocab_limit=self.vocab_limit,
            compute_dtype=self.compute_dtype,
        )

    def score_rescorable(
        self,
        input_ids_B_T: torch.Tensor,
        attention_mask_B_T: torch.Tensor,
        response_mask_B_T: torch.Tensor,
        *,
        top_k: int = 0,
        entropy: bool = False,
    ) -> tuple[ScoreOutput, Rescorer]:
        """No-grad :func:`score_rescorable` of the model with this scorer's settings."""
        return score_rescorable(
            self.model,
            input_ids_B_T,
            attention_mask_B_T,
            response_mask_B_T,
            temperature=self.temperature,
            top_k=top_k,
            entropy=entropy,
            chunk_size=self.chunk_size,
            vocab_limit=self.vocab_limit,
            compute_dtype=self.compute_dtype,
        )


def teacher_rows(
    teacher: PolicyScorer, mb: RolloutBatch, *, teacher_mb: RolloutBatch | None = None
) -> Callable[..., tuple[torch.Tensor | None, ...]]:
    """The teacher's backbone over micro-batch ``mb`` now (its response rows kept, no head), and a function
    ``scores_at(rows_n, cols_n, target_n, given_n_K, top_k)`` that gives :func:`score_teacher`'s values at n
    positions of ``mb``'s layout later (``Rescorer.scores_at``: the head on those rows only), so a
    student pass working chunk by chunk has the teacher's scores of each chunk with the teacher's head run
    once per position, computed as ``score`` computes them. ``teacher_mb`` as in :func:`score_teacher`."""
    if teacher_mb is None:
        teacher_mb = mb
    P, P2 = mb.prompt_len, teacher_mb.prompt_len
    rows = teacher.keep_rows(
        teacher_mb.input_ids_B_T, teacher_mb.attention_mask_B_T, teacher_mb.response_mask_B_T
    )

    def scores_at(rows_n, cols_n, target_n, given_n_K, top_k):
        return rows.scores_at(rows_n, cols_n + (P2 - P), target_n, given_n_K, top_k)

    return scores_at


def score_pair(
    student: PolicyScorer,
    teacher: PolicyScorer,
    batch: RolloutBatch,
    micro_batch_size: int,
    width: int,
    *,
    on_micro_batch: Callable[[int], object] | None = None,
    teacher_batch: RolloutBatch | None = None,
) -> tuple[ScoreOutput, ScoreOutput, dict[str, float]]:
    """No-grad scoring of ``batch`` by both models, ``micro_batch_size`` rows at a time.

    The student, at its scorer's temperature (the distribution the rollout tokens were drawn from), gives
    its top-``width`` ids and log-probs, entropy and sampled-token log-probs; the teacher, at its own,
    gives its log-probs at the student's top-``width`` ids, its own top-``width``, entropy and
    sampled-token log-probs (``width = 0``: no top-k, no given ids). The teacher's scorer moves its inputs
    to the teacher's device and its outputs come back. Returns the two ``ScoreOutput`` of the whole batch
    (micro-batches concatenated along ``_B``) and the timings ``time/score_student`` /
    ``time/score_teacher`` (seconds). ``on_micro_batch(rows)`` is called after each micro-batch (a
    progress bar's ``update``). ``teacher_batch``: the same responses after the teacher's own prompts
    (:func:`opd.rollout.relay_responses`), scored by the teacher instead of ``batch`` (:func:`score_teacher`);
    the teacher's outputs are still in ``batch``'s layout.
    """
    if not (isinstance(micro_batch_size, int) and micro_batch_size >= 1):
        raise ValueError(f"micro_batch_size={micro_batch_size!r}: must be an int ≥ 1. Fix: use e.g. 8.")
    parts_s, parts_t = [], []
    t_student = t_teacher = 0.0
    with torch.no_grad():
        for lo in range(0, batch.input_ids_B_T.shape[0], micro_batch_size):
            sl = slice(lo, lo + micro_batch_size)
            mb = batch.select(sl)
            t0 = time.perf_counter()
            s = student(
                mb.input_ids_B_T, mb.attention_mask_B_T, mb.response_mask_B_T, top_k=width, entropy=True
            )
            t1 = time.perf_counter()
            tmb = None if teacher_batch is None else teacher_batch.select(sl)
            t = score_teacher(teacher, mb, s.topk_ids_B_T_K, width, teacher_mb=tmb)
            t_student += t1 - t0
            t_teacher += time.perf_counter() - t1
            parts_s.append(s)
            parts_t.append(t)
            if on_micro_batch is not None:
                on_micro_batch(mb.input_ids_B_T.shape[0])
    timings = {"time/score_student": t_student, "time/score_teacher": t_teacher}
    return cat_scores(parts_s), cat_scores(parts_t), timings


def score_teacher(
    teacher: PolicyScorer,
    mb: RolloutBatch,
    given_ids_B_T_K: torch.Tensor | None,
    width: int,
    *,
    teacher_mb: RolloutBatch | None = None,
) -> ScoreOutput:
    """The teacher's scoring of micro-batch ``mb`` (log-probs at ``given_ids_B_T_K``, its own top-``width``,
    entropy), in ``mb``'s layout. With ``teacher_mb`` (the same rows' responses after the teacher's own
    prompts, :func:`opd.rollout.relay_responses`) the teacher reads that instead: the given ids are moved to
    its layout and every output back, so response position ``j`` of the result is the teacher's
    distribution before the ``j``-th response token given *its* prompt and the response's first ``j``
    tokens. Without it, or with an identical layout, this is ``teacher(mb, ...)`` itself."""
    if teacher_mb is None:
        teacher_mb = mb
    P, P2 = mb.prompt_len, teacher_mb.prompt_len
    given = None if given_ids_B_T_K is None else shift_positions(given_ids_B_T_K, P, P2)
    t = teacher(
        teacher_mb.input_ids_B_T,
        teacher_mb.attention_mask_B_T,
        teacher_mb.response_mask_B_T,
        given,
        top_k=width,
        entropy=True,
    )
    return _to_layout(t, P2, P)


def score_teacher_first(
    teacher: PolicyScorer, mb: RolloutBatch, width: int, *, teacher_mb: RolloutBatch | None = None
) -> tuple[ScoreOutput, Callable[[torch.Tensor], torch.Tensor]]:
    """:func:`score_teacher` before the student's ids are known: the teacher's own top-``width``,
    entropy and sampled-token log-probs now (``given_logp_B_T_K`` None), and a function that gives its
    log-probs at ids of ``mb``'s layout later (``Rescorer.given``: K weight rows per position, no second
    vocabulary-wide head). Both in ``mb``'s layout, as :func:`score_teacher`'s. With a teacher that keeps
    its hidden rows, ``given(ids_n_K, at=(rows_n, cols_n))`` gives just n positions of ``mb``'s layout
    (``Rescorer.given_at``: a chunk at a time); a served teacher has no ``at``."""
    if not hasattr(teacher, "score_rescorable"):
        # a scorer that keeps no hidden rows (a served teacher, opd.remote): a second scoring call later
        def rescore(ids_B_T_K: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return score_teacher(teacher, mb, ids_B_T_K, width, teacher_mb=teacher_mb).given_logp_B_T_K

        with torch.no_grad():
            return score_teacher(teacher, mb, None, width, teacher_mb=teacher_mb), rescore
    if teacher_mb is None:
        teacher_mb = mb
    P, P2 = mb.prompt_len, teacher_mb.prompt_len
    with torch.no_grad():
        t, rescorer = teacher.score_rescorable(
            teacher_mb.input_ids_B_T,
            teacher_mb.attention_mask_B_T,
            teacher_mb.response_mask_B_T,
            top_k=width,
            entropy=True,
        )

    def given(ids: torch.Tensor, at: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        if at is not None:  # ids_n_K at the positions (rows_n, cols_n) of mb's layout only
            return rescorer.given_at(at[0], at[1] + (P2 - P), ids)
        return shift_positions(rescorer.given(shift_positions(ids, P, P2)), P2, P)

    return _to_layout(t, P2, P), given


def _to_layout(t: ScoreOutput, P_from: int, P_to: int) -> ScoreOutput:
    return ScoreOutput(
        **{
            k: None if getattr(t, k) is None else shift_positions(getattr(t, k), P_from, P_to)
            for k in ScoreOutput.__dataclass_fields__
        }
    )


def cat_scores(parts: list[ScoreOutput]) -> ScoreOutput:
    """One ScoreOutput of micro-batch outputs, concatenated along ``_B`` (fields that are None stay None)."""
    return ScoreOutput(
        **{
            k: None if getattr(parts[0], k) is None else torch.cat([getattr(p, k) for p in parts])
            for k in ScoreOutput.__dataclass_fields__
        }
    )
