"""Fine-tuning on Ray Train: config.py (TrainConfig), loop.py (what every worker runs), driver.py
(plan, build_trainer, fit), report.py (the summary table)."""
