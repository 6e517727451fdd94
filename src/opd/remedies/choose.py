"""Which remedies ``opd recipe`` applies: a pure function of the diagnosis (no models, no torch, no files).

:func:`choose_remedies` maps a verdict of :func:`opd.diagnose.decide` (its ``verdict``, ``remedies`` and
``flags``), the share of the diagnosis's rollouts with a low overlap mass, and the recipe's settings to a
:class:`RemedyPlan`: either a refusal (with the message to print) or the remedies to apply before the
first run (``initial``, each with why) and, in order, the remedies to try when a failure-signature alert
stops a run (``fallback``). The rules (docs/recipe.md, "opd recipe"):

- ``no-go``: refuse (the teacher brings no new capability, gives no signal, or cannot score the
  student's tokens: no remedy changes that); ``inconclusive``: refuse (rerun the diagnosis with a larger
  ``max_new_tokens``);
- ``go``: nothing before the first run;
- ``go-after-remedy``:
  - a template mismatch → *template alignment*, when ``template_candidates`` are given (without them it
    is named and skipped: there is nothing to choose from);
  - prompts off the teacher's distribution (the diagnosis's *teacher-aligned prompts*) → *content
    alignment*;
  - incompatible thinking patterns → *content alignment* when the overlap is low on part of the pool
    only (the share of low-overlap rollouts is between ``partial_share`` bounds: selecting the aligned
    prompts keeps most of the pool), else *cold start* (the teacher disagrees everywhere);
- then at most ``max_remedies`` remedies in all, only those in ``allowed``; the fallback ladder is the
  remaining allowed remedies in the order template (with candidates) → content → cold start.

A go-after-remedy whose remedies are all disallowed (or need missing candidates) is refused too: the
recipe would only run the plain OPD the diagnosis advises against.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from opd.diagnose.verdict import (
    FLAG_INCOMPATIBLE_PATTERN,
    FLAG_LITTLE_NEW,
    FLAG_NO_SIGNAL,
    FLAG_TEMPLATE,
    FLAG_TOKENIZER,
    REMEDY_COLD_START,
    REMEDY_LONGER,
    REMEDY_PROMPTS,
    REMEDY_TEMPLATE,
)

__all__ = [
    "COLDSTART",
    "CONTENT",
    "LADDER",
    "REMEDY_NAMES",
    "TEMPLATE",
    "Remedy",
    "RemedyPlan",
    "choose_remedies",
    "next_remedy",
]

TEMPLATE, CONTENT, COLDSTART = "template", "content", "coldstart"
REMEDY_NAMES = (TEMPLATE, CONTENT, COLDSTART)
LADDER = (TEMPLATE, CONTENT, COLDSTART)
"""Escalation order after an alert: the cheapest change first (a template, then the prompt pool, then an
SFT stage)."""

DESCRIPTIONS = {
    TEMPLATE: "template alignment (the candidate template with the best initial overlap)",
    CONTENT: "content alignment (the prompts the teacher and student agree on most, plus an OOD share)",
    COLDSTART: "off-policy cold start (SFT on teacher responses, then OPD)",
}


@dataclass(frozen=True)
class Remedy:
    name: str
    """One of :data:`REMEDY_NAMES`."""
    why: str


@dataclass
class RemedyPlan:
    refused: str | None = None
    """Why the recipe does not run (None: it runs)."""
    initial: list[Remedy] = field(default_factory=list)
    """Applied before the first run, in this order."""
    fallback: list[Remedy] = field(default_factory=list)
    """Tried in this order, one per alert that stops a run (as long as ``max_remedies`` allows)."""
    notes: list[str] = field(default_factory=list)
    """What the diagnosis asked for and the plan could not do (and why)."""


def choose_remedies(
    verdict: str,
    remedies: list[str] | tuple[str, ...],
    flags: list[str] | tuple[str, ...],
    *,
    low_overlap_share: float | None = None,
    allowed: tuple[str, ...] = REMEDY_NAMES,
    template_candidates: int = 0,
    template_measured: bool = False,
    max_remedies: int = 2,
    partial_share: tuple[float, float] = (0.1, 0.9),
) -> RemedyPlan:
    """The plan for a diagnosis (module docstring). ``remedies`` / ``flags``: the verdict's (the
    ``REMEDY_*`` / ``FLAG_*`` strings of :mod:`opd.diagnose.verdict`); ``low_overlap_share``: the share of
    the diagnosis's rollouts whose overlap mass is under the threshold (None = not measured);
    ``template_candidates``: how many candidate templates the config gives; ``template_measured``: they
    were measured before the diagnosis and the pick is already in place, so the template is no fallback
    rung (an alert would rerun the same config)."""
    unknown = [r for r in allowed if r not in REMEDY_NAMES]
    if unknown:
        raise ValueError(f"allowed remedies {unknown}: unknown; choose from {list(REMEDY_NAMES)}")
    plan = RemedyPlan()
    if verdict == "no-go":
        plan.refused = _refusal(flags)
        return plan
    if verdict == "inconclusive":
        plan.refused = (
            "the diagnosis is inconclusive: most responses hit max_new_tokens, so the evidence is cut off; "
            "rerun with a larger max_new_tokens (diagnose={max_new_tokens: ...}) before choosing a remedy"
        )
        return plan
    if verdict not in ("go", "go-after-remedy"):
        raise ValueError(f"verdict {verdict!r}: expected go, go-after-remedy, no-go or inconclusive")

    wanted: list[Remedy] = []
    if verdict == "go-after-remedy":
        if REMEDY_TEMPLATE in remedies or FLAG_TEMPLATE in flags:
            if template_candidates:
                wanted.append(
                    Remedy(
                        TEMPLATE,
                        "the diagnosis found a template mismatch (the teacher scores the student's rendering "
                        f"badly); {template_candidates} candidate template(s) given: pick the best-aligned one",
                    )
                )
            else:
                plan.notes.append(
                    "the diagnosis found a template mismatch, but no template_candidates are given: template "
                    "alignment skipped (give the teacher's post-training template as a candidate)"
                )
        if REMEDY_PROMPTS in remedies:
            wanted.append(
                Remedy(
                    CONTENT,
                    "at the first response token the teacher is much less certain than the student: the prompts "
                    "are off the teacher's distribution; keep the prompts both models agree on",
                )
            )
        if REMEDY_COLD_START in remedies or (
            FLAG_INCOMPATIBLE_PATTERN in flags and REMEDY_PROMPTS not in remedies
        ):
            lo, hi = partial_share
            if low_overlap_share is not None and lo <= low_overlap_share <= hi:
                wanted.append(
                    Remedy(
                        CONTENT,
                        f"the thinking patterns disagree on part of the pool only ({low_overlap_share:.0%} of the "
                        f"rollouts have a low overlap mass, between {lo:.0%} and {hi:.0%}): keep the prompts "
                        "the teacher and student agree on",
                    )
                )
            else:
                share = "" if low_overlap_share is None else f" ({low_overlap_share:.0%} of the rollouts)"
                wanted.append(
                    Remedy(
                        COLDSTART,
                        f"condition (i) fails across the pool{share}: incompatible thinking patterns (low "
                        "overlap mass, negative Eq. 7 advantage); SFT the student on the teacher's responses, "
                        "then OPD",
                    )
                )
    if REMEDY_LONGER in remedies:
        plan.notes.append(
            "the diagnosis's evidence is truncated at its max_new_tokens: its figures may understate both models; "
            "consider a larger max_new_tokens (not a remedy the recipe applies)"
        )
    seen: set[str] = set()
    for r in wanted:
        if r.name in seen:
            continue
        seen.add(r.name)
        if r.name not in allowed:
            plan.notes.append(f"{DESCRIPTIONS[r.name]} is called for but not in remedies={list(allowed)}")
        elif len(plan.initial) >= max_remedies:
            plan.notes.append(
                f"{DESCRIPTIONS[r.name]} is called for but max_remedies={max_remedies} is reached"
            )
        else:
            plan.initial.append(r)
    if verdict == "go-after-remedy" and not plan.initial:
        plan.refused = (
            "the diagnosis says go-after-remedy but none of its remedies can be applied ("
            + "; ".join(plan.notes)
            + "): plain OPD is what it advises against; allow the remedy or run `opd train` yourself"
        )
        return plan
    applied = {r.name for r in plan.initial}
    for name in LADDER:
        if (
            name in applied
            or name not in allowed
            or (name == TEMPLATE and (not template_candidates or template_measured))
        ):
            continue
        if len(plan.initial) + len(plan.fallback) >= max_remedies:
            break
        plan.fallback.append(
            Remedy(name, f"a failure-signature alert stopped the run: next remedy, {DESCRIPTIONS[name]}")
        )
    return plan


def next_remedy(plan: RemedyPlan, applied: list[str]) -> Remedy | None:
    """The first fallback not yet applied (None: the ladder is exhausted)."""
    for r in plan.fallback:
        if r.name not in applied:
            return r
    return None


def _refusal(flags: list[str] | tuple[str, ...]) -> str:
    if FLAG_TOKENIZER in flags:
        return (
            "no-go: the tokenizers are incompatible, so the teacher cannot score the student's tokens; no remedy "
            "changes that: use a teacher with the student's tokenizer"
        )
    if FLAG_NO_SIGNAL in flags:
        return (
            "no-go: the teacher's distribution equals the student's (per-token reward ~0), so OPD has nothing "
            "to optimise; use a different teacher"
        )
    if FLAG_LITTLE_NEW in flags:
        return (
            "no-go: the teacher brings no new capability the student can learn (not more accurate from the "
            "student's own prefixes); no remedy adds capability: use a stronger teacher"
        )
    return "no-go: the diagnosis advises against OPD for this pair (see its reasons)"
