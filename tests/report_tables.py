"""Read the tables back out of rendered reports, so tests can compare what a reader sees with the JSON.

Independent of ``opd.report``: markdown is split on unescaped ``|``, HTML is read with the standard
library's parser. Cells come back as plain text (HTML entities decoded, ``\\|`` unescaped).
"""

from __future__ import annotations

import math
import re
from html.parser import HTMLParser

import pytest

Table = list[list[str]]  # header row first


def markdown_tables(md: str) -> list[Table]:
    """Every GitHub-flavoured table in ``md`` (header row first, the ``---`` rule dropped)."""
    tables: list[Table] = []
    current: Table = []
    for line in md.splitlines() + [""]:
        if line.startswith("|"):
            cells = [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
            if not all(re.fullmatch(r":?-+:?", c) for c in cells):
                current.append(cells)
        elif current:
            tables.append(current)
            current = []
    return tables


class _HTMLTables(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tables: list[Table] = []
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.tables[-1][-1].append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def html_tables(html: str) -> list[Table]:
    """Every ``<table>`` in ``html`` (header row first)."""
    parser = _HTMLTables()
    parser.feed(html)
    return parser.tables


def number(cell: str) -> float:
    """A rendered number back to a float: ``0.344``, ``12.5%`` (→ 0.125), ``30s``, ``1,234``, ``-inf``."""
    text = cell.strip().replace(",", "").replace("−", "-")
    scale = 1.0
    if text.endswith("%"):
        text, scale = text[:-1], 0.01
    elif text.endswith("s"):
        text = text[:-1]
    return float(text) * scale


def assert_cell(cell: str, value, *, digits: int, pct: bool = False, what: str = "") -> None:
    """``cell`` shows ``value`` rounded as printed: ``digits`` decimals (``pct``: of 100·value), or, with
    ``digits < 0``, ``-digits`` significant digits. ``None`` must show as "—", bools as yes/no."""
    if value is None:
        assert cell == "—", f"{what}: {cell!r} should be — (None in the JSON)"
        return
    if isinstance(value, bool):
        assert cell == ("yes" if value else "no"), f"{what}: {cell!r} vs {value}"
        return
    if isinstance(value, float) and math.isnan(value):
        assert cell == "nan", f"{what}: {cell!r} vs nan"
        return
    shown = number(cell)
    if digits >= 0:
        tol = 0.5 * 10.0 ** (-digits) * (0.01 if pct else 1.0)
    else:
        tol = 0.5 * 10.0 ** (1 + digits) * (10.0 ** math.floor(math.log10(abs(value))) if value else 1.0)
    assert shown == pytest.approx(value, abs=tol * 1.0001 + 1e-15), (
        f"{what}: {cell!r} shows {shown}, JSON {value}"
    )


# ------------------------------------------------------------------------------------------- demo report


def check_demo_report(summary: dict, md: str, html: str) -> None:
    """The demo's report.md and report.html show summary.json's numbers, and the JSON's gap recovered is
    (after − before) / (teacher − before) from the JSON's own accuracies."""
    zoo = summary["zoo"]
    for r in summary["results"]:
        teacher_acc = zoo[r["teacher"]]["accuracy"]
        assert r["teacher_accuracy"] == teacher_acc and r["accuracy_before"] == zoo["student"]["accuracy"]
        gap = teacher_acc - r["accuracy_before"]
        if abs(gap) <= 1e-9:  # no gap to recover
            assert r["gap_recovered"] is None, r["teacher"]
        else:
            expected = (r["accuracy_after"] - r["accuracy_before"]) / gap
            assert r["gap_recovered"] == pytest.approx(expected, rel=1e-12, abs=1e-12), r["teacher"]
    md_tables, html_tables_ = markdown_tables(md), html_tables(html)
    assert len(md_tables) == 2 and md_tables == html_tables_, "report.md and report.html tables differ"
    main, by_difficulty = md_tables
    assert main[0] == [
        "model",
        "params",
        "accuracy (before → after)",
        "gap recovered",
        "training time",
        "tokens/s",
        "pre-flight verdict",
    ]
    names = ["student", *(r["teacher"] for r in summary["results"])]
    assert [row[0] for row in main[1:]] == [
        "student (before)",
        *names[1:],
        *(f"student ← {r['teacher']}" for r in summary["results"]),
    ]
    for row, name in zip(main[1:], names):
        assert number(row[1]) == zoo[name]["params"], name
        assert_cell(row[2], zoo[name]["accuracy"], digits=3, what=f"{name} accuracy")
    for row, r in zip(main[1 + len(names) :], summary["results"]):
        what = f"student ← {r['teacher']}"
        assert number(row[1]) == r["student_params"], what
        before, after = row[2].split("→")
        assert_cell(before, r["accuracy_before"], digits=3, what=f"{what} before")
        assert_cell(after, r["accuracy_after"], digits=3, what=f"{what} after")
        assert_cell(row[3], r["gap_recovered"], digits=1, pct=True, what=f"{what} gap recovered")
        assert_cell(row[4], r["train_wall_time_s"], digits=0, what=f"{what} training time")
        assert_cell(row[5], r["tokens_per_s"], digits=0, what=f"{what} tokens/s")
        assert row[6] == (r["verdict"] or "—"), what
    diffs = list(zoo["student"]["by_difficulty"])
    assert by_difficulty[0] == ["model", *diffs]
    expected_rows = [(n, zoo[n]["by_difficulty"]) for n in names]
    expected_rows += [(f"student ← {r['teacher']}", r["after_by_difficulty"]) for r in summary["results"]]
    assert [row[0] for row in by_difficulty[1:]] == [n for n, _ in expected_rows]
    for row, (name, accs) in zip(by_difficulty[1:], expected_rows):
        for cell, d in zip(row[1:], diffs):
            assert_cell(cell, accs.get(d), digits=3, what=f"{name} {d}")
    for t, v in summary["verdicts"].items():
        assert f"- {t}: {v['verdict']} — " in md, t


# ------------------------------------------------------------------------------------------ diagnosis


def _sig(cell: str, value, what: str) -> None:
    """A cell rendered by ``opd.report.format_cell`` (4 significant digits; ints in full)."""
    if isinstance(value, int) and not isinstance(value, bool):
        assert cell == str(value), f"{what}: {cell!r} vs {value}"
    elif isinstance(value, str):
        assert cell == value, f"{what}: {cell!r} vs {value!r}"
    else:
        assert_cell(cell, value, digits=-4, what=what)


def check_diagnosis_report(d: dict, md: str, html: str) -> None:
    """diagnosis.md and diagnosis.html show diagnosis.json's numbers (every table, the gap line)."""
    md_tables, html_tables_ = markdown_tables(md), html_tables(html)
    assert md_tables == html_tables_, "diagnosis.md and diagnosis.html tables differ"
    by_header = {tuple(t[0]): t[1:] for t in md_tables}
    checks = by_header[("condition", "check", "value", "threshold", "result")]
    assert len(checks) == len(d["checks"])
    for row, c in zip(checks, d["checks"]):
        what = f"check {c['description']}"
        assert row[:2] == [c["condition"], c["description"]], what
        _sig(row[2], c["value"], what)
        if c["threshold"] is None:
            assert row[3] == ""
        else:
            op, thr = row[3].split(" ", 1)
            assert op == c["op"], what
            assert_cell(thr, c["threshold"], digits=-3, what=what + " threshold")  # 3 significant digits
        assert row[4] == {None: "—", True: "pass", False: "FAIL"}[c["passed"]], what
    ci = d.get("condition_i")
    if ci:
        rows = dict((r[0], r[1]) for r in by_header[("metric", "value")])
        m = ci["metrics"]
        for label, value in [
            (f"overlap ratio E|I_t|/k (Eq. 6), k = {ci['k']}", m.get("overlap/ratio")),
            ("student mass on I_t", m.get("overlap/mass_student")),
            ("teacher mass on I_t", m.get("overlap/mass_teacher")),
            ("Eq. 7 overlap advantage", m.get("overlap/adv")),
            ("entropy gap E|H(q)-H(p)|", m.get("entropy/gap")),
            ("overlap ratio at the first response token", ci["first_token"]["overlap_ratio"]),
        ]:
            _sig(rows[label], value, label)
    ci2 = d.get("condition_ii") or {}
    acc = ci2.get("accuracy")
    if acc:
        rows = by_header[("model", "accuracy", "mean length", "truncated")]
        for row, who in zip(rows, ("student", "teacher")):
            assert row[0] == who
            for cell, key in zip(row[1:], ("accuracy", "length_mean", "truncated_frac")):
                _sig(cell, acc[who][key], f"{who} {key}")
        gap = re.search(r"Gap \(teacher - student\): (\S+) ± (\S+) \(paired s\.e\.\)", md)
        assert gap, "the accuracy gap line is missing from diagnosis.md"
        assert_cell(gap.group(1), acc["gap"], digits=3, what="accuracy gap")
        assert acc["gap"] == pytest.approx(acc["teacher"]["accuracy"] - acc["student"]["accuracy"], abs=1e-12)
    cont = ci2.get("continuation") or {}
    if cont.get("by_fraction"):
        rows = by_header[("fraction", "prefix tokens", "student", "teacher", "advantage", "s.e.")]
        assert len(rows) == len(cont["by_fraction"])
        for row, c in zip(rows, cont["by_fraction"]):
            keys = (
                "fraction",
                "depth_mean",
                "student_accuracy",
                "teacher_accuracy",
                "advantage",
                "advantage_se",
            )
            for cell, key in zip(row, keys):
                _sig(cell, c[key], f"continuation {key}")
            assert c["advantage"] == pytest.approx(c["teacher_accuracy"] - c["student_accuracy"], abs=1e-12)
    rew = ci2.get("reward")
    if rew:
        rows = by_header[("reward", "mean", "std", "mean abs", "p05", "p50", "p95")]
        for row, key in zip(rows, ("sampled_token", "topk", "seq_mean_sampled_token")):
            s = rew.get(key) or {}
            for cell, stat in zip(row[1:], ("mean", "std", "abs_mean", "p05", "p50", "p95")):
                _sig(cell, s.get(stat), f"reward {key} {stat}")
    gen = (d.get("cost") or {}).get("generated_tokens")
    if gen:
        rows = by_header[("generated tokens", "count")]
        assert {r[0]: int(r[1]) for r in rows} == gen
