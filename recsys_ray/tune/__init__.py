"""Ray Tune: the sweep config (config.py), running and resuming a sweep (sweep.py), its report (report.py)."""
