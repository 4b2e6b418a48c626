"""Micro-batching: many concurrent callers, one call of a batch function.

Concurrent handlers each ``await batcher.submit(item)``; items are gathered for at most
``max_wait`` seconds or ``max_size`` items, then ``func(items)`` runs once and every caller gets
its own result (or the batch's exception). With SQLite this turns 200 transactions into one, which
is what lets ingest register thousands of files a second.
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
    ) -> None:
        self._func = func
        self._max_size = max_size
        self._max_wait = max_wait
        self._pending: list[tuple[T, asyncio.Future[R]]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._running: set[asyncio.Task[None]] = set()

    async def submit(self, item: T) -> R:
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._pending.append((item, future))
        if len(self._pending) >= self._max_size:
            self._flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self._max_wait, self._flush)
        return await future

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._pending:
            return
        batch, self._pending = self._pending, []
        task = asyncio.create_task(self._run(batch))
        self._running.add(task)
        task.add_done_callback(self._running.discard)

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
            return
        for (_, fut), result in zip(batch, results, strict=True):
            if not fut.done():
                fut.set_result(result)

    async def close(self) -> None:
        """Flush what is pending and wait for running batches (called after handlers drained)."""
        self._flush()
        if self._running:
            await asyncio.gather(*self._running, return_exceptions=True)
