"""Behaviour logs -> validated, split, tokenized examples (Ray Data): config.py (DataConfig),
sources.py (where inputs come from), files.py (reading them), validate.py, examples.py, tokenize.py,
text.py, pipeline.py (the job), layout.py (the prepared folder and its reader), catalogue.py."""
