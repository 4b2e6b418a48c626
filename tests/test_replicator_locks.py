"""The replicator's (file, endpoint) locks: a bulk request takes the free ones at once, a single
copy waits for its own; nothing stays behind once released."""

from __future__ import annotations

import asyncio

from daemons.replicator.locks import KeyedLocks


async def test_claim_free_takes_only_what_nobody_holds() -> None:
    locks: KeyedLocks[str] = KeyedLocks()
    assert locks.claim_free(["a", "b"]) == ["a", "b"]
    assert locks.claim_free(["b", "c"]) == ["c"]
    locks.release(["a", "b", "c"])
    assert len(locks) == 0


async def test_a_waiting_copy_runs_when_the_bulk_releases_its_key() -> None:
    locks: KeyedLocks[str] = KeyedLocks()
    order: list[str] = []
    locks.claim_free(["a"])

    async def single() -> None:
        async with locks.hold("a"):
            order.append("single")

    waiter = asyncio.create_task(single())
    await asyncio.sleep(0.01)
    assert order == [] and locks.held("a")
    order.append("bulk done")
    locks.release(["a"])
    await asyncio.wait_for(waiter, 1)
    assert order == ["bulk done", "single"] and len(locks) == 0


async def test_holders_of_one_key_run_one_at_a_time_and_a_cancelled_waiter_leaves_nothing() -> None:
    locks: KeyedLocks[str] = KeyedLocks()
    inside = 0
    most = 0

    async def copy() -> None:
        nonlocal inside, most
        async with locks.hold("k"):
            inside += 1
            most = max(most, inside)
            try:
                await asyncio.sleep(0.001)
            finally:
                inside -= 1

    cancelled = asyncio.create_task(copy())
    others = [asyncio.create_task(copy()) for _ in range(5)]
    await asyncio.sleep(0)
    cancelled.cancel()
    await asyncio.gather(*others)
    assert most == 1 and len(locks) == 0
