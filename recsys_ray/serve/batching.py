"""Dynamic batching of a model replica's calls: the requests that arrive while a batch runs form
the next one.

Why not ``@serve.batch``: in Ray 2.60 it forms a batch as soon as its wait times out and only
then queues for the previous batch to finish (its ``max_concurrent_batches`` semaphore is taken
after the batch is formed). With a forward pass longer than the wait, the requests of a steady
load become batches of one that run one after another: measured on 2 cores, the MiniLM
retriever's ``/v1/recommend`` at 8 clients had a mean batch of 1.0 and spent 281 ms of its 338 ms
queued (docs/benchmarks.md). Here the next batch is formed when the model is free: everything
queued by then, up to ``max_batch_size``, after waiting at most ``batch_wait_timeout_s`` more for
a batch that is not full. A lone request waits only that timeout, as before.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Awaitable, Callable, Sequence
from typing import Any


class Batcher:
    """``await batcher(item)`` -> this item's result of ``fn(items)`` (one call per batch, in
    arrival order; ``fn`` returns one result per item). ``set_max_batch_size`` /
    ``set_batch_wait_timeout_s`` change it live (a deployment's ``reconfigure``)."""

    def __init__(self, fn: Callable[[list[Any]], Awaitable[Sequence[Any]]], max_batch_size: int,
                 batch_wait_timeout_s: float):
        self.fn = fn
        self.max_batch_size, self.wait_s = max_batch_size, batch_wait_timeout_s
        self._pending: collections.deque[tuple[Any, asyncio.Future]] = collections.deque()
        self._arrived: asyncio.Event | None = None  # made in the loop that first uses it
        self._worker: asyncio.Task | None = None

    def set_max_batch_size(self, n: int) -> None:
        self.max_batch_size = max(1, int(n))

    def set_batch_wait_timeout_s(self, seconds: float) -> None:
        self.wait_s = max(0.0, float(seconds))

    async def __call__(self, item: Any) -> Any:
        loop = asyncio.get_running_loop()
        if self._arrived is None:
            self._arrived = asyncio.Event()
        future = loop.create_future()
        self._pending.append((item, future))
        self._arrived.set()
        if self._worker is None or self._worker.done():
            self._worker = loop.create_task(self._work())
        return await future

    async def _fill(self) -> None:
        """Wait up to the timeout for a full batch (returns at once when it is full)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.wait_s
        while len(self._pending) < self.max_batch_size:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except TimeoutError:
                return

    async def _work(self) -> None:
        while self._pending:
            if self.wait_s > 0 and len(self._pending) < self.max_batch_size:
                await self._fill()
            batch = []
            while self._pending and len(batch) < self.max_batch_size:
                item, future = self._pending.popleft()
                if not future.done():  # a request cancelled meanwhile (client gone) is dropped
                    batch.append((item, future))
            if not batch:
                continue
            try:
                results = await self.fn([item for item, _ in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"batch function returned {len(results)} results for {len(batch)} items")
            except Exception as exc:  # every request of the batch gets the error, the next batch still runs
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for (_, future), result in zip(batch, results, strict=True):
                if not future.done():
                    future.set_result(result)
