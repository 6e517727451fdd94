"""``opd compare CONFIG.yaml`` — several training methods from one student, on the same prompts, at equal
compute, evaluated side by side in one report.

A comparison config (:class:`CompareConfig`) names the student, the teacher, the prompts, the compute
budget (``budget_unit`` / ``budget``: equal student-trained tokens or equal FLOPs, :mod:`opd.cost`), the
seeds, the benchmarks and evaluation settings, and a list of ``runs`` — each a name, a training method (an
``opd <command>`` from :data:`opd.methods.METHODS`: ``train`` for OPD, ``sft``, ``kd``, ...) and
``overrides`` of that method's config keys. :func:`run_compare` then:

1. **plans**: builds every run's config through its method's config class (the same validation as
   ``opd <command>``), for every seed, before anything trains; a bad key, value or method fails here as
   one line naming the run and the fix;
2. **trains** each run in ``output_dir/<name>/seed-<s>``: a finished run whose saved config equals the
   planned one is collected, not retrained; an interrupted one is resumed (``resume=true``); a finished
   run with other settings is refused unless ``overwrite: true``;
3. **evaluates** (:func:`opd.evaluation.evaluate_model`) the initial student, every teacher the runs use
   and each run's final model on the benchmarks; results are cached in ``output_dir/evaluations/`` and
   reused while the model, benchmarks and settings are unchanged;
4. **reports**: ``compare.json``, ``report.md``, the self-contained ``report.html`` and PNG plots —
   accuracy per benchmark with error bars, gap recovered, params, serving speed, training wall time and
   FLOPs, the exact budget each run spent, and accuracy against training FLOPs from each run's periodic
   evaluation (``metrics.jsonl`` rows with ``eval/accuracy`` and ``cost/flops``).

Gap recovered = (acc − acc_student_initial) / (acc_teacher − acc_student_initial), with the run's own
teacher (a run without a teacher key, e.g. GRPO, is measured against the comparison's ``teacher``).

Error bars: with one seed, the standard error over prompts of avg@k (the evaluator's ``avg@k_stderr``);
with several seeds, the standard error of the mean over seeds.

Deliberately left out: running methods in parallel (each run takes the machine; runs are sequential),
significance tests, and tuning each method's hyperparameters (the config states them; the comparison is
only as fair as those choices).
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import logging
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from opd.config import BUDGET_UNITS
from opd.config_io import build_config, load_yaml_text, parse_overrides, to_dict
from opd.errors import ConfigError
from opd.report import (
    Bullets,
    Paragraph,
    Plot,
    Section,
    Table,
    fig_to_data_uri,
    markdown_table,
    new_figure,
    write_report,
    write_text_atomic,
)
from opd.textfiles import read_utf8
from opd.tracking import read_metrics

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

    def __post_init__(self) -> None:
        errs: list[str] = []
        for key in ("benchmarks", "seeds", "runs"):
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
    values: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"compare config file {str(p)!r} not found")
        loaded = load_yaml_text(read_utf8(p), f"compare config file {str(p)!r}") or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"compare config file {str(p)!r}: expected a mapping of key: value")
        values.update(loaded)
    if overrides:
        values.update(parse_overrides(overrides) if isinstance(overrides, list) else overrides)
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
    from opd.methods import METHODS

    for m in METHODS:
        if m.command == command:
            return m
    known = [m.command for m in METHODS]
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


# --------------------------------------------------------------------------- training or collecting


def _comparable(config: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps({k: v for k, v in config.items() if k not in IGNORED_WHEN_COLLECTING}))


def run_state(run: PlannedRun) -> tuple[str, str]:
    """What to do with ``run``'s directory: ``("collect", why)`` for a finished run with the same config,
    ``("resume", why)``, ``("train", why)`` (empty or absent), ``("retrain", why)`` (a finished run with
    other settings, or debris without a checkpoint: only with ``overwrite``)."""
    from opd.checkpoint import list_checkpoints
    from opd.rundir import config_changes

    d = run.out_dir
    if not d.is_dir() or not any(p.name != ".opd.lock" for p in d.iterdir()):
        return "train", "new"
    summary_path, config_path = d / "summary.json", d / "config.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else None
    saved = json.loads(config_path.read_text()) if config_path.is_file() else None
    planned = _comparable(to_dict(run.config))
    if saved is not None:
        saved_c = _comparable(saved)
        diffs = [
            f"{k}: {saved_c.get(k)!r} -> {v!r}" for k, v in planned.items() if saved_c.get(k, v) != v
        ] + [f"{k}: {saved_c[k]!r} -> (absent)" for k in saved_c if k not in planned]
    else:
        diffs = ["no config.json"]
    if summary is not None and summary.get("final_model") and not summary.get("interrupted"):
        if not diffs:
            return "collect", "finished with the same config"
        return "retrain", "holds a finished run with other settings (" + "; ".join(diffs[:4]) + ")"
    if list_checkpoints(d):
        # resuming may change what `opd train resume=true` allows (steps, evaluation, ...)
        defining = (
            config_changes(saved, to_dict(run.config), to_dict(type(run.config)()))
            if saved is not None
            else diffs
        )
        if not defining:
            return "resume", "interrupted; continuing from its newest checkpoint"
        return "retrain", "holds an unfinished run with other settings (" + "; ".join(defining[:4]) + ")"
    return "retrain", "holds an unfinished run with no checkpoint to continue from"


def train_or_collect(cfg: CompareConfig, planned: list[PlannedRun]) -> dict[tuple[str, int], dict[str, Any]]:
    """Train, resume or collect every planned run; returns ``{(name, seed): summary}``.

    Decisions are made for all runs first, so a run that would need ``overwrite`` fails before any
    training."""
    decisions = [(run, *run_state(run)) for run in planned]
    refused = [(r, why) for r, action, why in decisions if action == "retrain" and not cfg.overwrite]
    if refused:
        r, why = refused[0]
        raise ConfigError(
            f"run {r.name!r} seed {r.seed}: {str(r.out_dir)!r} {why}: pass overwrite=true to retrain it, "
            "or choose another output_dir"
        )
    if cfg.collect_only:
        missing = [f"{r.name} seed {r.seed} ({why})" for r, action, why in decisions if action != "collect"]
        if missing:
            raise ConfigError(
                f"collect_only=true but these runs are not finished with the planned config: "
                f"{', '.join(missing)}; run without collect_only to train them"
            )
    summaries: dict[tuple[str, int], dict[str, Any]] = {}
    for i, (run, action, why) in enumerate(decisions, 1):
        tag = f"[compare {i}/{len(decisions)}] {run.name} seed {run.seed}"
        if action == "collect":
            print(f"{tag}: collected ({why})", flush=True)
            summaries[(run.name, run.seed)] = json.loads((run.out_dir / "summary.json").read_text())
            continue
        run_cfg = run.config
        if action == "resume":
            run_cfg = dataclasses.replace(run_cfg, resume=True)
        elif action == "retrain":
            run_cfg = dataclasses.replace(run_cfg, overwrite=True)
        print(f"{tag}: opd {run.method.command} ({action}: {why}) -> {run.out_dir}", flush=True)
        t0 = time.perf_counter()
        summaries[(run.name, run.seed)] = run.method.train(run_cfg)
        record_train_time(Path(cfg.output_dir), run, time.perf_counter() - t0, resumed=action == "resume")
    return summaries


TRAIN_TIMES = "train_times.json"
"""``output_dir/train_times.json``: the wall time of each ``train(config)`` call ``opd compare`` made —
model loading, teacher-data generation and periodic evaluation included, which a summary's
``wall_time_s`` (the training loop) leaves out — keyed by run and seed, with the hash of the
``summary.json`` it produced so a retrained run's old time is never used."""


