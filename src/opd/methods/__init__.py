"""Training methods, one file each (``methods/<name>.py``), each exposing ``train(config)``.

:data:`METHODS` is the registry the CLI and :func:`opd.train` read: one :class:`Method` per method, with
its subcommand, its config dataclass and its ``train``. Adding a method (say SFT) is one file and one
line:

1. ``methods/sft.py``: a config dataclass that inherits the shared parts it needs from :mod:`opd.config`
   (``ModelsConfig``, ``DataConfig``, ``OptimConfig``, ``RunConfig``; keys stay flat) plus its own
   fields, and ``train(cfg)`` that reads top to bottom on the frame in :mod:`opd.methods.common`;
2. here: ``Method("sft", SFTConfig, sft.train, "supervised fine-tuning", "...")`` in :data:`METHODS`.

``opd sft key=value ...`` and ``opd.train(SFTConfig(...))`` then work, with ``--help`` listing its keys.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from opd.config import OPDConfig
from opd.methods import coldstart, gkd, grpo, kd, opd, sft
from opd.methods.kd import KDConfig
from opd.methods.sft import SFTConfig


@dataclass(frozen=True)
class Method:
    """A training method as the CLI and ``opd.train`` see it."""

    command: str
    """Its ``opd <command>`` subcommand."""
    config: type
    """Its config dataclass (``opd.train`` dispatches on the config's type)."""
    train: Callable[[Any], dict[str, Any]]
    """``train(config) -> summary``."""
    help: str
    """One line for ``opd --help``."""
    description: str
    """The subcommand's ``--help`` description."""


METHODS: tuple[Method, ...] = (
    Method(
        "train",
        OPDConfig,
        opd.train,
        "run on-policy distillation",
        "Run on-policy distillation of a student toward a teacher on the student's own samples.",
    ),
    Method(
        "sft",
        SFTConfig,
        sft.train,
        "supervised fine-tuning on rejection-sampled teacher responses",
        "Generate teacher responses for the prompts (rejecting truncated, answerless and repetitive ones), "
        "then fine-tune the student on them by maximum likelihood (docs/baselines.md).",
    ),
    Method(
        "coldstart",
        coldstart.ColdstartConfig,
        coldstart.train,
        "the recipe's off-policy cold start: SFT on teacher responses, then OPD on the other prompts",
        "Stage 1: SFT of the student on rejection-sampled teacher responses to sft_num_prompts prompts (the "
        "sft_ keys, as opd sft); stage 2: OPD from the SFT model on the prompts not used for SFT (every opd "
        "train key). One run directory (sft/, opd/, summary.json); resume=true continues either stage "
        "(docs/recipe.md).",
    ),
    Method(
        "kd",
        KDConfig,
        kd.train,
        "word-level knowledge distillation on fixed sequences",
        "Distil the teacher's full next-token distributions into the student (forward KL at a temperature) "
        "on gold solutions or an SFT run's teacher data (docs/baselines.md).",
    ),
    Method(
        "gkd",
        gkd.GKDConfig,
        gkd.train,
        "distillation baseline: GKD (generalized JSD on a mix of student samples and fixed sequences)",
        "Distil with GKD as TRL configures it: the generalized JSD(beta) between teacher and student over "
        "the full vocabulary, on the student's own samples with probability lmbda, else on fixed sequences.",
    ),
    Method(
        "grpo",
        grpo.GRPOConfig,
        grpo.train,
        "RL baseline: GRPO with the grader's 0/1 reward (no teacher)",
        "Train the student with GRPO: G samples per prompt, a 0/1 reward from grading each against the "
        "prompt's answer, group-normalised advantages and the PPO-clipped policy-gradient loss.",
    ),
)


def method_for(config: Any) -> Method:
    """The method whose config type ``config`` is (ValueError naming the known types otherwise)."""
    for method in METHODS:
        if type(config) is method.config:
            return method
    known = ", ".join(f"{m.config.__name__} (opd {m.command})" for m in METHODS)
    raise ValueError(
        f"config of type {type(config).__name__}: no training method takes it; pass one of: {known}"
    )
