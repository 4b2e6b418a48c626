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
from typing import Any, Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


ALONE = -1  # the index of a ``submit``'s item: its own future, not a place in a list


class _Waiters(Generic[R]):
    """The caller's side of a ``submit_many``: one future for all its items, completed once
    every item's batch has run. (One future per item, each awaited and each given its result,
    was most of a bulk request's batching cost: docs/benchmarks-history.md.)"""

    __slots__ = ("error", "future", "left", "results")

    def __init__(self, future: asyncio.Future[list[R]], count: int) -> None:
        self.future = future
        self.results: list[R] = [None] * count  # type: ignore[list-item]  # filled in below
        self.left = count
        self.error: BaseException | None = None

    def settle(self, index: int, result: R | None, error: BaseException | None) -> None:
        """One item's outcome (its result, or its batch's error); the last one lets the caller go on."""
        if error is None:
            self.results[index] = result  # type: ignore[assignment]
        elif self.error is None:
            self.error = error
        self.left -= 1
        if self.left or self.future.done():  # more to come; or a cancelled caller waits no more
            return
        if self.error is not None:
            self.future.set_exception(self.error)
        else:
            self.future.set_result(self.results)


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
        # Items waiting for a batch, each with where its result goes: the future of a ``submit``
        # (index ``ALONE``), or its place among the results of a ``submit_many`` (``_Waiters``;
        # typed Any: told apart by the index, per item, cheaper than isinstance or cast).
        self._pending: list[tuple[T, Any, int]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._running: set[asyncio.Task[None]] = set()

    async def submit(self, item: T) -> R:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[R] = loop.create_future()
        self._pending.append((item, future, ALONE))
        if len(self._running) < self._concurrency:
            if len(self._pending) >= self._max_size:
                self._flush()
            elif self._timer is None:
                self._timer = loop.call_later(self._max_wait, self._flush)
        return await future

    async def submit_many(self, items: Sequence[T]) -> list[R]:
        """``submit`` of each item, for a caller that has many at once: they join the pending
        batch together (filling whole batches at once), and one await waits for them all. The
        first failure is raised, after every item's batch has run."""
        if not items:
            return []
        loop = asyncio.get_running_loop()
        waiters: _Waiters[R] = _Waiters(loop.create_future(), len(items))
        self._pending.extend((item, waiters, i) for i, item in enumerate(items))
        while len(self._running) < self._concurrency and len(self._pending) >= self._max_size:
            self._flush()
        if self._pending and len(self._running) < self._concurrency and self._timer is None:
            self._timer = loop.call_later(self._max_wait, self._flush)
        # Cancelled, the caller stops waiting; its items still run (nobody reads their results).
        return await waiters.future

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if len(self._running) >= self._concurrency or not self._pending:
            return  # a running batch flushes what waits when it ends
        batch, self._pending = self._pending[: self._max_size], self._pending[self._max_size :]
        task = asyncio.create_task(self._run(batch))
        self._running.add(task)

    async def _run(self, batch: list[tuple[T, Any, int]]) -> None:
        try:
            results = await self._func([item for item, _, _ in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"batch function returned {len(results)} results for {len(batch)} items")
        except BaseException as exc:  # every waiter must hear about the failure, cancellation included
            self._settle(batch, None, exc if isinstance(exc, Exception) else RuntimeError("batch cancelled"))
            if not isinstance(exc, Exception):
                raise
        else:
            self._settle(batch, results, None)
        finally:
            self._running.discard(asyncio.current_task())  # type: ignore[arg-type]
            if self._pending:
                self._flush()  # group commit: what arrived meanwhile goes now, without waiting

    @staticmethod
    def _settle(
        batch: list[tuple[T, Any, int]], results: Sequence[R] | None, error: Exception | None
    ) -> None:
        """Hand each item its result (``results``) or the batch's ``error``."""
        for k, (_, sink, index) in enumerate(batch):
            result = None if results is None else results[k]
            if index != ALONE:
                sink.settle(index, result, error)
            elif not sink.done():
                if error is not None:
                    sink.set_exception(error)
                else:
                    sink.set_result(result)

    async def close(self) -> None:
        """Flush what is pending and wait until every batch has run (after handlers drained)."""
        self._flush()
        while self._running:
            await asyncio.gather(*self._running, return_exceptions=True)
