"""Helpers of the catalogue race tests: a second engine on the same catalogue (a second daemon's
worth), and a way to let other writers work in the middle of a transaction, right after one of
its statements: the window between a read and the write decided on it, made wide on purpose.

``between`` runs the other writers' work on the test's event loop while the transaction waits:
through the greenlet the PostgreSQL engine runs synchronous code in (``run_sync``), or from the
SQLite worker thread. The work gets ``WAIT`` seconds; work still blocked by the paused
transaction's locks then (the fixed code's row locks, SQLite's single writer) goes on after its
commit, and the test awaits it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from sqlalchemy import Connection, event
from sqlalchemy.util import await_only

from common.catalogue import Catalogue

WAIT = 1.5  # seconds the other writers get while the transaction waits (ms of work unblocked)


@pytest.fixture
async def second(catalogue_url: str, catalogue: Catalogue) -> AsyncIterator[Catalogue]:
    """Another engine on the same catalogue, as a second process would hold."""
    cat = await Catalogue.open(catalogue_url)
    try:
        yield cat
    finally:
        await cat.close()


class Interlude:
    """Other writers' work, started in the middle of a transaction (``install``), awaited after."""

    def __init__(self, work: Callable[[], Awaitable[Any]]) -> None:
        self.work = work
        self.loop = asyncio.get_running_loop()
        self.task: asyncio.Future[Any] | None = None
        self.finished_in_window = False

    def install(self, conn: Connection, marker: str) -> None:
        """Run the work right after the first statement of ``conn``'s transaction whose SQL holds
        ``marker`` (call from inside the function the catalogue runs)."""
        fired = False

        def after(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
            nonlocal fired
            if fired or marker not in statement:
                return
            fired = True
            if conn.dialect.name == "postgresql":
                await_only(self._start())
            else:
                asyncio.run_coroutine_threadsafe(self._start(), self.loop).result()

        event.listen(conn, "after_cursor_execute", after)

    async def _start(self) -> None:
        self.task = asyncio.ensure_future(self.work())
        await asyncio.wait({self.task}, timeout=WAIT)
        self.finished_in_window = self.task.done()

    async def result(self) -> Any:
        assert self.task is not None, "the marked statement never ran"
        return await self.task