def record_train_time(out: Path, run: PlannedRun, seconds: float, *, resumed: bool) -> None:
    path = out / TRAIN_TIMES
    times = json.loads(path.read_text()) if path.is_file() else {}
    times[f"{run.name}/seed-{run.seed}"] = {
        "seconds": seconds,
        "resumed": resumed,
        "summary_sha256": _summary_identity(run.out_dir),
    }
    write_text_atomic(path, json.dumps(times, indent=1))


def train_time(out: Path, run: PlannedRun, summary: dict[str, Any]) -> tuple[float | None, str]:
    """(seconds, what they measure) of one run's training: the ``train`` call ``opd compare`` timed
    ("call"; "call, resumed part" for a resumed run), else the summary's loop time ("loop", a run
    trained outside ``opd compare``)."""
    path = out / TRAIN_TIMES
    entry = (json.loads(path.read_text()) if path.is_file() else {}).get(f"{run.name}/seed-{run.seed}")
    if (
        entry
        and (run.out_dir / "summary.json").is_file()
        and entry["summary_sha256"] == _summary_identity(run.out_dir)
    ):
        return entry["seconds"], "call, resumed part" if entry["resumed"] else "call"
    return summary.get("loop_time_s"), "loop"


# --------------------------------------------------------------------------- evaluation


