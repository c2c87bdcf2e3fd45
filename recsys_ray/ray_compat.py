"""The only place that uses Ray internals: each use, why no public API serves, and what breaks.

Pinned to Ray 2.60 (pyproject). Each function imports the internal module when it is called, so a
Ray upgrade that moves one breaks that one feature with an ImportError naming it, not every import
of recsys_ray; the tests exercise each.

- :func:`deploy_serve_config`: ``serve run CONFIG`` / ``serve deploy`` from Python. ``serve.run``
  takes an application object and gives every deployment a fresh code version, so a change
  confined to ``user_config`` would restart replicas instead of reconfiguring them in place.
- :func:`worker_group_callback`: a Ray Train callback that runs in the Train controller when its
  worker group starts (Tune's sweep guard frees the placement group of a trial ASHA killed).
  Ray Train passes non-user callbacks of ``RunConfig(callbacks=)`` to its controller as they are,
  "so custom workarounds built on top of internal callbacks" work; the base class is internal.
- :func:`direct_ingress_urls`: where the ingress replicas of an application listen themselves
  when Serve's direct ingress is on (``RAY_SERVE_ENABLE_DIRECT_INGRESS=1``, experimental in 2.60:
  each ingress replica serves HTTP on a port the controller hands out from 30000-31000, no proxy
  on the path). Serve's own tests read them from the controller's ``get_target_groups``; no public
  API lists them. :func:`wait_serve_gone` waits for the controller actor (by Serve's internal name)
  to exit: with direct ingress ``serve.shutdown()`` returns while it still drains.
- :func:`read_run_snapshot`: the kept checkpoints of a Ray Train run and the metrics they were
  reported with, from the run folder alone (``checkpoint_manager_snapshot.json``). Ray's public
  ``Result`` needs the driver that ran the fit; ``Result.from_path`` reads Tune's layout, not a
  Train V2 run's.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import ray

from recsys_ray import storage

RUN_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train V2's checkpoint bookkeeping, per run


def deploy_serve_config(config: dict) -> list[str]:
    """Deploy a Serve config dict as ``serve deploy`` does; returns the application names."""
    from ray.serve._private.api import serve_start
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(config)
    client = serve_start(http_options=schema.http_options.model_dump())
    client.deploy_apps(schema)
    return [app.name for app in schema.applications]


def worker_group_callback(on_start: Callable) -> object:
    """A Train callback calling ``on_start(placement_group, controller_actor)`` in the controller
    each time a worker group starts (first start and every restart after a failure)."""
    from ray.train.v2._internal.execution.callback import WorkerGroupCallback

    class OnWorkerGroupStart(WorkerGroupCallback):
        def after_worker_group_start(self, worker_group) -> None:
            pg = worker_group.get_worker_group_state().placement_group_handle.placement_group
            on_start(pg, ray.get_runtime_context().current_actor)

    return OnWorkerGroupStart()


def read_run_snapshot(run_path: str) -> dict | None:
    """``{"checkpoints": [(dir_name, metrics), ...] in Ray's order (worst first, ties: earlier
    first), "latest": (dir_name, metrics) | None}`` of a Ray Train run folder (local or URI),
    or None when the folder holds no snapshot or one of another layout."""
    text = storage.read_text(storage.join(run_path, RUN_SNAPSHOT))
    if text is None:
        return None
    try:
        doc = json.loads(text)
        kept = [(r["checkpoint_dir_name"], dict(r.get("metrics") or {})) for r in doc.get("checkpoint_results", [])]
        latest = doc.get("latest_checkpoint_result")
        last = (latest["checkpoint_dir_name"], dict(latest.get("metrics") or {})) if latest else None
    except (ValueError, KeyError, TypeError, AttributeError):
        return None  # another layout (another Ray version): callers fall back to the folder listing
    return {"checkpoints": kept, "latest": last}


def direct_ingress_urls(app_name: str) -> list[str]:
    """``http://ip:port`` of each running ingress replica of ``app_name`` that serves HTTP itself
    (Serve direct ingress); empty when direct ingress is off (the targets are then the proxies)."""
    from ray.serve.context import _get_global_client
    from ray.serve.schema import RequestProtocol

    controller = _get_global_client()._controller
    groups = ray.get(controller.get_target_groups.remote(app_name))
    return [f"http://{t.ip}:{t.port}" for g in groups if g.protocol == RequestProtocol.HTTP and g.ingress_deployment_name
            for t in g.targets]


def wait_serve_gone(timeout_s: float = 120) -> None:
    """Until Serve's controller actor is gone: with direct ingress, ``serve.shutdown()`` returns
    while the controller still drains, and the next deploy would reach a controller shutting down."""
    import time

    from ray.serve._private.constants import SERVE_CONTROLLER_NAME

    from recsys_ray.errors import RecsysError

    deadline = time.monotonic() + timeout_s
    while any(a["name"] == SERVE_CONTROLLER_NAME for a in ray.util.list_named_actors(all_namespaces=True)):
        if time.monotonic() > deadline:
            raise RecsysError(f"Serve's controller still running {timeout_s:.0f} s after serve.shutdown()")
        time.sleep(0.5)
