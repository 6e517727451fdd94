"""The verdict of ``opd diagnose``: a pure function of the measured evidence (no models, no torch).

:func:`decide` maps an :class:`Evidence` (the figures :mod:`opd.diagnose.measure` fills in) and the
:class:`DiagnoseThresholds` to a :class:`Verdict`: ``go``, ``go-after-remedy`` (remedy named), ``no-go`` or
``inconclusive``, with the reasons, flags and every thresholded :class:`Check`. The rules are in the
package docstring (:mod:`opd.diagnose`) and docs/diagnose.md; names and paths of the models are never
looked at, only measurements.
"""

from __future__ import annotations

from dataclasses import dataclass

from opd.errors import ConfigError

__all__ = [
    "FLAG_INCOMPATIBLE_PATTERN",
    "FLAG_LITTLE_NEW",
    "FLAG_NO_SIGNAL",
    "FLAG_TEMPLATE",
    "FLAG_TOKENIZER",
    "FLAG_TRUNCATED",
    "FLAG_UNMEASURED",
    "REMEDY_COLD_START",
    "REMEDY_LONGER",
    "REMEDY_PROMPTS",
    "REMEDY_TEMPLATE",
    "VERDICTS",
    "Check",
    "DiagnoseThresholds",
    "Evidence",
    "Verdict",
    "decide",
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
            raise ConfigError("invalid diagnose thresholds:\n  - " + "\n  - ".join(bad))


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
                "SFT the student on teacher responses first, then run OPD (off-policy cold start: `opd coldstart`)."
            )
    if not measured:
        reasons.append("Condition (ii) is unmeasured: the prompts carry no answers.")
    return Verdict("go-after-remedy", reasons, remedies, flags, checks)
