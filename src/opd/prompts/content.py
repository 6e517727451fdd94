"""Content alignment: rank prompts (or pools) by teacher–student agreement, then select.

``rank_prompts(cfg)`` samples ``rollouts_per_prompt`` student rollouts for each of ``num_prompts``
prompts of every pool (``cfg.pools``, or the single pool ``cfg.prompts``), lets the teacher score them
(under ``teacher_prompt_template`` / ``teacher_system_prompt`` when set, as ``opd train`` would) and
records per prompt the token means of the overlap ratio, overlap masses, Eq. 7 teacher advantage,
entropy gap and sampled-token KL (:func:`opd.prompts.measure.per_prompt`). Prompts are ranked by
their mean rank over overlap ratio, student overlap mass and teacher advantage (each higher = more
aligned); a pool's figures are the means over its measured prompts, ranked the same way.

``select_prompts(ranking, n=..., fraction=..., ood_share=0.1, seed=0)`` keeps ``n`` units (prompts, or
pools when the ranking has several pools): ``n − round(n·ood_share)`` of the most aligned plus
``round(n·ood_share)`` from the rest, drawn at random (``ood="random"``, seeded) or the least aligned
(``ood="least"``). The study (docs/paper.md §4) warns that aligned prompts lower the student's entropy;
the out-of-distribution share holds it up.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from opd.data import load_prompts, prompt_texts
from opd.datafiles import read_rows
from opd.diagnose import measure as dmeasure
from opd.models import prompt_token_cap
from opd.prompts.config import OOD_PICKS, diagnose_config, prompt_limit
from opd.prompts.dedup import DedupResult, dedup
from opd.prompts.measure import METRICS, RANKED, Pair, mean_rank, per_prompt
from opd.report import markdown_table, write_text_atomic
from opd.rollout import relay_responses
from opd.tracking import progress

__all__ = ["PromptRanking", "PromptScore", "Selection", "rank_prompts", "select_prompts", "write_selection"]


@dataclass
class PromptScore:
    """One measured prompt: its pool, its index in the pool's rows, the row itself, its figures
    (:data:`opd.prompts.measure.METRICS`, ``tokens``) and its ``mean_rank`` (1 = most aligned)."""

    pool: str
    index: int
    row: dict
    metrics: dict[str, Any]
    mean_rank: float = 0.0


@dataclass
class PromptRanking:
    """Per-prompt and per-pool figures, most aligned first. ``pool_rows`` holds every row of each pool
    (after dedup), measured or not; ``dedup`` each pool's dedup summary."""

    prompts: list[PromptScore]
    pools: list[dict[str, Any]]
    pool_rows: dict[str, list[dict]]
    dedup: dict[str, dict] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def unit(self) -> str:
        """What ``select_prompts`` selects by default: ``pool`` with several pools, else ``prompt``."""
        return "pool" if len(self.pools) > 1 else "prompt"


@dataclass
class Selection:
    """What ``select_prompts`` kept: ``rows`` (the original rows, aligned ones first), per-row ``origin``
    (``aligned`` / ``ood``), the kept units and figures for the report."""

    rows: list[dict]
    origin: list[str]
    unit: str
    aligned: list[str]
    ood: list[str]
    stats: dict[str, Any]


def _pools(cfg) -> dict[str, str]:
    return dict(cfg.pools) if getattr(cfg, "pools", None) else {"prompts": cfg.prompts}


def rank_prompts(
    cfg, pools: dict[str, str] | None = None, *, rows: dict[str, list[dict]] | None = None
) -> PromptRanking:
    """Measure and rank prompts (module docstring). ``cfg``: a :class:`opd.prompts.PromptsConfig`
    (or a config with the diagnosis's keys). ``pools`` (name → source) overrides ``cfg.pools`` /
    ``cfg.prompts``; ``rows`` gives a pool's rows already read (e.g. after :func:`opd.prompts.dedup`)."""
    pools = dict(pools) if pools else _pools(cfg)
    dcfg = diagnose_config(cfg, prompts=next(iter(pools.values())))
    dcfg.check_runnable()
    pair = Pair.load(dcfg)
    try:
        return _rank(cfg, dcfg, pair, pools, rows or {}, prompt_limit(cfg))
    finally:
        pair.close()


