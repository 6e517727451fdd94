"""``PromptsConfig``: one prompt-alignment job (``opd prompts select`` / ``opd prompts template``).

The models, prompts and teacher-prompt keys are ``opd train``'s (:class:`opd.config.ModelsConfig`,
:class:`opd.config.DataConfig`, :class:`opd.config.TeacherPromptConfig`); the sampling and scoring keys
mean what they mean in ``opd diagnose`` (:class:`opd.diagnose.DiagnoseConfig`), whose measurement code
does the work. Loaded like every opd config: YAML file plus ``key=value`` overrides.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from opd.config import DataConfig, ModelsConfig, TeacherPromptConfig
from opd.config_io import _coerce_types, below, dtype_errors, load_yaml_text, raise_errors, require_keys
from opd.diagnose.config import DiagnoseConfig
from opd.errors import ConfigError
from opd.textfiles import read_utf8

__all__ = [
    "OOD_PICKS",
    "PromptsConfig",
    "TemplateCandidate",
    "diagnose_config",
    "load_candidates",
    "prompt_limit",
]

OOD_PICKS = ("random", "least")
"""How the out-of-distribution share is drawn from the prompts not kept as aligned."""


@dataclass
class PromptsConfig(TeacherPromptConfig, DataConfig, ModelsConfig):
    """Teacher-aligned prompts: rank prompts (or pools) by teacher–student agreement, dedup, select;
    or pick the teacher's prompt template among candidates (docs/recipe.md)."""

    # --- what is measured (the diagnosis's measurement, step 0 of opd train) ---
    pools: dict = field(default_factory=dict)
    """Several prompt pools to rank as pools, a mapping name -> source, e.g. pools={easy: a.jsonl, hard: b.jsonl};
    empty = rank the single prompts of ``prompts``."""
    num_prompts: int = 64
    """Prompts measured per pool (a seeded sample; 0 = every row). Only measured prompts can be selected one
    by one; a selected pool brings all its rows."""
    rollouts_per_prompt: int = 4
    """Student rollouts per measured prompt."""
    max_new_tokens: int = 256
    """Maximum response length of the rollouts."""
    temperature: float = 1.0
    """Student sampling temperature (OPD samples at 1.0); the student is scored at it."""
    teacher_temperature: float = 1.0
    """Temperature applied to the teacher's logits when scoring (as in opd train)."""
    metrics_top_k: int = 16
    """k of the overlap metrics (TopK of each model at every position)."""
    chunk_prompts: int = 256
    """Prompts sampled and scored per chunk (bounds memory on large pools)."""

    # --- selection ---
    select_n: int = 0
    """Prompts (or pools) to keep; 0 = use select_fraction."""
    select_fraction: float = 0.5
    """Share of the measured prompts (or of the pools) to keep when select_n = 0."""
    ood_share: float = 0.1
    """Share of the kept prompts drawn from outside the most aligned ones, to hold the student's entropy up
    (docs/paper.md §4: aligned prompts lower it)."""
    ood_pick: str = "random"
    """How the out-of-distribution share is drawn from the rest: random (seeded) or least (the least aligned)."""

    # --- dedup (before measuring) ---
    dedup_exact: bool = True
    """Drop rows whose normalised prompt text repeats an earlier row's (opd.prompts.dedup.normalize_text)."""
    embedding_model: str = ""
    """A local Hugging Face model directory (or lab:<name>) for near-duplicate removal; empty = off. Never downloaded."""
    dedup_threshold: float = 0.95
    """Cosine similarity of mean-pooled hidden states at or above which a row is a near duplicate of a kept one."""

    # --- run ---
    student_dtype: str = "float32"
    """Student weights dtype: float32, bfloat16 or float16 (inference only)."""
    output_dir: str = "runs/prompts"
    """Where selected.jsonl and selection.{json,md} (or template.{json,md}) are written."""
    seed: int = 0
    """Seed of the prompt sample, the rollouts and the random out-of-distribution pick."""
    batch_size: int = 64
    """Sequences per generate call and per scoring forward pass."""
    score_chunk_size: int = 256
    """Positions per chunk when computing log-softmax."""
    threads: int = 0
    """torch CPU threads; 0 = auto (1 for tiny models, as in opd diagnose)."""
    progress: bool = True
    """Show progress bars."""

    def __post_init__(self) -> None:
        if isinstance(self.pools, str):
            self.pools = (
                load_yaml_text(self.pools, "pools", ", e.g. pools={easy: a.jsonl, hard: b.jsonl}") or {}
            )
        _coerce_types(self)
        errs = TeacherPromptConfig._check(self)
        if not isinstance(self.pools, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and v for k, v in self.pools.items()
        ):
            errs.append(f"pools={self.pools!r}: expected a mapping of pool names to prompt sources")
        errs += below(
            self, ("rollouts_per_prompt", "max_new_tokens", "metrics_top_k", "batch_size", "chunk_prompts"), 1
        )
        errs += below(
            self, ("num_prompts", "select_n", "threads", "max_prompt_tokens", "score_chunk_size"), 0
        )
        if self.select_n == 0 and not 0.0 < self.select_fraction <= 1.0:
            errs.append(f"select_fraction={self.select_fraction}: must be in (0, 1] (or set select_n)")
        if not 0.0 <= self.ood_share < 1.0:
            errs.append(f"ood_share={self.ood_share}: must be in [0, 1)")
        if self.ood_pick not in OOD_PICKS:
            errs.append(f"ood_pick={self.ood_pick!r}: choose one of {', '.join(OOD_PICKS)}")
        if not 0.0 < self.dedup_threshold <= 1.0:
            errs.append(f"dedup_threshold={self.dedup_threshold}: must be in (0, 1]")
        if self.temperature <= 0 or self.teacher_temperature <= 0:
            errs.append("temperature and teacher_temperature must be > 0 (rollouts are sampled); use 1.0")
        errs += dtype_errors(self, ("student_dtype", "teacher_dtype"))
        raise_errors(errs, "prompts config")

    def check_runnable(self) -> None:
        """The keys that must be set before running."""
        require_keys(
            self,
            ("student", "teacher"),
            "opd prompts select student=lab:student teacher=lab:teacher-a-plus prompts=lab:train",
            () if self.prompts or self.pools else ("prompts (or pools)",),
        )


