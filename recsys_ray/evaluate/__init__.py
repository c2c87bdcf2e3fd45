"""Offline evaluation: metrics, baselines, the evaluation job and its report (see evaluate.py)."""
