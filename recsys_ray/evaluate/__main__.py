"""``python -m recsys_ray.evaluate METRICS.json``: print the table of an evaluation again."""

import sys

from recsys_ray.evaluate.report import main_table

if len(sys.argv) != 2:
    raise SystemExit("usage: python -m recsys_ray.evaluate METRICS.json")
print(main_table(sys.argv[1]))
