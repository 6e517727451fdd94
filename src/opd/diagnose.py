"""Pre-flight diagnosis: will on-policy distillation of this student toward this teacher work?

``diagnose(DiagnoseConfig(student=..., teacher=..., prompts=...))`` (CLI: ``opd diagnose``) measures, on
a small prompt sample and before any training, the two conditions under which OPD works (docs/paper.md §2)
and the token-level signature that predicts success (§3), and returns a verdict with its evidence:

1. **Tokenizer / chat template / EOS.** ``opd.models.check_compatibility`` (a different vocabulary is
   fatal: the teacher must score the student's token ids). One conversation (the first prompt and a
   student response) is rendered with both chat templates and tokenised with both tokenizers; the token
   diff and both stop-token sets are reported, and on the rollouts the reward at the student's stop
   token, ``log q(stop) − log p(stop)``, shows whether the teacher accepts the student's end of turn.
2. **Student rollouts.** ``rollouts`` samples per prompt from the student at ``temperature``; both
   models score them once (student: top-k ids, log-probs, entropy; teacher: log-probs at the student's
   top-k ids, its own top-k, entropy) — exactly what step 0 of ``opd train`` computes.
3. **Condition (i), compatible thinking patterns** (``opd.metrics``): overlap ratio ``E|I_t|/k``
   (Eq. 6), overlap masses ``E Σ_{v∈I_t} p_t(v)`` and ``… q_t(v)``, the Eq. 7 advantage (≤ 0, → 0 when
   compatible) and the per-state entropy gap ``E|H(q_t) − H(p_t)|``, overall and by response position.
4. **Condition (ii), new capability** (needs answers in the prompt data): greedy accuracy of both
   models on the prompts (``eval_temperature = 0``: deterministic, one decode per prompt; a sampled
   avg@``eval_samples`` otherwise), and the **teacher continuation advantage** (docs/paper.md §5): the first
   rollout of each prompt is cut after a fraction f of its response tokens (``prefix_fractions``); the
   teacher and the student each complete the same prefix (same decoding as the accuracy check), and the
   advantage is ``acc(teacher completions) − acc(student completions)``. It asks whether the teacher can
   do better than the student *from the student's own states*, which is where OPD supervises. Also the
   size and spread of the per-token reward ``r_t = log q_t(ŷ_t) − log p_t(ŷ_t)`` (sampled token) and
   of the top-K reward ``Σ_{v∈TopK(p_t)} p̄_t(v)(log q_t(v) − log p_t(v))`` (student support,
   ``student_p`` weights: what ``top_k=16`` optimises).
5. **Context:** the AUROC of the sequence-mean reward against the correctness of the student's
   rollouts (docs/paper.md §5 finds ≈ 0.73–0.75 for working and failing teachers alike, so it is reported,
   never used for the verdict).

Verdict (:func:`decide`, a pure function of the measured :class:`Evidence` and the
:class:`DiagnoseThresholds`; names and paths of the models are never looked at):

- ``no-go`` — the tokenizers are incompatible; or the reward is ~0 (the teacher's distribution equals
  the student's on its own rollouts); or, with answers, the teacher adds nothing the student can learn:
  neither an accuracy gap nor a continuation advantage, or an accuracy gap that vanishes from the
  student's own prefixes although the two models agree token by token (condition (i) holds) — the
  same-pipeline case of docs/paper.md §2, flagged ``little-new-capability``;
- ``go-after-remedy`` — the teacher has something to teach but condition (i) or the template check
  fails; the remedy is named: ``teacher-aligned template`` (chat templates render differently, or the
  teacher rejects the student's stop token), ``teacher-aligned prompts`` (the teacher is less certain
  than the student already at the first response token, i.e. the prompts are off its distribution),
  otherwise ``off-policy cold start`` (the teacher is confident but disagrees: a different thinking
  pattern; SFT on teacher responses first, docs/paper.md §4);
- ``go`` — everything else (without answers condition (ii) is unmeasured, and the reasons say so);
- ``inconclusive`` — a no-go other than the tokenizer one, measured on truncated evidence: more than
  ``truncated_frac_max`` of the rollouts or accuracy responses hit ``max_new_tokens``, so answers were
  cut off before grading and the reward seen only on the first tokens; remedy ``larger
  max_new_tokens``. Every other verdict on truncated evidence carries the ``truncated-evidence`` flag
  and a reason saying so.

Outputs in ``out_dir``: ``diagnosis.json`` (top-level ``verdict``, ``reasons``, ``remedies``,
``flags``, ``checks`` and every measured figure), ``diagnosis.md`` and a self-contained
``diagnosis.html`` with plots. Cost (docs/diagnose.md): 2 scoring passes over ``N·R`` rollouts, and at
most ``N·M·(R + 2E·(1 + F))`` generated tokens for N prompts, R rollouts, M = max_new_tokens,
E = eval samples, F = number of prefix fractions; ``diagnosis.json["cost"]`` records the actual counts.

Deliberately left out: any training step (the diagnosis is step 0 only; the per-step alerts of
``opd.alerts`` watch a real run), multi-GPU sharding, vLLM sampling, and comparing several teachers in
one call (run it once per teacher; the JSON files are comparable).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("opd.diagnose")

__all__ = [
    "REMEDY_COLD_START",
    "REMEDY_PROMPTS",
    "REMEDY_TEMPLATE",
    "VERDICTS",
    "Check",
    "DiagnoseConfig",
    "DiagnoseThresholds",
    "Evidence",
    "Verdict",
    "auroc",
    "decide",
    "diagnose",
]

VERDICTS = ("go", "go-after-remedy", "no-go", "inconclusive")
REMEDY_COLD_START = "off-policy cold start"
REMEDY_LONGER = "larger max_new_tokens"
REMEDY_TEMPLATE = "teacher-aligned template"
REMEDY_PROMPTS = "teacher-aligned prompts"
FLAG_NO_SIGNAL = "no-signal"
FLAG_LITTLE_NEW = "little-new-capability"
FLAG_INCOMPATIBLE_PATTERN = "incompatible-pattern"
FLAG_TEMPLATE = "template-mismatch"
FLAG_TOKENIZER = "tokenizer-mismatch"
FLAG_UNMEASURED = "capability-unmeasured"
FLAG_TRUNCATED = "truncated-evidence"


# ---------------------------------------------------------------------------------------------- config


@dataclass
class DiagnoseThresholds:
    """Decision thresholds of :func:`decide` (how they were chosen: docs/diagnose.md)."""

    overlap_ratio_min: float = 0.4
    """Condition (i): initial top-k overlap ratio E|I_t|/k (Eq. 6) must be at least this."""
    overlap_mass_min: float = 0.9
    """Condition (i): the smaller of the student and teacher probability mass on I_t must be at least this."""
    overlap_adv_min: float = -0.1
    """Condition (i): the Eq. 7 overlap advantage (<= 0) must be at least this (close to 0)."""
    entropy_gap_max: float = 0.5
    """Condition (i): the mean per-state entropy gap E|H(q_t) - H(p_t)| (nats) must be at most this."""
    reward_abs_min: float = 0.01
    """Below this mean |log q - log p| per sampled token (nats) the teacher gives no signal (teacher ~ student)."""
    accuracy_gap_min: float = 0.05
    """Condition (ii): teacher minus student accuracy on the prompts that counts as a capability gap."""
    continuation_advantage_min: float = 0.05
    """Condition (ii): teacher minus student accuracy when completing the student's own prefixes that counts."""
    significance_z: float = 1.0
    """Condition (ii): a gap must also exceed this many standard errors (the effective threshold is
    max(minimum, z * s.e.)), so sampling noise on a small prompt sample does not count as capability."""
    stop_reward_min: float = -2.0
    """Template check: mean reward log q - log p at the student's stop token must be at least this (nats)."""
    first_token_entropy_excess: float = 0.5
    """Remedy choice: teacher entropy minus student entropy at the first response token (nats) above which
    the prompts are judged off the teacher's distribution (remedy: teacher-aligned prompts)."""
    truncated_frac_max: float = 0.5
    """Evidence check: above this fraction of responses cut at max_new_tokens (student rollouts, or either
    model's accuracy responses) the evidence is truncated: answers are cut off before they can be graded,
    so a no-go (except a tokenizer mismatch) becomes ``inconclusive`` (remedy: a larger max_new_tokens)."""

    def __post_init__(self) -> None:
        bad = []
        for name in ("overlap_ratio_min", "overlap_mass_min"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                bad.append(f"{name}={v}: must be in [0, 1]")
        if self.overlap_adv_min > 0:
            bad.append(
                f"overlap_adv_min={self.overlap_adv_min}: the Eq. 7 advantage is <= 0; use a value <= 0"
            )
        for name in ("entropy_gap_max", "reward_abs_min"):
            if getattr(self, name) < 0:
                bad.append(f"{name}={getattr(self, name)}: must be >= 0")
        if bad:
            from opd.config import ConfigError

            raise ConfigError("invalid diagnose thresholds:\n  - " + "\n  - ".join(bad))


@dataclass
class DiagnoseConfig:
    """One pre-flight diagnosis of a (student, teacher, prompts) triple. Same conventions as ``OPDConfig``."""

    # --- models and data ---
    student: str = ""
    """Student model: a local directory, a hub id (online only), a .gguf file or ``lab:<name>``."""
    teacher: str = ""
    """Teacher model: a local directory, hub id, .gguf file or ``lab:<name>`` (must share the student's vocabulary)."""
    prompts: str = ""
    """Prompt source (.jsonl/.json/.parquet/.csv, a saved HF dataset directory, or ``lab:<split>``); answers enable condition (ii)."""
    student_dtype: str = "float32"
    """Student weights dtype: float32, bfloat16 or float16 (log-probs are always float32)."""
    teacher_dtype: str = "float32"
    """Teacher weights dtype: float32, bfloat16 or float16."""
    trust_remote_code: bool = False
    """Allow model repos to run their own Python code. Off unless you trust the source."""
    prompt_field: str = "auto"
    """Field holding the prompt; 'auto' tries prompt/problem/question/input/instruction."""
    answer_field: str = "auto"
    """Field holding the ground-truth answer (dotted paths allowed); 'auto' finds it or runs without answers."""
    prompt_template: str | None = None
    """Template applied to the prompt text; ``{problem}`` is replaced by the prompt. None = use as is."""
    use_chat_template: bool = True
    """Render prompts with the student tokenizer's chat template (what ``opd train`` does)."""
    chat_template_kwargs: dict = field(default_factory=dict)
    """Extra keyword arguments for apply_chat_template, e.g. {enable_thinking: false}."""
    max_prompt_tokens: int = 1024
    """Prompts longer than this many tokens are skipped."""

    # --- sample sizes ---
    num_prompts: int = 64
    """Prompts sampled (seeded shuffle) from the source."""
    rollouts: int = 4
    """Student rollouts per prompt (scored by both models for condition (i) and the rewards)."""
    max_new_tokens: int = 256
    """Maximum response length of every generation (rollouts, accuracy, continuations)."""
    temperature: float = 1.0
    """Student sampling temperature for the rollouts (OPD samples at 1.0)."""
    teacher_temperature: float = 1.0
    """Temperature applied to the teacher's logits when scoring (as in ``opd train``)."""
    top_k: int = 16
    """k of the overlap metrics (TopK of each model at every position)."""
    prefix_fractions: tuple[float, ...] = (0.25, 0.5, 0.75)
    """Continuation test: cut each prompt's first rollout after these fractions of its response tokens."""
    eval_temperature: float = 0.0
    """Decoding for the accuracy check and the continuations: 0 = greedy (deterministic), > 0 = sampled."""
    eval_samples: int = 1
    """Samples per prompt (and per prefix) when eval_temperature > 0 (avg@n); ignored when greedy."""
    position_bin: int = 0
    """Response positions per bin of the position profiles; 0 = the longest rollout // 16, rounded up."""

    # --- run ---
    out_dir: str = "runs/diagnose"
    """Where diagnosis.json, diagnosis.md and diagnosis.html are written."""
    seed: int = 0
    """Seed of the prompt sample and of all sampling."""
    batch_size: int = 64
    """Sequences per generate call and per scoring forward pass (lower it for large models)."""
    score_chunk_size: int = 256
    """Positions per chunk when computing log-softmax (peak memory O(chunk * vocab))."""
    threads: int = 0
    """torch CPU threads; 0 = auto: 1 when both models have under 10M parameters (tiny models gain nothing
    from intra-op threads and slow down several-fold on a shared CPU), else the torch default. Restored after."""
    progress: bool = True
    """Show progress bars."""
    thresholds: DiagnoseThresholds = field(default_factory=DiagnoseThresholds)
    """Decision thresholds (see DiagnoseThresholds; CLI: --threshold name=value)."""

    def __post_init__(self) -> None:
        from opd.config import ConfigError

        if isinstance(self.thresholds, dict):
            self.thresholds = DiagnoseThresholds(**self.thresholds)
        if isinstance(self.prefix_fractions, (int, float)):
            self.prefix_fractions = (float(self.prefix_fractions),)
        self.prefix_fractions = tuple(float(f) for f in self.prefix_fractions)
        errs = []
        for key in ("num_prompts", "rollouts", "max_new_tokens", "top_k", "eval_samples", "batch_size"):
            if int(getattr(self, key)) < 1:
                errs.append(f"{key}={getattr(self, key)}: must be >= 1")
        for key in ("position_bin", "threads", "max_prompt_tokens", "score_chunk_size"):
            if int(getattr(self, key)) < 0:
                errs.append(f"{key}={getattr(self, key)}: must be >= 0")
        if any(not 0.0 <= f < 1.0 for f in self.prefix_fractions):
            errs.append(
                f"prefix_fractions={list(self.prefix_fractions)}: each fraction must be in [0, 1) "
                "(0 = from the prompt alone); pass an empty list to skip the continuation test"
            )
        if self.temperature <= 0:
            errs.append(
                f"temperature={self.temperature}: rollouts must be sampled (> 0), as OPD samples them; use 1.0"
            )
        if self.teacher_temperature <= 0:
            errs.append(f"teacher_temperature={self.teacher_temperature}: must be > 0; use 1.0")
        if self.eval_temperature < 0:
            errs.append(f"eval_temperature={self.eval_temperature}: must be >= 0 (0 = greedy)")
        for dt_key in ("student_dtype", "teacher_dtype"):
            if getattr(self, dt_key) not in ("float32", "bfloat16", "float16"):
                errs.append(f"{dt_key}={getattr(self, dt_key)!r}: choose float32, bfloat16 or float16")
        if errs:
            raise ConfigError("invalid diagnose config:\n  - " + "\n  - ".join(errs))

    def check_runnable(self) -> None:
        """The keys that must be set before running (not needed to print help or defaults)."""
        from opd.config import ConfigError

        missing = [k for k in ("student", "teacher", "prompts") if not getattr(self, k)]
        if missing:
            raise ConfigError(
                f"missing required option(s): {', '.join(missing)}; e.g. opd diagnose --student lab:student "
                "--teacher lab:teacher-a-plus --prompts lab:test"
            )

    def bin_size(self, longest_response: int) -> int:
        """Positions per profile bin: ``position_bin``, or the longest rollout / 16 (at least 1)."""
        return self.position_bin or max(1, math.ceil(longest_response / 16))


# ------------------------------------------------------------------------------------------- statistics


def auroc(scores: list[float] | torch.Tensor, labels: list[bool] | torch.Tensor) -> float | None:
    """Area under the ROC curve of ``scores`` for the positive ``labels`` (Mann–Whitney U / (n⁺ n⁻)).

    ``AUROC = P(s⁺ > s⁻) + ½ P(s⁺ = s⁻)`` for a random positive and negative; computed from average
    ranks (ties share their mean rank), O(n log n). None when either class is empty.
    """
    s = torch.as_tensor(scores, dtype=torch.float64).flatten()
    y = torch.as_tensor(labels).flatten().bool()
    if s.shape != y.shape:
        raise ValueError(f"auroc: {s.numel()} scores but {y.numel()} labels; pass one label per score")
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    if not bool(torch.isfinite(s).all()):
        raise ValueError("auroc: scores contain NaN or inf; drop those rows first")
    order = torch.argsort(s, stable=True)
    sorted_s = s[order]
    ranks_sorted = torch.empty_like(sorted_s)
    # average rank of each run of equal scores (ranks are 1-based)
    _, counts = torch.unique_consecutive(sorted_s, return_counts=True)
    ends = torch.cumsum(counts, 0).double()
    starts = ends - counts.double() + 1
    ranks_sorted = torch.repeat_interleave((starts + ends) / 2, counts)
    ranks = torch.empty_like(ranks_sorted)
    ranks[order] = ranks_sorted
    u = float(ranks[y].sum()) - n_pos * (n_pos + 1) / 2
    return u / (n_pos * n_neg)


def _mean_se(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and standard error (sample std / sqrt(n); 0 for n = 1); (None, None) for no values."""
    n = len(values)
    if n == 0:
        return None, None
    m = sum(values) / n
    if n == 1:
        return m, 0.0
    var = sum((v - m) ** 2 for v in values) / (n - 1)
    return m, math.sqrt(var / n)


# --------------------------------------------------------------------------------------------- verdict


@dataclass
class Evidence:
    """The measured figures the verdict depends on (None = not measured)."""

    tokenizer_compatible: bool = True
    tokenizer_error: str | None = None
    template_differs: bool = False
    """The student's and the teacher's chat templates render the test conversation to different ids."""
    stop_ids_differ: bool = False
    overlap_ratio: float | None = None
    overlap_mass_student: float | None = None
    overlap_mass_teacher: float | None = None
    overlap_adv: float | None = None
    entropy_gap: float | None = None
    first_token_entropy_student: float | None = None
    first_token_entropy_teacher: float | None = None
    reward_abs_mean: float | None = None
    stop_reward: float | None = None
    accuracy_student: float | None = None
    accuracy_teacher: float | None = None
    accuracy_gap_se: float | None = None
    continuation_advantage: float | None = None
    continuation_advantage_se: float | None = None
    truncated_frac: float | None = None
    """Fraction of the student's rollouts that hit max_new_tokens."""
    eval_truncated_frac: float | None = None
    """Largest fraction (student or teacher) of the accuracy-check responses that hit max_new_tokens."""
    max_new_tokens: int | None = None
    """The response length cap the evidence was measured with (quoted in the truncation reason)."""

    @property
    def accuracy_gap(self) -> float | None:
        if self.accuracy_student is None or self.accuracy_teacher is None:
            return None
        return self.accuracy_teacher - self.accuracy_student

    @property
    def overlap_mass(self) -> float | None:
        masses = [m for m in (self.overlap_mass_student, self.overlap_mass_teacher) if m is not None]
        return min(masses) if masses else None


@dataclass
class Check:
    """One thresholded finding: ``value op threshold`` → ``passed`` (None when not measured)."""

    id: str
    condition: str  # "tokenizer", "i", "ii" or "template"
    description: str
    value: float | bool | None
    op: str
    threshold: float | bool | None
    passed: bool | None


@dataclass
class Verdict:
    verdict: str
    reasons: list[str]
    remedies: list[str]
    flags: list[str]
    checks: list[Check]


def _cmp(value: float | None, op: str, threshold: float) -> bool | None:
    if value is None:
        return None
    return value >= threshold if op == ">=" else value <= threshold


def _fmt(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}g}"


def decide(ev: Evidence, th: DiagnoseThresholds | None = None) -> Verdict:
    """The verdict from the measurements alone (rules: module docstring; thresholds: ``th``), then the
    truncation rule: when most responses hit max_new_tokens the evidence is truncated, a no-go (other
    than a tokenizer mismatch, which lengths cannot change) becomes ``inconclusive``, and every verdict
    says so and recommends a larger cap. Truncated evidence misleads both ways: cut-off answers grade as
    wrong for both models, and the first few tokens (often boilerplate both models agree on) can show
    a near-zero reward for a teacher that differs later."""
    th = th or DiagnoseThresholds()
    v = _decide_untruncated(ev, th)
    if not ev.tokenizer_compatible:
        return v
    fracs = [f for f in (ev.truncated_frac, ev.eval_truncated_frac) if f is not None]
    worst = max(fracs) if fracs else None
    passed = _cmp(worst, "<=", th.truncated_frac_max)
    v.checks.append(
        Check(
            "truncation",
            "evidence",
            "largest fraction of responses cut at max_new_tokens (rollouts, accuracy check)",
            worst,
            "<=",
            th.truncated_frac_max,
            passed,
        )
    )
    if passed is not False:
        return v
    cap = f"max_new_tokens={ev.max_new_tokens}" if ev.max_new_tokens else "max_new_tokens"
    parts = []
    if ev.truncated_frac is not None:
        parts.append(f"{ev.truncated_frac:.0%} of the student's rollouts")
    if ev.eval_truncated_frac is not None:
        parts.append(f"up to {ev.eval_truncated_frac:.0%} of the accuracy-check responses")
    note = (
        f"The evidence is truncated: {' and '.join(parts)} hit {cap} before finishing (max "
        f"{th.truncated_frac_max:.0%}): answers are cut off before they can be graded and the reward is "
        "seen only on the first tokens, so these figures can understate both models and the teacher's "
        "difference. Rerun with a larger "
        f"max_new_tokens (e.g. {4 * ev.max_new_tokens if ev.max_new_tokens else 'several times the current one'})."
    )
    v.flags.append(FLAG_TRUNCATED)
    if v.verdict == "no-go":
        return Verdict(
            "inconclusive",
            [note, "Without truncation this would read: " + " ".join(v.reasons)],
            [REMEDY_LONGER],
            v.flags,
            v.checks,
        )
    v.reasons.append(note)
    if v.verdict == "go-after-remedy":
        v.remedies.append(REMEDY_LONGER)
    return v


def _decide_untruncated(ev: Evidence, th: DiagnoseThresholds) -> Verdict:
    """The verdict rules of the module docstring, ignoring truncation."""
    checks: list[Check] = []

    def add(cid, cond, desc, value, op, threshold) -> bool | None:
        passed = _cmp(value, op, threshold) if op in (">=", "<=") else value
        checks.append(Check(cid, cond, desc, value, op, threshold, passed))
        return passed

    add(
        "tokenizer",
        "tokenizer",
        "same token ids (opd.models.check_compatibility)",
        ev.tokenizer_compatible,
        "==",
        True,
    )
    if not ev.tokenizer_compatible:
        return Verdict(
            "no-go",
            [
                "The tokenizers are incompatible, so the teacher cannot score the student's tokens: "
                + (ev.tokenizer_error or "token ids differ")
            ],
            [],
            [FLAG_TOKENIZER],
            checks,
        )

    # --- condition (i) and the template check
    c_ratio = add(
        "overlap_ratio",
        "i",
        "top-k overlap ratio E|I_t|/k (Eq. 6)",
        ev.overlap_ratio,
        ">=",
        th.overlap_ratio_min,
    )
    c_mass = add(
        "overlap_mass", "i", "min(student, teacher) mass on I_t", ev.overlap_mass, ">=", th.overlap_mass_min
    )
    c_adv = add(
        "overlap_adv", "i", "Eq. 7 overlap advantage (<= 0)", ev.overlap_adv, ">=", th.overlap_adv_min
    )
    c_gap = add(
        "entropy_gap", "i", "entropy gap E|H(q_t) - H(p_t)| (nats)", ev.entropy_gap, "<=", th.entropy_gap_max
    )
    compatible = all(c is not False for c in (c_ratio, c_mass, c_adv, c_gap))
    c_tmpl = add(
        "chat_template",
        "template",
        "both chat templates render the same ids",
        not ev.template_differs,
        "==",
        True,
    )
    c_stop = add(
        "stop_reward",
        "template",
        "reward at the student's stop token (nats)",
        ev.stop_reward,
        ">=",
        th.stop_reward_min,
    )
    template_ok = c_tmpl is not False and c_stop is not False

    # --- condition (ii)
    c_signal = add(
        "reward_size",
        "ii",
        "mean |log q - log p| per sampled token (nats)",
        ev.reward_abs_mean,
        ">=",
        th.reward_abs_min,
    )
    acc_thr = max(th.accuracy_gap_min, th.significance_z * (ev.accuracy_gap_se or 0.0))
    c_acc = add("accuracy_gap", "ii", "teacher - student accuracy", ev.accuracy_gap, ">=", acc_thr)
    cont_thr = max(th.continuation_advantage_min, th.significance_z * (ev.continuation_advantage_se or 0.0))
    c_cont = add(
        "continuation_advantage",
        "ii",
        "teacher - student accuracy completing the student's prefixes",
        ev.continuation_advantage,
        ">=",
        cont_thr,
    )

    reasons: list[str] = []
    remedies: list[str] = []
    flags: list[str] = []
    cond_i_text = (
        f"overlap ratio {_fmt(ev.overlap_ratio)} (min {th.overlap_ratio_min}), overlap mass "
        f"{_fmt(ev.overlap_mass)} (min {th.overlap_mass_min}), Eq. 7 advantage {_fmt(ev.overlap_adv)} "
        f"(min {th.overlap_adv_min}), entropy gap {_fmt(ev.entropy_gap)} (max {th.entropy_gap_max})"
    )
    cap_text = (
        f"accuracy gap {_fmt(ev.accuracy_gap)} ± {_fmt(ev.accuracy_gap_se, 2)} (teacher "
        f"{_fmt(ev.accuracy_teacher)} vs student {_fmt(ev.accuracy_student)}; min {_fmt(acc_thr, 2)}), "
        f"continuation advantage {_fmt(ev.continuation_advantage)} ± {_fmt(ev.continuation_advantage_se, 2)} "
        f"(min {_fmt(cont_thr, 2)})"
    )

    if c_signal is False:
        flags.append(FLAG_NO_SIGNAL)
        return Verdict(
            "no-go",
            [
                f"The teacher's log-probs on the student's own tokens differ by only {_fmt(ev.reward_abs_mean)} nats "
                f"per token on average (min {th.reward_abs_min}): the per-token reward is ~0, so OPD has nothing "
                "to optimise (the teacher's distribution equals the student's)."
            ],
            [],
            flags,
            checks,
        )

    measured = c_acc is not None or c_cont is not None
    if measured:
        if c_acc is not True and c_cont is not True:
            flags.append(FLAG_LITTLE_NEW)
            return Verdict(
                "no-go",
                [
                    "The teacher adds nothing the student can learn: it is not more accurate than the student, "
                    f"neither from the prompt nor from the student's own prefixes ({cap_text}).",
                    f"Condition (i) for context: {cond_i_text}.",
                ],
                [],
                flags,
                checks,
            )
        if c_cont is False and compatible:
            flags.append(FLAG_LITTLE_NEW)
            return Verdict(
                "no-go",
                [
                    "The teacher scores higher from the prompt but not from the student's own prefixes, while it "
                    f"already agrees with the student token by token ({cond_i_text}); from the student's view it "
                    f"brings little new capability ({cap_text}).",
                ],
                [],
                flags,
                checks,
            )
    else:
        flags.append(FLAG_UNMEASURED)

    if compatible and template_ok:
        reasons.append(f"Condition (i) holds: {cond_i_text}.")
        if measured:
            reasons.append(f"Condition (ii) holds: the teacher brings new capability ({cap_text}).")
        else:
            reasons.append(
                "Condition (ii) is unmeasured: the prompts carry no answers, so accuracy and the continuation "
                f"advantage could not be checked (mean |reward| {_fmt(ev.reward_abs_mean)} nats/token shows the "
                "teacher does differ from the student). Add answers to confirm the teacher is more capable."
            )
        return Verdict("go", reasons, [], flags, checks)

    # something to teach, but condition (i) or the template check fails → name the remedy
    if measured:
        reasons.append(f"The teacher has something to teach ({cap_text}).")
    if not template_ok:
        flags.append(FLAG_TEMPLATE)
        remedies.append(REMEDY_TEMPLATE)
        if c_tmpl is False:
            reasons.append(
                "The student's and the teacher's chat templates render the same conversation to different tokens; "
                "during OPD the teacher scores the student's rendering, a format it was not post-trained on."
            )
        if c_stop is False:
            reasons.append(
                f"The teacher rejects the student's end of turn: mean reward at the stop token {_fmt(ev.stop_reward)} "
                f"nats (min {th.stop_reward_min}); every rollout ends on a poisoned reward."
            )
    if not compatible:
        flags.append(FLAG_INCOMPATIBLE_PATTERN)
        reasons.append(f"Condition (i) fails, the thinking patterns are not compatible: {cond_i_text}.")
        excess = None
        if ev.first_token_entropy_teacher is not None and ev.first_token_entropy_student is not None:
            excess = ev.first_token_entropy_teacher - ev.first_token_entropy_student
        if excess is not None and excess >= th.first_token_entropy_excess:
            remedies.append(REMEDY_PROMPTS)
            reasons.append(
                f"At the first response token the teacher is less certain than the student by {_fmt(excess)} nats "
                f"(threshold {th.first_token_entropy_excess}): the prompts are off the teacher's distribution; use "
                "the teacher's own post-training prompts (mixed with out-of-distribution ones)."
            )
        else:
            remedies.append(REMEDY_COLD_START)
            reasons.append(
                "The teacher is confident on these prompts but disagrees with the student's way of solving them: "
                "SFT the student on teacher responses first (off-policy cold start), then run OPD."
            )
    if not measured:
        reasons.append("Condition (ii) is unmeasured: the prompts carry no answers.")
    return Verdict("go-after-remedy", reasons, remedies, flags, checks)


# -------------------------------------------------------------------------------------------- pipeline


def _progress(cfg: DiagnoseConfig, total: int, desc: str, unit: str = "seq"):
    from opd.tracking import progress

    return progress(total=total, desc=desc, enabled=cfg.progress, unit=unit)


def template_check(
    student_tok, teacher_tok, user_text: str, assistant_text: str, cfg: DiagnoseConfig
) -> dict:
    """Render one conversation with both chat templates and diff the tokens; compare stop tokens."""
    from opd.rollout import stop_token_ids

    conv = [{"role": "user", "content": user_text}, {"role": "assistant", "content": assistant_text}]
    out: dict[str, Any] = {"conversation": conv, "use_chat_template": cfg.use_chat_template}
    renders: dict[str, list[int] | None] = {}
    for who, tok in (("student", student_tok), ("teacher", teacher_tok)):
        info: dict[str, Any] = {"has_chat_template": bool(getattr(tok, "chat_template", None))}
        ids = None
        if info["has_chat_template"]:
            try:
                text = tok.apply_chat_template(conv, tokenize=False, **cfg.chat_template_kwargs)
                ids = tok.encode(text, add_special_tokens=False)
                info["rendered"] = text
            except Exception as e:  # a template may reject the roles; report, do not crash the diagnosis
                info["error"] = f"{type(e).__name__}: {e}"
        try:
            stops = stop_token_ids(tok)
        except ValueError as e:
            stops, info["stop_error"] = [], str(e)
        info["stop_token_ids"] = stops
        info["stop_tokens"] = tok.convert_ids_to_tokens(stops) if stops else []
        info["eos_token"] = tok.eos_token
        info["num_tokens"] = None if ids is None else len(ids)
        renders[who] = ids
        out[who] = info
    s_ids, t_ids = renders["student"], renders["teacher"]
    out["same_render"] = s_ids is not None and s_ids == t_ids
    both_missing = not out["student"]["has_chat_template"] and not out["teacher"]["has_chat_template"]
    out["template_differs"] = bool(cfg.use_chat_template and not both_missing and not out["same_render"])
    out["stop_ids_differ"] = set(out["student"]["stop_token_ids"]) != set(out["teacher"]["stop_token_ids"])
    # the same text through both tokenizers (ids must agree for OPD)
    probe = out["student"].get("rendered") or (user_text + "\n" + assistant_text)
    out["same_tokenization"] = student_tok.encode(probe, add_special_tokens=False) == teacher_tok.encode(
        probe, add_special_tokens=False
    )
    diff = []
    if s_ids is not None and t_ids is not None and s_ids != t_ids:
        s_toks = student_tok.convert_ids_to_tokens(s_ids)
        t_toks = teacher_tok.convert_ids_to_tokens(t_ids)
        for op, i1, i2, j1, j2 in difflib.SequenceMatcher(None, s_toks, t_toks, autojunk=False).get_opcodes():
            if op != "equal":
                diff.append(
                    {
                        "op": op,
                        "student_at": i1,
                        "student": s_toks[i1:i2][:24],
                        "teacher_at": j1,
                        "teacher": t_toks[j1:j2][:24],
                    }
                )
            if len(diff) >= 20:
                break
    out["token_diff"] = diff
    return out


def _generate(
    model, tokenizer, stop_ids, prompt_ids, cfg, *, n, temperature, max_new_tokens, seed, vocab_limit, desc
):
    """Batches of ``HFGenerateBackend.generate`` with a progress bar; returns per-row response ids, truncation."""
    from opd.rollout import HFGenerateBackend

    backend = HFGenerateBackend(
        model, tokenizer, stop_ids, batch_size=cfg.batch_size, vocab_limit=vocab_limit
    )
    per_call = max(1, cfg.batch_size // (1 if temperature == 0 else n))
    responses: list[list[int]] = []
    truncated: list[bool] = []
    generated = 0
    with _progress(cfg, len(prompt_ids) * n, desc) as bar:
        for lo in range(0, len(prompt_ids), per_call):
            chunk = prompt_ids[lo : lo + per_call]
            batch = backend.generate(
                chunk,
                n=n,
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                top_p=1.0,
                top_k=0,
                seed=seed + lo,
            )
            for row in range(batch.input_ids_B_T.shape[0]):
                ids = batch.input_ids_B_T[row][batch.response_mask_B_T[row] > 0].tolist()
                responses.append(ids)
                truncated.append(bool(batch.truncated_B[row]))
                generated += len(ids)
            bar.update(len(chunk) * n)
    return responses, truncated, generated


def _rollouts(student, tok, stop_ids, prompt_ids, cfg: DiagnoseConfig, vocab_limit: int):
    """``cfg.rollouts`` student samples per prompt as one RolloutBatch (rows prompt-major), generated in
    calls of about ``batch_size`` rows (a progress bar per call) and merged into the common layout."""
    from opd.rollout import HFGenerateBackend, RolloutBatch

    backend = HFGenerateBackend(student, tok, stop_ids, batch_size=cfg.batch_size, vocab_limit=vocab_limit)
    per_call = max(1, cfg.batch_size // cfg.rollouts)
    parts = []
    with _progress(cfg, len(prompt_ids) * cfg.rollouts, "rollouts") as bar:
        for lo in range(0, len(prompt_ids), per_call):
            b = backend.generate(
                prompt_ids[lo : lo + per_call],
                n=cfg.rollouts,
                max_new_tokens=cfg.max_new_tokens,
                temperature=cfg.temperature,
                top_p=1.0,
                top_k=0,
                seed=cfg.seed + lo,
            )
            parts.append((lo, b))
            bar.update(b.input_ids_B_T.shape[0])
    # merge: left-pad every part to the longest prompt, right-pad to the longest response
    P = max(b.prompt_len for _, b in parts)
    R = max(b.input_ids_B_T.shape[1] - b.prompt_len for _, b in parts)
    pad = backend.pad_token_id
    ids, att, resp = [], [], []
    for _, b in parts:
        left, right = P - b.prompt_len, R - (b.input_ids_B_T.shape[1] - b.prompt_len)
        ids.append(torch.nn.functional.pad(b.input_ids_B_T, (left, right), value=pad))
        att.append(torch.nn.functional.pad(b.attention_mask_B_T, (left, right), value=0))
        resp.append(torch.nn.functional.pad(b.response_mask_B_T, (left, right), value=0.0))
    return RolloutBatch(
        input_ids_B_T=torch.cat(ids),
        attention_mask_B_T=torch.cat(att),
        response_mask_B_T=torch.cat(resp),
        prompt_len=P,
        prompt_index_B=torch.cat([b.prompt_index_B + lo for lo, b in parts]),
        truncated_B=torch.cat([b.truncated_B for _, b in parts]),
    )


def _grade_rows(tokenizer, responses: list[list[int]], answers: list[str | None]) -> list[bool | None]:
    from opd.grading import grade

    out: list[bool | None] = []
    for ids, ans in zip(responses, answers, strict=True):
        out.append(None if ans is None else bool(grade(tokenizer.decode(ids, skip_special_tokens=True), ans)))
    return out


def _score_rollouts(student, teacher, batch, cfg: DiagnoseConfig, vocab_limit: int):
    """Student and teacher ScoreOutputs of the rollout batch (no grad), in micro-batches of batch_size."""
    from opd.scoring import ScoreOutput, score

    parts_s, parts_t = [], []
    B = batch.input_ids_B_T.shape[0]
    with torch.no_grad(), _progress(cfg, B, "score") as bar:
        for lo in range(0, B, cfg.batch_size):
            mb = batch.select(slice(lo, lo + cfg.batch_size))
            args = (mb.input_ids_B_T, mb.attention_mask_B_T, mb.response_mask_B_T.long())
            s = score(
                student,
                *args,
                temperature=cfg.temperature,  # the distribution the rollouts were sampled from
                top_k=cfg.top_k,
                entropy=True,
                chunk_size=cfg.score_chunk_size,
                vocab_limit=vocab_limit,
            )
            t = score(
                teacher,
                *args,
                temperature=cfg.teacher_temperature,
                top_k=cfg.top_k,
                given_ids_B_T_K=s.topk_ids_B_T_K,
                entropy=True,
                chunk_size=cfg.score_chunk_size,
                vocab_limit=vocab_limit,
            )
            parts_s.append(s)
            parts_t.append(t)
            bar.update(mb.input_ids_B_T.shape[0])

    def cat(parts):
        return ScoreOutput(
            **{
                k: None if getattr(parts[0], k) is None else torch.cat([getattr(p, k) for p in parts])
                for k in ScoreOutput.__dataclass_fields__
            }
        )

    return cat(parts_s), cat(parts_t)


def _profile(values_B_T, mask_B_T, bin_size, positions_B_T) -> dict[str, list]:
    from opd.metrics import position_profile

    starts, means, counts = position_profile(values_B_T, mask_B_T, bin_size, positions_B_T)
    return {"start": starts.tolist(), "mean": [float(x) for x in means], "count": counts.tolist()}


def _quantiles(x: torch.Tensor) -> dict[str, float]:
    if x.numel() == 0:
        return {}
    qs = torch.quantile(x.double(), torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95], dtype=torch.float64))
    return {f"p{int(q * 100):02d}": float(v) for q, v in zip((0.05, 0.25, 0.5, 0.75, 0.95), qs)}


def _reward_stats(r_N: torch.Tensor) -> dict[str, float]:
    if r_N.numel() == 0:
        return {}
    r = r_N.double()
    return {
        "mean": float(r.mean()),
        "std": float(r.std()) if r.numel() > 1 else 0.0,
        "abs_mean": float(r.abs().mean()),
        "frac_positive": float((r > 0).double().mean()),
        **_quantiles(r),
    }


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, torch.Tensor):
        return _jsonable(x.tolist())
    return x


