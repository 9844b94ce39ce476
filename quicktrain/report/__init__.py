"""Tables and plots shared by ``quicktrain report``, the demo and the benchmarks."""

from .html import Section, environment_info, render_html, runs_section, write_csv
from .plots import plot_runs
from .runs import RunRecord, load_run
from .tables import COLUMNS, markdown_table, print_table, run_rows

__all__ = [
    "COLUMNS",
    "RunRecord",
    "Section",
    "environment_info",
    "load_run",
    "markdown_table",
    "plot_runs",
    "print_table",
    "render_html",
    "run_rows",
    "runs_section",
    "write_csv",
]
