"""Prompt dedup: exact (normalised text) and near-duplicate (embedding cosine) removal.

Exact: a row is a duplicate when its :func:`normalize_text` equals an earlier row's. The text is the
prompt field's value (found as ``opd.data`` finds it: ``prompt_field="auto"`` takes the first of
:data:`opd.data.PROMPT_FIELDS` with a value, and a dotted name walks nested dicts), or,
for chat messages, the contents of the messages joined by newlines; normalisation is Unicode NFKC,
``\\boxed{{}}`` → ``\\boxed{}``, case folding, and every run of whitespace collapsed to one space, stripped.

Near duplicates: with ``embedding_model`` (a local Hugging Face model directory or ``lab:<name>``; it is
loaded with ``local_files_only=True`` and never downloaded) each remaining row's normalised text is
embedded as the attention-masked mean of the model's last hidden states, L2-normalised; a row whose
cosine similarity with an earlier *kept* row is at least ``threshold`` is removed. First occurrence wins
in both passes, so the result keeps the original order.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from opd.data import _MISSING, PROMPT_FIELDS, _get_field, _resolve_field
from opd.tracking import progress

__all__ = ["DedupResult", "dedup", "embed_texts", "normalize_text", "prompt_text"]

_WS = re.compile(r"\s+")


def prompt_text(row: dict, prompt_field: str = "auto") -> str:
    """The prompt text of a row (see the module docstring); the field is found as :func:`opd.data.load_prompts`
    finds it (``"auto"``: the first of :data:`opd.data.PROMPT_FIELDS` with a value; dotted names walk
    nested dicts)."""
    name = _resolve_field(row, prompt_field, PROMPT_FIELDS)
    value = _MISSING if name is None else _get_field(row, name)
    if value is _MISSING:
        raise ValueError(
            f"dedup: a row has no prompt field {prompt_field!r} (auto tries {list(PROMPT_FIELDS)}; fields: "
            f"{sorted(row)}); pass prompt_field=<name>"
        )
    if isinstance(value, list):
        return "\n".join(str(m.get("content", "")) if isinstance(m, dict) else str(m) for m in value)
    return str(value)


def normalize_text(text: str) -> str:
    """NFKC, ``\\boxed{{}}`` → ``\\boxed{}``, case-folded, whitespace runs collapsed, stripped."""
    text = unicodedata.normalize("NFKC", text).replace("\\boxed{{}}", "\\boxed{}")
    return _WS.sub(" ", text.casefold()).strip()


@dataclass
class DedupResult:
    """The kept rows (original order) and what was removed: ``removed`` holds ``(index, reason, index of
    the kept row it duplicates, similarity)``; ``counts`` by reason (``exact``, ``near``)."""

    rows: list[dict]
    kept_index: list[int]
    removed: list[tuple[int, str, int, float]] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=lambda: {"exact": 0, "near": 0})

    def summary(self) -> dict[str, Any]:
        return {
            "rows_in": len(self.kept_index) + len(self.removed),
            "rows_out": len(self.kept_index),
            "removed": dict(self.counts),
        }


def _load_embedder(embedding_model: str | Path, trust_remote_code: bool = False):
    from transformers import AutoModel, AutoTokenizer

    from opd.lab import resolve

    lab = resolve(str(embedding_model), kind="model")
    path = Path(lab.require_built()) if lab is not None else Path(embedding_model)
    if not path.is_dir():
        raise ValueError(
            f"embedding_model={str(embedding_model)!r} is not a local model directory; opd never downloads "
            "it: download it yourself (e.g. huggingface-cli download) and pass the folder"
        )
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
    model = AutoModel.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
    model.eval()
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok, model


@torch.no_grad()
def embed_texts(
    texts: list[str],
    embedding_model: str | Path,
    *,
    batch_size: int = 64,
    max_length: int = 512,
    show_progress=False,
) -> torch.Tensor:
    """``[N, d]`` L2-normalised mean-pooled last hidden states of ``texts`` (float32)."""
    tok, model = _load_embedder(embedding_model)
    out = []
    starts = range(0, len(texts), batch_size)
    for i in progress(starts, desc="embed", enabled=show_progress, unit="batch"):
        enc = tok(
            texts[i : i + batch_size],
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=max_length,
        )
        hidden_B_T_D = model(**enc).last_hidden_state.float()
        m_B_T_1 = enc["attention_mask"].unsqueeze(-1).float()
        pooled_B_D = (hidden_B_T_D * m_B_T_1).sum(1) / m_B_T_1.sum(1).clamp(min=1.0)
        out.append(torch.nn.functional.normalize(pooled_B_D, dim=-1))
    return torch.cat(out) if out else torch.zeros(0, 0)


def dedup(
    rows: list[dict],
    *,
    exact: bool = True,
    embedding_model: str | Path | None = None,
    threshold: float = 0.95,
    prompt_field: str = "auto",
    batch_size: int = 64,
    show_progress: bool = False,
) -> DedupResult:
    """Remove exact and (with ``embedding_model``) near-duplicate prompts; see the module docstring."""
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"dedup: threshold={threshold}: must be in (0, 1]")
    texts = [normalize_text(prompt_text(r, prompt_field)) for r in rows]
    res = DedupResult(rows=[], kept_index=[])
    keep: list[int] = []
    if exact:
        first: dict[str, int] = {}
        for i, t in enumerate(texts):
            if t in first:
                res.removed.append((i, "exact", first[t], 1.0))
                res.counts["exact"] += 1
            else:
                first[t] = i
                keep.append(i)
    else:
        keep = list(range(len(rows)))
    if embedding_model and keep:
        emb_N_D = embed_texts(
            [texts[i] for i in keep], embedding_model, batch_size=batch_size, show_progress=show_progress
        )
        kept_local: list[int] = []
        survivors = []
        block = 1024
        for b0 in range(0, len(keep), block):
            e_B_D = emb_N_D[b0 : b0 + block]
            prev = emb_N_D[kept_local] if kept_local else None
            sim_prev_B_K = e_B_D @ prev.T if prev is not None else None
            sim_in_B_B = e_B_D @ e_B_D.T
            kept_in_block: list[int] = []
            for j in range(e_B_D.shape[0]):
                best, best_at = -2.0, -1
                if sim_prev_B_K is not None and sim_prev_B_K.shape[1]:
                    s, a = sim_prev_B_K[j].max(0)
                    best, best_at = float(s), kept_local[int(a)]
                for jj in kept_in_block:
                    if float(sim_in_B_B[j, jj]) > best:
                        best, best_at = float(sim_in_B_B[j, jj]), b0 + jj
                if best >= threshold:
                    res.removed.append((keep[b0 + j], "near", keep[best_at], round(best, 6)))
                    res.counts["near"] += 1
                else:
                    kept_in_block.append(j)
                    survivors.append(keep[b0 + j])
            kept_local += [b0 + j for j in kept_in_block]
        keep = survivors
    res.kept_index = keep
    res.rows = [rows[i] for i in keep]
    res.removed.sort()
    return res