def prompt_limit(cfg: Any) -> int | None:
    """How many prompts to measure per pool: ``num_prompts``, None (every row) when it is 0."""
    return int(getattr(cfg, "num_prompts", 64)) or None


def diagnose_config(cfg: Any, **overrides: Any) -> DiagnoseConfig:
    """The :class:`DiagnoseConfig` the diagnosis's measurement functions take, from any config that has
    (some of) its keys (a :class:`PromptsConfig`, a ``DiagnoseConfig``, a recipe's config)."""
    names = {f.name for f in fields(DiagnoseConfig)}
    values = {n: getattr(cfg, n) for n in names if hasattr(cfg, n) and n != "thresholds"}
    values.update(overrides)
    values["num_prompts"] = max(1, int(values.get("num_prompts", 1)))  # 0 (every row) is ours: limit=None
    values["prefix_fractions"] = ()
    values["progress"] = bool(values.get("progress", True))
    return DiagnoseConfig(**values)


@dataclass(frozen=True)
class TemplateCandidate:
    """A teacher context to try: ``teacher_prompt_template`` and/or ``teacher_system_prompt`` (both None
    = the student's own rendering). ``name`` labels it in the report."""

    name: str
    teacher_prompt_template: str | None = None
    teacher_system_prompt: str | None = None

    def config_keys(self) -> dict:
        """The ``opd train`` / ``opd diagnose`` keys that apply this candidate."""
        return {
            "teacher_prompt_template": self.teacher_prompt_template,
            "teacher_system_prompt": self.teacher_system_prompt,
        }

    def as_dict(self) -> dict:
        return {
            "name": self.name,
            "teacher_prompt_template": self.teacher_prompt_template,
            "teacher_system_prompt": self.teacher_system_prompt,
        }


_CANDIDATE_KEYS = ("name", "teacher_prompt_template", "teacher_system_prompt")


def load_candidates(source: str | Path | list) -> list[TemplateCandidate]:
    """Candidates from a YAML or JSON file (or an already parsed list): a list whose items are mappings
    with ``name`` (optional), ``teacher_prompt_template`` and/or ``teacher_system_prompt`` (short forms
    ``template`` / ``system_prompt`` accepted), or plain strings (a template each)."""
    where = "candidates"
    items = source
    if not isinstance(source, list):
        p = Path(source)
        where = f"candidates file {str(p)!r}"
        if not p.is_file():
            raise ConfigError(f"{where} not found; pass a YAML or JSON list of candidate templates")
        text = read_utf8(p)
        try:
            items = json.loads(text) if p.suffix == ".json" else load_yaml_text(text, where)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{where}: not valid JSON ({e}); expected a list of candidates") from e
    if not isinstance(items, list) or not items:
        raise ConfigError(
            f"{where}: expected a non-empty list of candidates, e.g. "
            "[{name: plain}, {name: qa, teacher_prompt_template: 'Question: {problem}'}]"
        )
    out: list[TemplateCandidate] = []
    for i, item in enumerate(items):
        if isinstance(item, str) or item is None:
            item = {"teacher_prompt_template": item}
        if not isinstance(item, dict):
            raise ConfigError(f"{where}: item {i} is {item!r}; expected a mapping or a template string")
        item = dict(item)
        for short, long in (
            ("template", "teacher_prompt_template"),
            ("system_prompt", "teacher_system_prompt"),
        ):
            if short in item:
                item[long] = item.pop(short)
        unknown = [k for k in item if k not in _CANDIDATE_KEYS]
        if unknown:
            raise ConfigError(
                f"{where}: item {i} has unknown key(s) {unknown}; known: {', '.join(_CANDIDATE_KEYS)}"
            )
        tmpl = item.get("teacher_prompt_template")
        if tmpl is not None and "{problem}" not in tmpl and "{prompt}" not in tmpl:
            raise ConfigError(
                f"{where}: item {i}: teacher_prompt_template {tmpl!r} has no {{problem}} placeholder; put "
                "{problem} where the prompt text goes"
            )
        name = item.get("name") or f"candidate-{i}"
        out.append(TemplateCandidate(str(name), tmpl, item.get("teacher_system_prompt")))
    names = [c.name for c in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"{where}: candidate name(s) {dup} repeat; give each candidate its own name")
    return out
