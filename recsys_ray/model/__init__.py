"""The recommender models: one pretrained BERT (encoder.py) under a model kind (kinds/, registry
in kinds/__init__.py), the contract every kind fulfils (base.py), its config (config.py) and the
losses (losses.py)."""
