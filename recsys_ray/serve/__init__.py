"""The Ray Serve application: HTTP edge in api.py (arguments, request models, routes), deployments
and the builder in app.py. ``import_path: recsys_ray.serve:build_app`` in a Serve config."""

from recsys_ray.serve.app import build_app

__all__ = ["build_app"]
