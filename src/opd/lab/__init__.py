"""The lab: a model organism of on-policy distillation that trains and runs on a laptop CPU.

* :mod:`opd.lab.world` — running-total problems with two solution styles (thinking patterns ``a``,
  ``b``) and a difficulty axis (``easy``: operands 1-5; ``hard``: 1-9, at least one of 6-9);
* :func:`resolve` — the one parser of ``lab:<name>`` (models, loaders, run-directory checks use it);
* :func:`prompt_rows` — fixed prompt sets with answers (``lab:train``, ``lab:test``, ...);
* :mod:`opd.lab.zoo` — tiny Qwen2 models trained on those solutions (``lab:student``,
  ``lab:teacher-a-plus``, ...), shipped inside the package and rebuilt by ``opd lab build``;
* :func:`opd.lab.evaluate.evaluate_model` — accuracy of a model on prompt rows, overall and per difficulty / ``n_ops``
  (a thin use of :mod:`opd.evaluate`, the evaluator training and ``opd diagnose`` use).

All lab models share one byte-level tokenizer with the ChatML template (:func:`lab_tokenizer`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from opd.lab import world, zoo
from opd.tiny import build_byte_tokenizer

__all__ = [
    "LAB_PREFIX",
    "PROMPT_SETS",
    "LabModel",
    "LabNameError",
    "LabPrompts",
    "lab_tokenizer",
    "prompt_rows",
    "resolve",
    "world",
    "zoo",
]

LAB_PREFIX = "lab:"
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


@dataclass(frozen=True)
class LabModel:
    """A zoo model named by ``lab:<name>``; ``directory`` is where the zoo keeps it (built or not)."""

    name: str
    directory: Path

    def require_built(self) -> Path:
        """``directory``, or ``FileNotFoundError`` saying how to build the zoo if it holds no weights."""
        if (
            not (self.directory / "config.json").is_file()
            or not (self.directory / "model.safetensors").is_file()
        ):
            raise FileNotFoundError(
                f"lab model {self.name!r} is not built (no config.json/model.safetensors in {self.directory}); "
                "run `opd lab build` to train the zoo (minutes on a CPU)"
            )
        return self.directory


@dataclass(frozen=True)
class LabPrompts:
    """A fixed lab prompt set named by ``lab:<name>`` (see :data:`PROMPT_SETS`)."""

    name: str
    split: str
    difficulties: tuple[str, ...]

    def rows(self, *, template: str = world.PROMPT_TEMPLATE) -> list[dict]:
        """The set as rows with answers (see :func:`prompt_rows`)."""
        return [
            world.row(p, template)
            for d in self.difficulties
            for p in world.problem_set(SPLIT_SEED, self.split, d, SIZES[self.split])
        ]


class LabNameError(ValueError):
    """``lab:<name>`` names no lab model or prompt set (or one of the wrong kind)."""


def resolve(spec: str | os.PathLike, *, kind: str | None = None) -> LabModel | LabPrompts | None:
    """The one place ``lab:<name>`` is parsed: a :class:`LabModel`, a :class:`LabPrompts`, or None
    when ``spec`` is not a ``lab:`` string (a path, hub id, ...), which the caller handles.

    ``kind`` (``"model"`` or ``"prompts"``) restricts what the name may be. An unknown name, or one of
    the other kind, raises :class:`LabNameError` listing every valid name.
    """
    if kind not in (None, "model", "prompts"):
        raise ValueError(f"kind={kind!r}: expected None, 'model' or 'prompts'")
    name = os.fspath(spec)
    if not name.startswith(LAB_PREFIX):
        return None
    key = name[len(LAB_PREFIX) :]
    if key in zoo.SPECS and kind in (None, "model"):
        return LabModel(key, zoo.zoo_dir() / key)
    if key in PROMPT_SETS and kind in (None, "prompts"):
        split, diffs = PROMPT_SETS[key]
        return LabPrompts(key, split, diffs)
    what = {None: "lab model or prompt set", "model": "lab model", "prompts": "lab prompt set"}[kind]
    raise LabNameError(
        f"unknown {what} {name!r}; lab models: {', '.join(LAB_PREFIX + n for n in zoo.MODEL_NAMES)}; "
        f"lab prompt sets: {', '.join(LAB_PREFIX + n for n in PROMPT_SETS)}"
    )


def prompt_rows(name: str, *, template: str = world.PROMPT_TEMPLATE) -> list[dict]:
    """The lab prompt set ``name`` (also accepted as ``lab:<name>``) as rows with answers.

    Each row: ``prompt`` (the user message: the problem in ``template``, which asks for a final
    ``\\boxed{}`` answer), ``answer`` (ground truth string), ``difficulty`` ('easy'/'hard'), ``n_ops``,
    ``expr`` and the reference solutions ``solution_a`` / ``solution_b``. Sets are deterministic and
    train/test are disjoint; ``train`` has 2000 problems per difficulty, ``test`` 200.
    """
    spec = name if name.startswith(LAB_PREFIX) else LAB_PREFIX + name
    prompts = resolve(spec, kind="prompts")
    assert isinstance(prompts, LabPrompts)
    return prompts.rows(template=template)


def lab_tokenizer():
    """The tokenizer every lab model uses: byte-level ``Qwen2Tokenizer``, ChatML, EOS ``<|im_end|>``."""
    return build_byte_tokenizer()
