"""Where models and tensors live: device choice in one place (STYLE.md §9).

``Runtime.from_config(cfg)`` turns the user's ``device`` / ``teacher_device`` strings into torch devices:

- ``auto``: ``cuda`` when torch sees a CUDA GPU, else ``mps`` (Apple silicon), else ``cpu``;
- ``cpu``, ``cuda``, ``cuda:N``, ``mps``: exactly that device, or a one-line :class:`ConfigError` when it
  is not available here (``device=cuda`` on a machine without a GPU names the fix, ``device=cpu``);
- ``teacher_device`` empty: the student's device.

Every method moves each model to its device once at load time; tensors follow their model (a rollout
batch goes to the student's device, the teacher's scoring inputs to the teacher's, its outputs back).
The dtype policy (float32 student master weights, autocast compute) is :mod:`opd.precision`'s.

Left out for now: multi-process (``torchrun`` / accelerate) setup. When it arrives it belongs here —
rank, world size and the per-rank device — and the scoring module (``opd.scoring.PolicyScorer``) is
the ``torch.nn.Module`` a DDP/FSDP wrapper wraps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from opd.config import DEVICE_PATTERN, ConfigError


def resolve_device(value: str, key: str = "device") -> torch.device:
    """``auto`` / ``cpu`` / ``cuda[:N]`` / ``mps`` → an available ``torch.device`` (ConfigError otherwise)."""
    if not DEVICE_PATTERN.fullmatch(value):
        raise ConfigError(f"{key}={value!r}: choose auto, cpu, cuda, cuda:N or mps")
    if value == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(value)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"{key}={value!r}: torch sees no CUDA GPU here (torch.cuda.is_available() is False, "
                f"torch {torch.__version__}); use {key}=cpu or {key}=auto, or install a CUDA build of torch"
            )
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ConfigError(
                f"{key}={value!r}: only {count} CUDA device(s) visible; use cuda:0..cuda:{count - 1}"
            )
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(
            f"{key}={value!r}: the MPS backend is not available here; use {key}=cpu or {key}=auto"
        )
    return device


@dataclass(frozen=True)
class Runtime:
    """The devices of one run: ``device`` for the student (training, rollouts), ``teacher_device`` for
    the teacher (scoring only). Built once per run by :meth:`from_config`."""

    device: torch.device
    teacher_device: torch.device

    @classmethod
    def from_config(cls, cfg) -> Runtime:
        """Resolve ``cfg.device`` and ``cfg.teacher_device`` (empty = the student's device)."""
        device = resolve_device(cfg.device, "device")
        teacher = resolve_device(cfg.teacher_device, "teacher_device") if cfg.teacher_device else device
        return cls(device=device, teacher_device=teacher)

    def describe(self) -> str:
        """One line for the log: where the student and the teacher run."""
        if self.teacher_device == self.device:
            return f"device {self.device}"
        return f"student on {self.device}, teacher on {self.teacher_device}"


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's input embeddings (where its input ids must go)."""
    embeddings = (
        model.get_input_embeddings() if callable(getattr(model, "get_input_embeddings", None)) else None
    )
    if embeddings is not None and getattr(embeddings, "weight", None) is not None:
        return embeddings.weight.device
    return next(model.parameters()).device