def _evaluation():
    """The evaluation module (imported lazily: it is only needed once training is done)."""
    from opd import evaluation

    return evaluation


def eval_settings(cfg: CompareConfig):
    """``cfg.evaluation`` as ``opd.evaluation.EvalSettings`` (ConfigError naming an unknown key)."""
    settings_cls = _evaluation().EvalSettings
    names = [f.name for f in dataclasses.fields(settings_cls)]
    unknown = [k for k in cfg.evaluation if k not in names]
    if unknown:
        hints = []
        for k in unknown:
            close = difflib.get_close_matches(k, names, n=1)
            hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ConfigError(f"evaluation: unknown key(s) {', '.join(hints)}; known keys: {', '.join(names)}")
    try:
        return settings_cls(**cfg.evaluation)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"evaluation: {_one_line(str(e))}") from None


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "model"


def _drop_predictions(result: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in result.items() if k != "predictions"}


def evaluate_cached(
    model: str, label: str, identity: str, benchmarks: list, settings: Any, eval_dir: Path, progress: bool
) -> dict[str, Any]:
    """``evaluate_model(model, ...)`` without the predictions, cached in ``eval_dir/<label>.json`` and
    reused while ``identity`` (what the model is), the benchmarks and the settings are unchanged."""
    key = {
        "identity": identity,
        "benchmarks": [b.name for b in benchmarks],
        "settings": json.loads(json.dumps(dataclasses.asdict(settings), default=str)),
    }
    path = eval_dir / f"{_slug(label)}.json"
    if path.is_file():
        cached = json.loads(path.read_text())
        if cached.get("key") == key:
            print(f"  {label}: evaluation collected from {path.name}", flush=True)
            return cached["result"]
    print(f"  {label}: evaluating {model}", flush=True)
    result = _drop_predictions(_evaluation().evaluate_model(model, benchmarks, settings, progress=progress))
    write_text_atomic(path, json.dumps({"key": key, "result": result}, indent=1, default=str))
    return result


def _summary_identity(run_dir: Path) -> str:
    """What a run's final model is: a hash of its summary.json (rewritten by every (re)training)."""
    return hashlib.sha256((run_dir / "summary.json").read_bytes()).hexdigest()


# --------------------------------------------------------------------------- accounting


def gap_recovered(acc: float | None, acc_student: float | None, acc_teacher: float | None) -> float | None:
    """(acc − acc_student) / (acc_teacher − acc_student); None when an input is missing or the teacher
    is no better than the initial student (the ratio is then undefined)."""
    if acc is None or acc_student is None or acc_teacher is None:
        return None
    gap = acc_teacher - acc_student
    if gap <= 1e-12:
        return None
    return (acc - acc_student) / gap


def _stderr(xs: list[float]) -> float | None:
    if len(xs) < 2:
        return None
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) / math.sqrt(len(xs))


def _acc(result: dict[str, Any], bench: str | None) -> tuple[float | None, float | None]:
    """(avg@k, its standard error over prompts) on ``bench`` (None: overall)."""
    block = result.get("overall") if bench is None else result.get("benchmarks", {}).get(bench)
    if not block:
        return None, None
    return block.get("avg@k"), block.get("avg@k_stderr")


def aggregate(per_seed: list[dict[str, Any]], bench: str | None) -> dict[str, Any]:
    """Mean accuracy over seeds and its error bar: the standard error over seeds with several seeds, the
    evaluator's standard error over prompts with one."""
    accs = [_acc(r, bench) for r in per_seed]
    values = [a for a, _ in accs if a is not None]
    if not values:
        return {"mean": None, "err": None, "err_kind": None, "per_seed": []}
    if len(values) > 1:
        return {
            "mean": sum(values) / len(values),
            "err": _stderr(values),
            "err_kind": "seeds",
            "per_seed": values,
        }
    return {"mean": values[0], "err": accs[0][1], "err_kind": "prompts", "per_seed": values}


