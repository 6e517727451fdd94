"""The comparison config (:class:`CompareConfig`), and the plan: every run's config built and checked
through its method before anything trains (:func:`plan_runs`)."""

from __future__ import annotations

import dataclasses
import difflib
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import opd.methods
from opd.config import BUDGET_UNITS
from opd.config_io import build_config, config_values, load_yaml_text
from opd.errors import ConfigError

log = logging.getLogger("opd")


OWNED_KEYS = ("student", "prompts", "budget_unit", "budget", "seed", "output_dir", "resume", "overwrite")
"""Run config keys the comparison sets for every run; a run's ``overrides`` may not change them (the
comparison is from one student, on one prompt set, at one budget; seeds come from ``seeds``)."""

TOP_LEVEL_KEYS = ("teacher", "eval_prompts", "progress", "threads")
"""Comparison keys passed on to every run whose method config has that key (a run may override them)."""

IGNORED_WHEN_COLLECTING = frozenset({"progress", "threads", "resume", "overwrite", "output_dir"})
"""Config keys that may differ between a finished run and the planned one for it to be collected."""

RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


# --------------------------------------------------------------------------- config


@dataclass
class RunSpec:
    """One entry of ``runs``."""

    name: str = ""
    """Run name: the report's row label and the directory ``output_dir/<name>``."""
    method: str = "train"
    """The training method: an ``opd <command>`` name (``train`` is OPD; ``opd --help`` lists them)."""
    overrides: dict = field(default_factory=dict)
    """Keys of that method's config for this run (``opd <method> --help`` lists them), applied after
    ``shared``."""


