"""Helpers of the fault tests (tests/ is on sys.path: ``from fault_helpers import ...``)."""

from __future__ import annotations


def alive_actor_pids(class_name: str) -> list[int]:
    """Process ids of the live actors whose class name starts with ``class_name`` (from the GCS:
    no dashboard needed). Fault tests kill these from outside with SIGKILL."""
    from ray._private import state

    return sorted(a["Pid"] for a in state.actors().values()
                  if a["State"] == "ALIVE" and a.get("Pid") and a["ActorClassName"].startswith(class_name))
