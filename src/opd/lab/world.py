"""The lab's task world: running-total problems with two solution styles and a difficulty axis.

A problem is a start value and a chain of single-digit additions and subtractions, e.g. ``47+8-3+6``.
Every running total stays in 10..99 (two digits), the operations of one problem are distinct, and the
answer is the final total. The prompt template asks for a final ``\\boxed{}`` answer, so the same
grading as for real math applies (last ``\\boxed{...}``, string match).

Two *thinking patterns* solve the same problems with the same computation in the same order, one step
per line, but in different token sequences that differ from the first response token on:

* pattern A (equation chain)::

      47+8=55
      55-3=52
      52+6=58
      \\boxed{58}

* pattern B (ledger)::

      at 47
      +8 -> 55
      -3 -> 52
      +6 -> 58
      \\boxed{58}

Difficulty is the size of the operands: ``easy`` problems only add or subtract 1-5, ``hard`` problems
use 1-9 with at least one operation of 6-9. Both have 2-4 steps, so prompts and responses have the same
shape and length; a hard solution applies the same procedure (add a digit to a two-digit number, with a
carry) to operands a model trained on easy problems never saw as operations. A teacher trained on hard
problems can correct such a model token by token on its own, well-formed solutions (where the model
puts at least a little probability on the right digits: see :mod:`opd.lab.zoo`).

Splits are fixed by a hash of the problem text, independent of seeds and sizes: a problem is in
``test`` iff the first byte of its SHA-256 is below ``TEST_FRACTION * 256``. Train streams skip test
problems, so train and test are disjoint by construction.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass

PROMPT_TEMPLATE = "Compute {expr}. Answer in \\boxed{{}}."
QA_TEMPLATE = "Question: {problem}\nWork it out one step per line.\nAnswer:"
"""A prompt-template variant (an opd ``prompt_template``: ``{problem}`` is the rendered
:data:`PROMPT_TEMPLATE` prompt). ``lab:teacher-a-qa`` was trained with its prompts in this template only,
so the template alignment of docs/recipe.md has a teacher whose post-training template differs from the
student's."""
TEMPLATE_VARIANTS: dict[str, str | None] = {"plain": None, "qa": QA_TEMPLATE}
"""Named prompt-template variants of the lab: None = the plain prompt (what the rest of the zoo saw)."""
PATTERNS = ("a", "b")
N_OPS = (2, 4)  # inclusive range of the number of operations
SMALL, LARGE = range(1, 6), range(6, 10)  # operand magnitudes: easy uses SMALL only, hard also LARGE
DIFFICULTIES = ("easy", "hard")
VALUE_RANGE = (10, 99)  # every running total, start value included
TEST_FRACTION = 0.25


@dataclass(frozen=True)
class Problem:
    start: int
    ops: tuple[int, ...]  # signed single digits, non-zero

    @property
    def expr(self) -> str:
        return f"{self.start}" + "".join(f"{o:+d}" for o in self.ops)

    @property
    def totals(self) -> list[int]:
        """Running totals after each operation."""
        out, v = [], self.start
        for o in self.ops:
            v += o
            out.append(v)
        return out

    @property
    def answer(self) -> str:
        return str(self.start + sum(self.ops))

    @property
    def difficulty(self) -> str:
        return "hard" if any(abs(o) in LARGE for o in self.ops) else "easy"

    @property
    def split(self) -> str:
        h = hashlib.sha256(self.expr.encode()).digest()[0]
        return "test" if h < TEST_FRACTION * 256 else "train"

    def prompt(self, template: str = PROMPT_TEMPLATE) -> str:
        return template.format(expr=self.expr)

    def solution(self, pattern: str) -> str:
        """The step-by-step response in ``pattern`` ('a' or 'b'), ending in ``\\boxed{answer}``."""
        lines, v = [], self.start
        if pattern == "a":
            for o, t in zip(self.ops, self.totals):
                lines.append(f"{v}{o:+d}={t}")
                v = t
        elif pattern == "b":
            lines.append(f"at {v}")
            for o, t in zip(self.ops, self.totals):
                lines.append(f"{o:+d} -> {t}")
        else:
            raise ValueError(f"pattern={pattern!r}: expected one of {PATTERNS}")
        lines.append(f"\\boxed{{{self.answer}}}")
        return "\n".join(lines)


def sample_problem(rng: random.Random, difficulty: str) -> Problem:
    """One problem of ``difficulty``; totals stay in ``VALUE_RANGE`` and operations are distinct.

    ``easy``: every operand in ``SMALL``; ``hard``: operands in ``SMALL`` or ``LARGE``, one random
    position forced to ``LARGE``.
    """
    if difficulty not in DIFFICULTIES:
        raise ValueError(f"difficulty={difficulty!r}: expected one of {DIFFICULTIES}")
    n = rng.randint(*N_OPS)
    forced = rng.randrange(n) if difficulty == "hard" else -1
    vmin, vmax = VALUE_RANGE
    start = rng.randint(vmin, vmax)
    v, ops = start, []
    for i in range(n):
        mags = LARGE if i == forced else (SMALL if difficulty == "easy" else range(1, 10))
        # never empty: at most 3 earlier ops, and at least 4 magnitudes of one sign keep v in range
        choices = [s * m for s in (-1, 1) for m in mags if s * m not in ops and vmin <= v + s * m <= vmax]
        o = rng.choice(choices)
        ops.append(o)
        v += o
    return Problem(start, tuple(ops))


def problem_stream(seed: int, split: str, hard_fraction: float = 0.5) -> Iterator[Problem]:
    """Endless deterministic stream of ``split`` problems; each is hard with probability ``hard_fraction``."""
    if split not in ("train", "test"):
        raise ValueError(f"split={split!r}: expected 'train' or 'test'")
    if not 0.0 <= hard_fraction <= 1.0:
        raise ValueError(f"hard_fraction={hard_fraction}: expected a probability in [0, 1]")
    rng = random.Random(f"opd-lab/{split}/{seed}")
    while True:
        p = sample_problem(rng, "hard" if rng.random() < hard_fraction else "easy")
        if p.split == split:
            yield p


def problem_set(
    seed: int, split: str, difficulty: str, n: int, *, exclude: set[str] | None = None
) -> list[Problem]:
    """``n`` distinct problems (by expression) of one difficulty and split, skipping ``exclude``."""
    if difficulty not in DIFFICULTIES:
        raise ValueError(f"difficulty={difficulty!r}: expected one of {DIFFICULTIES}")
    seen = set(exclude or ())
    out = []
    for p in problem_stream(seed, split, 1.0 if difficulty == "hard" else 0.0):
        if p.expr not in seen:
            seen.add(p.expr)
            out.append(p)
            if len(out) == n:
                return out
    raise AssertionError("unreachable")


def detect_pattern(response: str) -> str | None:
    """Which solution style a response follows, judged by its first line: 'a', 'b' or None."""
    first = response.split("\n", 1)[0]
    if _A_LINE.fullmatch(first):
        return "a"
    if _B_HEAD.fullmatch(first):
        return "b"
    return None


_A_LINE = re.compile(r"\d+[+-]\d+=\d+")
_B_HEAD = re.compile(r"at \d+")


def row(p: Problem, template: str = PROMPT_TEMPLATE) -> dict:
    """A prompt row: ``prompt`` (user message), ``answer`` and metadata."""
    return {
        "prompt": p.prompt(template),
        "answer": p.answer,
        "difficulty": p.difficulty,
        "n_ops": len(p.ops),
        "expr": p.expr,
        "solution_a": p.solution("a"),
        "solution_b": p.solution("b"),
    }