def budget_spent_amount(summary: dict[str, Any], unit: str) -> float | None:
    """The amount of ``unit`` a finished run spent (from its summary's ``cost``)."""
    cost = summary.get("cost") or {}
    if unit == "none":
        return cost.get("cost/flops")
    return cost.get(f"cost/{unit}")


def largest_step_amount(metrics: list[dict[str, Any]], unit: str) -> float | None:
    """How much of ``unit`` the run's largest single step spent (the most an equal-budget run can
    overshoot by), from consecutive cumulative ``cost/*`` rows of metrics.jsonl."""
    key = "cost/flops" if unit in ("none", "flops") else f"cost/{unit}"
    values = [r[key] for r in metrics if key in r]
    steps = [b - a for a, b in zip([0.0, *values], values)]
    return max(steps) if steps else None


def accuracy_curve(metrics: list[dict[str, Any]]) -> list[tuple[float, float]]:
    """(training FLOPs so far, eval/accuracy) for each metrics row with a periodic evaluation; the step-0
    row (before training) is at 0 FLOPs."""
    pts = []
    for r in metrics:
        if r.get("eval/accuracy") is None:
            continue
        flops = r.get("cost/flops", 0.0 if r.get("step", 0) == 0 else None)
        if flops is not None:
            pts.append((float(flops), float(r["eval/accuracy"])))
    return pts


# --------------------------------------------------------------------------- the whole comparison


def run_compare(cfg: CompareConfig) -> dict[str, Any]:
    """Plan, train or collect, evaluate and report (see the module docstring). Returns the comparison
    summary, also written to ``output_dir/compare.json`` next to ``report.md`` / ``report.html``."""
    import torch

    t0 = time.perf_counter()
    if not cfg.student or not cfg.prompts:
        raise ConfigError(
            "student and prompts are required; set them at the top of the compare config, e.g. "
            "student: lab:student, prompts: lab:train"
        )
    planned = plan_runs(cfg)  # every run's config is valid before anything trains
    settings = eval_settings(cfg)
    ev = _evaluation()
    specs = cfg.benchmarks or [cfg.eval_prompts]
    benchmarks = [
        ev.load_benchmark(
            str(s),
            cfg.data_dir or None,
            prompt_field=cfg.benchmark_prompt_field,
            answer_field=cfg.benchmark_answer_field,
            limit=settings.limit,
            seed=settings.seed,
        )
        for s in specs
    ]
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    print(
        f"opd compare: {len({p.name for p in planned})} runs x {len(cfg.seeds)} seed(s), budget "
        f"{cfg.budget:g} {cfg.budget_unit}, benchmarks {', '.join(b.name for b in benchmarks)} -> {out}",
        flush=True,
    )

    print("[1/3] training (or collecting finished runs)", flush=True)
    t_train = time.perf_counter()
    summaries = train_or_collect(cfg, planned)
    train_time = time.perf_counter() - t_train

    print("[2/3] evaluating", flush=True)
    t_eval = time.perf_counter()
    eval_dir = out / "evaluations"
    evals: dict[str, Any] = {
        "student": evaluate_cached(
            cfg.student, "student", cfg.student, benchmarks, settings, eval_dir, cfg.progress
        )
    }
    teachers = sorted({getattr(p.config, "teacher", "") or cfg.teacher for p in planned} - {""})
    teacher_evals = {
        t: evaluate_cached(t, f"teacher-{t}", t, benchmarks, settings, eval_dir, cfg.progress)
        for t in teachers
    }
    run_evals: dict[tuple[str, int], dict[str, Any]] = {}
    for p in planned:
        final = summaries[(p.name, p.seed)]["final_model"]
        run_evals[(p.name, p.seed)] = evaluate_cached(
            final,
            f"{p.name}-seed-{p.seed}",
            _summary_identity(p.out_dir),
            benchmarks,
            settings,
            eval_dir,
            cfg.progress,
        )
    eval_time = time.perf_counter() - t_eval

    print("[3/3] report", flush=True)
    summary = build_summary(cfg, planned, summaries, evals["student"], teacher_evals, run_evals, benchmarks)
    summary["wall_time_s"] = {
        "total": time.perf_counter() - t0,
        "training_this_invocation": train_time,
        "evaluation_this_invocation": eval_time,
    }
    metrics = {(p.name, p.seed): _read_metrics(p.out_dir) for p in planned}
    write_text_atomic(out / "compare.json", json.dumps(summary, indent=1, default=str))
    write_compare_report(out, summary, metrics)
    print("\n" + markdown_table(results_rows(summary), results_headers(summary)), flush=True)
    print(
        f"\nreport: {out / 'report.html'}  (total {summary['wall_time_s']['total'] / 60:.1f} min)", flush=True
    )
    return summary


