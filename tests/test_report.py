"""Self-contained report helpers: tables, embedded PNG figures, one-file HTML pages."""

from __future__ import annotations

import base64
import re

import pytest

from opd.report import (
    Bullets,
    Paragraph,
    Plot,
    Preformatted,
    Section,
    Table,
    fig_to_data_uri,
    format_cell,
    html_figure,
    html_table,
    markdown_table,
    new_figure,
    render_html_block,
    render_markdown,
    write_html_report,
    write_report,
)


def test_format_cell():
    assert format_cell(None) == "—"
    assert format_cell(True) == "yes"
    assert format_cell(0.123456789) == "0.1235"
    assert format_cell(float("nan")) == "nan"
    assert format_cell(float("-inf")) == "-inf"
    assert format_cell(3) == "3"


def test_markdown_table_aligns_numbers_and_escapes_pipes():
    md = markdown_table([["a|b", 1.0, None], ["c", 2.5, 3]], ["name", "x", "y"])
    lines = md.strip().split("\n")
    assert lines[0] == "| name | x | y |"
    assert lines[1] == "|---|---:|---:|"  # numeric (or empty) columns right-aligned
    assert lines[2] == "| a\\|b | 1 | — |"
    assert len(lines) == 4


def test_tables_reject_ragged_rows():
    with pytest.raises(ValueError, match="row 1 has 1 cells but there are 2 headers"):
        markdown_table([[1, 2], [3]], ["a", "b"])
    with pytest.raises(ValueError, match="row 0"):
        html_table([[1]], ["a", "b"])


def test_html_table_escapes():
    h = html_table([["<b>x</b>", 1]], ["k&v", "n"])
    assert "&lt;b&gt;x&lt;/b&gt;" in h and "k&amp;v" in h
    assert '<td class="num">1</td>' in h


def test_fig_to_data_uri_is_png():
    fig = new_figure(2, 2)
    ax = fig.subplots()
    ax.plot([0, 1], [1, 0])
    uri = fig_to_data_uri(fig, dpi=50)
    assert uri.startswith("data:image/png;base64,")
    assert base64.b64decode(uri.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"


def test_html_figure_needs_data_uri():
    with pytest.raises(ValueError, match="self-contained"):
        html_figure("plot.png")


def test_write_html_report_is_self_contained(tmp_path):
    fig = new_figure(2, 2)
    fig.subplots().bar(["a", "b"], [1, 2])
    path = write_html_report(
        tmp_path / "sub" / "r.html",
        "Report <1>",
        [Section("Plots", [html_figure(fig, "a caption")]), ("Table", [html_table([[1]], ["x"])])],
        intro=["<p>intro</p>"],
    )
    text = path.read_text()
    assert "<title>Report &lt;1&gt;</title>" in text
    assert "<h2>Plots</h2>" in text and "<h2>Table</h2>" in text and "<p>intro</p>" in text
    assert 'src="data:image/png;base64,' in text
    # nothing is loaded from elsewhere
    assert not re.search(r'(src|href)="(?!data:)', text)
    assert "<script" not in text
    assert not list((tmp_path / "sub").glob(".*tmp*"))  # atomic write left no temporary file


def test_blocks_render_to_markdown_and_html_from_the_same_data():
    blocks = [Paragraph("a < b"), Bullets(["x", "y"]), Preformatted("code"), Table([[1, 0.5]], ["n", "v"])]
    blocks.append(Plot("data:image/png;base64,AA==", "caption"))
    md = render_markdown("T", [Section("S", blocks)])
    assert "a < b" in md and "- x\n- y" in md and "```\ncode\n```" in md and "| 1 | 0.5 |" in md
    assert "caption" not in md  # a plot without a file is left to the HTML report
    html = "".join(render_html_block(b) for b in blocks)
    assert "a &lt; b" in html and "<li>y</li>" in html and "<pre>code</pre>" in html
    assert '<td class="num">0.5</td>' in html and "<figcaption>caption</figcaption>" in html
    with pytest.raises(TypeError, match="expected one of Paragraph"):
        render_html_block(("p", "x"))


def test_write_report_renders_markdown_and_html_from_the_same_blocks(tmp_path):
    fig = new_figure(2, 2)
    fig.add_subplot(111).plot([0, 1], [1, 0])
    sections = [
        Section("Results", [Paragraph("a < b"), Bullets(["x", "y"]), Table([["s", 0.5]], ["name", "acc"])]),
        Section("Curves", [Plot(fig_to_data_uri(fig), "loss", file="loss.png"), Preformatted("k=v")]),
    ]
    md_path, html_path = write_report(tmp_path / "report", "T", sections)
    md = md_path.read_text()
    assert md_path.name == "report.md" and html_path.name == "report.html"
    assert md.startswith(
        "# T\n\n## Results\n\na < b\n\n- x\n- y\n\n| name | acc |\n|---|---:|\n| s | 0.5 |\n"
    )
    assert "![loss](loss.png)" in md and "```\nk=v\n```" in md
    page = html_path.read_text()
    assert "<p>a &lt; b</p>" in page and "<li>y</li>" in page and '<td class="num">0.5</td>' in page
    assert "data:image/png;base64," in page and "<pre>k=v</pre>" in page
    with pytest.raises(TypeError, match="raw HTML has no markdown form"):
        render_markdown("T", [Section("S", ["<p>only html</p>"])])
    assert "<p>only html</p>" in render_html_block("<p>only html</p>")
