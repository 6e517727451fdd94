"""The ``opd recipe`` report: ``report.md`` and ``report.html`` from the same sections, plus ``curves.png``.

Sections: the outcome, the diagnosis before and after (side by side), the plan (each remedy and why,
what the diagnosis asked for and could not be done), the attempts (remedies, method, steps, the alert
that stopped it), and the metric curves of every attempt (accuracy, overlap ratio and mass, sampled KL,
entropy gap, response length, against the OPD step).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from opd.report import Bullets, Paragraph, Plot, Section, Table, fig_to_data_uri, new_figure, write_report
from opd.tracking import read_metrics_if_any

__all__ = ["CURVES", "write_recipe_report"]

CURVES = (
    ("eval/accuracy", "accuracy (eval_prompts, greedy)"),
    ("overlap/ratio", "top-k overlap ratio"),
    ("overlap/mass_teacher", "teacher mass on the overlap"),
    ("kl/sampled", "sampled-token KL (nats)"),
    ("entropy/gap", "entropy gap (nats)"),
    ("response/length_mean", "response length (tokens)"),
)

DIAG_ROWS = (
    ("verdict", "verdict"),
    ("remedies", "remedies named"),
    ("overlap_ratio", "overlap ratio"),
    ("overlap_mass", "overlap mass (min of both)"),
    ("low_overlap_share", "rollouts with a low overlap mass"),
    ("overlap_adv", "Eq. 7 overlap advantage"),
    ("entropy_gap", "entropy gap (nats)"),
    ("reward_abs_mean", "mean |reward| (nats/token)"),
    ("accuracy_student", "student accuracy"),
    ("accuracy_teacher", "teacher accuracy"),
    ("continuation_advantage", "continuation advantage"),
)


def _cell(v: Any) -> Any:
    if isinstance(v, list):
        return ", ".join(map(str, v)) or "none"
    return v


def _curves_plot(root: Path, state: dict[str, Any]) -> Plot | None:
    attempts = state.get("attempts") or []
    series = [(a, read_metrics_if_any((a.get("metrics") or {}).get("opd"))) for a in attempts]
    if not any(rows for _, rows in series):
        return None
    fig = new_figure(12, 6.4)
    axes = fig.subplots(2, 3).ravel()
    for ax, (key, label) in zip(axes, CURVES, strict=True):
        for a, rows in series:
            pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
            if pts:
                names = "+".join(r["name"] for r in [*map(dict, a.get("remedies", []))]) or "plain"
                ax.plot(
                    *zip(*pts, strict=True),
                    marker="o" if key == "eval/accuracy" else None,
                    ms=3,
                    label=f"attempt {a['attempt']} ({names})",
                )
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("OPD step", fontsize=8)
    for ax in axes:  # one legend, on the first panel with a curve
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
            break
    uri = fig_to_data_uri(fig)
    fig.savefig(root / "curves.png", dpi=110)
    return Plot(
        uri,
        "OPD metrics per attempt (step 0 of a cold-started attempt is after its SFT stage).",
        file="curves.png",
    )


def write_recipe_report(root: Path, state: dict[str, Any]) -> tuple[Path, Path]:
    """Write ``report.md``, ``report.html`` (and ``curves.png``) into ``root``; returns the two reports."""
    diag = state.get("diagnosis") or {}
    before, after = diag.get("before") or {}, diag.get("after") or {}
    plan = state.get("plan") or {}
    ev = state.get("evaluation") or {}
    intro: list = []
    first = state.get("template_first")
    if first is not None:
        intro.append(
            Paragraph(
                "**The teacher's template, picked before the diagnosis** (`template-first/`): "
                + (f"`{first['template']!r}`" if first.get("template") else "the student's own prompt")
                + f" — {first.get('why', '')}. The diagnosis and every run score the teacher under it."
            )
        )
    if state.get("status") == "refused":
        intro.append(Paragraph(f"**Refused.** {state['refused']}"))
    else:
        intro.append(
            Paragraph(
                f"Final model: `{state.get('final_model')}`. Accuracy on eval_prompts: "
                f"{_fmt(ev.get('student'))} (student) → {_fmt(ev.get('final'))} (final model). Remedies applied: "
                + (", ".join(r["name"] for r in (state["attempts"][-1]["remedies"])) or "none")
                + f"; {len(state.get('attempts', []))} run(s)."
            )
        )
    sections = [
        Section(
            "Diagnosis before and after",
            [
                Table(
                    [
                        [label, _cell(before.get(k)), _cell(after.get(k)) if after else None]
                        for k, label in DIAG_ROWS
                    ],
                    ["", "before (the student)", "after (the final model)"],
                ),
                Paragraph("Reasons (before):"),
                Bullets(before.get("reasons") or ["none"]),
            ],
        ),
        Section(
            "Remedies chosen and why",
            [
                Bullets(
                    [f"**{r['name']}** (before the first run): {r['why']}" for r in plan.get("initial", [])]
                    + [f"{r['name']} (if an alert stops a run): {r['why']}" for r in plan.get("fallback", [])]
                    + [f"not applied: {n}" for n in plan.get("notes", [])]
                    or [
                        "none: the recipe refused (above)"
                        if state.get("status") == "refused"
                        else "none: the diagnosis says go"
                    ]
                )
            ],
        ),
    ]
    attempts = state.get("attempts") or []
    if attempts:
        rows = []
        for a in attempts:
            e = next((x for x in ev.get("attempts", []) if x["attempt"] == a["attempt"]), {})
            rows.append(
                [
                    a["attempt"],
                    ", ".join(r["name"] for r in a["remedies"]) or "none",
                    a.get("method"),
                    a.get("steps_done"),
                    "; ".join(a.get("alerts", {})) or "none",
                    a.get("stopped_by_alert"),
                    e.get("opd_start"),
                    e.get("final"),
                ]
            )
        blocks: list = [
            Table(
                rows,
                [
                    "attempt",
                    "remedies",
                    "method",
                    "OPD steps",
                    "alerts fired",
                    "stopped at step",
                    "accuracy at OPD start",
                    "final accuracy",
                ],
            )
        ]
        for a in attempts:
            for key, msg in (a.get("alerts") or {}).items():
                blocks.append(Paragraph(f"Attempt {a['attempt']}, {key}: {msg}"))
            for name, info in (a.get("setup") or {}).items():
                blocks.append(
                    Paragraph(
                        f"Attempt {a['attempt']}, {name} remedy: {info.get('why', '')} "
                        + json.dumps({k: v for k, v in info.items() if k != "why"})[:400]
                    )
                )
        sections.append(Section("Runs", blocks))
        plot = _curves_plot(root, state)
        if plot is not None:
            sections.append(Section("Metric curves", [plot]))
    return write_report(root / "report", "opd recipe", sections, intro=intro)


def _fmt(x: Any) -> str:
    return "n/a" if x is None else f"{x:.3f}"
