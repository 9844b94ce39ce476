"""Tables and plots shared by ``quicktrain report``, the demo and the benchmarks."""

from .html import Section, environment_info, render_html, runs_section, write_csv, write_records_csv
from .plots import plot_runs
from .runs import RunRecord, load_run
from .tables import COLUMNS, format_value, markdown_table, print_table, records_markdown, run_rows

__all__ = [
    "COLUMNS",
    "RunRecord",
    "Section",
    "environment_info",
    "format_value",
    "load_run",
    "markdown_table",
    "plot_runs",
    "print_table",
    "records_markdown",
    "render_html",
    "run_rows",
    "runs_section",
    "write_csv",
    "write_records_csv",
]
