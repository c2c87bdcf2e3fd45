"""Fixtures of the Serve tests: a Serve instance on a free loopback port per module."""

from __future__ import annotations

import pytest

from recsys_ray.runtime import free_port


@pytest.fixture(scope="module")
def serve_port(ray_session, request):
    """Serve on a free loopback port for one test module (``SERVE_HTTP_OPTIONS`` of the module
    adds to the HTTP options), shut down after it."""
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port, **getattr(request.module, "SERVE_HTTP_OPTIONS", {})})
    yield port
    serve.shutdown()