@dataclass
class CompareConfig:
    """A comparison of training methods from one student at equal compute (``opd compare``)."""

    student: str = ""
    """The student every run starts from (a local directory, hub id, .gguf file or ``lab:<name>``)."""
    teacher: str = ""
    """The teacher of the runs (a run may override it, e.g. to distil toward another teacher)."""
    prompts: str = ""
    """Training prompts of every run."""
    eval_prompts: str = ""
    """Prompts with answers for each run's periodic evaluation (the accuracy-against-FLOPs curve);
    set ``eval_every`` (and ``eval_limit``) in ``shared``."""
    benchmarks: list = field(default_factory=list)
    """Benchmarks of the final evaluation (``opd.evaluation.load_benchmark`` specs, e.g. ``lab:test`` or a
    file); empty = ``[eval_prompts]``."""
    data_dir: str = ""
    """Directory that benchmark names are looked up in (empty = the evaluator's default)."""
    benchmark_prompt_field: str = "auto"
    """Field of the benchmark rows holding the problem ('auto': prompt, problem, question, ...)."""
    benchmark_answer_field: str = "auto"
    """Field of the benchmark rows holding the answer (dotted paths allowed; 'auto': reward_model.ground_truth, answer, ...)."""
    budget_unit: str = "flops"
    """What is held equal across runs: flops (the estimate of ``opd.cost``), student_loss_tokens
    (response tokens trained on) or none (each run does its configured ``steps``)."""
    budget: float = 0.0
    """The compute budget in ``budget_unit`` every run spends; each stops after the first step that
    reaches it, so set ``steps`` high enough in ``shared`` (it is only an upper bound)."""
    seeds: list = field(default_factory=lambda: [0])
    """Training seeds; each run trains once per seed (``output_dir/<name>/seed-<s>``)."""
    output_dir: str = "runs/compare"
    """Where the runs, the evaluations and the report go."""
    shared: dict = field(default_factory=dict)
    """Config keys applied to every run whose method has that key (e.g. ``steps``, ``lr``,
    ``max_new_tokens``, ``eval_every``), before the run's own ``overrides``."""
    runs: list = field(default_factory=list)
    """The runs: a list of ``{name, method, overrides}`` (:class:`RunSpec`)."""
    evaluation: dict = field(default_factory=dict)
    """Settings of the final evaluation (``opd.evaluation.EvalSettings`` fields: samples, temperature,
    top_p, max_new_tokens, batch_size, speed, limit, seed, ...)."""
    overwrite: bool = False
    """Retrain a run whose directory holds a finished run with other settings (off: that is an error)."""
    collect_only: bool = False
    """Train nothing: collect finished runs and report (a run that is not finished is an error)."""
    progress: bool = True
    """Show progress bars."""
    threads: int = 0
    """torch CPU threads for every run and the evaluation (0 = torch default)."""
    reach_accuracy: list = field(default_factory=list)
    """Accuracy levels of the runs' periodic evaluation (``eval/accuracy``) for the report's "compute to reach"
    table: the training FLOPs at which each run first reached each level, e.g. [0.6, 0.7]. Empty: no table."""

    def __post_init__(self) -> None:
        errs: list[str] = []
        for key in ("benchmarks", "seeds", "runs", "reach_accuracy"):
            value = getattr(self, key)
            if isinstance(value, str):  # a key=value override: `seeds=[0,1,2]`
                value = load_yaml_text(value, key, f", e.g. {key}=[...]")
            if value is None:
                value = []
            if not isinstance(value, list):
                value = [value] if key != "runs" else value
            setattr(self, key, value)
        for key in ("shared", "evaluation"):
            value = getattr(self, key)
            if isinstance(value, str):
                value = load_yaml_text(value, key, f", e.g. {key}={{key: value}}") or {}
            if value is None:
                value = {}
            if not isinstance(value, dict):
                errs.append(f"{key}: expected a mapping of key: value, got {type(value).__name__}")
                value = {}
            setattr(self, key, value)
        if not isinstance(self.runs, list):
            errs.append("runs: expected a list of {name, method, overrides}")
        for key in ("overwrite", "collect_only", "progress"):
            value = getattr(self, key)
            if isinstance(value, str) and value.lower() in ("true", "false"):
                setattr(self, key, value.lower() == "true")
        try:
            self.budget = float(self.budget)
        except (TypeError, ValueError):
            errs.append(f"budget={self.budget!r}: expected a number")
        if self.budget_unit not in BUDGET_UNITS:
            errs.append(f"budget_unit={self.budget_unit!r}: choose one of {', '.join(BUDGET_UNITS)}")
        elif self.budget_unit != "none" and not (isinstance(self.budget, float) and self.budget > 0):
            errs.append(
                f"budget={self.budget} with budget_unit={self.budget_unit}: give the budget every run "
                "spends (e.g. budget: 2.0e12 with budget_unit: flops), or budget_unit: none to run each "
                "for its configured steps"
            )
        try:
            self.seeds = [int(s) for s in self.seeds]
        except (TypeError, ValueError):
            errs.append(f"seeds={self.seeds!r}: expected a list of integers, e.g. [0, 1, 2]")
        if not self.seeds:
            errs.append("seeds: give at least one seed, e.g. [0]")
        elif len(set(self.seeds)) != len(self.seeds):
            errs.append(f"seeds={self.seeds}: each seed once")
        if not self.benchmarks and not self.eval_prompts:
            errs.append(
                "benchmarks: give the final evaluation's benchmarks (e.g. [lab:test]) or eval_prompts"
            )
        for key in OWNED_KEYS:
            if key in self.shared:
                errs.append(
                    f"shared.{key}: set by the comparison for every run; "
                    + (
                        f"use the top-level key {key}"
                        if key in ("student", "prompts", "budget_unit", "budget", "output_dir")
                        else "remove it (seeds come from `seeds`; collecting and resuming are automatic)"
                    )
                )
        if errs:
            raise ConfigError("invalid compare config: " + "; ".join(errs))

    def run_specs(self) -> list[RunSpec]:
        """``runs`` as :class:`RunSpec` (ConfigError naming the entry when one is malformed)."""
        if not self.runs:
            raise ConfigError("runs: list the runs to compare, e.g. runs: [{name: opd, method: train}]")
        specs, seen = [], set()
        for i, entry in enumerate(self.runs):
            if not isinstance(entry, dict):
                raise ConfigError(f"runs[{i}]: expected a mapping {{name, method, overrides}}, got {entry!r}")
            unknown = sorted(set(entry) - {"name", "method", "overrides"})
            if unknown:
                raise ConfigError(
                    f"runs[{i}] ({entry.get('name', '?')}): unknown key(s) {', '.join(unknown)}; a run has "
                    "name, method and overrides (put the method's config keys under overrides)"
                )
            name = str(entry.get("name", ""))
            if not RUN_NAME.fullmatch(name):
                raise ConfigError(
                    f"runs[{i}]: name {name!r} is not a valid run name; use letters, digits, '-', '_', '.' "
                    "(it names the run's directory)"
                )
            if name in seen:
                raise ConfigError(f"runs[{i}]: name {name!r} is used twice; give each run its own name")
            seen.add(name)
            overrides = entry.get("overrides") or {}
            if not isinstance(overrides, dict):
                raise ConfigError(f"run {name!r}: overrides must be a mapping of key: value")
            specs.append(RunSpec(name, str(entry.get("method", "train")), dict(overrides)))
        return specs