def _rank(cfg, dcfg, pair: Pair, pools: dict[str, str], given: dict[str, list[dict]], limit) -> PromptRanking:
    tok = pair.tokenizer
    cap, cap_why = prompt_token_cap(dcfg.max_prompt_tokens, dcfg.max_new_tokens, pair.student, pair.teacher)
    exclude = prompt_texts(dcfg.exclude_prompts) if dcfg.exclude_prompts else None
    chunk = int(getattr(cfg, "chunk_prompts", 256) or 256)
    scores: list[PromptScore] = []
    pool_rows: dict[str, list[dict]] = {}
    for name, source in pools.items():
        rows = given.get(name) or read_rows(source)
        pool_rows[name] = rows
        prompts = load_prompts(
            source,
            tok,
            prompt_field=dcfg.prompt_field,
            answer_field=None,
            prompt_template=dcfg.prompt_template,
            teacher_prompt_template=dcfg.teacher_prompt_template,
            teacher_system_prompt=dcfg.teacher_system_prompt,
            use_chat_template=dcfg.use_chat_template,
            chat_template_kwargs=dcfg.chat_template_kwargs,
            max_prompt_tokens=cap,
            max_prompt_tokens_why=cap_why,
            limit=limit,
            seed=dcfg.seed,
            rows=rows,
            exclude=exclude,
        )
        ex = prompts.examples
        starts = list(range(0, len(ex), chunk))
        for c, i0 in enumerate(progress(starts, desc=f"rank {name}", enabled=dcfg.progress, unit="chunk")):
            part = ex[i0 : i0 + chunk]
            ccfg = diagnose_config(dcfg, seed=dcfg.seed + c, progress=False)
            batch = dmeasure.sample_rollouts(
                pair.student, tok, [e.input_ids for e in part], ccfg, pair.vocab_limit
            )
            teacher_batch = None
            if part[0].teacher_input_ids is not None:
                teacher_batch = relay_responses(
                    batch, [part[int(p)].teacher_input_ids for p in batch.prompt_index_B]
                )
            s_out, t_out = dmeasure.score_rollouts(
                pair.student, pair.teacher, batch, ccfg, pair.vocab_limit, teacher_batch
            )
            for e, m in zip(part, per_prompt(s_out, t_out, batch, len(part))):
                scores.append(PromptScore(name, int(e.meta["row"]), rows[int(e.meta["row"])], m))
    ranks = mean_rank([s.metrics for s in scores])
    for s, r in zip(scores, ranks):
        s.mean_rank = r
    scores.sort(key=lambda s: (s.mean_rank, -(s.metrics.get("teacher_advantage") or float("-inf"))))
    pool_stats = []
    for name in pools:
        mine = [s for s in scores if s.pool == name]
        stat: dict[str, Any] = {
            "pool": name,
            "source": pools[name],
            "rows": len(pool_rows[name]),
            "measured": len(mine),
        }
        for k in METRICS:
            vals = [s.metrics[k] for s in mine if s.metrics.get(k) is not None]
            stat[k] = sum(vals) / len(vals) if vals else None
        pool_stats.append(stat)
    for p, r in zip(pool_stats, mean_rank(pool_stats)):
        p["mean_rank"] = r
    pool_stats.sort(key=lambda p: (p["mean_rank"], -(p.get("teacher_advantage") or float("-inf"))))
    settings = {
        "student": dcfg.student,
        "teacher": dcfg.teacher,
        "teacher_prompt_template": dcfg.teacher_prompt_template,
        "teacher_system_prompt": dcfg.teacher_system_prompt,
        "num_prompts": limit or 0,
        "rollouts_per_prompt": dcfg.rollouts_per_prompt,
        "max_new_tokens": dcfg.max_new_tokens,
        "metrics_top_k": dcfg.metrics_top_k,
        "seed": dcfg.seed,
        "ranked_by": "mean rank over " + ", ".join(RANKED) + " (each higher = more aligned)",
    }
    return PromptRanking(scores, pool_stats, pool_rows, {}, settings)