def diagnose(config: DiagnoseConfig) -> dict[str, Any]:
    """Run the pre-flight diagnosis (module docstring) and write the three report files.

    Returns the content of ``diagnosis.json``: ``verdict``, ``reasons``, ``remedies``, ``flags``,
    ``checks``, the measured figures (``tokenizer``, ``rollouts``, ``condition_i``, ``condition_ii``,
    ``context``), ``cost`` and ``config``.
    """
    from opd.rundir import locked_run_dir

    config.check_runnable()
    threads = torch.get_num_threads()
    try:
        models = {"student": config.student, "teacher": config.teacher}
        with locked_run_dir(config.out_dir, models=models, data={"prompts": config.prompts}, key="out_dir"):
            return _run(config)
    finally:
        torch.set_num_threads(threads)


TINY_MODEL_PARAMS = 10_000_000
"""Below this many parameters (both models), ``threads = 0`` runs torch with one CPU thread."""


def _run(cfg: DiagnoseConfig) -> dict[str, Any]:
    from opd.config import to_dict
    from opd.data import load_prompts
    from opd.models import (
        TokenizerMismatchError,
        check_compatibility,
        load_model,
        load_tokenizer,
        prompt_token_cap,
    )
    from opd.rollout import stop_token_ids

    t_start = time.perf_counter()
    seconds: dict[str, float] = {}
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    def lap(name: str, t0: float) -> float:
        seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - t0
        return time.perf_counter()

    t0 = time.perf_counter()
    tok = load_tokenizer(cfg.student, trust_remote_code=cfg.trust_remote_code)
    teacher_tok = load_tokenizer(cfg.teacher, trust_remote_code=cfg.trust_remote_code)
    student = load_model(cfg.student, dtype=cfg.student_dtype, trust_remote_code=cfg.trust_remote_code)
    teacher = load_model(cfg.teacher, dtype=cfg.teacher_dtype, trust_remote_code=cfg.trust_remote_code)
    student.eval()
    teacher.eval()
    n_params = max(sum(p.numel() for p in m.parameters()) for m in (student, teacher))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    elif n_params < TINY_MODEL_PARAMS and next(student.parameters()).device.type == "cpu":
        torch.set_num_threads(1)
    t0 = lap("load", t0)

    result: dict[str, Any] = {"config": to_dict(cfg) | {"thresholds": dataclasses.asdict(cfg.thresholds)}}
    result["config"].pop("prefix_fractions")
    result["config"]["prefix_fractions"] = list(cfg.prefix_fractions)
    ev = Evidence()
    try:
        compat = check_compatibility(tok, teacher_tok, student, teacher)
    except TokenizerMismatchError as e:
        ev.tokenizer_compatible, ev.tokenizer_error = False, str(e)
        result["tokenizer"] = {"compatible": False, "error": str(e)}
        return _finish(result, ev, cfg, seconds, t_start, out_dir, cost={})
    vocab_limit = compat.vocab_limit
    max_prompt_tokens, cap_why = prompt_token_cap(cfg.max_prompt_tokens, cfg.max_new_tokens, student, teacher)

    prompts = load_prompts(
        cfg.prompts,
        tok,
        prompt_field=cfg.prompt_field,
        answer_field=cfg.answer_field,
        prompt_template=cfg.prompt_template,
        use_chat_template=cfg.use_chat_template,
        chat_template_kwargs=cfg.chat_template_kwargs,
        max_prompt_tokens=max_prompt_tokens,
        limit=cfg.num_prompts,
        seed=cfg.seed,
        max_prompt_tokens_why=cap_why,
    )
    examples = prompts.examples
    N, R, M = len(examples), cfg.rollouts, cfg.max_new_tokens
    has_answers = any(e.answer is not None for e in examples)
    s_stop, t_stop = stop_token_ids(tok), stop_token_ids(teacher_tok)
    t0 = lap("load", t0)

    # -- student rollouts (what OPD step 0 samples)
    batch = _rollouts(student, tok, s_stop, [e.input_ids for e in examples], cfg, vocab_limit)
    mask_B_T = batch.response_mask_B_T > 0
    resp_ids = [batch.input_ids_B_T[b][mask_B_T[b]].tolist() for b in range(batch.input_ids_B_T.shape[0])]
    rollout_correct = _grade_rows(tok, resp_ids, [examples[int(p)].answer for p in batch.prompt_index_B])
    t0 = lap("rollouts", t0)

    # -- tokenizer / template / EOS check on one conversation: the first prompt and its first rollout
    tmpl = template_check(
        tok, teacher_tok, examples[0].text, tok.decode(resp_ids[0], skip_special_tokens=True), cfg
    )
    tmpl["compatible"] = True
    tmpl["compat_warnings"] = compat.warnings
    tmpl["vocab_limit"] = vocab_limit
    ev.template_differs, ev.stop_ids_differ = tmpl["template_differs"], tmpl["stop_ids_differ"]
    result["tokenizer"] = tmpl

    # -- scoring by both models
    s_out, t_out = _score_rollouts(student, teacher, batch, cfg, vocab_limit)
    t0 = lap("scoring", t0)
    cond_i, rewards = _condition_i(s_out, t_out, batch, mask_B_T, s_stop, cfg, ev)
    result["rollouts"] = {
        "num": len(resp_ids),
        "prompts": N,
        "per_prompt": R,
        "length_mean": float(batch.response_lengths_B.float().mean()),
        "truncated_frac": float(batch.truncated_B.float().mean()),
        "student_sampled_accuracy": None
        if not has_answers
        else _mean([c for c in rollout_correct if c is not None]),
    }
    result["condition_i"] = cond_i
    ev.truncated_frac, ev.max_new_tokens = result["rollouts"]["truncated_frac"], cfg.max_new_tokens

    # -- condition (ii): accuracy and teacher continuation advantage
    cond_ii: dict[str, Any] = {"has_answers": has_answers, "reward": rewards["stats"]}
    gen_tokens = {
        "student_rollouts": sum(len(r) for r in resp_ids),
        "student_eval": 0,
        "teacher_eval": 0,
        "student_continuations": 0,
        "teacher_continuations": 0,
    }
    if has_answers:
        cond_ii["accuracy"], n_s, n_t = _accuracy(
            student, teacher, tok, teacher_tok, s_stop, t_stop, examples, cfg, vocab_limit, ev
        )
        gen_tokens["student_eval"], gen_tokens["teacher_eval"] = n_s, n_t
        t0 = lap("accuracy", t0)
        cond_ii["continuation"], n_s, n_t = _continuations(
            student,
            teacher,
            tok,
            teacher_tok,
            s_stop,
            t_stop,
            examples,
            batch,
            resp_ids,
            cfg,
            vocab_limit,
            ev,
        )
        gen_tokens["student_continuations"], gen_tokens["teacher_continuations"] = n_s, n_t
        t0 = lap("continuations", t0)
    result["condition_ii"] = cond_ii

    # -- context: AUROC of the sequence-mean reward against the rollouts' correctness
    ctx: dict[str, Any] = {}
    if has_answers:
        labels = [bool(c) for c in rollout_correct]
        ctx["auroc_sampled_token"] = auroc(rewards["seq_sampled"], labels)
        ctx["auroc_topk"] = auroc(rewards["seq_topk"], labels)
        ctx["num_correct"], ctx["num_wrong"] = sum(labels), len(labels) - sum(labels)
        ctx["note"] = (
            "docs/paper.md §5: about 0.73-0.75 for working and failing teachers alike; context only."
        )
    ctx["seq_mean_reward"] = rewards["seq_sampled"]
    ctx["rollout_correct"] = rollout_correct
    result["context"] = ctx

    n_seq = len(resp_ids)
    cost = {
        "generated_tokens": gen_tokens | {"total": sum(gen_tokens.values())},
        "scored_sequences": {"student": n_seq, "teacher": n_seq},
        "scored_tokens": {
            "student": int(batch.attention_mask_B_T.sum()),
            "teacher": int(batch.attention_mask_B_T.sum()),
        },
        "bound_generated_tokens": N * M * (R + 2 * _eval_n(cfg) * (1 + len(cfg.prefix_fractions)))
        if has_answers
        else N * M * R,
    }
    return _finish(result, ev, cfg, seconds, t_start, out_dir, cost=cost)


