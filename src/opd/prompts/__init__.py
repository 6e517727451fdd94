"""Teacher-aligned prompts (docs/recipe.md): the study's second remedy (docs/paper.md §4), as tools.

- **Template alignment** — :func:`select_template`: given candidate teacher contexts
  (:class:`TemplateCandidate`: ``teacher_prompt_template`` and/or ``teacher_system_prompt``), measure on
  one sample of student rollouts, with the diagnosis's code, the overlap ratio, overlap masses, Eq. 7
  teacher advantage, entropy gap and KL the teacher gives under each, and pick the best.
- **Content alignment** — :func:`rank_prompts` ranks single prompts (or pools) by the same
  teacher–student agreement; :func:`select_prompts` keeps the most aligned plus an out-of-distribution
  share (``ood_share``) to hold the student's entropy up; :func:`write_selection` writes the kept rows
  (JSONL, original fields) and a JSON / markdown report.
- **Dedup** — :func:`dedup`: exact (normalised text) and near-duplicate removal with a local embedding model.

CLI: ``opd prompts select`` (dedup → rank → select → files) and ``opd prompts template --candidates FILE``.
:func:`run_select` and :func:`run_template` are what they run.
"""

from __future__ import annotations

from typing import Any

from opd.config_io import to_dict
from opd.errors import ConfigError
from opd.prompts.config import PromptsConfig, TemplateCandidate, load_candidates
from opd.prompts.content import (
    PromptRanking,
    PromptScore,
    Selection,
    dedup_pools,
    rank_prompts,
    select_prompts,
    write_selection,
)
from opd.prompts.dedup import DedupResult, dedup, normalize_text
from opd.prompts.template import TemplateSelection, select_template, write_template_report

__all__ = [
    "DedupResult",
    "PromptRanking",
    "PromptScore",
    "PromptsConfig",
    "Selection",
    "TemplateCandidate",
    "TemplateSelection",
    "dedup",
    "load_candidates",
    "normalize_text",
    "rank_prompts",
    "run_select",
    "run_template",
    "select_prompts",
    "select_template",
    "write_selection",
    "write_template_report",
]


def run_select(cfg: PromptsConfig) -> dict[str, Any]:
    """``opd prompts select``: dedup every pool, rank, select, write ``output_dir``'s files; returns the
    selection's stats plus the written ``paths``."""
    cfg.check_runnable()
    if cfg.pools and cfg.prompts:
        raise ConfigError(
            "set either prompts (its single prompts are ranked) or pools (the pools are ranked), not both"
        )
    pools = dict(cfg.pools) if cfg.pools else {"prompts": cfg.prompts}
    rows, results = dedup_pools(cfg, pools)
    ranking = rank_prompts(cfg, pools, rows=rows)
    ranking.dedup = {name: r.summary() for name, r in results.items()}
    sel = select_prompts(
        ranking,
        n=cfg.select_n or None,
        fraction=None if cfg.select_n else cfg.select_fraction,
        ood_share=cfg.ood_share,
        seed=cfg.seed,
        ood=cfg.ood_pick,
    )
    paths = write_selection(sel, ranking, cfg.output_dir, config=to_dict(cfg))
    return {"rows": len(sel.rows), "stats": sel.stats, "dedup": ranking.dedup, "paths": paths}


def run_template(cfg: PromptsConfig, candidates: list[TemplateCandidate]) -> TemplateSelection:
    """``opd prompts template``: :func:`select_template` and ``template.{json,md}`` in ``output_dir``."""
    cfg.check_runnable()
    sel = select_template(cfg, candidates)
    write_template_report(sel, cfg.output_dir)
    return sel
