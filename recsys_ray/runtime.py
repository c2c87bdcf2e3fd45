"""Starting or joining Ray, free ports, and turning errors raised inside Ray tasks back into ours."""

from __future__ import annotations

import json
import logging
import os
import socket

import ray

from recsys_ray import storage
from recsys_ray.errors import RecsysError

log = logging.getLogger(__name__)


def _job_env_keys() -> set[str]:
    """Env var names the submitted job's own runtime_env sets (Ray refuses to set them twice)."""
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw:
        return set()
    try:
        return set((json.loads(raw).get("runtime_env") or {}).get("env_vars") or {})
    except (ValueError, AttributeError):
        return set()


def init_ray(num_cpus: int | None = None) -> None:
    """Join the cluster when ``RAY_ADDRESS`` is set (``ray job submit``), else start a local Ray.

    The job's workers get this process's non-secret storage settings (S3 endpoint, region;
    :func:`recsys_ray.storage.worker_env`), never a credential: each worker resolves those from
    its own node's chain. Idempotent: an already initialised Ray (a test fixture, a notebook)
    is reused.
    """
    if ray.is_initialized():
        return
    env = storage.worker_env()
    if os.environ.get("RAY_ADDRESS"):
        taken = _job_env_keys()
        env = {k: v for k, v in env.items() if k not in taken}
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True,
                 runtime_env={"env_vars": env} if env else None)
    else:
        # A local Ray with its own dashboard, and every worker pointed at it for State API
        # queries. Without that, Ray Train 2.60's PlacementGroupCleaner asks whichever Ray was
        # started last on this machine whether our Train controller is alive; when that is another
        # instance (a `serve run`, a second job) the answer is "not found", and it removes the
        # run's placement group, killing the workers (seen: a training killed mid-epoch).
        # address="local": always a new instance of our own; joining a cluster is what RAY_ADDRESS
        # is for (a bare ray.init() would silently join any `ray start` cluster on this machine)
        port = free_port()
        api = f"http://127.0.0.1:{port}"
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1",
                 dashboard_port=port, runtime_env={"env_vars": {"RAY_API_SERVER_ADDRESS": api, **env}},
                 log_to_driver=True)
        os.environ.setdefault("RAY_API_SERVER_ADDRESS", api)  # this driver's own State API calls too
        log.info("ray dashboard: %s", api)
    log.info("ray resources: %s", ray.cluster_resources())


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def free_port_block(n: int = 4, host: str = "127.0.0.1") -> int:
    """A port P with P .. P+n-1 all free (cluster/local-multinode.sh derives its ports from P)."""
    for _ in range(50):
        base = free_port(host)
        if base + n < 65000 and all(port_free(base + i, host) for i in range(n)):
            return base
    raise RecsysError(f"no block of {n} free ports on {host}")


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether nothing listens on ``port``."""
    with socket.socket() as s:
        return s.connect_ex((host, port)) != 0


def cluster_cpus() -> int:
    """CPUs of the whole cluster (at least 1)."""
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def unwrap_task_error(exc: BaseException) -> BaseException:
    """The user-level exception inside a RayTaskError chain (e.g. our DataError), else ``exc``."""
    found: BaseException | None = None
    cur: BaseException | None = exc
    for _ in range(20):  # RayTaskError.cause, UserCodeException.__cause__, ...
        if cur is None:
            break
        if isinstance(cur, RecsysError) and type(cur).__module__.startswith("recsys_ray"):
            found = cur  # the original class, not Ray's RayTaskError(DataError) hybrid
            break
        nxt = getattr(cur, "cause", None) or cur.__cause__
        if nxt is cur:
            break
        cur = nxt
    return found if found is not None else exc
