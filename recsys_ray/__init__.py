"""recsys_ray: fine-tune a pretrained BERT into a recommender on Ray (Data, Train, Tune, Serve)."""

__version__ = "0.1.0"
