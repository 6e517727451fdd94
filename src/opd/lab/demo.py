"""``opd demo`` — the main job: OPD end to end on the lab's model organism, with a report.

Steps (each with a progress bar):
  1. evaluate the zoo (student and the three teachers) on the lab test set;
  2. pre-flight ``opd diagnose`` of each (student, teacher) pair: the verdict before any training;
  3. OPD from ``lab:student`` toward ``teacher-a-plus`` (compatible pattern, new capability),
     ``teacher-b-plus`` (incompatible pattern, similar accuracy) and ``teacher-a-same`` (same pipeline,
     no new capability), identical settings (student top-K, K = 16, student_p), with periodic eval;
  4. evaluate each final student on the whole test set;
  5. write ``summary.json``, ``report.md``, ``report.html`` (self-contained) and PNG plots, and print
     the table: model, params, accuracy before → after, gap recovered, wall time, tokens/s.

The settings below were chosen so the full demo fits in about 10 minutes on a 2-core CPU; ``--smoke``
is a reduced version for CI that exercises every step in a fraction of that.
"""

from __future__ import annotations

import functools
import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from opd.config import OPDConfig
from opd.data import load_prompts
from opd.diagnose import DiagnoseConfig, diagnose
from opd.evaluate import evaluate_accuracy
from opd.lab import resolve
from opd.methods.opd import train
from opd.models import load_model, load_tokenizer
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
)
from opd.rundir import RunDirError, locked_run_dir
from opd.tracking import read_metrics

TEACHERS = ("teacher-a-plus", "teacher-b-plus", "teacher-a-same")
TEACHER_ROLES = {
    "teacher-a-plus": "same thinking pattern, new capability (hard problems)",
    "teacher-b-plus": "different thinking pattern, new capability",
    "teacher-a-same": "same pattern, same data as the student (no new capability)",
}


@dataclass
class DemoSettings:
    """The demo's knobs; identical for every teacher."""

    steps: int = 150
    prompts_per_step: int = 16
    rollouts_per_prompt: int = 4
    max_new_tokens: int = 64  # lab responses are at most 53 tokens
    lr: float = 3e-4
    support_size: int = 16
    micro_batch_size: int = 64
    eval_every: int = 25
    eval_limit: int = 100  # test prompts evaluated during training (a fixed random subset)
    test_limit: int = 0  # test prompts for before/after accuracy (0 = the whole lab test set)
    diagnose_prompts: int = 32
    diagnose_rollouts: int = 2
    threads: int = 1  # tiny models run fastest on one thread (and do not fight over a shared CPU)


FULL = DemoSettings()
SMOKE = DemoSettings(
    steps=3,
    prompts_per_step=4,
    rollouts_per_prompt=2,
    eval_every=3,
    eval_limit=16,
    test_limit=32,
    diagnose_prompts=4,
    diagnose_rollouts=1,
)


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _eval(model_name: str, test_set, settings: DemoSettings, progress: bool) -> dict[str, Any]:
    model = load_model(model_name)
    tok = load_tokenizer(model_name)
    res = evaluate_accuracy(
        model, tok, test_set, temperature=0.0, max_new_tokens=settings.max_new_tokens, progress=progress
    )
    return {
        "accuracy": res["accuracy"],
        "by_difficulty": res["by_difficulty"],
        "params": _params(model),
        "response_length_mean": res["response_length_mean"],
    }


def run_demo(
    *,
    smoke: bool = False,
    output_dir: str | None = None,
    seed: int = 0,
    steps: int | None = None,
    progress: bool = True,
    settings: DemoSettings | None = None,
) -> dict[str, Any]:
    """Run the demo; returns the summary (also written to ``<output_dir>/summary.json``).

    ``output_dir`` must be a new or empty directory (it is locked for the demo's duration)."""

    output_dir = output_dir or f"runs/demo-{time.strftime('%Y%m%d-%H%M%S')}"
    with locked_run_dir(output_dir, key="--output-dir") as run:
        if run.entries():
            raise RunDirError(
                f"--output-dir {output_dir!r} is not empty: choose a new directory for the demo, or delete it"
            )
        return _run_demo(
            smoke=smoke, output_dir=output_dir, seed=seed, steps=steps, progress=progress, settings=settings
        )


