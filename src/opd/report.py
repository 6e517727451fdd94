"""Self-contained reports: markdown tables, HTML pages with embedded PNG plots, no external assets.

Generic helpers shared by ``opd diagnose`` and the demo report. An HTML report is one file: plots are
PNG images inlined as ``data:`` URIs, the stylesheet is inline, nothing is fetched from the network, so
the file can be attached to an issue or opened offline.

Building blocks (each returns a string):

- :func:`markdown_table` / :func:`html_table` — a table from rows of cells;
- :func:`fig_to_data_uri` — a matplotlib figure as a ``data:image/png;base64,...`` URI;
- :func:`html_figure`, :func:`html_paragraph`, :func:`html_pre`, :func:`html_list` — HTML blocks;
- :func:`write_html_report` — a page from ``(title, blocks)`` sections;
- :func:`new_figure` — a matplotlib ``Figure`` that needs no GUI backend (safe in threads and tests);
- :func:`write_report` — the same sections as ``<stem>.md`` and ``<stem>.html``, from typed blocks
  (:class:`Paragraph`, :class:`Bullets`, :class:`Preformatted`, :class:`Table`, :class:`Plot`) that
  :func:`render_markdown` and :func:`render_html_block` render the same way in both formats, so the two
  reports cannot drift. A report whose HTML needs an extra (a styled badge) renders the same sections
  with :func:`render_markdown` and :func:`write_html_report`, each with its own ``intro``.

Cells are formatted by :func:`format_cell`: floats with 4 significant digits, ``None`` as an em dash.
All text is HTML-escaped except blocks produced by the ``html_*`` helpers, which are passed through.

Deliberately left out: markdown-to-HTML conversion (write the two formats from the same data instead),
JavaScript, interactive plots and external CSS.
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "Block",
    "Bullets",
    "Paragraph",
    "Plot",
    "Preformatted",
    "Section",
    "Table",
    "fig_to_data_uri",
    "format_cell",
    "html_figure",
    "html_list",
    "html_paragraph",
    "html_pre",
    "html_table",
    "markdown_table",
    "new_figure",
    "render_html_block",
    "render_markdown",
    "write_html_report",
    "write_report",
    "write_text_atomic",
]

CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; max-width: 1100px;
       margin: 2em auto; padding: 0 1em; color: #1f2328; line-height: 1.45; }
h1 { border-bottom: 2px solid #d0d7de; padding-bottom: .3em; }
h2 { border-bottom: 1px solid #d0d7de; padding-bottom: .2em; margin-top: 1.8em; }
table { border-collapse: collapse; margin: .8em 0; font-size: .92em; }
th, td { border: 1px solid #d0d7de; padding: .3em .6em; text-align: left; vertical-align: top; }
th { background: #f6f8fa; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
pre { background: #f6f8fa; padding: .8em; overflow-x: auto; font-size: .85em; }
figure { margin: 1em 0; }
figure img { max-width: 100%; border: 1px solid #eaeef2; }
figcaption { font-size: .88em; color: #57606a; }
.badge { display: inline-block; padding: .15em .6em; border-radius: 1em; font-weight: 600; color: #fff; }
.good { background: #1a7f37; } .warn { background: #9a6700; } .bad { background: #cf222e; }
.muted { color: #57606a; }
"""


@dataclass(frozen=True)
class Paragraph:
    text: str


@dataclass(frozen=True)
class Bullets:
    items: Sequence[str]


@dataclass(frozen=True)
class Preformatted:
    text: str


@dataclass(frozen=True)
class Table:
    rows: Sequence[Sequence[Any]]
    headers: Sequence[str]
    digits: int = 4


@dataclass(frozen=True)
class Plot:
    """A plot: ``uri`` (from :func:`fig_to_data_uri`) is inlined in HTML; markdown links ``file`` (a PNG
    written next to the report) and leaves the plot out when ``file`` is None."""

    uri: str
    caption: str = ""
    file: str | None = None


Block = Paragraph | Bullets | Preformatted | Table | Plot


@dataclass
class Section:
    """One titled part of a report: typed blocks (rendered to markdown and HTML alike) or HTML strings
    from the ``html_*`` helpers (HTML only)."""

    title: str
    blocks: list[Block | str] = field(default_factory=list)


