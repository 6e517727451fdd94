"""Teacher-forced training sequences for the off-policy baselines (SFT, word-level KD): the rejection
rules for teacher samples, the ``teacher_data.jsonl`` file, gold solutions from a dataset field, and
the batch layout.

A :class:`ForcedSequence` is one prompt and one fixed response (a teacher sample or a reference solution),
both as token ids of the student's tokenizer (teacher and student share it). :func:`collate` lays a
list of them out exactly as :class:`opd.rollout.RolloutBatch` does for rollouts (``[left padding |
prompt | response | right padding]``, ``response_mask_B_T`` = 1 on response tokens), so the same
:class:`opd.scoring.PolicyScorer` passes score them.

Rejection rules (:func:`rejection_reason`), checked in this order; a rejected response is counted under
the first rule it fails:

1. ``truncated`` — no stop token within ``max_new_tokens``;
2. ``no_answer`` — no final answer: :func:`opd.grading.extract_boxed` finds no (closed, non-empty)
   last ``\\boxed{...}`` in the decoded response;
3. ``repetitive`` — :func:`repetition_rate` (the share of duplicated ``n``-grams of response tokens,
   ``1 − distinct / total``) is above ``max_repetition``; 1.0 turns the rule off;
4. ``incorrect`` — only with ``only_correct``, and only for prompts that carry an answer:
   :func:`opd.grading.grade` says the response is wrong.

``teacher_data.jsonl``: one JSON object per accepted response, with ``row`` (the prompt's row in its
source), ``sample`` (its index among the prompt's samples), ``prompt`` (the problem text), ``prompt_ids``,
``response`` (decoded, special tokens skipped), ``response_ids`` (including the stop token), ``answer``
and ``correct`` (None without an answer). It is written atomically (temporary file, then rename).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence as Seq
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from opd.data import _MISSING, PromptSet, _get_field
from opd.datafiles import read_rows
from opd.grading import extract_boxed, grade
from opd.rollout import END_OF_TURN_TOKENS, RolloutBatch
from opd.textfiles import read_utf8

REJECTION_REASONS = ("truncated", "no_answer", "repetitive", "incorrect")
"""Why a teacher response is rejected, in the order the rules are checked (module docstring)."""


@dataclass
class ForcedSequence:
    """One teacher-forced training sequence (token ids of the student's tokenizer)."""

    row: int
    """The prompt's row in its source."""
    prompt: str
    """The problem text (before the chat template)."""
    prompt_ids: list[int]
    """The rendered prompt's token ids."""
    response: str
    """The response text (special tokens skipped)."""
    response_ids: list[int]
    """The response's token ids, stop token included."""
    answer: str | None = None
    correct: bool | None = None
    sample: int = 0


def repetition_rate(ids: Seq[int], n: int) -> float:
    """``1 − distinct / total`` over the ``n``-grams of ``ids`` (0 when there are none): 0 for a response
    that never repeats ``n`` tokens in a row, → 1 for one looping on a short phrase (Welleck et al. 2019's
    seq-rep-n)."""
    if n < 1:
        raise ValueError(f"n={n}: the n-gram length must be >= 1")
    grams = [tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def rejection_reason(
    text: str,
    ids: Seq[int],
    *,
    truncated: bool,
    answer: str | None,
    repetition_ngram: int,
    max_repetition: float,
    only_correct: bool,
) -> tuple[str | None, bool | None]:
    """``(reason, correct)``: the first rule of the module docstring ``text`` / ``ids`` fail (None when the
    response is accepted) and whether it is correct (None without an ``answer`` or when not graded)."""
    if truncated:
        return "truncated", None
    if extract_boxed(text) is None:
        return "no_answer", None if answer is None else False
    if repetition_rate(ids, repetition_ngram) > max_repetition:
        return "repetitive", None
    correct = None if answer is None else bool(grade(text, answer))
    if only_correct and correct is False:
        return "incorrect", correct
    return None, correct


# --------------------------------------------------------------------------- the file


def write_sequences(path: str | Path, sequences: list[ForcedSequence], stats: dict[str, Any]) -> None:
    """Write ``sequences`` to ``path`` (JSONL) and ``stats`` to ``<path>.stats.json``, each atomically;
    the data file last, so its presence means both are complete."""
    path = Path(path)
    _atomic_write(stats_path(path), json.dumps(stats, indent=1) + "\n")
    _atomic_write(path, "".join(json.dumps(asdict(s)) + "\n" for s in sequences))


def stats_path(path: str | Path) -> Path:
    """Where the generation settings and rejection counts of a teacher-data file live."""
    return Path(str(path) + ".stats.json")


def read_sequences(path: str | Path, vocab_size: int) -> list[ForcedSequence]:
    """The sequences of a ``teacher_data.jsonl`` file; ValueError naming the file and line for a row that
    is not a sequence or holds token ids outside ``[0, vocab_size)`` (another tokenizer's file)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"sft_data={str(path)!r} does not exist; point it at the teacher_data.jsonl of an opd sft run"
        )
    out = []
    names = set(ForcedSequence.__dataclass_fields__)
    for i, line in enumerate(read_utf8(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            seq = ForcedSequence(**{k: v for k, v in row.items() if k in names})
            if not seq.prompt_ids or not seq.response_ids:
                raise ValueError("empty prompt_ids or response_ids")
        except (ValueError, TypeError) as e:
            raise ValueError(
                f"{path}: line {i} is not a teacher-data row ({e}); expected the JSON objects opd sft writes "
                "(row, prompt, prompt_ids, response, response_ids, ...)"
            ) from None
        bad = [t for t in seq.prompt_ids + seq.response_ids if not 0 <= int(t) < vocab_size]
        if bad:
            raise ValueError(
                f"{path}: line {i} has token ids outside the student's vocabulary [0, {vocab_size}) "
                f"(e.g. {bad[0]}): the file was made with another tokenizer; regenerate it with this student"
            )
        out.append(seq)
    if not out:
        raise ValueError(f"{path}: no sequences in the file; regenerate it (opd sft) or pick another file")
    return out


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# --------------------------------------------------------------------------- gold solutions


def end_of_response_id(tokenizer, use_chat_template: bool) -> int:
    """The token a reference solution ends with: the template's end-of-turn marker when prompts use the
    chat template and the vocabulary has one (``<|im_end|>``, ``<|eot_id|>``, ...), else the EOS."""
    vocab = tokenizer.get_vocab()
    if use_chat_template:
        for token in END_OF_TURN_TOKENS:
            if token in vocab:
                return int(vocab[token])
    if tokenizer.eos_token_id is None:
        raise ValueError(
            f"tokenizer {type(tokenizer).__name__} has no EOS token: a reference solution cannot end; set one"
        )
    return int(tokenizer.eos_token_id)


def field_sequences(
    prompts: PromptSet, tokenizer, response_field: str, use_chat_template: bool
) -> list[ForcedSequence]:
    """One sequence per prompt of ``prompts``: the text of the prompt row's ``response_field`` (a gold
    solution), tokenised without special tokens and ended with :func:`end_of_response_id`."""
    rows = read_rows(prompts.source)
    stop = end_of_response_id(tokenizer, use_chat_template)
    out = []
    for ex in prompts.examples:
        row = rows[ex.meta["row"]]
        text = _get_field(row, response_field)  # a dotted path walks nested dicts
        text = None if text is _MISSING else text
        if not isinstance(text, str) or not text.strip():
            raise ValueError(
                f"response_field={response_field!r}: row {ex.meta['row']} of {prompts.source!r} has no text "
                f"there (got {type(text).__name__}); fields of that row: {', '.join(sorted(row))}"
            )
        ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [stop]
        out.append(ForcedSequence(ex.meta["row"], ex.text, list(ex.input_ids), text, ids, ex.answer))
    return out


# --------------------------------------------------------------------------- batches


def collate(sequences: list[ForcedSequence], pad_id: int) -> RolloutBatch:
    """A :class:`opd.rollout.RolloutBatch` of ``sequences``: prompts left-padded to one column
    ``prompt_len``, responses after it, right-padded; ``response_mask_B_T`` marks the response tokens
    (the only ones that carry a loss); ``prompt_index_B`` is the position in ``sequences``."""
    prompt_len = max(len(s.prompt_ids) for s in sequences)
    R = max(len(s.response_ids) for s in sequences)
    B, T = len(sequences), prompt_len + R
    ids_B_T = torch.full((B, T), pad_id, dtype=torch.long)
    attn_B_T = torch.zeros((B, T), dtype=torch.long)
    resp_B_T = torch.zeros((B, T), dtype=torch.float32)
    for b, s in enumerate(sequences):
        p, r = len(s.prompt_ids), len(s.response_ids)
        ids_B_T[b, prompt_len - p : prompt_len] = torch.tensor(s.prompt_ids, dtype=torch.long)
        ids_B_T[b, prompt_len : prompt_len + r] = torch.tensor(s.response_ids, dtype=torch.long)
        attn_B_T[b, prompt_len - p : prompt_len + r] = 1
        resp_B_T[b, prompt_len : prompt_len + r] = 1.0
    return RolloutBatch(
        ids_B_T, attn_B_T, resp_B_T, prompt_len, torch.arange(B), torch.zeros(B, dtype=torch.bool)
    )