def _read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    return read_metrics(path) if path.is_file() else []


def build_summary(
    cfg: CompareConfig,
    planned: list[PlannedRun],
    summaries: dict[tuple[str, int], dict[str, Any]],
    student_eval: dict[str, Any],
    teacher_evals: dict[str, dict[str, Any]],
    run_evals: dict[tuple[str, int], dict[str, Any]],
    benchmarks: list,
) -> dict[str, Any]:
    """The comparison's numbers: per run (aggregated over seeds) and per (run, seed), plus baselines."""
    bench_names = [b.name for b in benchmarks]
    names = list(dict.fromkeys(p.name for p in planned))
    by_name = {n: [p for p in planned if p.name == n] for n in names}

    def acc_block(result: dict[str, Any]) -> dict[str, Any]:
        return {b: aggregate([result], b) for b in bench_names} | {"overall": aggregate([result], None)}

    baselines = {
        "student": {
            "model": cfg.student,
            "params": student_eval.get("params"),
            "accuracy": acc_block(student_eval),
            "speed": student_eval.get("speed"),
        },
        "teachers": {
            t: {"model": t, "params": r.get("params"), "accuracy": acc_block(r), "speed": r.get("speed")}
            for t, r in teacher_evals.items()
        },
    }
    runs = []
    for name in names:
        ps = by_name[name]
        own_teacher = getattr(ps[0].config, "teacher", "")
        teacher = own_teacher or cfg.teacher  # the gap of a run without a teacher: the comparison's
        per_seed = []
        for p in ps:
            s = summaries[(p.name, p.seed)]
            metrics = _read_metrics(p.out_dir)
            per_seed.append(
                {
                    "seed": p.seed,
                    "output_dir": str(p.out_dir),
                    "final_model": s.get("final_model"),
                    "steps_done": s.get("steps_done"),
                    "stopped_by_budget": s.get("stopped_by_budget"),
                    "budget_spent": budget_spent_amount(s, cfg.budget_unit),
                    "largest_step": largest_step_amount(metrics, cfg.budget_unit),
                    "flops": (s.get("cost") or {}).get("cost/flops"),
                    "student_loss_tokens": (s.get("cost") or {}).get("cost/student_loss_tokens"),
                    "wall_time_s": s.get("wall_time_s"),
                    "train_time_s": train_time(Path(cfg.output_dir), p, s)[0],
                    "train_time_measures": train_time(Path(cfg.output_dir), p, s)[1],
                    "accuracy": {b: _acc(run_evals[(p.name, p.seed)], b)[0] for b in bench_names}
                    | {"overall": _acc(run_evals[(p.name, p.seed)], None)[0]},
                }
            )
        results = [run_evals[(p.name, p.seed)] for p in ps]
        accuracy = {b: aggregate(results, b) for b in bench_names} | {"overall": aggregate(results, None)}
        t_acc = baselines["teachers"].get(teacher, {}).get("accuracy", {})
        s_acc = baselines["student"]["accuracy"]
        gap = {
            b: gap_recovered(accuracy[b]["mean"], s_acc[b]["mean"], t_acc.get(b, {}).get("mean"))
            for b in [*bench_names, "overall"]
        }
        speeds = [r.get("speed") for r in results if r.get("speed")]

        def mean_of(key: str, rows: list[dict[str, Any]]) -> Any:
            """The mean over seeds of a number; the first seed's value of anything else (device, dtype)."""
            vals = [r[key] for r in rows if r.get(key) is not None]
            if not vals:
                return None
            if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals):
                return sum(vals) / len(vals)
            return vals[0]

        runs.append(
            {
                "name": name,
                "method": ps[0].method.command,
                "teacher": own_teacher or None,
                "gap_teacher": teacher,
                "overrides": next(
                    (dict(r.get("overrides") or {}) for r in cfg.runs if str(r.get("name")) == name), {}
                ),
                "shared_not_applied": ps[0].not_applied,
                "params": results[0].get("params"),
                "accuracy": accuracy,
                "gap_recovered": gap,
                "speed": {k: mean_of(k, speeds) for k in speeds[0]} if speeds else None,
                "wall_time_s": mean_of("wall_time_s", per_seed),
                "train_time_s": mean_of("train_time_s", per_seed),
                "train_time_measures": sorted({s["train_time_measures"] for s in per_seed}),
                "flops": mean_of("flops", per_seed),
                "budget_spent": mean_of("budget_spent", per_seed),
                "seeds": per_seed,
            }
        )
    return {
        "student": cfg.student,
        "teacher": cfg.teacher,
        "prompts": cfg.prompts,
        "budget_unit": cfg.budget_unit,
        "budget": cfg.budget,
        "seeds": cfg.seeds,
        "benchmarks": bench_names,
        "evaluation": cfg.evaluation,
        "baselines": baselines,
        "runs": runs,
        "budget_check": budget_check(cfg, runs),
    }


