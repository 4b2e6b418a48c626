"""Micro-batching with group commit: many concurrent callers, one call of a batch function.

Concurrent handlers each ``await batcher.submit(item)``. At most one batch runs at a time; items
that arrive meanwhile wait and go together in the next batch as soon as the running one ends (or
after ``max_wait`` when nothing is running, or at once when ``max_size`` items are waiting). So the
busier the daemon, the larger the batches: with SQLite, one transaction registers hundreds of
files instead of hundreds of transactions queueing for the single write lock.

``concurrency=2`` lets a second batch start while one runs: for a consumer that serves batches in
order anyway (a copy process), so its next batch is already there when it finishes one.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class MicroBatcher(Generic[T, R]):
    def __init__(
        self,
        func: Callable[[Sequence[T]], Awaitable[Sequence[R]]],
        *,
        max_size: int = 256,
        max_wait: float = 0.01,
        concurrency: int = 1,
    ) -> None:
        self._func = func
        self._max_size = max_size
        self._max_wait = max_wait
        self._concurrency = concurrency
        self._pending: list[tuple[T, asyncio.Future[R]]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._running: set[asyncio.Task[None]] = set()

    async def submit(self, item: T) -> R:
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._pending.append((item, future))
        if len(self._running) < self._concurrency:
            if len(self._pending) >= self._max_size:
                self._flush()
            elif self._timer is None:
                self._timer = asyncio.get_running_loop().call_later(self._max_wait, self._flush)
        return await future

    async def submit_many(self, items: Sequence[T]) -> list[R]:
        """``submit`` of each item, for a caller that has many at once: they join the pending
        batch together (filling whole batches at once), and one await waits for them all. The
        first failure is raised, after every item's batch has run."""
        if not items:
            return []
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[R]] = [loop.create_future() for _ in items]
        self._pending.extend(zip(items, futures, strict=True))
        while len(self._running) < self._concurrency and len(self._pending) >= self._max_size:
            self._flush()
        if self._pending and len(self._running) < self._concurrency and self._timer is None:
            self._timer = loop.call_later(self._max_wait, self._flush)
        try:
            await asyncio.wait(futures)
        except asyncio.CancelledError:
            for future in futures:  # as a cancelled ``submit``: the batch runs, nobody waits
                future.cancel()
            raise
        failures = [e for e in (f.exception() for f in futures) if e is not None]  # all retrieved
        if failures:
            raise failures[0]
        return [f.result() for f in futures]

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if len(self._running) >= self._concurrency or not self._pending:
            return  # a running batch flushes what waits when it ends
        batch, self._pending = self._pending[: self._max_size], self._pending[self._max_size :]
        task = asyncio.create_task(self._run(batch))
        self._running.add(task)

    async def _run(self, batch: list[tuple[T, asyncio.Future[R]]]) -> None:
        try:
            results = await self._func([item for item, _ in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"batch function returned {len(results)} results for {len(batch)} items")
        except BaseException as exc:  # every waiter must hear about the failure, cancellation included
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(exc if isinstance(exc, Exception) else RuntimeError("batch cancelled"))
            if not isinstance(exc, Exception):
                raise
        else:
            for (_, fut), result in zip(batch, results, strict=True):
                if not fut.done():
                    fut.set_result(result)
        finally:
            self._running.discard(asyncio.current_task())  # type: ignore[arg-type]
            if self._pending:
                self._flush()  # group commit: what arrived meanwhile goes now, without waiting

    async def close(self) -> None:
        """Flush what is pending and wait until every batch has run (after handlers drained)."""
        self._flush()
        while self._running:
            await asyncio.gather(*self._running, return_exceptions=True)