def format_cell(value: Any, digits: int = 4) -> str:
    """A table cell as text: floats with ``digits`` significant digits, ``None`` as "—", bools as yes/no."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return f"{value:.{digits}g}"
    return str(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def markdown_table(rows: Sequence[Sequence[Any]], headers: Sequence[str], *, digits: int = 4) -> str:
    """A GitHub-flavoured markdown table; numeric columns are right-aligned, ``|`` in cells is escaped.

    Raises ValueError naming the row if a row's length differs from ``headers``.
    """
    _check_rows(rows, headers)
    numeric = [
        bool(rows) and all(_is_number(r[j]) or r[j] is None for r in rows) for j in range(len(headers))
    ]

    def cell(v: Any) -> str:
        return format_cell(v, digits).replace("|", "\\|").replace("\n", " ")

    lines = [
        "| " + " | ".join(cell(h) for h in headers) + " |",
        "|" + "|".join("---:" if n else "---" for n in numeric) + "|",
    ]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def html_table(rows: Sequence[Sequence[Any]], headers: Sequence[str], *, digits: int = 4) -> str:
    """An HTML table (cells escaped; numbers right-aligned)."""
    _check_rows(rows, headers)
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
    body = []
    for r in rows:
        tds = "".join(
            f'<td class="num">{html.escape(format_cell(v, digits))}</td>'
            if _is_number(v)
            else f"<td>{html.escape(format_cell(v, digits))}</td>"
            for v in r
        )
        body.append(f"<tr>{tds}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _check_rows(rows: Sequence[Sequence[Any]], headers: Sequence[str]) -> None:
    for i, r in enumerate(rows):
        if len(r) != len(headers):
            raise ValueError(
                f"table row {i} has {len(r)} cells but there are {len(headers)} headers ({list(headers)}); "
                "give every row one cell per header"
            )


def html_paragraph(text: str, *, css_class: str | None = None) -> str:
    """A ``<p>`` with escaped text."""
    cls = f' class="{html.escape(css_class)}"' if css_class else ""
    return f"<p{cls}>{html.escape(text)}</p>"


def html_pre(text: str) -> str:
    """Preformatted, escaped text (token diffs, configs)."""
    return f"<pre>{html.escape(text)}</pre>"


def html_list(items: Iterable[str]) -> str:
    """A bulleted list of escaped items."""
    return "<ul>" + "".join(f"<li>{html.escape(i)}</li>" for i in items) + "</ul>"


def new_figure(width: float = 6.4, height: float = 3.6):
    """A matplotlib ``Figure`` bound to the Agg canvas (no pyplot state, no display needed)."""
    # lazy: matplotlib is slow to import and only a report with plots needs it
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def fig_to_data_uri(fig, *, dpi: int = 110) -> str:
    """Render a matplotlib figure to PNG and return it as a ``data:image/png;base64,...`` URI."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def html_figure(fig_or_uri: Any, caption: str = "", *, alt: str = "") -> str:
    """An inline ``<figure>``: a matplotlib figure (rendered to PNG) or an existing data URI."""
    uri = fig_or_uri if isinstance(fig_or_uri, str) else fig_to_data_uri(fig_or_uri)
    if not uri.startswith("data:"):
        raise ValueError(
            f"html_figure: expected a matplotlib figure or a data: URI, got a string starting {uri[:20]!r}; "
            "reports are self-contained, so pass fig_to_data_uri(fig)"
        )
    cap = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
    return f'<figure><img src="{uri}" alt="{html.escape(alt or caption)}">{cap}</figure>'


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` via a temporary sibling and a rename (no half-written reports)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def write_html_report(
    path: str | Path,
    title: str,
    sections: Sequence[Section | tuple[str, Sequence[Block | str]]],
    *,
    intro: Sequence[Block | str] = (),
) -> Path:
    """Write a self-contained HTML page: ``<h1>title``, the ``intro`` blocks, then each section.

    Args:
        path: output file (parent directories are created).
        title: page title (escaped).
        sections: :class:`Section` objects or ``(title, blocks)`` pairs; blocks are typed blocks or HTML
            strings from the ``html_*`` helpers (passed through unescaped).
        intro: blocks placed before the first section.
    """
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        *(render_html_block(b) for b in intro),
    ]
    for s in sections:
        sec_title, blocks = (s.title, s.blocks) if isinstance(s, Section) else s
        parts.append(f"<h2>{html.escape(sec_title)}</h2>")
        parts.extend(render_html_block(b) for b in blocks)
    parts.append("</body></html>")
    return write_text_atomic(path, "\n".join(parts) + "\n")


def render_html_block(block: Block | str) -> str:
    """A typed block as HTML; an HTML string (from the ``html_*`` helpers) is passed through."""
    if isinstance(block, str):
        return block
    if isinstance(block, Paragraph):
        return html_paragraph(block.text)
    if isinstance(block, Bullets):
        return html_list(block.items)
    if isinstance(block, Preformatted):
        return html_pre(block.text)
    if isinstance(block, Table):
        return html_table(block.rows, block.headers, digits=block.digits)
    if isinstance(block, Plot):
        return html_figure(block.uri, block.caption)
    raise TypeError(
        f"report block of type {type(block).__name__}: expected one of Paragraph, Bullets, "
        "Preformatted, Table, Plot or an HTML string"
    )


def _markdown_block(block: Block | str) -> str:
    if isinstance(block, Paragraph):
        return block.text
    if isinstance(block, Bullets):
        return "\n".join(f"- {i}" for i in block.items)
    if isinstance(block, Preformatted):
        return f"```\n{block.text}\n```"
    if isinstance(block, Table):
        return markdown_table(block.rows, block.headers, digits=block.digits).rstrip("\n")
    if isinstance(block, Plot):
        return f"![{block.caption}]({block.file})" if block.file else ""
    raise TypeError(
        f"report block {block!r:.60}: raw HTML has no markdown form; use Paragraph, Bullets, Preformatted, "
        "Table or Plot for content that appears in both formats"
    )


def render_markdown(title: str, sections: Sequence[Section], *, intro: Sequence[Block] = ()) -> str:
    """The markdown page of ``sections`` (``# title``, the ``intro`` blocks, then ``## section`` each)."""
    parts = [f"# {title}", *(_markdown_block(b) for b in intro)]
    for s in sections:
        parts.append(f"## {s.title}")
        parts.extend(_markdown_block(b) for b in s.blocks)
    return "\n\n".join(p for p in parts if p) + "\n"


def write_report(
    stem: str | Path, title: str, sections: Sequence[Section], *, intro: Sequence[Block] = ()
) -> tuple[Path, Path]:
    """Write ``<stem>.md`` and the self-contained ``<stem>.html`` from the same sections; returns both."""
    stem = Path(stem)
    md = write_text_atomic(stem.with_name(stem.name + ".md"), render_markdown(title, sections, intro=intro))
    return md, write_html_report(stem.with_name(stem.name + ".html"), title, sections, intro=intro)