def _mean(xs: list) -> float | None:
    return sum(float(x) for x in xs) / len(xs) if xs else None


def _eval_n(cfg: DiagnoseConfig) -> int:
    return 1 if cfg.eval_temperature == 0 else cfg.eval_samples


def _condition_i(s_out, t_out, batch, mask_B_T, stop_ids, cfg: DiagnoseConfig, ev: Evidence):
    """Mechanism metrics, position profiles and rewards of the scored rollouts (fills ``ev``)."""
    from opd.metrics import mechanism_metrics, mechanism_tensors

    args = (
        s_out.topk_ids_B_T_K,
        s_out.topk_logp_B_T_K,
        t_out.topk_ids_B_T_K,
        t_out.given_logp_B_T_K,
        s_out.entropy_B_T,
        t_out.entropy_B_T,
        mask_B_T,
    )
    mt = mechanism_tensors(*args)
    mech = mechanism_metrics(*args, position_chunk=None)
    pos, bin_size = mt.position_B_T, cfg.bin_size(int(mask_B_T.sum(-1).max()))

    r_B_T = torch.where(mask_B_T, t_out.token_logp_B_T - s_out.token_logp_B_T, 0.0)
    w_B_T_K = torch.softmax(s_out.topk_logp_B_T_K, dim=-1)
    rk_B_T = torch.where(mask_B_T, (w_B_T_K * (t_out.given_logp_B_T_K - s_out.topk_logp_B_T_K)).sum(-1), 0.0)
    n_B = mask_B_T.sum(-1).clamp(min=1)
    seq_sampled = (r_B_T.sum(-1) / n_B).tolist()
    seq_topk = (rk_B_T.sum(-1) / n_B).tolist()

    first = mask_B_T & (pos == 0)
    stop_B_T = (
        mask_B_T & torch.isin(batch.input_ids_B_T, torch.tensor(stop_ids)) & ~batch.truncated_B[:, None]
    )
    profile = {"bin_size": bin_size}
    for name, values, m in (
        ("overlap_ratio", mt.overlap_ratio_B_T, mask_B_T),
        ("overlap_mass_student", mt.mass_student_B_T, mask_B_T),
        ("overlap_mass_teacher", mt.mass_teacher_B_T, mask_B_T),
        ("overlap_adv", mt.overlap_adv_B_T, mt.adv_valid_B_T),
        ("entropy_student", mt.student_entropy_B_T, mask_B_T),
        ("entropy_teacher", mt.teacher_entropy_B_T, mask_B_T),
        ("entropy_gap", mt.entropy_gap_B_T, mask_B_T),
        ("reward", r_B_T, mask_B_T),
    ):
        profile[name] = _profile(values, m, bin_size, pos)

    def fmean(values, m):
        return float(values[m].double().mean()) if bool(m.any()) else None

    cond_i = {
        "k": cfg.top_k,
        "metrics": mech,
        "first_token": {
            "overlap_ratio": fmean(mt.overlap_ratio_B_T, first),
            "entropy_student": fmean(mt.student_entropy_B_T, first),
            "entropy_teacher": fmean(mt.teacher_entropy_B_T, first),
        },
        "stop_token": {
            "count": int(stop_B_T.sum()),
            "reward_mean": fmean(r_B_T, stop_B_T),
            "student_logp_mean": fmean(s_out.token_logp_B_T, stop_B_T),
            "teacher_logp_mean": fmean(t_out.token_logp_B_T, stop_B_T),
        },
        "profile": profile,
    }
    ev.overlap_ratio = mech.get("overlap/ratio")
    ev.overlap_mass_student = mech.get("overlap/mass_student")
    ev.overlap_mass_teacher = mech.get("overlap/mass_teacher")
    ev.overlap_adv = mech.get("overlap/adv")
    ev.entropy_gap = mech.get("entropy/gap")
    ev.first_token_entropy_student = cond_i["first_token"]["entropy_student"]
    ev.first_token_entropy_teacher = cond_i["first_token"]["entropy_teacher"]
    ev.stop_reward = cond_i["stop_token"]["reward_mean"]
    stats = {
        "sampled_token": _reward_stats(r_B_T[mask_B_T]),
        "topk": _reward_stats(rk_B_T[mask_B_T]),
        "seq_mean_sampled_token": _reward_stats(torch.tensor(seq_sampled)),
        "kl_estimate": float(-r_B_T[mask_B_T].double().mean()) if bool(mask_B_T.any()) else None,
    }
    ev.reward_abs_mean = stats["sampled_token"].get("abs_mean")
    r_N = r_B_T[mask_B_T].double()
    if r_N.numel():
        lo, hi = float(r_N.min()), float(r_N.max())
        hi = hi if hi > lo else lo + 1e-6
        counts = torch.histc(r_N, bins=50, min=lo, max=hi)
        stats["histogram"] = {"edges": torch.linspace(lo, hi, 51).tolist(), "counts": counts.long().tolist()}
    return cond_i, {"stats": stats, "seq_sampled": seq_sampled, "seq_topk": seq_topk}


