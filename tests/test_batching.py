import asyncio

import pytest

from common.batching import MicroBatcher


async def test_concurrent_submissions_share_one_call_and_get_their_own_result():
    calls = []

    async def double(items):
        calls.append(list(items))
        return [i * 2 for i in items]

    b = MicroBatcher(double, max_size=100, max_wait=0.01)
    results = await asyncio.gather(*(b.submit(i) for i in range(10)))
    assert results == [i * 2 for i in range(10)]
    assert calls == [list(range(10))]


async def test_full_batch_is_flushed_without_waiting():
    sizes = []

    async def echo(items):
        sizes.append(len(items))
        return list(items)

    b = MicroBatcher(echo, max_size=4, max_wait=60)
    assert await asyncio.wait_for(asyncio.gather(*(b.submit(i) for i in range(8))), 2) == list(range(8))
    assert sizes == [4, 4]


async def test_a_failing_batch_fails_every_waiter():
    async def boom(items):
        raise OSError("disk")

    b = MicroBatcher(boom, max_size=10, max_wait=0.001)
    results = await asyncio.gather(*(b.submit(i) for i in range(3)), return_exceptions=True)
    assert all(isinstance(r, OSError) for r in results)


async def test_close_flushes_pending_items():
    async def echo(items):
        return list(items)

    b = MicroBatcher(echo, max_size=10, max_wait=60)
    pending = asyncio.ensure_future(b.submit("x"))
    await asyncio.sleep(0)
    await b.close()
    assert await pending == "x"


async def test_close_with_nothing_pending_returns_at_once_without_running_a_batch():
    calls = []

    async def echo(items):
        calls.append(list(items))
        return list(items)

    batcher = MicroBatcher(echo, max_wait=60)
    await asyncio.wait_for(batcher.close(), 1)
    assert calls == []
    # Still usable afterwards, and a later close waits for what was submitted.
    pending = asyncio.ensure_future(batcher.submit(7))
    await asyncio.sleep(0)
    await asyncio.wait_for(batcher.close(), 1)
    assert pending.done() and pending.result() == 7 and calls == [[7]]


async def test_submit_many_fills_whole_batches_and_answers_in_order():
    calls = []

    async def double(items):
        calls.append(len(items))
        return [i * 2 for i in items]

    b = MicroBatcher(double, max_size=4, max_wait=60, concurrency=2)
    assert await asyncio.wait_for(b.submit_many(list(range(10))), 2) == [i * 2 for i in range(10)]
    assert calls == [4, 4, 2]  # two full batches at once, the rest as soon as one ended
    assert await b.submit_many([]) == []


async def test_submit_many_raises_the_first_failure_after_all_batches_ran():
    seen = []

    async def picky(items):
        seen.extend(items)
        if 1 in items:
            raise OSError("disk")
        return list(items)

    b = MicroBatcher(picky, max_size=2, max_wait=0)
    with pytest.raises(OSError, match="disk"):
        await b.submit_many([0, 1, 2, 3])
    assert seen == [0, 1, 2, 3]


async def test_single_and_many_submissions_share_batches_and_each_gets_its_own_results():
    calls = []

    async def double(items):
        calls.append(list(items))
        await asyncio.sleep(0)
        return [i * 2 for i in items]

    b = MicroBatcher(double, max_size=3, max_wait=60)
    one, many, other = await asyncio.wait_for(
        asyncio.gather(b.submit(100), b.submit_many([1, 2, 3, 4]), b.submit(200)), 2
    )
    assert (one, many, other) == (200, [2, 4, 6, 8], 400)
    assert calls == [[100, 1, 2], [3, 4, 200]]  # a submit_many spread over two batches


async def test_a_cancelled_submit_many_lets_its_batch_run_and_the_batcher_go_on():
    started, release, ran = asyncio.Event(), asyncio.Event(), []

    async def slow(items):
        started.set()
        await release.wait()
        ran.extend(items)
        return list(items)

    b = MicroBatcher(slow, max_size=2, max_wait=0)
    waiting = asyncio.create_task(b.submit_many([1, 2, 3]))
    await started.wait()
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    release.set()
    assert await asyncio.wait_for(b.submit_many([4]), 2) == [4]
    await b.close()
    assert ran == [1, 2, 3, 4]  # nobody waited for 1-3 any more; they ran all the same