def budget_check(cfg: CompareConfig, runs: list[dict[str, Any]]) -> list[str]:
    """Problems with the equal-budget claim: a run that ended (its ``steps``) before spending the budget."""
    if cfg.budget_unit == "none":
        return []
    problems = []
    for r in runs:
        for s in r["seeds"]:
            if s["budget_spent"] is None:
                problems.append(f"{r['name']} seed {s['seed']}: its summary records no cost")
            elif s["budget_spent"] < cfg.budget:
                problems.append(
                    f"{r['name']} seed {s['seed']}: ended after {s['steps_done']} steps having spent "
                    f"{s['budget_spent']:.4g} of the {cfg.budget:.4g} {cfg.budget_unit} budget; raise its "
                    "steps (an upper bound) so it spends the whole budget"
                )
    return problems


# --------------------------------------------------------------------------- report


def _pm(block: dict[str, Any]) -> str:
    if block.get("mean") is None:
        return "—"
    err = block.get("err")
    return f"{block['mean']:.3f}" + (f" ± {err:.3f}" if err is not None else "")


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f}%"


def _num(x: float | None, fmt: str = ".3g") -> str:
    return "—" if x is None else format(x, fmt)


def _acc_columns(summary: dict[str, Any]) -> list[str]:
    """The benchmarks, plus "overall" when there are several."""
    benches = list(summary["benchmarks"])
    return benches + ["overall"] if len(benches) > 1 else benches


def results_headers(summary: dict[str, Any]) -> list[str]:
    return [
        "model",
        "method",
        *[f"{b} acc" for b in _acc_columns(summary)],
        "gap recovered",
        "params",
        "tokens/s (batch 1)",
        "latency / token (ms)",
        "training time (s)",
        "training FLOPs",
    ]


def _speed_cells(speed: dict[str, Any] | None) -> list[str]:
    if not speed:
        return ["—", "—"]
    lat = speed.get("per_token_latency_s")
    return [_num(speed.get("tokens_per_s_batch1"), ".0f"), _num(None if lat is None else 1000 * lat, ".2f")]


def results_rows(summary: dict[str, Any]) -> list[list[str]]:
    """The main table: the initial student, the teacher(s), then one row per run (mean over seeds)."""
    benches = _acc_columns(summary)
    rows = []
    base = summary["baselines"]
    for label, b in [("student (initial)", base["student"])] + [
        (f"teacher {t}", b) for t, b in base["teachers"].items()
    ]:
        rows.append(
            [
                label,
                "—",
                *[_pm(b["accuracy"][x]) for x in benches],
                "—",
                f"{b['params']:,}" if b.get("params") is not None else "—",
                *_speed_cells(b.get("speed")),
                "—",
                "—",
            ]
        )
    for r in summary["runs"]:
        rows.append(
            [
                r["name"],
                f"opd {r['method']}",
                *[_pm(r["accuracy"][x]) for x in benches],
                _pct(r["gap_recovered"]["overall"]),
                f"{r['params']:,}" if r.get("params") is not None else "—",
                *_speed_cells(r.get("speed")),
                _num(r["train_time_s"], ".0f") + ("" if r["train_time_measures"] == ["call"] else " †"),
                _num(r["flops"], ".3g"),
            ]
        )
    return rows