def _count(total: int, n: int | None, fraction: float | None) -> int:
    if (n is None) == (fraction is None):
        raise ValueError("select_prompts: pass exactly one of n (a count) or fraction (a share)")
    if n is not None:
        if n < 1:
            raise ValueError(f"select_prompts: n={n}: must be >= 1")
        return min(n, total)
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"select_prompts: fraction={fraction}: must be in (0, 1]")
    return max(1, round(total * fraction))


def select_prompts(
    ranking: PromptRanking,
    n: int | None = None,
    fraction: float | None = None,
    *,
    ood_share: float = 0.1,
    seed: int = 0,
    ood: str = "random",
    unit: str | None = None,
) -> Selection:
    """Keep the most aligned prompts (or pools) plus an out-of-distribution share (module docstring).

    ``unit``: ``prompt`` (only measured prompts are candidates) or ``pool`` (a kept pool brings all its
    rows); default :attr:`PromptRanking.unit`. The kept rows are the pools' original rows (all fields).
    """
    if not 0.0 <= ood_share < 1.0:
        raise ValueError(f"select_prompts: ood_share={ood_share}: must be in [0, 1)")
    if ood not in OOD_PICKS:
        raise ValueError(f"select_prompts: ood={ood!r}: choose one of {', '.join(OOD_PICKS)}")
    unit = unit or ranking.unit
    if unit not in ("prompt", "pool"):
        raise ValueError(f"select_prompts: unit={unit!r}: choose prompt or pool")
    keys = (
        [f"{s.pool}/{s.index}" for s in ranking.prompts]
        if unit == "prompt"
        else [p["pool"] for p in ranking.pools]
    )
    if not keys:
        raise ValueError("select_prompts: the ranking is empty; measure at least one prompt")
    k = _count(len(keys), n, fraction)
    n_ood = round(k * ood_share)
    n_aligned = k - n_ood
    aligned = keys[:n_aligned]
    rest = keys[n_aligned:]
    if ood == "least":
        picked = rest[len(rest) - n_ood :] if n_ood else []
    else:
        picked = random.Random(seed).sample(rest, n_ood)
        picked.sort(key=rest.index)
    rows: list[dict] = []
    origin: list[str] = []
    if unit == "prompt":
        by_key = {f"{s.pool}/{s.index}": s for s in ranking.prompts}
        for tag, group in (("aligned", aligned), ("ood", picked)):
            for key in group:
                rows.append(by_key[key].row)
                origin.append(tag)
    else:
        for tag, group in (("aligned", aligned), ("ood", picked)):
            for key in group:
                rows += ranking.pool_rows[key]
                origin += [tag] * len(ranking.pool_rows[key])
    stats = _selection_stats(ranking, unit, aligned, picked, keys)
    return Selection(rows, origin, unit, aligned, picked, stats)


def _mean_of(scores: list[PromptScore]) -> dict[str, Any]:
    out: dict[str, Any] = {"prompts": len(scores)}
    for k in METRICS:
        vals = [s.metrics[k] for s in scores if s.metrics.get(k) is not None]
        out[k] = sum(vals) / len(vals) if vals else None
    return out


def _selection_stats(ranking, unit, aligned, picked, keys) -> dict[str, Any]:
    def scores_of(group):
        if unit == "prompt":
            g = set(group)
            return [s for s in ranking.prompts if f"{s.pool}/{s.index}" in g]
        g = set(group)
        return [s for s in ranking.prompts if s.pool in g]

    return {
        "unit": unit,
        "candidates": len(keys),
        "kept": len(aligned) + len(picked),
        "aligned": len(aligned),
        "ood": len(picked),
        "measured_means": {
            "all": _mean_of(ranking.prompts),
            "aligned": _mean_of(scores_of(aligned)),
            "ood": _mean_of(scores_of(picked)),
            "not_kept": _mean_of(scores_of([k for k in keys if k not in set(aligned) | set(picked)])),
        },
    }


