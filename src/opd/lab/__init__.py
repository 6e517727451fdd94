"""The lab: a model organism of on-policy distillation that trains and runs on a laptop CPU.

* :mod:`opd.lab.world` — running-total problems with two solution styles (thinking patterns ``a``,
  ``b``) and a difficulty axis (``easy``: operands 1-5; ``hard``: 1-9, at least one of 6-9);
* :func:`prompt_rows` — fixed prompt sets with answers (``lab:train``, ``lab:test``, ...);
* :mod:`opd.lab.zoo` — tiny Qwen2 models trained on those solutions (``lab:student``,
  ``lab:teacher-a-plus``, ...), shipped inside the package and rebuilt by ``opd lab build``;
* :func:`evaluate_model` — accuracy of a model on prompt rows, overall and per difficulty / ``n_ops``
  (a thin use of :mod:`opd.evaluate`, the evaluator training and ``opd diagnose`` use).

All lab models share one byte-level tokenizer with the ChatML template (:func:`lab_tokenizer`).
"""

from __future__ import annotations

from pathlib import Path

from opd.lab import world, zoo
from opd.lab.evaluate import evaluate_model, generate_responses

__all__ = [
    "PROMPT_SETS",
    "evaluate_model",
    "generate_responses",
    "is_lab_name",
    "lab_tokenizer",
    "prompt_rows",
    "resolve_model",
    "world",
    "zoo",
]

SPLIT_SEED = 0  # the prompt sets are fixed: they do not depend on the zoo's build seed
SIZES = {"train": 2000, "test": 200}  # problems per difficulty

# name -> (split, difficulties); every set lists easy rows first, then hard rows
PROMPT_SETS: dict[str, tuple[str, tuple[str, ...]]] = {
    "train": ("train", ("easy", "hard")),
    "train-easy": ("train", ("easy",)),
    "train-hard": ("train", ("hard",)),
    "test": ("test", ("easy", "hard")),
    "test-easy": ("test", ("easy",)),
    "test-hard": ("test", ("hard",)),
}


def prompt_rows(name: str, *, template: str = world.PROMPT_TEMPLATE) -> list[dict]:
    """The lab prompt set ``name`` (also accepted as ``lab:<name>``) as rows with answers.

    Each row: ``prompt`` (the user message: the problem in ``template``, which asks for a final
    ``\\boxed{}`` answer), ``answer`` (ground truth string), ``difficulty`` ('easy'/'hard'), ``n_ops``,
    ``expr`` and the reference solutions ``solution_a`` / ``solution_b``. Sets are deterministic and
    train/test are disjoint; ``train`` has 2000 problems per difficulty, ``test`` 200.
    """
    key = name[len("lab:") :] if name.startswith("lab:") else name
    if key not in PROMPT_SETS:
        raise ValueError(
            f"unknown lab prompt set {name!r}; available: {', '.join('lab:' + k for k in PROMPT_SETS)}"
        )
    split, diffs = PROMPT_SETS[key]
    return [
        world.row(p, template) for d in diffs for p in world.problem_set(SPLIT_SEED, split, d, SIZES[split])
    ]


def lab_tokenizer():
    """The tokenizer every lab model uses: byte-level ``Qwen2Tokenizer``, ChatML, EOS ``<|im_end|>``."""
    from opd.tiny import build_byte_tokenizer

    return build_byte_tokenizer()


def is_lab_name(spec: object) -> bool:
    """True for strings of the form ``lab:<name>``."""
    return isinstance(spec, str) and spec.startswith("lab:")


def resolve_model(spec: str | Path) -> str:
    """``lab:<name>`` → the zoo model's directory (as a string); anything else is returned unchanged."""
    if is_lab_name(spec):
        from opd.lab import zoo

        return str(zoo.model_path(str(spec)[len("lab:") :]))
    return str(spec)
