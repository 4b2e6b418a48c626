"""One copy of a file to an endpoint at a time in this process: locks by (file, endpoint).

Two forms of taking one, because the replicator has two paths (``handlers``): a single copy waits
for its key (``hold``: a duplicate request waits, then finds the copy made), while a bulk request
takes at once every key that is free (``claim_free``), copies those together and leaves the busy
ones to the single-copy path, which waits. Nothing is kept for a key nobody holds, so the table
does not grow over a night.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Hashable, Iterable
from contextlib import asynccontextmanager
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


class KeyedLocks(Generic[K]):
    def __init__(self) -> None:
        # Held keys -> the futures of those waiting for them (woken all at once on release: the
        # first to run takes the key, the others wait again).
        self._held: dict[K, list[asyncio.Future[None]]] = {}

    def __len__(self) -> int:
        return len(self._held)

    def held(self, key: K) -> bool:
        return key in self._held

    def claim_free(self, keys: Iterable[K]) -> list[K]:
        """Take every key of ``keys`` that nobody holds, at once (no waiting); returns those taken."""
        taken = []
        for key in keys:
            if key not in self._held:
                self._held[key] = []
                taken.append(key)
        return taken

    async def acquire(self, key: K) -> None:
        while (waiters := self._held.get(key)) is not None:
            wake: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            waiters.append(wake)
            try:
                await wake
            except asyncio.CancelledError:
                if key in self._held and wake in self._held[key]:
                    self._held[key].remove(wake)
                raise
        self._held[key] = []

    def release(self, keys: Iterable[K]) -> None:
        for key in keys:
            for wake in self._held.pop(key):
                if not wake.done():
                    wake.set_result(None)

    @asynccontextmanager
    async def hold(self, key: K) -> AsyncIterator[None]:
        await self.acquire(key)
        try:
            yield
        finally:
            self.release((key,))
