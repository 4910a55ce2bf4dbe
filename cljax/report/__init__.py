"""Tables and figures over many runs (``runs.py``: collect, aggregate, write the report;
``tables.py``: over orders, paired differences, growth) and the pseudo-label judge
(``pseudo_labels.py``); ``keep`` copies what a report reads out of a sweep."""

from cljax.report.keep import KEPT_FILES, keep_results
from cljax.report.runs import aggregate, collect, collect_roots, markdown_table, write_report

__all__ = ["KEPT_FILES", "aggregate", "collect", "collect_roots", "keep_results",
           "markdown_table", "write_report"]