def _run_demo(
    *,
    smoke: bool,
    output_dir: str,
    seed: int,
    steps: int | None,
    progress: bool,
    settings: DemoSettings | None,
) -> dict[str, Any]:

    settings = settings or (SMOKE if smoke else FULL)
    if steps is not None:
        settings = replace(settings, steps=steps, eval_every=min(settings.eval_every, steps))
    if settings.threads:
        torch.set_num_threads(settings.threads)
    resolve("lab:student", kind="model").require_built()  # a clear error if the zoo is not built
    out_dir = Path(output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    log = functools.partial(print, flush=True)

    tok = load_tokenizer("lab:student")
    test_set = load_prompts(
        "lab:test", tok, limit=settings.test_limit or None, seed=seed if settings.test_limit else None
    )

    log(
        f"opd demo: {len(test_set.examples)} test prompts, {settings.steps} OPD steps per teacher -> {out_dir}"
    )
    log("[1/4] evaluating the zoo")
    zoo: dict[str, Any] = {}
    for name in ("student", *TEACHERS):
        zoo[name] = _eval(f"lab:{name}", test_set, settings, progress)
        log(
            f"  {name:<15} {zoo[name]['params']:>9,d} params  accuracy {zoo[name]['accuracy']:.3f}  "
            + "  ".join(f"{d} {a:.3f}" for d, a in zoo[name]["by_difficulty"].items())
        )

    log("[2/4] pre-flight diagnosis of each pair")
    verdicts: dict[str, Any] = {}
    for teacher in TEACHERS:
        verdicts[teacher] = _diagnose(teacher, out_dir / "diagnose" / teacher, settings, seed, progress)
        log(f"  {teacher:<15} verdict: {verdicts[teacher].get('verdict')}")

    log("[3/4] OPD runs (identical settings)")
    runs: dict[str, Any] = {}
    for teacher in TEACHERS:
        cfg = OPDConfig(
            student="lab:student",
            teacher=f"lab:{teacher}",
            prompts="lab:train",
            output_dir=str(out_dir / "runs" / teacher),
            steps=settings.steps,
            prompts_per_step=settings.prompts_per_step,
            rollouts_per_prompt=settings.rollouts_per_prompt,
            max_new_tokens=settings.max_new_tokens,
            lr=settings.lr,
            weight_decay=0.0,
            objective="topk",
            support_size=settings.support_size,
            micro_batch_size=settings.micro_batch_size,
            eval_every=settings.eval_every,
            eval_prompts="lab:test",
            eval_limit=settings.eval_limit,
            seed=seed,
            progress=progress,
        )
        summary = train(cfg)
        runs[teacher] = {"summary": summary, "metrics": _read(out_dir / "runs" / teacher / "metrics.jsonl")}

    log("[4/4] evaluating the distilled students")
    results = []
    before = zoo["student"]["accuracy"]
    for teacher in TEACHERS:
        after = _eval(runs[teacher]["summary"]["final_model"], test_set, settings, progress)
        t_acc = zoo[teacher]["accuracy"]
        gap = t_acc - before
        m = [r for r in runs[teacher]["metrics"] if r["step"] > 0]  # step 0 holds only the starting eval
        results.append(
            {
                "teacher": teacher,
                "role": TEACHER_ROLES[teacher],
                "teacher_params": zoo[teacher]["params"],
                "teacher_accuracy": t_acc,
                "student_params": zoo["student"]["params"],
                "accuracy_before": before,
                "accuracy_after": after["accuracy"],
                "after_by_difficulty": after["by_difficulty"],
                "gap_recovered": (after["accuracy"] - before) / gap if abs(gap) > 1e-9 else None,
                "train_wall_time_s": runs[teacher]["summary"]["loop_time_s"],
                "tokens_per_s": sum(r["throughput/tokens_per_s"] for r in m) / max(1, len(m)),
                "overlap_ratio_first": m[0].get("overlap/ratio"),
                "overlap_ratio_last": m[-1].get("overlap/ratio"),
                "verdict": verdicts[teacher].get("verdict"),
            }
        )

    summary = {
        "settings": asdict(settings),
        "seed": seed,
        "smoke": smoke,
        "zoo": zoo,
        "verdicts": verdicts,
        "results": results,
        "wall_time_s": time.perf_counter() - t_start,
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    write_demo_report(out_dir, summary, {t: runs[t]["metrics"] for t in TEACHERS})
    log("")
    log(results_table(summary))
    log(f"\nreport: {out_dir / 'report.html'}  (total {summary['wall_time_s'] / 60:.1f} min)")
    return summary


def _diagnose(teacher: str, out: Path, settings: DemoSettings, seed: int, progress: bool) -> dict[str, Any]:

    cfg = DiagnoseConfig(
        student="lab:student",
        teacher=f"lab:{teacher}",
        prompts="lab:train",
        num_prompts=settings.diagnose_prompts,
        rollouts_per_prompt=settings.diagnose_rollouts,
        max_new_tokens=settings.max_new_tokens,
        output_dir=str(out),
        seed=seed,
        progress=progress,
    )
    res = diagnose(cfg)
    return {
        "verdict": res.get("verdict"),
        "reasons": res.get("reasons", []),
        "report": str(out / "diagnosis.html"),
    }


def _read(path: Path) -> list[dict[str, Any]]:

    return read_metrics(path)


# --------------------------------------------------------------------------- report


def _fmt(x: Any, pct: bool = False) -> str:
    if x is None:
        return "—"
    return f"{100 * x:.1f}%" if pct else f"{x:.3f}"


RESULT_HEADERS = [
    "model",
    "params",
    "accuracy (before → after)",
    "gap recovered",
    "training time",
    "tokens/s",
    "pre-flight verdict",
]


def results_rows(summary: dict[str, Any]) -> list[list[str]]:
    """The main table: the zoo, then one line per distilled student."""
    zoo = summary["zoo"]
    rows = [
        [
            "student (before)",
            f"{zoo['student']['params']:,}",
            _fmt(zoo["student"]["accuracy"]),
            "",
            "",
            "",
            "",
        ]
    ]
    for name in TEACHERS:
        rows.append([name, f"{zoo[name]['params']:,}", _fmt(zoo[name]["accuracy"]), "", "", "", ""])
    for r in summary["results"]:
        rows.append(
            [
                f"student ← {r['teacher']}",
                f"{r['student_params']:,}",
                f"{_fmt(r['accuracy_before'])} → {_fmt(r['accuracy_after'])}",
                _fmt(r["gap_recovered"], pct=True),
                f"{r['train_wall_time_s']:.0f}s",
                f"{r['tokens_per_s']:.0f}",
                r["verdict"] or "—",
            ]
        )
    return rows


def difficulty_rows(summary: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Accuracy per difficulty for the zoo and every distilled student."""
    zoo = summary["zoo"]
    diffs = list(zoo["student"]["by_difficulty"])
    rows = [
        [name, *(_fmt(zoo[name]["by_difficulty"].get(d)) for d in diffs)] for name in ("student", *TEACHERS)
    ]
    for r in summary["results"]:
        rows.append([f"student ← {r['teacher']}", *(_fmt(r["after_by_difficulty"].get(d)) for d in diffs)])
    return ["model", *diffs], rows


def results_table(summary: dict[str, Any]) -> str:

    return markdown_table(results_rows(summary), RESULT_HEADERS)


CURVES = [
    ("eval/accuracy", "test accuracy (subset)", "accuracy"),
    ("overlap/ratio", "top-16 overlap ratio", "overlap"),
    ("kl/sampled", "reverse KL on sampled tokens", "reverse_kl"),
    ("overlap/mass_teacher", "overlap mass (teacher)", "overlap_mass"),
    ("entropy/gap", "entropy gap |H(q) - H(p)|", "entropy_gap"),
]


def write_demo_report(
    out_dir: Path, summary: dict[str, Any], metrics: dict[str, list[dict[str, Any]]]
) -> None:
    plots = []
    for key, title, fname in CURVES:
        fig = new_figure(6.4, 3.4)
        ax = fig.add_subplot(111)
        for teacher, rows in metrics.items():
            pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o" if key == "eval/accuracy" else None, ms=3, label=teacher)
        ax.set_xlabel("OPD step")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.savefig(out_dir / f"{fname}.png", dpi=110)
        plots.append(Plot(fig_to_data_uri(fig), title, file=f"{fname}.png"))

    diff_headers, diff_rows = difficulty_rows(summary)
    roles = [f"{t}: {TEACHER_ROLES[t]}" for t in TEACHERS]
    verdicts = [
        f"{t}: {v.get('verdict')} — " + "; ".join(v.get("reasons", [])[:3])
        for t, v in summary["verdicts"].items()
    ]
    intro = (
        f"Seed {summary['seed']}, {summary['settings']['steps']} OPD steps per teacher (student top-K, "
        f"K = {summary['settings']['support_size']}, student_p weights), total wall time "
        f"{summary['wall_time_s'] / 60:.1f} min."
    )
    note = "Gap recovered = (after − before) / (teacher − before) on the lab test set, greedy decoding."
    sections = [
        Section(
            "Results",
            [Paragraph(intro), Bullets(roles), Table(results_rows(summary), RESULT_HEADERS), Paragraph(note)],
        ),
        Section("Accuracy by difficulty", [Table(diff_rows, diff_headers)]),
        Section("Pre-flight verdicts (opd diagnose, before training)", [Bullets(verdicts)]),
        Section("Curves", plots),
    ]
    write_report(out_dir / "report", "opd demo report", sections)
