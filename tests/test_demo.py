"""`opd demo --smoke`: the reduced main job end to end through the real CLI, on the shipped lab zoo."""

import json
import subprocess
import sys

import pytest
from report_tables import check_demo_report


@pytest.mark.smoke
def test_demo_smoke(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "opd.cli", "demo", "--smoke", "--no-progress", "--output-dir", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert [r["teacher"] for r in summary["results"]] == [
        "teacher-a-plus",
        "teacher-b-plus",
        "teacher-a-same",
    ]
    for r in summary["results"]:
        assert 0.0 <= r["accuracy_before"] <= 1.0 and 0.0 <= r["accuracy_after"] <= 1.0
        assert r["verdict"] in ("go", "go-after-remedy", "no-go")
        assert r["tokens_per_s"] > 0
    for name in ("report.md", "report.html", "accuracy.png", "overlap.png", "reverse_kl.png"):
        assert (out / name).stat().st_size > 0, name
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html and 'src="http' not in html  # self-contained
    assert "gap recovered" in proc.stdout
    check_demo_report(summary, (out / "report.md").read_text(), html)