def load_compare_config(path: str | Path | None, overrides: list[str] | dict | None = None) -> CompareConfig:
    """YAML file (optional) + ``key=value`` overrides of its top-level keys → :class:`CompareConfig`."""
    values = config_values(path, overrides, "compare config file")
    return build_config(CompareConfig, values, command="compare")


# --------------------------------------------------------------------------- planning


@dataclass
class PlannedRun:
    """One (run, seed): its validated config, its method and where it lives."""

    name: str
    seed: int
    method: Any  # opd.methods.Method
    config: Any
    out_dir: Path
    not_applied: list[str]
    """``shared`` keys this run's method has no field for (listed in the report)."""


def _method(command: str, run_name: str):
    for m in opd.methods.METHODS:  # read at call time (a test may replace the registry)
        if m.command == command:
            return m
    known = [m.command for m in opd.methods.METHODS]
    close = difflib.get_close_matches(command, known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ConfigError(
        f"run {run_name!r}: method {command!r} is not a registered training method{hint}; set method to "
        f"one of: {', '.join(known)} (train is OPD)"
    )


def _one_line(message: str) -> str:
    lines = [ln.strip().lstrip("- ").strip() for ln in str(message).splitlines() if ln.strip()]
    if lines and lines[0].endswith(":") and len(lines) > 1:
        return lines[0] + " " + "; ".join(lines[1:])
    return "; ".join(lines)


def plan_runs(cfg: CompareConfig) -> list[PlannedRun]:
    """Every (run, seed) with its config built and validated by its method's config class; nothing is
    trained. ConfigError names the run (and the fix) for a bad method, key or value."""
    specs = cfg.run_specs()
    fields_of = {}
    for spec in specs:
        method = _method(spec.method, spec.name)
        fields_of[spec.name] = (method, {f.name for f in dataclasses.fields(method.config)})
    all_fields = set().union(*(f for _, f in fields_of.values()))
    unknown_shared = sorted(k for k in cfg.shared if k not in all_fields)
    if unknown_shared:
        hints = []
        for k in unknown_shared:
            close = difflib.get_close_matches(k, sorted(all_fields), n=1)
            hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ConfigError(
            f"shared: key(s) {', '.join(hints)} belong to none of the runs' methods; fix the name "
            "(`opd <method> --help` lists each method's keys)"
        )
    planned = []
    for spec in specs:
        method, names = fields_of[spec.name]
        owned = sorted(k for k in spec.overrides if k in OWNED_KEYS)
        if owned:
            raise ConfigError(
                f"run {spec.name!r}: overrides of {', '.join(owned)} are not allowed (the comparison sets "
                "them for every run: student, prompts and the budget are shared, seeds come from `seeds`); "
                "remove them from the run's overrides"
            )
        for seed in cfg.seeds:
            out_dir = Path(cfg.output_dir) / spec.name / f"seed-{seed}"
            values: dict[str, Any] = {}
            for key in TOP_LEVEL_KEYS:
                if key in names and getattr(cfg, key) not in ("", None):
                    values[key] = getattr(cfg, key)
            values.update(
                student=cfg.student,
                prompts=cfg.prompts,
                budget_unit=cfg.budget_unit,
                budget=cfg.budget,
                seed=seed,
                output_dir=str(out_dir),
            )
            values.update({k: v for k, v in cfg.shared.items() if k in names})
            values.update(spec.overrides)
            values = {k: v for k, v in values.items() if k in names or k in spec.overrides}
            try:
                run_cfg = build_config(method.config, values, command=method.command)
                check = getattr(run_cfg, "check_runnable", None)
                if check is not None:
                    check()
            except ConfigError as e:
                raise ConfigError(
                    f"run {spec.name!r} (opd {method.command}): {_one_line(str(e))}; fix the run's "
                    "overrides or the shared keys in the compare config"
                ) from None
            not_applied = sorted(k for k in cfg.shared if k not in names)
            planned.append(PlannedRun(spec.name, seed, method, run_cfg, out_dir, not_applied))
    return planned