def dedup_pools(cfg, pools: dict[str, str]) -> tuple[dict[str, list[dict]], dict[str, DedupResult]]:
    """Each pool's rows after :func:`opd.prompts.dedup` with the config's dedup keys."""
    rows, results = {}, {}
    for name, source in pools.items():
        r = dedup(
            read_rows(source),
            exact=cfg.dedup_exact,
            embedding_model=cfg.embedding_model or None,
            threshold=cfg.dedup_threshold,
            prompt_field=cfg.prompt_field,
            batch_size=cfg.batch_size,
            show_progress=cfg.progress,
        )
        if not r.rows:
            raise ValueError(f"pool {name!r} ({source}): no rows left after dedup")
        rows[name], results[name] = r.rows, r
    return rows, results


def write_selection(
    selection: Selection, ranking: PromptRanking, output_dir: str | Path, *, config: dict | None = None
) -> dict[str, Path]:
    """``selected.jsonl`` (the kept rows, original fields), ``ranking.jsonl`` (every measured prompt with
    its figures), ``selection.json`` and ``selection.md`` in ``output_dir``."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "selected": out / "selected.jsonl",
        "ranking": out / "ranking.jsonl",
        "json": out / "selection.json",
        "md": out / "selection.md",
    }
    write_text_atomic(
        paths["selected"], "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in selection.rows)
    )
    write_text_atomic(
        paths["ranking"],
        "".join(
            json.dumps({"pool": s.pool, "index": s.index, "mean_rank": s.mean_rank} | s.metrics) + "\n"
            for s in ranking.prompts
        ),
    )
    stats = {
        "selected_rows": len(selection.rows),
        "selection": selection.stats,
        "aligned": selection.aligned,
        "ood": selection.ood,
        "pools": ranking.pools,
        "dedup": ranking.dedup,
        "settings": ranking.settings,
        "config": config or {},
    }
    write_text_atomic(paths["json"], json.dumps(stats, indent=1) + "\n")
    write_text_atomic(paths["md"], _markdown(selection, ranking))
    return paths


_COLS = (
    ("overlap ratio", "overlap_ratio"),
    ("overlap mass (student)", "overlap_mass_student"),
    ("teacher advantage", "teacher_advantage"),
    ("entropy gap", "entropy_gap"),
    ("student entropy", "entropy_student"),
    ("sampled KL", "kl"),
)


def _markdown(selection: Selection, ranking: PromptRanking) -> str:
    st = selection.stats
    s = ranking.settings
    lines = [
        "# Teacher-aligned prompts",
        "",
        f"Student `{s.get('student')}`, teacher `{s.get('teacher')}`; {s.get('rollouts_per_prompt')} rollouts "
        f"per measured prompt, k = {s.get('metrics_top_k')}, seed {s.get('seed')}; ranked by {s.get('ranked_by')}.",
        "",
        f"Kept {st['kept']} of {st['candidates']} {st['unit']}s ({st['aligned']} most aligned + {st['ood']} "
        f"out-of-distribution): {len(selection.rows)} rows.",
        "",
    ]
    if ranking.dedup:
        lines += ["## Dedup", ""]
        rows = [
            [p, d["rows_in"], d["removed"]["exact"], d["removed"]["near"], d["rows_out"]]
            for p, d in ranking.dedup.items()
        ]
        lines += [
            markdown_table(
                rows, ["pool", "rows in", "exact duplicates", "near duplicates", "rows out"]
            ).rstrip(),
            "",
        ]
    lines += ["## Measured figures (means over measured prompts)", ""]
    mm = st["measured_means"]
    rows = [
        [g, mm[g]["prompts"], *[mm[g][k] for _, k in _COLS]] for g in ("all", "aligned", "ood", "not_kept")
    ]
    lines += [markdown_table(rows, ["group", "prompts", *[h for h, _ in _COLS]]).rstrip(), ""]
    if len(ranking.pools) > 1:
        lines += ["## Pools", ""]
        rows = [
            [p["pool"], p["rows"], p["measured"], p["mean_rank"], *[p[k] for _, k in _COLS]]
            for p in ranking.pools
        ]
        lines += [
            markdown_table(rows, ["pool", "rows", "measured", "mean rank", *[h for h, _ in _COLS]]).rstrip(),
            "",
        ]
    return "\n".join(lines) + "\n"