BUDGET_HEADERS = [
    "run",
    "seed",
    "steps",
    "stopped by budget",
    "spent",
    "budget",
    "spent − budget",
    "largest step",
]


def budget_rows(summary: dict[str, Any]) -> list[list[str]]:
    """The exact amount each (run, seed) spent, against the budget and its largest single step."""
    rows = []
    budget = summary["budget"] if summary["budget_unit"] != "none" else None
    for r in summary["runs"]:
        for s in r["seeds"]:
            spent = s["budget_spent"]
            rows.append(
                [
                    r["name"],
                    str(s["seed"]),
                    str(s["steps_done"]),
                    "—" if s["stopped_by_budget"] is None else f"step {s['stopped_by_budget']}",
                    _num(spent, ".6g"),
                    _num(budget, ".6g"),
                    _num(None if spent is None or budget is None else spent - budget, ".4g"),
                    _num(s["largest_step"], ".4g"),
                ]
            )
    return rows


def _gap_rows(summary: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    benches = _acc_columns(summary)
    rows = [
        [r["name"], r["gap_teacher"], *[_pct(r["gap_recovered"][b]) for b in benches]]
        for r in summary["runs"]
    ]
    return ["run", "teacher (gap measured against)", *benches], rows


def write_compare_report(
    out_dir: Path, summary: dict[str, Any], metrics: dict[tuple[str, int], list[dict[str, Any]]]
) -> tuple[Path, Path]:
    """``report.md`` + self-contained ``report.html`` + ``accuracy.png`` / ``accuracy_vs_flops.png``."""
    benches = summary["benchmarks"]
    runs = summary["runs"]
    colors = {r["name"]: f"C{i % 10}" for i, r in enumerate(runs)}

    # accuracy per benchmark, with error bars, and the student / teacher levels
    fig = new_figure(max(8.0, 3.0 + 0.5 * len(runs) * len(benches)), 3.8)
    ax = fig.add_subplot(111)
    width = 0.8 / max(1, len(runs))
    for i, r in enumerate(runs):
        xs = [j + (i - (len(runs) - 1) / 2) * width for j in range(len(benches))]
        ys = [r["accuracy"][b]["mean"] or 0.0 for b in benches]
        errs = [r["accuracy"][b]["err"] or 0.0 for b in benches]
        ax.bar(xs, ys, width, yerr=errs, capsize=3, color=colors[r["name"]], label=r["name"])
    st = summary["baselines"]["student"]["accuracy"]
    for j, b in enumerate(benches):
        if st[b]["mean"] is not None:
            ax.hlines(
                st[b]["mean"],
                j - 0.45,
                j + 0.45,
                colors="k",
                linestyles=":",
                label="student (initial)" if j == 0 else None,
            )
        for k, (t, tb) in enumerate(summary["baselines"]["teachers"].items()):
            if tb["accuracy"][b]["mean"] is not None:
                ax.hlines(
                    tb["accuracy"][b]["mean"],
                    j - 0.45,
                    j + 0.45,
                    colors="k",
                    linestyles=["--", "-."][k % 2],
                    label=f"teacher {t}" if j == 0 else None,
                )
    ax.set_xticks(range(len(benches)), benches)
    ax.set_ylabel("accuracy (avg@k)")
    ax.set_title("final accuracy per benchmark")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.savefig(out_dir / "accuracy.png", dpi=110)
    acc_plot = Plot(
        fig_to_data_uri(fig), "Final accuracy per benchmark (error bars: see the note)", file="accuracy.png"
    )

    # accuracy against training FLOPs, from the runs' periodic evaluations
    fig = new_figure(6.8, 3.8)
    ax = fig.add_subplot(111)
    any_curve = False
    for r in runs:
        for k, s in enumerate(r["seeds"]):
            pts = accuracy_curve(metrics.get((r["name"], s["seed"]), []))
            if pts:
                any_curve = True
                ax.plot(
                    *zip(*pts),
                    marker="o",
                    ms=3,
                    color=colors[r["name"]],
                    alpha=1.0 if k == 0 else 0.5,
                    label=r["name"] if k == 0 else None,
                )
    if summary["budget_unit"] == "flops":
        ax.axvline(summary["budget"], color="grey", lw=0.8, ls="--", label="budget")
    ax.set_xlabel("training FLOPs (estimate, opd.cost)")
    ax.set_ylabel("eval/accuracy (periodic)")
    ax.set_title("accuracy against training compute")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    fig.savefig(out_dir / "accuracy_vs_flops.png", dpi=110)
    curve_note = (
        "Each run's periodic evaluation during training (its eval_prompts, eval_limit and eval_* settings; "
        "metrics.jsonl rows with eval/accuracy), at the cumulative FLOPs of that step. One line per seed."
    )
    if not any_curve:
        curve_note += " No run logged a periodic evaluation: set eval_every (and eval_limit) in shared."
    curve_plot = Plot(fig_to_data_uri(fig), "Accuracy against training FLOPs", file="accuracy_vs_flops.png")

    seeds = summary["seeds"]
    err_note = (
        f"Accuracy is avg@k; ± is the standard error of the mean over the {len(seeds)} seeds."
        if len(seeds) > 1
        else "Accuracy is avg@k; ± is the standard error over prompts (one seed; run more seeds for the "
        "spread between training runs). Teacher and student rows are evaluated once."
    )
    err_note += (
        " Training time: the wall time of the run's train call (model loading, teacher-data generation and "
        "periodic evaluation included; mean over seeds); † marks a run trained outside opd compare (its "
        "training loop only) or resumed (the last part only). Serving speed: Hugging Face generate on this "
        "machine; on a shared CPU it is noisy between models."
    )
    gap_note = (
        "Gap recovered = (acc − acc_student_initial) / (acc_teacher − acc_student_initial), with the run's "
        "own teacher; — where the teacher is no better than the initial student."
    )
    unit = summary["budget_unit"]
    intro = [
        Paragraph(
            f"Student {summary['student']}, prompts {summary['prompts']}, "
            + (f"budget {summary['budget']:g} {unit} per run" if unit != "none" else "no compute budget")
            + f", seeds {', '.join(map(str, seeds))}; benchmarks {', '.join(benches)}. Total wall time "
            f"{summary.get('wall_time_s', {}).get('total', 0.0) / 60:.1f} min (this invocation)."
        )
    ]
    budget_blocks: list[Any] = [
        Paragraph(
            "The exact amount each run spent: every run stops after the first step that reaches the budget, "
            "so runs differ by at most one step (largest step = the most one step spent)."
            if unit != "none"
            else "budget_unit is none: each run did its configured steps (spent = training FLOPs)."
        ),
        Table(budget_rows(summary), BUDGET_HEADERS),
    ]
    if summary["budget_check"]:
        budget_blocks.append(Paragraph("Not at equal budget:"))
        budget_blocks.append(Bullets(summary["budget_check"]))
    gap_headers, gap_rows = _gap_rows(summary)
    run_items = []
    for r in runs:
        ov = ", ".join(f"{k}={v}" for k, v in r["overrides"].items()) or "no overrides"
        extra = (
            f"; shared keys not applied (no such key): {', '.join(r['shared_not_applied'])}"
            if r["shared_not_applied"]
            else ""
        )
        dirs = ", ".join(s["output_dir"] for s in r["seeds"])
        teacher = (
            f"teacher {r['teacher']}" if r["teacher"] else f"no teacher (gap against {r['gap_teacher']})"
        )
        run_items.append(f"{r['name']}: opd {r['method']}, {teacher}, {ov}{extra} ({dirs})")
    sections = [
        Section(
            "Results", [Table(results_rows(summary), results_headers(summary)), Paragraph(err_note), acc_plot]
        ),
        Section("Gap recovered per benchmark", [Table(gap_rows, gap_headers), Paragraph(gap_note)]),
        Section("Equal budget", budget_blocks),
        Section("Accuracy against training compute", [curve_plot, Paragraph(curve_note)]),
        Section("Runs", [Bullets(run_items)]),
    ]
    return write_report(out_dir / "report", "opd compare report", sections, intro=intro)
