"""The ``opd diagnose`` report: one list of sections of typed :mod:`opd.report` blocks built from the
result dict (``diagnosis.json``), rendered to ``diagnosis.md`` and to a self-contained ``diagnosis.html``
by the same renderer, so the two formats show the same figures. Plots are in the HTML only."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from opd.report import (
    Block,
    Bullets,
    Paragraph,
    Plot,
    Preformatted,
    Section,
    Table,
    fig_to_data_uri,
    format_cell,
    new_figure,
    write_html_report,
)
from opd.report import render_markdown as render_markdown_page

__all__ = ["render_markdown", "report_sections", "write_html"]

TITLE = "OPD pre-flight diagnosis"


def _fmt(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}g}"


def _check_rows(result) -> list[list]:
    rows = []
    for c in result["checks"]:
        status = "—" if c["passed"] is None else ("pass" if c["passed"] else "FAIL")
        thr = "" if c["threshold"] is None else f"{c['op']} {format_cell(c['threshold'], 3)}"
        rows.append([c["condition"], c["description"], c["value"], thr, status])
    return rows


def report_sections(result: dict[str, Any], plots: dict[str, Plot] | None = None) -> list[Section]:
    """The report's sections, in typed :mod:`opd.report` blocks; ``plots`` (key -> :class:`Plot`, from
    :func:`_plots`) are placed where the result supports them, and left out when not given."""
    plots = plots or {}

    def plot(key: str) -> list[Block]:
        return [plots[key]] if key in plots else []

    sections = [
        Section("Reasons", [Bullets(result["reasons"])]),
        Section(
            "Checks",
            [Table(_check_rows(result), ["condition", "check", "value", "threshold", "result"])],
        ),
    ]

    tk = result.get("tokenizer", {})
    blocks: list[Block] = []
    if not tk.get("compatible", True):
        blocks.append(Paragraph(f"Incompatible: {tk.get('error')}"))
    else:
        blocks.append(
            Bullets(
                [
                    f"the conversation renders to the same ids with both chat templates: {tk.get('same_render')}",
                    f"the same text tokenises to the same ids with both tokenizers: {tk.get('same_tokenization')}",
                    f"student stop tokens: {tk['student']['stop_tokens']}; teacher stop tokens: "
                    f"{tk['teacher']['stop_tokens']}",
                ]
                + [f"warning: {w}" for w in tk.get("compat_warnings", [])]
            )
        )
        same = tk.get("same_render") and tk["student"].get("rendered")
        for who in ("student", "teacher"):
            if same and who == "teacher":
                continue
            if tk[who].get("rendered"):
                label = "both chat templates (identical)" if same else f"the {who}'s chat template"
                blocks += [
                    Paragraph(f"The test conversation rendered by {label}:"),
                    Preformatted(tk[who]["rendered"]),
                ]
            elif tk[who].get("error"):
                blocks.append(Paragraph(f"The {who}'s chat template failed: {tk[who]['error']}"))
        if tk.get("token_diff"):
            blocks.append(Paragraph("Token diff of the two renderings (student -> teacher):"))
            blocks.append(
                Preformatted(
                    "\n".join(
                        f"{d['op']:>8} @{d['student_at']}/{d['teacher_at']}: {d['student']} -> {d['teacher']}"
                        for d in tk["token_diff"]
                    )
                )
            )
    sections.append(Section("Tokenizer, chat template and EOS", blocks))

    ci = result.get("condition_i")
    if ci:
        m, ft, st = ci["metrics"], ci["first_token"], ci["stop_token"]
        names = [
            ("overlap/ratio", f"overlap ratio E|I_t|/k (Eq. 6), k = {ci['k']}"),
            ("overlap/mass_student", "student mass on I_t"),
            ("overlap/mass_teacher", "teacher mass on I_t"),
            ("overlap/adv", "Eq. 7 overlap advantage"),
            ("overlap/adv_verl", "verl overlap advantage"),
            ("entropy/student", "student entropy H(p) (nats)"),
            ("entropy/teacher", "teacher entropy H(q) (nats)"),
            ("entropy/gap", "entropy gap E|H(q)-H(p)|"),
            ("entropy/gap_of_means", "|E H(q) - E H(p)|"),
        ]
        rows = [[label, m.get(k)] for k, label in names] + [
            ["overlap ratio at the first response token", ft["overlap_ratio"]],
            ["student entropy at the first response token", ft["entropy_student"]],
            ["teacher entropy at the first response token", ft["entropy_teacher"]],
            [f"reward at the student's stop token ({st['count']} stops)", st["reward_mean"]],
        ]
        blocks = [Table(rows, ["metric", "value"]), *plot("profile")]
        prof = ci["profile"]
        keys = ["overlap_ratio", "overlap_mass_teacher", "overlap_adv", "entropy_student", "entropy_teacher"]
        keys += ["entropy_gap", "reward"]
        if prof["overlap_ratio"]["start"]:
            bs = prof["bin_size"]
            prow = []
            for i, s in enumerate(prof["overlap_ratio"]["start"]):
                row: list[Any] = [f"{s}-{s + bs}", prof["overlap_ratio"]["count"][i]]
                row += [dict(zip(prof[k]["start"], prof[k]["mean"])).get(s) for k in keys]
                prow.append(row)
            blocks += [Paragraph("By response position:"), Table(prow, ["positions", "tokens", *keys])]
        sections.append(Section("Condition (i): compatible thinking patterns", blocks))

    ci2 = result.get("condition_ii")
    if ci2:
        blocks = []
        acc = ci2.get("accuracy")
        if acc:
            dec = "greedy" if acc["temperature"] == 0 else f"T = {acc['temperature']}, avg@{acc['samples']}"
            rows = [
                [who, acc[who]["accuracy"], acc[who]["length_mean"], acc[who]["truncated_frac"]]
                for who in ("student", "teacher")
            ]
            blocks += [
                Paragraph(
                    f"Accuracy on {acc['num_prompts']} prompts ({dec}, the student's prompt rendering):"
                ),
                Table(rows, ["model", "accuracy", "mean length", "truncated"]),
                Paragraph(
                    f"Gap (teacher - student): {_fmt(acc['gap'])} ± {_fmt(acc['gap_se'], 2)} (paired s.e.)."
                ),
            ]
        cont = ci2.get("continuation") or {}
        if cont.get("by_fraction"):
            rows = [
                [
                    c["fraction"],
                    c["depth_mean"],
                    c["student_accuracy"],
                    c["teacher_accuracy"],
                    c["advantage"],
                    c["advantage_se"],
                ]
                for c in cont["by_fraction"]
            ]
            blocks += [
                Paragraph(
                    f"Teacher continuation advantage: the first rollout of {cont['rollouts']} prompts is cut after "
                    "each fraction of its response tokens, and both models complete the same prefix:"
                ),
                Table(rows, ["fraction", "prefix tokens", "student", "teacher", "advantage", "s.e."]),
                Paragraph(f"Mean advantage: {_fmt(cont['advantage'])} ± {_fmt(cont['advantage_se'], 2)}."),
            ]
        if acc or cont:
            blocks += plot("accuracy")
        if not ci2.get("has_answers"):
            blocks.append(
                Paragraph(
                    "The prompts carry no answers: accuracy and continuation advantage are not measured."
                )
            )
        rew = ci2["reward"]
        rows = []
        for key, label in (
            ("sampled_token", "per token, sampled-token log q - log p"),
            ("topk", "per token, top-K (student support, student_p)"),
            ("seq_mean_sampled_token", "per rollout, mean sampled-token"),
        ):
            s = rew.get(key) or {}
            rows.append(
                [
                    label,
                    s.get("mean"),
                    s.get("std"),
                    s.get("abs_mean"),
                    s.get("p05"),
                    s.get("p50"),
                    s.get("p95"),
                ]
            )
        blocks += [
            Paragraph(
                f"Reward size and spread (nats); KL estimate E[log p - log q] = {_fmt(rew.get('kl_estimate'))}:"
            ),
            Table(rows, ["reward", "mean", "std", "mean abs", "p05", "p50", "p95"]),
            *plot("reward"),
        ]
        sections.append(Section("Condition (ii): new capability", blocks))

    ctx = result.get("context") or {}
    if ctx.get("auroc_sampled_token") is not None or "num_correct" in ctx:
        sections.append(
            Section(
                "Context: reward vs correctness",
                [
                    Paragraph(
                        "AUROC of the sequence-mean reward against the correctness of the student's rollouts: "
                        f"sampled-token {_fmt(ctx.get('auroc_sampled_token'))}, top-K {_fmt(ctx.get('auroc_topk'))} "
                        f"({ctx['num_correct']} correct, {ctx['num_wrong']} wrong). {ctx['note']}"
                    )
                ],
            )
        )
    cost = result.get("cost") or {}
    blocks = []
    if cost.get("generated_tokens"):
        blocks += [
            Table([[k, v] for k, v in cost["generated_tokens"].items()], ["generated tokens", "count"]),
            Paragraph(
                f"Scored sequences {cost['scored_sequences']}, scored tokens (prompt + response) "
                f"{cost['scored_tokens']}; bound on generated tokens {cost['bound_generated_tokens']}."
            ),
        ]
    secs = cost.get("seconds", {})
    blocks.append(Paragraph("Time (s): " + ", ".join(f"{k} {v:.1f}" for k, v in secs.items())))
    sections.append(Section("Cost", blocks))
    return sections


def _header(result: dict[str, Any]) -> tuple[str, Bullets]:
    """The remedy suffix of the verdict line and the run's facts (models, prompts, rollouts)."""
    remedy = f" — remedy: {', '.join(result['remedies'])}" if result["remedies"] else ""
    items = [
        f"student: {result['student']}",
        f"teacher: {result['teacher']}",
        f"prompts: {result['prompts']}",
    ]
    if result["flags"]:
        items.append(f"flags: {', '.join(result['flags'])}")
    ro = result.get("rollouts")
    if ro:
        items.append(
            f"{ro['num']} student rollouts ({ro['prompts']} prompts x {ro['per_prompt']}), mean length "
            f"{ro['length_mean']:.1f} tokens, truncated {ro['truncated_frac']:.1%}"
        )
    return remedy, Bullets(items)


