"""Training or collecting each planned run, evaluating the models, the budget accounting and the
summary of the whole comparison (:func:`run_compare`)."""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import logging
import math
import re
import time
from pathlib import Path
from typing import Any

import torch

from opd import evaluation
from opd.checkpoint import list_checkpoints
from opd.compare.config import IGNORED_WHEN_COLLECTING, CompareConfig, PlannedRun, _one_line, plan_runs
from opd.compare.report import results_headers, results_rows, write_compare_report
from opd.config_io import to_dict
from opd.errors import ConfigError
from opd.report import (
    markdown_table,
    write_text_atomic,
)
from opd.rundir import config_changes
from opd.tracking import read_metrics_if_any

log = logging.getLogger("opd")


# --------------------------------------------------------------------------- training or collecting


def _comparable(config: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps({k: v for k, v in config.items() if k not in IGNORED_WHEN_COLLECTING}))


def run_state(run: PlannedRun) -> tuple[str, str]:
    """What to do with ``run``'s directory: ``("collect", why)`` for a finished run with the same config,
    ``("resume", why)``, ``("train", why)`` (empty or absent), ``("retrain", why)`` (a finished run with
    other settings, or debris without a checkpoint: only with ``overwrite``)."""
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
    """The evaluation module (a function, so a test can put a fake evaluator in its place)."""
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


# --------------------------------------------------------------------------- the whole comparison


def run_compare(cfg: CompareConfig) -> dict[str, Any]:
    """Plan, train or collect, evaluate and report (see the module docstring). Returns the comparison
    summary, also written to ``output_dir/compare.json`` next to ``report.md`` / ``report.html``."""
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
    metrics = {(p.name, p.seed): read_metrics_if_any(p.out_dir / "metrics.jsonl") for p in planned}
    write_text_atomic(out / "compare.json", json.dumps(summary, indent=1, default=str))
    write_compare_report(out, summary, metrics)
    print("\n" + markdown_table(results_rows(summary), results_headers(summary)), flush=True)
    print(
        f"\nreport: {out / 'report.html'}  (total {summary['wall_time_s']['total'] / 60:.1f} min)", flush=True
    )
    return summary


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
            metrics = read_metrics_if_any(p.out_dir / "metrics.jsonl")
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
        "reach_accuracy": cfg.reach_accuracy,
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
