"""The lab's model zoo: tiny Qwen2 models trained from scratch on the lab world, shipped in the package.

Every model is trained on worked solutions (:mod:`opd.lab.train`); "easy"/"hard" and the patterns A/B
are defined in :mod:`opd.lab.world`. The student's pipeline has two stages: ``student-base`` learns
easy problems only, then a brief exposure (80 small steps on half easy, half hard problems) gives
``student``, which solves few hard problems but puts some probability on the right digits of hard
steps. That shared support is what OPD needs (docs/paper.md §3): ``student-base`` is confidently wrong on
hard steps and OPD barely moves it.

================  ===========================================  ==========================================
name              how it is made                               role in the study (docs/paper.md §2)
================  ===========================================  ==========================================
student           small; A; ``student-base`` + brief exposure  the student
teacher-a-plus    ``teacher-a-same`` trained on easy + hard, A  compatible pattern, new capability
teacher-b-plus    larger; B; easy + hard from scratch          incompatible pattern, about equal score
teacher-a-same    larger; A; the student's pipeline            same pipeline: higher score
student-plus      ``student`` trained on easy + hard, A        the "after RL" student (reverse
                                                               distillation toward ``student``)
student-base      small; A; easy only                          a student with no support on hard steps
teacher-a-base    larger; A; easy only                         a teacher that knows nothing new
teacher-a-qa      larger; A; easy + hard from scratch, its     compatible pattern under another prompt
                  prompts in ``world.QA_TEMPLATE`` only        template (template alignment, recipe.md)
================  ===========================================  ==========================================

Each model directory holds ``config.json``, ``model.safetensors``, ``generation_config.json`` and the
shared tokenizer (byte-level ``Qwen2Tokenizer``, ChatML chat template, EOS ``<|im_end|>``), so it loads
with ``AutoModelForCausalLM`` / ``AutoTokenizer.from_pretrained`` like any checkpoint. ``build_info.json``
next to them records every spec, parameter count, accuracy (greedy and sampled at temperature 1, per
difficulty and number of steps), the solution pattern the model writes, weight hashes and build times.

``opd lab build`` (:func:`opd.lab.build.build`) retrains the zoo: models train in parallel worker processes, one
thread each, so the weights do not depend on the number of cores; the same seed gives bit-identical
weights on the same machine and torch build. Set ``OPD_LAB_ZOO`` to use a zoo built elsewhere.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from opd.lab.train import ModelSpec
from opd.lab.world import QA_TEMPLATE

PACKAGE_ZOO = Path(__file__).resolve().parent
ZOO_ENV = "OPD_LAB_ZOO"

_STUDENT = dict(hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=256)
_TEACHER = dict(hidden_size=96, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=384)
# the brief exposure that turns a *-base model into the student / teacher-a-same (constant small lr)
_EXPOSURE = dict(hard_fraction=0.5, steps=80, lr=3e-4, warmup=0.0, min_lr_ratio=1.0)

SPECS: dict[str, ModelSpec] = {
    s.name: s
    for s in (
        ModelSpec("student-base", "a", 0.0, **_STUDENT, steps=1000, seed_offset=1, notes="easy only"),
        ModelSpec(
            "student",
            "a",
            **_EXPOSURE,
            **_STUDENT,
            init_from="student-base",
            seed_offset=2,
            notes="student-base + brief exposure to hard problems",
        ),
        ModelSpec(
            "student-plus",
            "a",
            0.5,
            **_STUDENT,
            steps=500,
            batch_size=32,
            lr=1e-3,
            init_from="student",
            seed_offset=3,
            notes="student trained further on easy + hard: the 'after RL' student",
        ),
        ModelSpec("teacher-a-base", "a", 0.0, **_TEACHER, steps=1000, seed_offset=4, notes="easy only"),
        ModelSpec(
            "teacher-a-same",
            "a",
            **_EXPOSURE,
            **_TEACHER,
            init_from="teacher-a-base",
            seed_offset=5,
            notes="teacher-a-base + the student's brief exposure: the student's pipeline, larger",
        ),
        ModelSpec(
            "teacher-a-plus",
            "a",
            0.5,
            **_TEACHER,
            steps=800,
            batch_size=32,
            lr=1e-3,
            init_from="teacher-a-same",
            seed_offset=6,
            notes="teacher-a-same trained further on easy + hard: compatible, new capability",
        ),
        ModelSpec(
            "teacher-b-plus",
            "b",
            0.5,
            **_TEACHER,
            steps=1500,
            batch_size=32,
            seed_offset=7,
            notes="pattern B, easy + hard from scratch: incompatible pattern, same score",
        ),
        ModelSpec(
            "teacher-a-qa",
            "a",
            0.5,
            **_TEACHER,
            steps=1500,
            batch_size=32,
            seed_offset=8,
            prompt_template=QA_TEMPLATE,
            notes="pattern A, easy + hard from scratch, prompts in world.QA_TEMPLATE only: another template",
        ),
    )
}
MODEL_NAMES: tuple[str, ...] = (
    "student",
    "teacher-a-plus",
    "teacher-b-plus",
    "teacher-a-same",
    "student-plus",
    "student-base",
    "teacher-a-base",
    "teacher-a-qa",
)
assert set(MODEL_NAMES) == set(SPECS)


def zoo_dir() -> Path:
    """Where the zoo is read from: ``$OPD_LAB_ZOO`` if set, else the copy inside the package."""
    env = os.environ.get(ZOO_ENV)
    return Path(env) if env else PACKAGE_ZOO


def build_info(zoo: str | Path | None = None) -> dict:
    """The ``build_info.json`` of a built zoo (default: :func:`zoo_dir`)."""
    p = Path(zoo) if zoo is not None else zoo_dir()
    f = p / "build_info.json"
    if not f.is_file():
        raise FileNotFoundError(f"no build_info.json in {p}; run `opd lab build` to train the zoo")
    return json.loads(f.read_text())


def weights_sha256(model_dir: str | Path) -> str:
    return hashlib.sha256((Path(model_dir) / "model.safetensors").read_bytes()).hexdigest()
