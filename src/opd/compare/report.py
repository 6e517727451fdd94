"""The comparison report: tables and plots of a comparison summary, as markdown, self-contained HTML
and PNG (:func:`write_compare_report`)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from opd.report import (
    Bullets,
    Paragraph,
    Plot,
    Section,
    Table,
    fig_to_data_uri,
    new_figure,
    write_report,
)

log = logging.getLogger("opd")


# --------------------------------------------------------------------------- report


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


def flops_to_reach(curve: list[tuple[float, float]], level: float) -> float | None:
    """The training FLOPs of the first periodic evaluation at or above ``level`` (None: never reached)."""
    return next((flops for flops, acc in curve if acc >= level), None)


def reach_rows(
    summary: dict[str, Any], metrics: dict[tuple[str, int], list[dict[str, Any]]], levels: list[float]
) -> tuple[list[str], list[list[str]]]:
    """One row per run: for each level, the mean over seeds of the FLOPs to first reach it, with how many
    seeds reached it (a seed that never did is left out of the mean and counted)."""
    headers = ["run"] + [f"FLOPs to eval/accuracy ≥ {lv:g}" for lv in levels]
    rows = []
    for r in summary["runs"]:
        cells = [r["name"]]
        curves = [accuracy_curve(metrics.get((r["name"], s["seed"]), [])) for s in r["seeds"]]
        for lv in levels:
            hits = [f for f in (flops_to_reach(c, lv) for c in curves) if f is not None]
            if not hits:
                cells.append(f"not reached (0/{len(curves)} seeds)")
            else:
                cells.append(f"{sum(hits) / len(hits):.3g} ({len(hits)}/{len(curves)} seeds)")
        rows.append(cells)
    return headers, rows


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
    reach_blocks = []
    levels = [float(x) for x in summary.get("reach_accuracy") or []]
    if levels and any_curve:
        reach_headers, reach_table = reach_rows(summary, metrics, levels)
        reach_blocks = [
            Table(reach_table, reach_headers),
            Paragraph(
                "Compute to reach an accuracy: the training FLOPs of each run's first periodic evaluation at or "
                "above the level (reach_accuracy), the mean over the seeds that reached it. A run evaluates "
                "every eval_every steps, so this is an upper bound by up to eval_every - 1 steps."
            ),
        ]
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
        Section("Accuracy against training compute", [curve_plot, Paragraph(curve_note)] + reach_blocks),
        Section("Runs", [Bullets(run_items)]),
    ]
    return write_report(out_dir / "report", "opd compare report", sections, intro=intro)
