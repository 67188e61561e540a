"""The dynamic batcher (serving/batching.py) on its own: batches form under concurrency, one bad item fails
alone, results go back to the right callers, a stopped batcher serves what it had queued."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from serving.batching import Batcher


def _run(coro):
    return asyncio.run(coro)


def test_concurrent_submits_are_served_in_batches_each_to_its_own_caller():
    sizes, gate = [], threading.Event()

    def double(items):
        gate.wait(5)  # the first batch holds the thread while the rest queue up
        sizes.append(len(items))
        return [2 * x for x in items]

    b = Batcher(double, max_batch=16)
    b.start()

    async def main():
        tasks = [asyncio.create_task(b.submit(i)) for i in range(40)]
        await asyncio.sleep(0.2)
        gate.set()
        return await asyncio.gather(*tasks)

    out = _run(main())
    b.stop()
    assert [r for r, _, _ in out] == [2 * i for i in range(40)]
    assert sum(sizes) == 40 and max(sizes) == 16 and len(sizes) < 40, sizes
    assert all(size >= 1 and waited >= 0 for _, waited, size in out)


def test_one_bad_item_fails_only_its_own_request():
    def fn(items):
        if "bad" in items:
            raise ValueError("bad item")
        return [x.upper() for x in items]

    b = Batcher(fn, max_batch=8, max_wait_s=0.05)  # the wait makes the three share one batch
    b.start()

    async def main():
        return await asyncio.gather(*(b.submit(x) for x in ("a", "bad", "c")), return_exceptions=True)

    a, bad, c = _run(main())
    b.stop()
    assert a[0] == "A" and c[0] == "C"
    assert isinstance(bad, ValueError) and "bad item" in str(bad)


def test_a_wrong_number_of_results_is_an_error_not_a_silent_mismatch():
    b = Batcher(lambda items: items[:1], max_batch=8, max_wait_s=0.05)
    b.start()

    async def main():
        return await asyncio.gather(*(b.submit(x) for x in range(3)), return_exceptions=True)

    out = _run(main())
    b.stop()
    assert all(r[0] == i for i, r in enumerate(out))  # each retried alone: one result for one item is right


def test_stop_serves_what_is_queued_then_refuses():
    b = Batcher(lambda items: (time.sleep(0.05), items)[1], max_batch=2)
    b.start()

    async def main():
        tasks = [asyncio.create_task(b.submit(i)) for i in range(6)]
        await asyncio.sleep(0.01)
        threading.Thread(target=b.stop).start()
        done = await asyncio.gather(*tasks)
        with pytest.raises(RuntimeError, match="shutting down"):
            await b.submit(99)
        return done

    assert [r for r, _, _ in _run(main())] == list(range(6))
