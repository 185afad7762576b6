"""Reports: tables, plots, HTML/Markdown report and recommendations.

Example:
    >>> from autoquant.report import write_report, best_trial
    >>> paths = write_report(study, "out/", study_ref="studies/digits.toml")  # doctest: +SKIP
    >>> best_trial(study, max_drop=0.01, minimize="size").number  # doctest: +SKIP
"""

from __future__ import annotations

from autoquant.report._info import machine_info, study_facts
from autoquant.report._plots import (
    FIGURES,
    bitmap_figure,
    hypervolume_figure,
    pareto_figures,
    report_figures,
)
from autoquant.report._report import report_file, write_report
from autoquant.report._select import (
    DEFAULT_TOLERANCE,
    BestChoice,
    best_choice,
    best_payload,
    best_trial,
    deployed_warning,
    export_command,
    format_best,
    most_accurate_within_size,
    plan_frame,
    recommendations,
)
from autoquant.report._strategy_plots import pruning_figure, sensitivity_figure
from autoquant.report._tables import (
    FORMATS,
    failed_frame,
    float_baseline_or_none,
    format_frame,
    format_table,
    front_frame,
    points_text,
    pruning_summary,
    sensitivity_cost,
    sensitivity_frame,
    sensitivity_table_frame,
    trials_frame,
)

__all__ = [
    "DEFAULT_TOLERANCE",
    "FIGURES",
    "FORMATS",
    "BestChoice",
    "best_choice",
    "best_payload",
    "best_trial",
    "deployed_warning",
    "bitmap_figure",
    "export_command",
    "failed_frame",
    "float_baseline_or_none",
    "format_best",
    "format_frame",
    "format_table",
    "front_frame",
    "hypervolume_figure",
    "machine_info",
    "most_accurate_within_size",
    "pareto_figures",
    "plan_frame",
    "points_text",
    "pruning_figure",
    "pruning_summary",
    "recommendations",
    "report_figures",
    "report_file",
    "sensitivity_cost",
    "sensitivity_figure",
    "sensitivity_frame",
    "sensitivity_table_frame",
    "study_facts",
    "trials_frame",
    "write_report",
]
