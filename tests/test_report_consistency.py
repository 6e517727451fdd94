"""The numbers a reader sees in the demo's and diagnose's markdown / HTML reports are the JSON's numbers.

Rendered from fixed result dicts here (fast, every branch), and checked again on real runs in
test_demo.py (``opd demo --smoke``) and test_diagnose.py (tiny models end to end).
"""

from __future__ import annotations

import copy
import json

import pytest
from report_tables import check_demo_report, check_diagnosis_report, html_tables, markdown_tables

TEACHERS = ["teacher-a-plus", "teacher-b-plus", "teacher-a-same"]


def demo_summary() -> dict:
    """A demo summary with awkward values: a negative gap recovered, a zero gap (None), a None verdict."""
    by_diff = {"easy": 0.9, "medium": 0.5625, "hard": 0.205}
    zoo = {
        "student": {"params": 151_872, "accuracy": 0.555, "by_difficulty": by_diff},
        "teacher-a-plus": {"params": 579_456, "accuracy": 1.0, "by_difficulty": {**by_diff, "hard": 1.0}},
        "teacher-b-plus": {"params": 579_456, "accuracy": 1.0, "by_difficulty": {**by_diff, "hard": 0.995}},
        "teacher-a-same": {"params": 579_456, "accuracy": 0.555, "by_difficulty": by_diff},
    }
    after = {"teacher-a-plus": 0.7734375, "teacher-b-plus": 0.0, "teacher-a-same": 0.5625}
    results = []
    for i, t in enumerate(TEACHERS):
        gap = zoo[t]["accuracy"] - 0.555
        results.append(
            {
                "teacher": t,
                "role": "r",
                "teacher_params": 579_456,
                "teacher_accuracy": zoo[t]["accuracy"],
                "student_params": 151_872,
                "accuracy_before": 0.555,
                "accuracy_after": after[t],
                "after_by_difficulty": {"easy": 0.95, "medium": after[t], "hard": None},
                "gap_recovered": (after[t] - 0.555) / gap if gap else None,
                "train_wall_time_s": 123.4 + i,
                "tokens_per_s": 2345.6 - 100 * i,
                "overlap_ratio_first": 0.5,
                "overlap_ratio_last": 0.9,
                "verdict": ["go", "go-after-remedy", None][i],
            }
        )
    verdicts = {t: {"verdict": r["verdict"], "reasons": ["a reason"]} for t, r in zip(TEACHERS, results)}
    return {
        "settings": {"steps": 3, "support_size": 16},
        "seed": 0,
        "smoke": True,
        "zoo": zoo,
        "verdicts": verdicts,
        "results": results,
        "wall_time_s": 61.0,
    }


@pytest.fixture(scope="module")
def demo_report(tmp_path_factory):
    """(summary, report.md, report.html) rendered once from ``demo_summary()``."""
    summary = demo_summary()
    return (summary, *_render_demo(tmp_path_factory.mktemp("demo-report"), summary))


def _render_demo(tmp_path, summary):
    from opd.lab.demo import CURVES, write_demo_report

    metrics = {t: [{"step": s, **{key: 0.5 for key, _, _ in CURVES}} for s in (1, 2)] for t in TEACHERS}
    write_demo_report(tmp_path, summary, metrics)
    return (tmp_path / "report.md").read_text(), (tmp_path / "report.html").read_text()


def test_demo_report_shows_the_summary(demo_report):
    summary, md, html = demo_report
    check_demo_report(summary, md, html)
    rows = {row[0]: row for row in markdown_tables(md)[0]}
    assert rows["student ← teacher-b-plus"][3] == "-124.7%"  # (0 - 0.555) / (1 - 0.555)
    assert rows["student ← teacher-a-same"][3] == "—"  # no gap to recover


def test_demo_report_check_catches_a_wrong_number(demo_report):
    summary, md, html = demo_report
    wrong = copy.deepcopy(summary)
    wrong["results"][0]["accuracy_after"] = 0.7834375  # the JSON says one thing, the report another
    wrong["results"][0]["gap_recovered"] = (0.7834375 - 0.555) / 0.445
    with pytest.raises(AssertionError, match="after"):
        check_demo_report(wrong, md, html)
    bad_gap = copy.deepcopy(summary)
    bad_gap["results"][0]["gap_recovered"] = (0.7734375 - 0.555) / 1.0  # divided by the teacher's score
    with pytest.raises(AssertionError, match="teacher-a-plus"):
        check_demo_report(bad_gap, md, html)
    with pytest.raises(AssertionError, match="differ"):
        check_demo_report(summary, md, html.replace("<td>go</td>", "<td>no-go</td>", 1))


def test_table_readers():
    md = "x\n\n| a | b \\| c |\n|---|---:|\n| 1 | 2.5% |\n\ny\n"
    assert markdown_tables(md) == [[["a", "b | c"], ["1", "2.5%"]]]
    html = "<table><thead><tr><th>a</th></tr></thead><tbody><tr><td>&lt;1&gt;</td></tr></tbody></table>"
    assert html_tables(html) == [[["a"], ["<1>"]]]


def test_diagnosis_report_shows_the_json(tmp_path, tiny_pair):
    """A real (tiny) diagnosis, rendered again from its JSON: every table's numbers match."""
    from opd.diagnose import DiagnoseConfig, diagnose, render_markdown, write_html

    student, teacher, prompts = tiny_pair
    cfg = DiagnoseConfig(
        student=str(student),
        teacher=str(teacher),
        prompts=str(prompts),
        output_dir=str(tmp_path / "diag"),
        num_prompts=4,
        rollouts_per_prompt=2,
        max_new_tokens=6,
        prefix_fractions=(0.0, 0.5),
        progress=False,
        seed=0,
    )
    diagnose(cfg)
    d = json.loads((tmp_path / "diag" / "diagnosis.json").read_text())
    md = (tmp_path / "diag" / "diagnosis.md").read_text()
    html = (tmp_path / "diag" / "diagnosis.html").read_text()
    check_diagnosis_report(d, md, html)
    assert render_markdown(d) == md  # the report is a function of the JSON alone
    write_html(tmp_path / "again.html", d)
    assert html_tables((tmp_path / "again.html").read_text()) == html_tables(html)
    wrong = copy.deepcopy(d)
    wrong["condition_ii"]["accuracy"]["teacher"]["accuracy"] += 0.25
    with pytest.raises(AssertionError):
        check_diagnosis_report(wrong, md, html)
