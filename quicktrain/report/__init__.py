"""Tables and plots shared by ``quicktrain report``, the demo and the benchmarks."""

from .plots import plot_runs
from .runs import RunRecord, load_run
from .tables import COLUMNS, markdown_table, print_table, run_rows

__all__ = ["COLUMNS", "RunRecord", "load_run", "markdown_table", "plot_runs", "print_table", "run_rows"]