def render_markdown(result: dict[str, Any]) -> str:
    """The markdown report of a diagnosis result (the dict ``diagnose`` returns); plots are in the HTML."""
    remedy, facts = _header(result)
    intro = [Paragraph(f"**Verdict: `{result['verdict']}`**{remedy}"), facts]
    return render_markdown_page(TITLE, report_sections(result), intro=intro)


def write_html(path: str | Path, result: dict[str, Any]) -> Path:
    """The self-contained HTML report: the markdown report's content plus embedded plots."""
    cls = {"go": "good", "go-after-remedy": "warn", "no-go": "bad", "inconclusive": "warn"}[result["verdict"]]
    remedy, facts = _header(result)
    badge = f'<p><span class="badge {cls}">{result["verdict"]}</span> {html.escape(remedy)}</p>'
    return write_html_report(path, TITLE, report_sections(result, _plots(result)), intro=[badge, facts])


def _plots(result: dict[str, Any]) -> dict[str, Plot]:
    """key -> :class:`Plot` (PNG data URI and caption) for each plot the result supports."""
    out: dict[str, Plot] = {}
    prof = (result.get("condition_i") or {}).get("profile", {})
    if prof.get("overlap_ratio", {}).get("start"):
        bs = prof["bin_size"]
        fig = new_figure(10, 3.6)
        ax1, ax2 = fig.subplots(1, 2)
        for ax, keys in (
            (
                ax1,
                (
                    ("overlap_ratio", "overlap ratio"),
                    ("overlap_mass_student", "student mass on I"),
                    ("overlap_mass_teacher", "teacher mass on I"),
                ),
            ),
            (
                ax2,
                (
                    ("entropy_student", "H(p) student"),
                    ("entropy_teacher", "H(q) teacher"),
                    ("entropy_gap", "|H(q) - H(p)|"),
                ),
            ),
        ):
            for key, label in keys:
                ax.plot(
                    [s + bs / 2 for s in prof[key]["start"]], prof[key]["mean"], marker="o", ms=3, label=label
                )
            ax.set_xlabel("response position (tokens)")
            ax.legend(fontsize=8)
        ax1.set_ylim(0, 1.05)
        ax1.set_title("top-k overlap by position")
        ax2.set_ylabel("nats")
        ax2.set_title("entropy by position")
        out["profile"] = Plot(
            fig_to_data_uri(fig),
            "Condition (i): overlap and entropy by response position, on the student's rollouts.",
        )

    ci2 = result.get("condition_ii") or {}
    hist = (ci2.get("reward") or {}).get("histogram")
    ctx = result.get("context") or {}
    if hist and hist.get("counts"):
        fig = new_figure(10, 3.4)
        ax1, ax2 = fig.subplots(1, 2)
        ax1.stairs(hist["counts"], hist["edges"], fill=True, color="#4c72b0")
        ax1.set_yscale("log")
        ax1.set_xlabel("per-token reward log q - log p (nats)")
        ax1.set_title("per-token reward")
        seq, correct = ctx.get("seq_mean_reward") or [], ctx.get("rollout_correct") or []
        if any(c is not None for c in correct):
            ok = [s for s, c in zip(seq, correct) if c]
            bad = [s for s, c in zip(seq, correct) if c is False]
            ax2.hist(
                [ok, bad],
                bins=20,
                label=[f"correct ({len(ok)})", f"wrong ({len(bad)})"],
                color=["#55a868", "#c44e52"],
            )
            ax2.legend(fontsize=8)
        elif seq:
            ax2.hist(seq, bins=20, color="#4c72b0")
        ax2.set_xlabel("sequence-mean reward (nats)")
        ax2.set_title("reward per rollout")
        out["reward"] = Plot(
            fig_to_data_uri(fig),
            "Reward distribution: per token (log scale) and per rollout, by correctness.",
        )

    acc, cont = ci2.get("accuracy"), ci2.get("continuation") or {}
    if acc:
        fig = new_figure(10, 3.4)
        ax1, ax2 = fig.subplots(1, 2)
        ax1.bar(
            ["student", "teacher"],
            [acc["student"]["accuracy"], acc["teacher"]["accuracy"]],
            color=["#4c72b0", "#dd8452"],
        )
        ax1.bar_label(ax1.containers[0], fmt="%.2f")
        ax1.set_ylim(0, 1.08)
        ax1.set_title("accuracy on the prompts")
        bf = cont.get("by_fraction") or []
        if bf:
            xs = list(range(len(bf)))
            ax2.bar(
                [x - 0.2 for x in xs],
                [c["student_accuracy"] for c in bf],
                0.4,
                label="student completes",
                color="#4c72b0",
            )
            ax2.bar(
                [x + 0.2 for x in xs],
                [c["teacher_accuracy"] for c in bf],
                0.4,
                label="teacher completes",
                color="#dd8452",
            )
            ax2.set_xticks(xs, [f"{c['fraction']:.2f}\n({c['depth_mean']:.0f} tok)" for c in bf])
            for c in ax2.containers:
                ax2.bar_label(c, fmt="%.2f", fontsize=7)
            ax2.set_ylim(0, 1.08)
            ax2.set_xlabel("prefix: fraction of the student's rollout")
            ax2.legend(fontsize=8)
        ax2.set_title("completing the student's own prefixes")
        out["accuracy"] = Plot(
            fig_to_data_uri(fig),
            "Condition (ii): accuracy from the prompt, and when completing the student's truncated rollouts.",
        )
    return out
