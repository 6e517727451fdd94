"""Template alignment: which teacher context makes the teacher agree most with the student's rollouts.

``select_template(cfg, candidates)`` samples the student's rollouts once, under the student's own
prompts (``prompt_template`` / the chat template), and lets the teacher score exactly those response
tokens after each candidate's rendering of the prompt (``teacher_prompt_template`` /
``teacher_system_prompt``: :func:`opd.rollout.relay_responses`, what ``opd train`` does with those keys).
Every candidate therefore sees the same rollouts: only the teacher's context differs.

The pick (:func:`pick`): the candidate with the best mean rank over the overlap ratio (Eq. 6), the
student's overlap mass and the Eq. 7 teacher advantage (each higher = more aligned); ties go to the
higher teacher advantage, then to the earlier candidate.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from opd.data import load_prompts, prompt_texts
from opd.datafiles import read_rows
from opd.diagnose import measure as dmeasure
from opd.models import prompt_token_cap
from opd.prompts.config import TemplateCandidate, diagnose_config, prompt_limit
from opd.prompts.measure import RANKED, Pair, batch_metrics, mean_rank
from opd.report import markdown_table, write_text_atomic
from opd.rollout import relay_responses
from opd.tracking import progress

__all__ = ["TemplateSelection", "pick", "select_template", "write_template_report"]


@dataclass
class TemplateSelection:
    """All candidates' measurements and the pick. ``measurements[i]`` is ``candidates[i]``'s dict:
    ``name``, the candidate's keys, the batch figures of :data:`opd.prompts.measure.METRICS` (plus the
    entropies) and ``mean_rank``."""

    best: TemplateCandidate
    candidates: list[TemplateCandidate]
    measurements: list[dict[str, Any]]
    rule: str
    sample: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "best": self.best.as_dict(),
            "rule": self.rule,
            "sample": self.sample,
            "candidates": self.measurements,
        }


RULE = (
    "best mean rank over " + ", ".join(RANKED) + " (each higher = more aligned); ties: higher "
    "teacher_advantage, then the earlier candidate"
)


def pick(measurements: list[dict[str, Any]]) -> int:
    """Index of the best candidate under :data:`RULE` (fills each measurement's ``mean_rank``)."""
    ranks = mean_rank(measurements)
    for m, r in zip(measurements, ranks):
        m["mean_rank"] = r
    return min(
        range(len(measurements)),
        key=lambda i: (ranks[i], -(measurements[i].get("teacher_advantage") or float("-inf")), i),
    )


def select_template(cfg, candidates: list[TemplateCandidate]) -> TemplateSelection:
    """Measure every candidate teacher context on one sample of student rollouts and pick the best.

    ``cfg``: a :class:`opd.prompts.PromptsConfig` (or any config with the diagnosis's keys: student,
    teacher, prompts, num_prompts, rollouts_per_prompt, max_new_tokens, ...). Its own
    ``teacher_prompt_template`` / ``teacher_system_prompt`` are ignored: the candidates replace them.
    """
    if not candidates:
        raise ValueError("select_template: no candidates; pass at least one TemplateCandidate")
    dcfg = diagnose_config(cfg, teacher_prompt_template=None, teacher_system_prompt=None)
    dcfg.check_runnable()
    pair = Pair.load(dcfg)
    try:
        return _select(dcfg, pair, candidates, prompt_limit(cfg))
    finally:
        pair.close()


def _select(dcfg, pair: Pair, candidates: list[TemplateCandidate], limit) -> TemplateSelection:
    tok = pair.tokenizer
    cap, cap_why = prompt_token_cap(dcfg.max_prompt_tokens, dcfg.max_new_tokens, pair.student, pair.teacher)
    common = dict(
        prompt_field=dcfg.prompt_field,
        answer_field=None,
        prompt_template=dcfg.prompt_template,
        use_chat_template=dcfg.use_chat_template,
        chat_template_kwargs=dcfg.chat_template_kwargs,
    )
    exclude = prompt_texts(dcfg.exclude_prompts) if dcfg.exclude_prompts else None
    prompts = load_prompts(
        dcfg.prompts,
        tok,
        **common,
        max_prompt_tokens=cap,
        max_prompt_tokens_why=cap_why,
        limit=limit,
        seed=dcfg.seed,
        exclude=exclude,
    )
    all_rows = read_rows(dcfg.prompts)
    rows = [all_rows[e.meta["row"]] for e in prompts.examples]
    batch = dmeasure.sample_rollouts(
        pair.student, tok, [e.input_ids for e in prompts.examples], dcfg, pair.vocab_limit
    )
    measurements = []
    for cand in progress(candidates, desc="candidates", enabled=dcfg.progress, unit="template"):
        teacher_batch = None
        if cand.teacher_prompt_template is not None or cand.teacher_system_prompt is not None:
            rendered = load_prompts(
                dcfg.prompts,
                tok,
                **common,
                teacher_prompt_template=cand.teacher_prompt_template,
                teacher_system_prompt=cand.teacher_system_prompt,
                max_prompt_tokens=None,
                rows=rows,
            )
            t_ids = [e.teacher_input_ids for e in rendered.examples]
            too_long = [len(t) for t in t_ids if cap and len(t) > cap]
            if too_long:
                raise ValueError(
                    f"candidate {cand.name!r}: the teacher's rendering of {len(too_long)} prompt(s) is longer "
                    f"than max_prompt_tokens={cap} ({max(too_long)} tokens); shorten the template or raise "
                    "max_prompt_tokens"
                )
            teacher_batch = relay_responses(batch, [t_ids[int(p)] for p in batch.prompt_index_B])
        s_out, t_out = dmeasure.score_rollouts(
            pair.student, pair.teacher, batch, dcfg, pair.vocab_limit, teacher_batch
        )
        measurements.append(cand.as_dict() | batch_metrics(s_out, t_out, batch))
    best = pick(measurements)
    sample = {
        "prompts": dcfg.prompts,
        "num_prompts": len(prompts.examples),
        "rollouts_per_prompt": dcfg.rollouts_per_prompt,
        "rollouts": int(batch.input_ids_B_T.shape[0]),
        "response_tokens": int((batch.response_mask_B_T > 0).sum()),
        "student": dcfg.student,
        "teacher": dcfg.teacher,
        "seed": dcfg.seed,
        "metrics_top_k": dcfg.metrics_top_k,
    }
    return TemplateSelection(candidates[best], list(candidates), measurements, RULE, sample)


_COLUMNS = (
    ("candidate", "name"),
    ("mean rank", "mean_rank"),
    ("overlap ratio", "overlap_ratio"),
    ("overlap mass (student)", "overlap_mass_student"),
    ("overlap mass (teacher)", "overlap_mass_teacher"),
    ("teacher advantage (Eq. 7)", "teacher_advantage"),
    ("entropy gap", "entropy_gap"),
    ("sampled KL", "kl"),
)


def render_template_markdown(sel: TemplateSelection) -> str:
    s = sel.sample
    rows = [[m.get(k) for _, k in _COLUMNS] for m in sel.measurements]
    lines = [
        "# Template alignment",
        "",
        f"Student `{s.get('student')}`, teacher `{s.get('teacher')}`, {s.get('num_prompts')} prompts of "
        f"`{s.get('prompts')}` × {s.get('rollouts_per_prompt')} student rollouts (the same for every "
        f"candidate), k = {s.get('metrics_top_k')}, seed {s.get('seed')}.",
        "",
        f"**Best: `{sel.best.name}`** (rule: {sel.rule}).",
        "",
        markdown_table(rows, [h for h, _ in _COLUMNS]).rstrip(),
        "",
        "Candidates:",
        "",
    ]
    for c in sel.candidates:
        lines.append(
            f"- `{c.name}`: teacher_prompt_template={c.teacher_prompt_template!r}, "
            f"teacher_system_prompt={c.teacher_system_prompt!r}"
        )
    return "\n".join(lines) + "\n"


def write_template_report(sel: TemplateSelection, output_dir: str | Path) -> tuple[Path, Path]:
    """``template.json`` and ``template.md`` in ``output_dir``."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    j = write_text_atomic(out / "template.json", json.dumps(sel.to_dict(), indent=1) + "\n")
    m = write_text_atomic(out / "template.md", render_template_markdown(sel))
    return j, m
