"""Items added to a running application, without retraining (``POST /v1/items``).

Serve routes a call to one replica, so an addition is recorded once in a :class:`ItemLog`: a
detached named actor per application (it outlives replica restarts and redeploys) holding the
added items in order. Every model replica keeps the position it has applied up to and syncs
(:class:`ItemSync`) at most every ``period_s`` before answering, and at once when a request names
an item it does not know; a replica that starts later (autoscaling, a restart, a new checkpoint)
applies the whole log, skipping items its catalogue already has. So an item added through any
ingress is scored at once by ``/v1/score`` and in ``/v1/recommend`` histories, and recommended by
every replica within ``period_s``.
"""

from __future__ import annotations

import asyncio
import logging
import time

import ray

from recsys_ray.errors import RecsysError

log = logging.getLogger(__name__)

NAMESPACE = "recsys_ray"
SYNC_PERIOD_S = 1.0


def log_name(app_name: str) -> str:
    return f"item_log:{app_name}"


@ray.remote(num_cpus=0, max_restarts=-1)
class ItemLog:
    """The items added to one application, in order (``item_id``, ``text``)."""

    def __init__(self):
        self.items: list[dict] = []
        self.ids: set[str] = set()

    def append(self, items: list[dict]) -> int:
        """Record items a replica has accepted; ids already recorded are skipped. -> new length."""
        for it in items:
            if it["item_id"] not in self.ids:
                self.ids.add(it["item_id"])
                self.items.append({"item_id": it["item_id"], "text": it["text"]})
        return len(self.items)

    def since(self, position: int) -> tuple[int, list[dict]]:
        return len(self.items), self.items[position:]

    def length(self) -> int:
        return len(self.items)


def item_log(app_name: str):
    """This application's :class:`ItemLog` (created by the first replica that asks)."""
    return ItemLog.options(name=log_name(app_name), namespace=NAMESPACE, lifetime="detached",
                           get_if_exists=True).remote()


class ItemSync:
    """A model replica's view of the item log: applies what it has not seen to its Predictor."""

    def __init__(self, predictor, app_name: str, period_s: float = SYNC_PERIOD_S):
        self.predictor, self.app_name, self.period_s = predictor, app_name, period_s
        self.log = item_log(app_name)
        self.position = 0
        self.checked = 0.0
        self.lock = asyncio.Lock()

    def apply_now(self) -> None:
        """The whole log, blocking (a replica's constructor: before it is routed to)."""
        length, items = ray.get(self.log.since.remote(0))
        self._apply(items)
        self.position, self.checked = length, time.monotonic()

    def _apply(self, items: list[dict]) -> None:
        """Add the logged items this replica's catalogue lacks (a new checkpoint may have some)."""
        new = [it for it in items if it["item_id"] not in self.predictor.items.index]
        if new:
            self.predictor.add_items([it["item_id"] for it in new], [it["text"] for it in new])
            log.info("%d items added from the item log (catalogue now %d)", len(new), len(self.predictor.items))

    async def sync(self, force: bool = False) -> None:
        """Apply the log's new items if ``period_s`` passed since the last look (or ``force``)."""
        if not force and time.monotonic() - self.checked < self.period_s:
            return
        async with self.lock:
            if not force and time.monotonic() - self.checked < self.period_s:
                return
            try:
                length, items = await self.log.since.remote(self.position)
            except ray.exceptions.RayError as exc:  # the log is restarting: serve what we have
                log.warning("item log of %s unreachable: %s", self.app_name, exc)
                return
            self.checked = time.monotonic()
            await asyncio.to_thread(self._apply, items)
            self.position = length

    async def add(self, items: list[dict]) -> dict:
        """Check ``items`` here, record them for every replica, then apply them here: the log
        has them before any replica can name their rows (a Ranker asked about a row the
        Retriever already has finds it in the log)."""
        await self.sync(force=True)
        ids, texts = [it["item_id"] for it in items], [it["text"] for it in items]
        async with self.lock:
            self.predictor.check_new_items(ids, texts)
            try:
                length = await self.log.append.remote(items)
            except ray.exceptions.RayError as exc:
                raise RecsysError(f"the item log is unreachable ({exc}): nothing was added, try again") from None
            await asyncio.to_thread(self.predictor.add_items, ids, texts)
        return {"added": len(items), "items": len(self.predictor.items), "log_length": length}
