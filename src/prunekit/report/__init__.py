"""Reports over run directories: summary tables, plots, ``report.html``, layer sensitivity, Pareto fronts and the
comparison with published results.

Example:
    >>> from prunekit.report import make_report, pareto_front, ratio_caps
    >>> make_report(["runs/base", "runs/pruned"], "runs/report").html
    PosixPath('runs/report/report.html')
"""

from prunekit.report.build import SECTIONS, ReportResult, make_report
from prunekit.report.collect import RunRecord, collect_runs, lineage
from prunekit.report.pareto import pareto_front
from prunekit.report.sensitivity import layer_sensitivity, most_sensitive, ratio_caps, read_sensitivity
from prunekit.report.targets import DEFAULT_TARGETS, TARGETS, describe_targets, meets_targets, parse_targets

__all__ = ["DEFAULT_TARGETS", "SECTIONS", "TARGETS", "ReportResult", "RunRecord", "collect_runs", "describe_targets",
           "layer_sensitivity", "lineage", "make_report", "meets_targets", "most_sensitive", "pareto_front",
           "parse_targets", "ratio_caps", "read_sensitivity"]
