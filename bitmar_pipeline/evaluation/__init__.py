"""Evaluation: the report, selection quality, baselines, robustness sets and figures."""