def _accuracy(student, teacher, tok, teacher_tok, s_stop, t_stop, examples, cfg, vocab_limit, ev: Evidence):
    """Accuracy of both models on the prompts with answers (same prompt ids, decoding per eval_temperature)."""
    ex = [e for e in examples if e.answer is not None]
    n = _eval_n(cfg)
    answers = [e.answer for e in ex for _ in range(n)]
    res: dict[str, Any] = {"num_prompts": len(ex), "samples": n, "temperature": cfg.eval_temperature}
    per_prompt: dict[str, list[float]] = {}
    tokens = {}
    for who, model, stops, seed in (
        ("student", student, s_stop, cfg.seed + 1),
        ("teacher", teacher, t_stop, cfg.seed + 1),
    ):
        responses, truncated, generated = _generate(
            model,
            tok,
            stops,
            [e.input_ids for e in ex],
            cfg,
            n=n,
            temperature=cfg.eval_temperature,
            max_new_tokens=cfg.max_new_tokens,
            seed=seed,
            vocab_limit=vocab_limit,
            desc=f"accuracy {who}",
        )
        correct = _grade_rows(tok, responses, answers)
        per_prompt[who] = [sum(bool(c) for c in correct[i * n : (i + 1) * n]) / n for i in range(len(ex))]
        res[who] = {
            "accuracy": _mean(per_prompt[who]),
            "length_mean": _mean([len(r) for r in responses]),
            "truncated_frac": _mean(truncated),
        }
        tokens[who] = generated
    diffs = [t - s for s, t in zip(per_prompt["student"], per_prompt["teacher"])]
    gap, se = _mean_se(diffs)
    res["gap"], res["gap_se"] = gap, se
    ev.accuracy_student, ev.accuracy_teacher = res["student"]["accuracy"], res["teacher"]["accuracy"]
    ev.eval_truncated_frac = max(res[who]["truncated_frac"] or 0.0 for who in ("student", "teacher"))
    ev.accuracy_gap_se = se
    return res, tokens["student"], tokens["teacher"]


