"""Tables and the markdown / HTML report of ``opd eval`` and ``opd grade`` results."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from opd.report import Bullets, Paragraph, Section, Table, write_report

# ---------------------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------------------


def _pm(value: float, se: float | None) -> str:
    return f"{100 * value:.1f}" + (f" ± {100 * se:.1f}" if se is not None else "")


def accuracy_rows(models: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    """Headers and rows (one per model x benchmark, then each model's overall) of the accuracy table."""
    headers = [
        "model",
        "benchmark",
        "avg@k (%)",
        "pass@k (%)",
        "k",
        "prompts",
        "mean length",
        "truncated",
        "no answer",
    ]
    rows = []
    for res in models:
        for name, m in [*res["benchmarks"].items(), ("overall", res["overall"])]:
            rows.append(
                [
                    res["model"],
                    name,
                    _pm(m["avg@k"], m["avg@k_stderr"]),
                    _pm(m["pass@k"], m["pass@k_stderr"]),
                    m["k"],
                    m["n_prompts"],
                    round(m["mean_length"], 1),
                    f"{100 * m['truncated_rate']:.1f}%",
                    f"{100 * m['no_answer_rate']:.1f}%",
                ]
            )
    return headers, rows


def speed_rows(models: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    """Headers and rows (one per model with a speed measurement) of the size and speed table."""
    headers = [
        "model",
        "params",
        "MB",
        "tok/s batch 1",
        "tok/s batch B",
        "B",
        "TTFT (ms)",
        "ms/token",
        "device",
    ]
    rows = []
    for res in models:
        s = res.get("speed")
        if s is None:
            continue
        rows.append(
            [
                res["model"],
                res["params"],
                round(res["bytes"] / 1e6, 2),
                round(s["tokens_per_s_batch1"], 1),
                round(s["tokens_per_s_batch"], 1),
                s["batch_size"],
                round(1e3 * s["ttft_s"], 2),
                round(1e3 * s["per_token_latency_s"], 3),
                f"{s['device']} {s['dtype']}",
            ]
        )
    return headers, rows


def write_eval_report(stem: str | Path, title: str, summary: dict[str, Any]) -> tuple[Path, Path]:
    """``<stem>.md`` and ``<stem>.html`` of an ``opd eval`` / ``opd grade`` summary."""
    models = summary["models"]
    headers, rows = accuracy_rows(models)
    intro = []
    if "config" in summary:
        c = summary["config"]
        intro.append(
            Paragraph(
                f"Sampling: {c['samples'] if c['temperature'] else 1} response(s) per prompt, temperature "
                f"{c['temperature']}, top-p {c['top_p']}, at most {c['max_new_tokens']} new tokens, seed "
                f"{c['seed']}"
                + (f", {c['limit']} prompts per benchmark (seeded sample)" if c["limit"] else "")
                + f" (preset {c['preset']})."
            )
        )
    else:
        intro.append(
            Paragraph(
                f"Re-graded {summary['predictions']} with the current grader: {summary['changed']} "
                "response(s) changed verdict. Speed and size are not re-measured."
            )
        )
    sections = [
        Section(
            "Accuracy",
            [
                Table(rows, headers),
                Bullets(
                    [
                        "avg@k: mean over prompts of the fraction of the k samples graded correct; ± one "
                        "standard error over prompts.",
                        "pass@k: mean over prompts of 1 - C(n-c, k)/C(n, k) (Chen et al. 2021), here k = n.",
                        "mean length: response tokens; truncated: share of responses cut at max_new_tokens; "
                        "no answer: share without a \\boxed{} answer.",
                        "overall: every prompt of every benchmark, each weighing the same.",
                    ]
                ),
            ],
        )
    ]
    s_headers, s_rows = speed_rows(models)
    if s_rows:
        sections.append(
            Section(
                "Size and serving speed",
                [
                    Table(s_rows, s_headers),
                    Paragraph(
                        "Hugging Face generate with a KV cache, greedy, exactly the measured number of new "
                        "tokens, median of repeated runs after a warm-up; TTFT = a 1-token generate at batch 1; "
                        "ms/token = decode time per token after the first at batch 1. Compare rows measured "
                        "on the same machine only."
                    ),
                ],
            )
        )
    return write_report(stem, title, sections, intro=intro)
