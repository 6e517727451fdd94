"""Compute cost of a training run: tokens through each model, and an estimated FLOP count.

Every method keeps one :class:`CostMeter` and adds to it as it works; the cumulative counters go into
each metrics row (``cost/*``) and into ``summary.json``, and are checkpointed so a resumed run counts
on. The FLOP estimate is the standard dense-transformer rule (Kaplan et al. 2020; the ``6·N·D`` of
scaling-law papers), documented in docs/evaluation.md:

- a forward pass costs ``2·N`` FLOPs per token through a model of ``N`` parameters (prompt prefill,
  each generated token, every scoring pass);
- a training pass (forward + backward) costs ``6·N`` per token.

Attention's sequence-length term and the embedding lookup are ignored (small against ``N`` for the
lengths the study uses); ``N`` counts every parameter, embeddings included. The estimate is for
comparing methods on one pair, not an absolute hardware count.
"""

from __future__ import annotations

import resource
import sys
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

COUNTERS: tuple[str, ...] = (
    "student_generated_tokens",
    "student_prefill_tokens",
    "student_forward_tokens",
    "student_train_tokens",
    "student_loss_tokens",
    "teacher_generated_tokens",
    "teacher_prefill_tokens",
    "teacher_forward_tokens",
)
"""What a :class:`CostMeter` counts (tokens):

- ``student_generated_tokens`` / ``teacher_generated_tokens``: sampled response tokens (2·N each);
- ``*_prefill_tokens``: prompt tokens run through the model before sampling (2·N each);
- ``*_forward_tokens``: tokens (prompt + response) through a no-grad scoring forward (2·N each);
- ``student_train_tokens``: tokens (prompt + response) through a forward + backward pass (6·N each);
- ``student_loss_tokens``: response tokens that carry a loss, once per optimiser pass over them — the
  "student-trained tokens" an equal-budget comparison holds fixed (no FLOPs of their own).
"""


def count_parameters(model: torch.nn.Module | None) -> int:
    """All parameters of ``model`` (trainable or not; 0 for None)."""
    return 0 if model is None else sum(p.numel() for p in model.parameters())


def model_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's parameters and buffers as they are held now."""
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def peak_memory_mb(device: torch.device | str | None = None) -> float:
    """Peak memory so far: the CUDA allocator's peak on a CUDA device, else the process's peak resident
    set size (CPU: ``ru_maxrss``, which includes the Python interpreter and libraries)."""
    dev = torch.device(device) if device is not None else None
    if dev is not None and dev.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.max_memory_allocated(dev) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # macOS: bytes; Linux: KiB


@dataclass
class CostMeter:
    """Cumulative token counters and the FLOP estimate of one run (see the module docstring).

    ``student_params`` / ``teacher_params``: parameter counts (:func:`count_parameters`; 0 when a method
    has no teacher). Add with :meth:`add`; :meth:`row` gives the ``cost/*`` metrics."""

    student_params: int
    teacher_params: int = 0
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNTERS, 0))

    def add(self, **tokens: int | float | torch.Tensor) -> None:
        """``meter.add(student_generated_tokens=n, ...)``: add token counts (names from :data:`COUNTERS`)."""
        for name, value in tokens.items():
            if name not in self.counts:
                raise KeyError(f"unknown cost counter {name!r}; known: {', '.join(COUNTERS)}")
            self.counts[name] += int(value.sum()) if isinstance(value, torch.Tensor) else int(value)

    def student_flops(self) -> float:
        c, n = self.counts, self.student_params
        forward = c["student_generated_tokens"] + c["student_prefill_tokens"] + c["student_forward_tokens"]
        return 2.0 * n * forward + 6.0 * n * c["student_train_tokens"]

    def teacher_flops(self) -> float:
        c, n = self.counts, self.teacher_params
        return (
            2.0
            * n
            * (c["teacher_generated_tokens"] + c["teacher_prefill_tokens"] + c["teacher_forward_tokens"])
        )

    def flops(self) -> float:
        return self.student_flops() + self.teacher_flops()

    def row(self) -> dict[str, float]:
        """The ``cost/*`` metrics: every counter, ``cost/student_flops``, ``cost/teacher_flops``, ``cost/flops``."""
        out: dict[str, float] = {f"cost/{k}": v for k, v in self.counts.items()}
        out["cost/student_flops"] = self.student_flops()
        out["cost/teacher_flops"] = self.teacher_flops()
        out["cost/flops"] = self.flops()
        return out

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.student_params = int(state["student_params"])
        self.teacher_params = int(state["teacher_params"])
        self.counts = {k: int(state["counts"].get(k, 0)) for k in COUNTERS}