def _continuations(
    student, teacher, tok, teacher_tok, s_stop, t_stop, examples, batch, resp_ids, cfg, vocab_limit, ev
):
    """Teacher continuation advantage (docs/paper.md §5) on the first rollout of every prompt with an answer."""
    R = cfg.rollouts
    n = _eval_n(cfg)
    rows = [p * R for p, e in enumerate(examples) if e.answer is not None]
    res: dict[str, Any] = {
        "fractions": list(cfg.prefix_fractions),
        "rollouts": len(rows),
        "samples": n,
        "by_fraction": [],
    }
    if not rows or not cfg.prefix_fractions:
        return res, 0, 0
    items = []  # (fraction, prompt ids + prefix, answer, depth)
    stop_set = set(s_stop)
    for f in cfg.prefix_fractions:
        for b in rows:
            ids = resp_ids[b]
            content = ids[:-1] if ids and ids[-1] in stop_set else ids
            depth = int(round(f * len(content)))
            ex = examples[b // R]
            items.append((f, ex.input_ids + content[:depth], ex.answer, depth))
    # Both models get the budget the original rollout had: the continuation may add at most
    # max_new_tokens - depth tokens (one generate call per fraction, cut per item afterwards).
    per_item: dict[str, list[float]] = {"student": [0.0] * len(items), "teacher": [0.0] * len(items)}
    tokens = {"student": 0, "teacher": 0}
    for who, model, stops in (("student", student, s_stop), ("teacher", teacher, t_stop)):
        for f in cfg.prefix_fractions:
            idx = [i for i, it in enumerate(items) if it[0] == f]
            budget = max(1, cfg.max_new_tokens - min(items[i][3] for i in idx))
            responses, _, generated = _generate(
                model,
                tok,
                stops,
                [items[i][1] for i in idx],
                cfg,
                n=n,
                temperature=cfg.eval_temperature,
                max_new_tokens=budget,
                seed=cfg.seed + 2,
                vocab_limit=vocab_limit,
                desc=f"continue {who} @{f:g}",
            )
            tokens[who] += generated
            full, answers = [], []
            for j, r in enumerate(responses):
                _, ids, answer, depth = items[idx[j // n]]
                r = r[: max(1, cfg.max_new_tokens - depth)]
                full.append((ids[len(ids) - depth :] if depth else []) + r)
                answers.append(answer)
            correct = _grade_rows(tok, full, answers)
            for j, i in enumerate(idx):
                per_item[who][i] = sum(bool(c) for c in correct[j * n : (j + 1) * n]) / n
    all_diffs = []
    for f in cfg.prefix_fractions:
        idx = [i for i, it in enumerate(items) if it[0] == f]
        diffs = [per_item["teacher"][i] - per_item["student"][i] for i in idx]
        all_diffs += diffs
        adv, se = _mean_se(diffs)
        res["by_fraction"].append(
            {
                "fraction": f,
                "depth_mean": _mean([items[i][3] for i in idx]),
                "student_accuracy": _mean([per_item["student"][i] for i in idx]),
                "teacher_accuracy": _mean([per_item["teacher"][i] for i in idx]),
                "advantage": adv,
                "advantage_se": se,
            }
        )
    res["advantage"], res["advantage_se"] = _mean_se(all_diffs)
    ev.continuation_advantage, ev.continuation_advantage_se = res["advantage"], res["advantage_se"]
    return res, tokens["student"], tokens["teacher"]


# --------------------------------------------------------------------------------------------- reports


def _finish(
    result, ev: Evidence, cfg: DiagnoseConfig, seconds, t_start, out_dir: Path, *, cost
) -> dict[str, Any]:
    v = decide(ev, cfg.thresholds)
    seconds["total"] = time.perf_counter() - t_start
    head = {
        "verdict": v.verdict,
        "reasons": v.reasons,
        "remedies": v.remedies,
        "flags": v.flags,
        "checks": [dataclasses.asdict(c) for c in v.checks],
        "student": cfg.student,
        "teacher": cfg.teacher,
        "prompts": cfg.prompts,
    }
    result = _jsonable(
        head
        | result
        | {
            "evidence": dataclasses.asdict(ev),
            "cost": cost | {"seconds": seconds, "threads": torch.get_num_threads()},
        }
    )
    from opd.report import write_text_atomic

    write_text_atomic(out_dir / "diagnosis.json", json.dumps(result, indent=1) + "\n")
    write_text_atomic(out_dir / "diagnosis.md", render_markdown(result))
    write_html(out_dir / "diagnosis.html", result)
    log.info("diagnosis: %s (%s) -> %s", v.verdict, ", ".join(v.remedies) or "no remedy", out_dir)
    return result


# A report is a list of sections, each a list of blocks, rendered to markdown and to HTML from the same
# data: ("p", text) | ("list", [text]) | ("pre", text) | ("table", rows, headers) | ("plot", key).


def _check_rows(result) -> list[list]:
    from opd.report import format_cell

    rows = []
    for c in result["checks"]:
        status = "—" if c["passed"] is None else ("pass" if c["passed"] else "FAIL")
        thr = "" if c["threshold"] is None else f"{c['op']} {format_cell(c['threshold'], 3)}"
        rows.append([c["condition"], c["description"], c["value"], thr, status])
    return rows


def _report_sections(result: dict[str, Any]) -> list[tuple[str, list[tuple]]]:
    sections: list[tuple[str, list[tuple]]] = []
    sections.append(("Reasons", [("list", result["reasons"])]))
    sections.append(
        ("Checks", [("table", _check_rows(result), ["condition", "check", "value", "threshold", "result"])])
    )

    tk = result.get("tokenizer", {})
    blocks: list[tuple] = []
    if not tk.get("compatible", True):
        blocks.append(("p", f"Incompatible: {tk.get('error')}"))
    else:
        blocks.append(
            (
                "list",
                [
                    f"the conversation renders to the same ids with both chat templates: {tk.get('same_render')}",
                    f"the same text tokenises to the same ids with both tokenizers: {tk.get('same_tokenization')}",
                    f"student stop tokens: {tk['student']['stop_tokens']}; teacher stop tokens: "
                    f"{tk['teacher']['stop_tokens']}",
                ]
                + [f"warning: {w}" for w in tk.get("compat_warnings", [])],
            )
        )
        same = tk.get("same_render") and tk["student"].get("rendered")
        for who in ("student", "teacher"):
            if same and who == "teacher":
                continue
            if tk[who].get("rendered"):
                label = "both chat templates (identical)" if same else f"the {who}'s chat template"
                blocks += [("p", f"The test conversation rendered by {label}:"), ("pre", tk[who]["rendered"])]
            elif tk[who].get("error"):
                blocks.append(("p", f"The {who}'s chat template failed: {tk[who]['error']}"))
        if tk.get("token_diff"):
            blocks.append(("p", "Token diff of the two renderings (student -> teacher):"))
            blocks.append(
                (
                    "pre",
                    "\n".join(
                        f"{d['op']:>8} @{d['student_at']}/{d['teacher_at']}: {d['student']} -> {d['teacher']}"
                        for d in tk["token_diff"]
                    ),
                )
            )
    sections.append(("Tokenizer, chat template and EOS", blocks))

    ci = result.get("condition_i")
    if ci:
        m, ft, st = ci["metrics"], ci["first_token"], ci["stop_token"]
        names = [
            ("overlap/ratio", f"overlap ratio E|I_t|/k (Eq. 6), k = {ci['k']}"),
            ("overlap/mass_student", "student mass on I_t"),
            ("overlap/mass_teacher", "teacher mass on I_t"),
            ("overlap/adv", "Eq. 7 overlap advantage"),
            ("overlap/adv_verl", "verl overlap advantage"),
            ("entropy/student", "student entropy H(p) (nats)"),
            ("entropy/teacher", "teacher entropy H(q) (nats)"),
            ("entropy/gap", "entropy gap E|H(q)-H(p)|"),
            ("entropy/gap_of_means", "|E H(q) - E H(p)|"),
        ]
        rows = [[label, m.get(k)] for k, label in names] + [
            ["overlap ratio at the first response token", ft["overlap_ratio"]],
            ["student entropy at the first response token", ft["entropy_student"]],
            ["teacher entropy at the first response token", ft["entropy_teacher"]],
            [f"reward at the student's stop token ({st['count']} stops)", st["reward_mean"]],
        ]
        blocks = [("table", rows, ["metric", "value"]), ("plot", "profile")]
        prof = ci["profile"]
        keys = ["overlap_ratio", "overlap_mass_teacher", "overlap_adv", "entropy_student", "entropy_teacher"]
        keys += ["entropy_gap", "reward"]
        if prof["overlap_ratio"]["start"]:
            bs = prof["bin_size"]
            prow = []
            for i, s in enumerate(prof["overlap_ratio"]["start"]):
                row: list[Any] = [f"{s}-{s + bs}", prof["overlap_ratio"]["count"][i]]
                row += [dict(zip(prof[k]["start"], prof[k]["mean"])).get(s) for k in keys]
                prow.append(row)
            blocks += [("p", "By response position:"), ("table", prow, ["positions", "tokens", *keys])]
        sections.append(("Condition (i): compatible thinking patterns", blocks))

    ci2 = result.get("condition_ii")
    if ci2:
        blocks = []
        acc = ci2.get("accuracy")
        if acc:
            dec = "greedy" if acc["temperature"] == 0 else f"T = {acc['temperature']}, avg@{acc['samples']}"
            rows = [
                [who, acc[who]["accuracy"], acc[who]["length_mean"], acc[who]["truncated_frac"]]
                for who in ("student", "teacher")
            ]
            blocks += [
                ("p", f"Accuracy on {acc['num_prompts']} prompts ({dec}, the student's prompt rendering):"),
                ("table", rows, ["model", "accuracy", "mean length", "truncated"]),
                (
                    "p",
                    f"Gap (teacher - student): {_fmt(acc['gap'])} ± {_fmt(acc['gap_se'], 2)} (paired s.e.).",
                ),
            ]
        cont = ci2.get("continuation") or {}
        if cont.get("by_fraction"):
            rows = [
                [
                    c["fraction"],
                    c["depth_mean"],
                    c["student_accuracy"],
                    c["teacher_accuracy"],
                    c["advantage"],
                    c["advantage_se"],
                ]
                for c in cont["by_fraction"]
            ]
            blocks += [
                (
                    "p",
                    f"Teacher continuation advantage: the first rollout of {cont['rollouts']} prompts is cut after "
                    "each fraction of its response tokens, and both models complete the same prefix:",
                ),
                ("table", rows, ["fraction", "prefix tokens", "student", "teacher", "advantage", "s.e."]),
                ("p", f"Mean advantage: {_fmt(cont['advantage'])} ± {_fmt(cont['advantage_se'], 2)}."),
            ]
        if acc or cont:
            blocks.append(("plot", "accuracy"))
        if not ci2.get("has_answers"):
            blocks.append(
                ("p", "The prompts carry no answers: accuracy and continuation advantage are not measured.")
            )
        rew = ci2["reward"]
        rows = []
        for key, label in (
            ("sampled_token", "per token, sampled-token log q - log p"),
            ("topk", "per token, top-K (student support, student_p)"),
            ("seq_mean_sampled_token", "per rollout, mean sampled-token"),
        ):
            s = rew.get(key) or {}
            rows.append(
                [
                    label,
                    s.get("mean"),
                    s.get("std"),
                    s.get("abs_mean"),
                    s.get("p05"),
                    s.get("p50"),
                    s.get("p95"),
                ]
            )
        blocks += [
            (
                "p",
                f"Reward size and spread (nats); KL estimate E[log p - log q] = {_fmt(rew.get('kl_estimate'))}:",
            ),
            ("table", rows, ["reward", "mean", "std", "mean abs", "p05", "p50", "p95"]),
            ("plot", "reward"),
        ]
        sections.append(("Condition (ii): new capability", blocks))

    ctx = result.get("context") or {}
    if ctx.get("auroc_sampled_token") is not None or "num_correct" in ctx:
        sections.append(
            (
                "Context: reward vs correctness",
                [
                    (
                        "p",
                        "AUROC of the sequence-mean reward against the correctness of the student's rollouts: "
                        f"sampled-token {_fmt(ctx.get('auroc_sampled_token'))}, top-K {_fmt(ctx.get('auroc_topk'))} "
                        f"({ctx['num_correct']} correct, {ctx['num_wrong']} wrong). {ctx['note']}",
                    )
                ],
            )
        )
    cost = result.get("cost") or {}
    blocks = []
    if cost.get("generated_tokens"):
        blocks += [
            ("table", [[k, v] for k, v in cost["generated_tokens"].items()], ["generated tokens", "count"]),
            (
                "p",
                f"Scored sequences {cost['scored_sequences']}, scored tokens (prompt + response) "
                f"{cost['scored_tokens']}; bound on generated tokens {cost['bound_generated_tokens']}.",
            ),
        ]
    secs = cost.get("seconds", {})
    blocks.append(("p", "Time (s): " + ", ".join(f"{k} {v:.1f}" for k, v in secs.items())))
    sections.append(("Cost", blocks))
    return sections


def _header_lines(result: dict[str, Any]) -> tuple[str, list[str]]:
    remedy = f" — remedy: {', '.join(result['remedies'])}" if result["remedies"] else ""
    items = [
        f"student: {result['student']}",
        f"teacher: {result['teacher']}",
        f"prompts: {result['prompts']}",
    ]
    if result["flags"]:
        items.append(f"flags: {', '.join(result['flags'])}")
    ro = result.get("rollouts")
    if ro:
        items.append(
            f"{ro['num']} student rollouts ({ro['prompts']} prompts x {ro['per_prompt']}), mean length "
            f"{ro['length_mean']:.1f} tokens, truncated {ro['truncated_frac']:.1%}"
        )
    return remedy, items


def render_markdown(result: dict[str, Any]) -> str:
    """The markdown report of a diagnosis result (the dict ``diagnose`` returns); plots are in the HTML."""
    from opd.report import markdown_table

    remedy, items = _header_lines(result)
    lines = ["# OPD pre-flight diagnosis", "", f"**Verdict: `{result['verdict']}`**{remedy}", ""]
    lines += [f"- {i}" for i in items]
    for title, blocks in _report_sections(result):
        lines += ["", f"## {title}", ""]
        for b in blocks:
            if b[0] == "p":
                lines += [b[1], ""]
            elif b[0] == "list":
                lines += [f"- {x}" for x in b[1]] + [""]
            elif b[0] == "pre":
                lines += ["```", b[1], "```", ""]
            elif b[0] == "table":
                lines += [markdown_table(b[1], b[2])]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).rstrip() + "\n"


def write_html(path: str | Path, result: dict[str, Any]) -> Path:
    """The self-contained HTML report: the markdown report's content plus embedded plots."""
    from opd.report import (
        Section,
        html_figure,
        html_list,
        html_paragraph,
        html_pre,
        html_table,
        write_html_report,
    )

    plots = _plots(result)
    cls = {"go": "good", "go-after-remedy": "warn", "no-go": "bad", "inconclusive": "warn"}[result["verdict"]]
    remedy, items = _header_lines(result)
    intro = [f'<p><span class="badge {cls}">{result["verdict"]}</span> {html_paragraph(remedy)[3:-4]}</p>']
    intro.append(html_list(items))
    sections = []
    for title, blocks in _report_sections(result):
        out = []
        for b in blocks:
            if b[0] == "p":
                out.append(html_paragraph(b[1]))
            elif b[0] == "list":
                out.append(html_list(b[1]))
            elif b[0] == "pre":
                out.append(html_pre(b[1]))
            elif b[0] == "table":
                out.append(html_table(b[1], b[2]))
            elif b[0] == "plot" and b[1] in plots:
                out.append(html_figure(plots[b[1]][1], plots[b[1]][0]))
        sections.append(Section(title, out))
    return write_html_report(path, "OPD pre-flight diagnosis", sections, intro=intro)


def _plots(result: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """key -> (caption, PNG data URI) for each plot the result supports."""
    from opd.report import fig_to_data_uri, new_figure

    out: dict[str, tuple[str, str]] = {}
    prof = (result.get("condition_i") or {}).get("profile", {})
    if prof.get("overlap_ratio", {}).get("start"):
        bs = prof["bin_size"]
        fig = new_figure(10, 3.6)
        ax1, ax2 = fig.subplots(1, 2)
        for ax, keys in (
            (
                ax1,
                (
                    ("overlap_ratio", "overlap ratio"),
                    ("overlap_mass_student", "student mass on I"),
                    ("overlap_mass_teacher", "teacher mass on I"),
                ),
            ),
            (
                ax2,
                (
                    ("entropy_student", "H(p) student"),
                    ("entropy_teacher", "H(q) teacher"),
                    ("entropy_gap", "|H(q) - H(p)|"),
                ),
            ),
        ):
            for key, label in keys:
                ax.plot(
                    [s + bs / 2 for s in prof[key]["start"]], prof[key]["mean"], marker="o", ms=3, label=label
                )
            ax.set_xlabel("response position (tokens)")
            ax.legend(fontsize=8)
        ax1.set_ylim(0, 1.05)
        ax1.set_title("top-k overlap by position")
        ax2.set_ylabel("nats")
        ax2.set_title("entropy by position")
        out["profile"] = (
            "Condition (i): overlap and entropy by response position, on the student's rollouts.",
            fig_to_data_uri(fig),
        )

    ci2 = result.get("condition_ii") or {}
    hist = (ci2.get("reward") or {}).get("histogram")
    ctx = result.get("context") or {}
    if hist and hist.get("counts"):
        fig = new_figure(10, 3.4)
        ax1, ax2 = fig.subplots(1, 2)
        ax1.stairs(hist["counts"], hist["edges"], fill=True, color="#4c72b0")
        ax1.set_yscale("log")
        ax1.set_xlabel("per-token reward log q - log p (nats)")
        ax1.set_title("per-token reward")
        seq, correct = ctx.get("seq_mean_reward") or [], ctx.get("rollout_correct") or []
        if any(c is not None for c in correct):
            ok = [s for s, c in zip(seq, correct) if c]
            bad = [s for s, c in zip(seq, correct) if c is False]
            ax2.hist(
                [ok, bad],
                bins=20,
                label=[f"correct ({len(ok)})", f"wrong ({len(bad)})"],
                color=["#55a868", "#c44e52"],
            )
            ax2.legend(fontsize=8)
        elif seq:
            ax2.hist(seq, bins=20, color="#4c72b0")
        ax2.set_xlabel("sequence-mean reward (nats)")
        ax2.set_title("reward per rollout")
        out["reward"] = (
            "Reward distribution: per token (log scale) and per rollout, by correctness.",
            fig_to_data_uri(fig),
        )

    acc, cont = ci2.get("accuracy"), ci2.get("continuation") or {}
    if acc:
        fig = new_figure(10, 3.4)
        ax1, ax2 = fig.subplots(1, 2)
        ax1.bar(
            ["student", "teacher"],
            [acc["student"]["accuracy"], acc["teacher"]["accuracy"]],
            color=["#4c72b0", "#dd8452"],
        )
        ax1.bar_label(ax1.containers[0], fmt="%.2f")
        ax1.set_ylim(0, 1.08)
        ax1.set_title("accuracy on the prompts")
        bf = cont.get("by_fraction") or []
        if bf:
            xs = list(range(len(bf)))
            ax2.bar(
                [x - 0.2 for x in xs],
                [c["student_accuracy"] for c in bf],
                0.4,
                label="student completes",
                color="#4c72b0",
            )
            ax2.bar(
                [x + 0.2 for x in xs],
                [c["teacher_accuracy"] for c in bf],
                0.4,
                label="teacher completes",
                color="#dd8452",
            )
            ax2.set_xticks(xs, [f"{c['fraction']:.2f}\n({c['depth_mean']:.0f} tok)" for c in bf])
            for c in ax2.containers:
                ax2.bar_label(c, fmt="%.2f", fontsize=7)
            ax2.set_ylim(0, 1.08)
            ax2.set_xlabel("prefix: fraction of the student's rollout")
            ax2.legend(fontsize=8)
        ax2.set_title("completing the student's own prefixes")
        out["accuracy"] = (
            "Condition (ii): accuracy from the prompt, and when completing the student's truncated rollouts.",
            fig_to_data_uri(fig),
        )
    return out


# ------------------------------------------------------------------------------------------------- CLI

CLI_EPILOG = """\
Verdicts: go | go-after-remedy (remedy named: off-policy cold start, teacher-aligned template or
prompts) | no-go (the teacher adds nothing the student can learn) | inconclusive (most responses hit
max_new_tokens: rerun with a larger one). Thresholds: --threshold NAME=VALUE,
names: {names}.

Examples:
  opd diagnose --student lab:student --teacher lab:teacher-a-plus --prompts lab:test
  opd diagnose --student Qwen/Qwen3-1.7B-Base --teacher ./my-teacher --prompts data/math.jsonl \\
      --num-prompts 32 --rollouts 2 --max-new-tokens 2048 --teacher-dtype bfloat16 --batch-size 8
"""

# (flag, config field, argparse kwargs); help text is the field's docstring
_CLI_OPTIONS: list[tuple[str, str, dict]] = [
    ("--student", "student", dict(required=True)),
    ("--teacher", "teacher", dict(required=True)),
    ("--prompts", "prompts", dict(required=True)),
    ("--out", "out_dir", dict()),
    ("--num-prompts", "num_prompts", dict(type=int)),
    ("--rollouts", "rollouts", dict(type=int)),
    ("--max-new-tokens", "max_new_tokens", dict(type=int)),
    ("--prefix-fractions", "prefix_fractions", dict(type=float, nargs="*")),
    ("--top-k", "top_k", dict(type=int)),
    ("--temperature", "temperature", dict(type=float)),
    ("--teacher-temperature", "teacher_temperature", dict(type=float)),
    ("--eval-temperature", "eval_temperature", dict(type=float)),
    ("--eval-samples", "eval_samples", dict(type=int)),
    ("--position-bin", "position_bin", dict(type=int)),
    ("--seed", "seed", dict(type=int)),
    ("--student-dtype", "student_dtype", dict(choices=["float32", "bfloat16", "float16"])),
    ("--teacher-dtype", "teacher_dtype", dict(choices=["float32", "bfloat16", "float16"])),
    ("--trust-remote-code", "trust_remote_code", dict(action="store_const", const=True)),
    ("--prompt-field", "prompt_field", dict()),
    ("--answer-field", "answer_field", dict()),
    ("--prompt-template", "prompt_template", dict()),
    ("--no-chat-template", "use_chat_template", dict(action="store_const", const=False)),
    ("--chat-template-kwargs", "chat_template_kwargs", dict(metavar="YAML")),
    ("--max-prompt-tokens", "max_prompt_tokens", dict(type=int)),
    ("--batch-size", "batch_size", dict(type=int)),
    ("--threads", "threads", dict(type=int)),
    ("--no-progress", "progress", dict(action="store_const", const=False)),
]


def add_cli_parser(subparsers) -> Any:
    """Add the ``diagnose`` subcommand to ``opd``'s argparse subparsers (flags map onto DiagnoseConfig)."""
    import argparse

    from opd.config import field_docs

    docs = field_docs(DiagnoseConfig)
    p = subparsers.add_parser(
        "diagnose",
        help="pre-flight go/no-go: will OPD of this student toward this teacher work?",
        description="Sample student rollouts on a prompt sample, score them with both models and report "
        "condition (i) (compatible thinking patterns), condition (ii) (new capability) and a verdict, "
        "with evidence, in OUT/diagnosis.{json,md,html}.",
        epilog=CLI_EPILOG.format(names=", ".join(f.name for f in dataclasses.fields(DiagnoseThresholds))),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    defaults = DiagnoseConfig()
    for flag, key, kw in _CLI_OPTIONS:
        default = getattr(defaults, key)
        shown = "" if kw.get("required") or kw.get("action") else f" (default: {default!r})"
        p.add_argument(flag, dest=key, default=None, help=docs.get(key, "") + shown, **kw)
    p.add_argument(
        "--threshold",
        dest="thresholds",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="override a decision threshold (repeatable), e.g. --threshold overlap_ratio_min=0.5",
    )
    return p


def config_from_args(args) -> DiagnoseConfig:
    """The DiagnoseConfig of parsed ``opd diagnose`` arguments (unset flags keep the defaults)."""
    from opd.config import ConfigError, load_yaml_text

    values = {key: getattr(args, key) for _, key, _ in _CLI_OPTIONS if getattr(args, key, None) is not None}
    if isinstance(values.get("chat_template_kwargs"), str):
        loaded = load_yaml_text(values["chat_template_kwargs"], "--chat-template-kwargs") or {}
        if not isinstance(loaded, dict):
            raise ConfigError(
                f"--chat-template-kwargs {values['chat_template_kwargs']!r}: expected a mapping, "
                "e.g. '{enable_thinking: false}'"
            )
        values["chat_template_kwargs"] = loaded
    names = {f.name: f.type for f in dataclasses.fields(DiagnoseThresholds)}
    th = {}
    for item in args.thresholds or []:
        name, sep, raw = item.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or name not in names:
            raise ConfigError(
                f"--threshold {item!r}: expected NAME=VALUE with NAME one of {', '.join(names)}"
            )
        try:
            th[name] = float(raw)
        except ValueError:
            raise ConfigError(f"--threshold {item!r}: {raw!r} is not a number") from None
    if th:
        values["thresholds"] = DiagnoseThresholds(**th)
    return DiagnoseConfig(**values)


def run_cli(args) -> int:
    """``opd diagnose``: run, print the verdict and where the reports are; exit code 0 for any verdict."""
    cfg = config_from_args(args)
    result = diagnose(cfg)
    remedy = f" (remedy: {', '.join(result['remedies'])})" if result["remedies"] else ""
    print(f"opd diagnose: verdict {result['verdict']}{remedy}")
    for r in result["reasons"]:
        print(f"  - {r}")
    out = Path(cfg.out_dir)
    print(f"reports: {out / 'diagnosis.json'}, {out / 'diagnosis.md'}, {out / 'diagnosis.html'}")
    return 0
