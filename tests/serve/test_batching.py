"""serve/batching.py without Ray: requests that arrive while a batch runs form the next batch,
a lone request waits only the timeout, errors reach every request of their batch only."""

from __future__ import annotations

import asyncio
import time

import pytest

from recsys_ray.serve.batching import Batcher


def test_requests_arriving_during_a_slow_batch_form_the_next_one():
    sizes: list[int] = []

    async def model(items):
        sizes.append(len(items))
        await asyncio.sleep(0.05)  # a forward pass much longer than the wait
        return [x * 10 for x in items]

    async def main():
        b = Batcher(model, max_batch_size=16, batch_wait_timeout_s=0.005)

        async def client(k):  # 8 clients back to back, staggered like a steady load
            await asyncio.sleep(k * 0.007)
            return [await b(k * 100 + i) for i in range(5)]

        return await asyncio.gather(*(client(k) for k in range(8)))

    results = asyncio.run(main())
    assert results == [[(k * 100 + i) * 10 for i in range(5)] for k in range(8)]  # each gets its own result
    assert sum(sizes) == 40
    # Ray 2.60's @serve.batch gave batches of one here; merged batches mean far fewer model calls
    assert max(sizes) >= 6 and len(sizes) <= 12, sizes


def test_a_lone_request_waits_only_the_timeout_and_max_batch_size_is_live():
    calls: list[int] = []

    async def model(items):
        calls.append(len(items))
        return items

    async def main():
        b = Batcher(model, max_batch_size=4, batch_wait_timeout_s=0.02)
        t = time.perf_counter()
        assert await b("x") == "x"
        lone = time.perf_counter() - t
        out = await asyncio.gather(*(b(i) for i in range(10)))
        b.set_max_batch_size(1)
        out1 = await asyncio.gather(*(b(i) for i in range(3)))
        return lone, out, out1

    lone, out, out1 = asyncio.run(main())
    assert 0.015 <= lone < 0.2
    assert out == list(range(10)) and calls[1:4] == [4, 4, 2]  # full batches go at once
    assert out1 == [0, 1, 2] and calls[4:] == [1, 1, 1]


def test_an_error_fails_its_own_batch_and_the_next_batch_still_runs():
    async def model(items):
        if "bad" in items:
            raise ValueError("bad input in this batch")
        return [i.upper() for i in items]

    async def main():
        b = Batcher(model, max_batch_size=8, batch_wait_timeout_s=0.01)
        first = await asyncio.gather(b("a"), b("bad"), return_exceptions=True)
        second = await b("c")
        return first, second

    first, second = asyncio.run(main())
    assert all(isinstance(r, ValueError) for r in first)
    assert second == "C"

    async def wrong(items):
        return items[:-1]

    async def main2():
        return await asyncio.gather(Batcher(wrong, 4, 0.01)("a"), return_exceptions=True)

    (err,) = asyncio.run(main2())
    assert isinstance(err, RuntimeError) and "returned 0 results for 1 items" in str(err)


@pytest.mark.parametrize("size", [0, -3])
def test_max_batch_size_is_at_least_one(size):
    async def model(items):
        return items

    b = Batcher(model, 4, 0.0)
    b.set_max_batch_size(size)
    assert b.max_batch_size == 1
