"""One self-contained HTML report: sections of text, tables and embedded plots, plus the machine it ran on.

The file has no external resources (CSS is inline, images and downloads are ``data:`` URIs), so it can be
mailed or attached on its own. Every piece of text is escaped with :func:`html.escape`.
"""

from __future__ import annotations

import base64
import csv
import html
import mimetypes
import os
import platform
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from .plots import plot_runs
from .runs import RunRecord
from .tables import COLUMNS, run_rows

Table = tuple[Sequence[str], Sequence[Sequence[str]]]

_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?%?")

_CSS = """
body { font-family: "DejaVu Sans", "Liberation Sans", Arial, sans-serif; margin: 24px auto; max-width: 1150px;
       color: #1d1d1f; background: #fff; line-height: 1.4; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; }
h2 { font-size: 1.25em; border-bottom: 2px solid #d0d7de; padding-bottom: 4px; margin-top: 1.6em; }
p { white-space: pre-line; }
table { border-collapse: collapse; margin: 10px 0; font-size: 0.92em; }
th, td { border: 1px solid #d0d7de; padding: 4px 10px; text-align: left; }
th { background: #eef2f6; }
tbody tr:nth-child(even) { background: #f6f8fa; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
table.env th { background: none; font-weight: 600; }
img { max-width: 100%; height: auto; display: block; margin: 10px 0; border: 1px solid #d0d7de; }
"""


@dataclass
class Section:
    """One titled part of a report.

    Attributes:
        title: heading of the section.
        text: free text shown under the heading (blank lines separate paragraphs).
        tables: ``(columns, rows)`` pairs, each cell a string.
        images: image files (PNG, SVG, JPEG) embedded as ``data:`` URIs.
        downloads: files (e.g. the CSV of a table) embedded as ``data:`` download links.
    """

    title: str
    text: str = ""
    tables: list[Table] = field(default_factory=list)
    images: list[Path] = field(default_factory=list)
    downloads: list[Path] = field(default_factory=list)


def environment_info() -> dict[str, str]:
    """Where the report was made: host, OS, Python and torch versions, CPU model and cores, CUDA device, date."""
    cuda = "none"
    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        cuda = torch.cuda.get_device_name(0) + (f" (x{count})" if count > 1 else "")
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "host": platform.node() or "?",
        "os": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": _cpu_model(),
        "cores": f"{_usable_cores()} usable of {os.cpu_count()}",
        "cuda device": cuda,
    }


def _usable_cores() -> int | None:
    """Cores this process may run on (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def _cpu_model() -> str:
    """The ``model name`` of /proc/cpuinfo, else what :mod:`platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "?"


def runs_section(
    runs: Sequence[RunRecord], png_path: str | Path, title: str = "runs", *, target: float | None = None
) -> Section:
    """The standard comparison of runs: the :data:`COLUMNS` table (flagging runs that reached ``target`` but
    ended below it) and the curves of :func:`plot_runs` (drawn to ``png_path``)."""
    if not runs:
        raise ValueError("runs_section needs at least one run")
    png = plot_runs(runs, png_path)
    text = f"{len(runs)} run(s). Curves: accuracy and loss against epochs (left) and wall time (right)."
    return Section(title, text, tables=[(COLUMNS, run_rows(runs, target))], images=[png])


def write_csv(columns: Sequence[str], rows: Sequence[Sequence[str]], path: str | Path) -> Path:
    """Write ``rows`` under a header of ``columns`` as a CSV file; return its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        writer.writerows(rows)
    return path


def write_records_csv(records: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Write dict ``records`` as CSV with the union of their keys (in first-seen order) as header."""
    keys: list[str] = []
    for record in records:
        keys += [k for k in record if k not in keys]
    return write_csv(keys, [[record.get(k, "") for k in keys] for record in records], path)


def render_html(
    sections: Sequence[Section],
    path: str | Path,
    *,
    title: str = "quicktrain report",
    environment: Mapping[str, str] | None = None,
) -> Path:
    """Write ``sections`` as one self-contained HTML file; return its path.

    Args:
        sections: the parts of the report, in order.
        path: the HTML file to write (parent folders are created).
        title: page title and top heading.
        environment: key/value lines of the environment block; :func:`environment_info` when None.
    """
    path = Path(path)
    env = environment_info() if environment is None else environment
    e = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{e(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{e(title)}</h1>",
        '<table class="env"><tbody>',
        *(f"<tr><th>{e(str(k))}</th><td>{e(str(v))}</td></tr>" for k, v in env.items()),
        "</tbody></table>",
    ]
    for section in sections:
        parts.append(f"<section><h2>{e(section.title)}</h2>")
        parts += [f"<p>{e(p.strip())}</p>" for p in section.text.split("\n\n") if p.strip()]
        parts += [_table_html(columns, rows) for columns, rows in section.tables]
        parts += [_image_html(Path(image)) for image in section.images]
        parts += [_download_html(Path(file)) for file in section.downloads]
        parts.append("</section>")
    parts.append("</body></html>\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts), encoding="utf-8")
    return path


def _table_html(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    for i, row in enumerate(rows):
        if len(row) != len(columns):
            raise ValueError(f"table row {i} has {len(row)} cells but there are {len(columns)} columns: {row!r}")
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)
    body = "".join("<tr>" + "".join(_cell_html(str(cell)) for cell in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _cell_html(cell: str) -> str:
    """A ``<td>``, right-aligned when the cell is a number."""
    attr = ' class="num"' if _NUMBER.fullmatch(cell) else ""
    return f"<td{attr}>{html.escape(cell)}</td>"


def _data_uri(file: Path) -> tuple[str, str]:
    """``(mime type, data: URI)`` of ``file``; raise a clear error when it does not exist."""
    if not file.is_file():
        raise FileNotFoundError(f"report file {file} not found (an image or download of a section)")
    mime = mimetypes.guess_type(file.name)[0] or "application/octet-stream"
    return mime, f"data:{mime};base64,{base64.b64encode(file.read_bytes()).decode('ascii')}"


def _image_html(file: Path) -> str:
    mime, uri = _data_uri(file)
    if not mime.startswith("image/"):
        raise ValueError(f"{file} is not an image ({mime}); put it in Section.downloads instead")
    return f'<img src="{uri}" alt="{html.escape(file.name)}">'


def _download_html(file: Path) -> str:
    _, uri = _data_uri(file)
    name = html.escape(file.name)
    return f'<p><a href="{uri}" download="{name}">download {name}</a></p>'
