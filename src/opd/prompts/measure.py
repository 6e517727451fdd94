"""What the prompt tools measure, on the diagnosis's code (:mod:`opd.diagnose.measure`).

:class:`Pair` loads student and teacher as ``opd diagnose`` does (tokenizer compatibility check, tiny
models single-threaded); :func:`per_prompt` turns one scored rollout batch into per-prompt figures: the
token means over a prompt's rollouts of the overlap ratio (Eq. 6), the overlap masses, the Eq. 7
teacher advantage, the entropy gap and the sampled-token KL estimate, all from
:func:`opd.metrics.mechanism_tensors` and :func:`opd.diagnose.measure.token_rewards`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from opd.diagnose import measure
from opd.diagnose.config import DiagnoseConfig
from opd.diagnose.run import load_pair
from opd.metrics import mechanism_means, mechanism_tensors
from opd.models import check_compatibility

__all__ = ["METRICS", "Pair", "batch_metrics", "mean_rank", "per_prompt"]

METRICS = (
    "overlap_ratio",
    "overlap_mass_student",
    "overlap_mass_teacher",
    "teacher_advantage",
    "entropy_gap",
    "entropy_student",
    "kl",
)
"""Figures measured per prompt / per candidate (see the module docstring)."""
RANKED = ("overlap_ratio", "overlap_mass_student", "teacher_advantage")
"""The figures an alignment rank is the mean of (each: higher = more aligned)."""


@dataclass
class Pair:
    """Student, teacher and the shared tokenizer, loaded as ``opd diagnose`` loads them."""

    student: Any
    teacher: Any
    tokenizer: Any
    vocab_limit: int
    threads_before: int

    @classmethod
    def load(cls, cfg: DiagnoseConfig) -> Pair:
        before = torch.get_num_threads()
        tok, teacher_tok, student, teacher = load_pair(cfg)
        try:  # a different vocabulary is fatal (TokenizerMismatchError, a ValueError: one line in the CLI)
            compat = check_compatibility(tok, teacher_tok, student, teacher)
        except Exception:
            torch.set_num_threads(before)
            raise
        return cls(student, teacher, tok, compat.vocab_limit, before)

    def close(self) -> None:
        torch.set_num_threads(self.threads_before)


def _tensors(s_out, t_out, batch):
    mask_B_T = batch.response_mask_B_T > 0
    mt = mechanism_tensors(*measure.mechanism_inputs(s_out, t_out, mask_B_T))
    r_B_T, _ = measure.token_rewards(s_out, t_out, mask_B_T)
    return mask_B_T, mt, r_B_T


def batch_metrics(s_out, t_out, batch) -> dict[str, float | None]:
    """Token means over the whole batch (``opd.metrics.mechanism_metrics``, as ``opd diagnose`` reports)."""
    mask_B_T, mt, r_B_T = _tensors(s_out, t_out, batch)
    mech = mechanism_means(mt, position_chunk=None)
    n = int(mask_B_T.sum())
    return {
        "overlap_ratio": mech.get("overlap/ratio"),
        "overlap_mass_student": mech.get("overlap/mass_student"),
        "overlap_mass_teacher": mech.get("overlap/mass_teacher"),
        "teacher_advantage": mech.get("overlap/adv"),
        "entropy_gap": mech.get("entropy/gap"),
        "entropy_student": mech.get("entropy/student"),
        "entropy_teacher": mech.get("entropy/teacher"),
        "kl": float(-r_B_T[mask_B_T].double().mean()) if n else None,
    }


def per_prompt(s_out, t_out, batch, num_prompts: int) -> list[dict[str, float | None]]:
    """Per-prompt token means over the prompt's rollouts (``batch.prompt_index_B`` says whose row is whose);
    ``tokens`` = its response tokens. A prompt with no response token gets None figures."""
    mask_B_T, mt, r_B_T = _tensors(s_out, t_out, batch)
    m = mask_B_T.double()
    adv_m = mt.adv_valid_B_T.double()
    idx = batch.prompt_index_B.long()

    def by_prompt(values_B_T, mask):
        sums = torch.zeros(num_prompts, dtype=torch.float64).index_add_(
            0, idx, (values_B_T.double() * mask).sum(-1)
        )
        counts = torch.zeros(num_prompts, dtype=torch.float64).index_add_(0, idx, mask.sum(-1))
        return [float(s / c) if c > 0 else None for s, c in zip(sums.tolist(), counts.tolist())], counts

    out: list[dict[str, float | None]] = [{} for _ in range(num_prompts)]
    for name, values, mask in (
        ("overlap_ratio", mt.overlap_ratio_B_T, m),
        ("overlap_mass_student", mt.mass_student_B_T, m),
        ("overlap_mass_teacher", mt.mass_teacher_B_T, m),
        ("teacher_advantage", mt.overlap_adv_B_T, adv_m),
        ("entropy_gap", mt.entropy_gap_B_T, m),
        ("entropy_student", mt.student_entropy_B_T, m),
        ("kl", -r_B_T, m),
    ):
        means, counts = by_prompt(values, mask)
        for p, v in enumerate(means):
            out[p][name] = v
            if name == "overlap_ratio":
                out[p]["tokens"] = int(counts[p])
    return out


def mean_rank(items: list[dict], keys: tuple[str, ...] = RANKED) -> list[float]:
    """Each item's mean rank over ``keys`` (rank 1 = the highest value; ties share their mean rank; a
    missing figure ranks last). Lower = more aligned."""
    n = len(items)
    total = [0.0] * n
    for k in keys:
        vals = [it.get(k) for it in items]
        order = sorted(range(n), key=lambda i: (vals[i] is None, -(vals[i] or 0.0)))
        ranks = [0.0] * n
        i = 0
        while i < n:
            j = i
            while j + 1 < n and vals[order[j + 1]] == vals[order[i]]:
                j += 1
            for t in range(i, j + 1):
                ranks[order[t]] = (i + j) / 2 + 1
            i = j + 1
        total = [a + b for a, b in zip(total, ranks)]
    return [t / len(keys) for t in total]
