"""This process as one instance of its daemon: a lease in the catalogue, renewed while it runs.

Several instances of a daemon may share a catalogue (``common.catalogue.instances``). Each holds a
lease of ``catalogue.lease_seconds``, renewed every third of it; the work it takes is marked with
its id (``InstanceLease.id``), and another instance settles that work only once the lease has run
out. A clean stop removes the row, handing what is left over at once.

An instance starting forgets the rows of earlier instances of its daemon on its node whose
process no longer exists (``forget_dead_predecessors``): a daemon restarted by systemd after a
kill takes its predecessor's work over at once instead of after the lease. This relies on node
names being unique per process namespace (the default, the host name, is; two containers on one
host each have their own).

A lease that could not be renewed in time is lost for good: another instance may already have
taken its work over. The instance then stops (``instance_lease_lost``, SIGTERM to itself: the
runner's ordinary stop; systemd starts it again as a new instance) rather than finish work that
is no longer its own; the statements that record held work check the holder, so what it still
records after that is refused, not written twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from common.catalogue.instances import InstanceInfo
from common.catalogue.sql import utcnow
from common.logging import get_logger
from common.periodic import every

if TYPE_CHECKING:
    from common.catalogue import Catalogue

log = get_logger("spool.instance")
PRUNE_AFTER = timedelta(hours=1)


def new_instance_id(daemon: str, node: str) -> str:
    """``daemon@node:pid:random``: unique even when a restarted process gets the same pid."""
    return f"{daemon}@{node}:{os.getpid()}:{secrets.token_hex(4)}"


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        return True
    return True


def _stop_this_process() -> None:
    os.kill(os.getpid(), signal.SIGTERM)


class InstanceLease:
    def __init__(
        self,
        catalogue: Catalogue,
        daemon: str,
        node: str,
        lease_seconds: float,
        on_lost: Callable[[], None] = _stop_this_process,
    ) -> None:
        self.catalogue = catalogue
        self.daemon, self.node = daemon, node
        self.lease = timedelta(seconds=lease_seconds)
        self.id = new_instance_id(daemon, node)
        self.expires: datetime | None = None
        self.lost = False
        self._on_lost = on_lost
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.forget_dead_predecessors()
        # Rows of instances dead for long: their work was settled long ago (a successor settles
        # within a round of the expiry); kept an hour for ``spool status`` to show who died.
        await self.catalogue.instances.prune(utcnow() - PRUNE_AFTER)
        now = utcnow()
        self.expires = now + self.lease
        info = InstanceInfo(self.id, self.daemon, self.node, os.getpid(), now, now, self.expires)
        await self.catalogue.instances.register(info)
        log.info("instance_registered", instance=self.id, lease_seconds=self.lease.total_seconds())
        self._task = asyncio.create_task(
            every(self.lease.total_seconds() / 3, self.renew, name="instance_lease", log=log)
        )

    async def forget_dead_predecessors(self) -> list[str]:
        """Forget earlier instances of this daemon on this node whose process is gone."""
        gone = [
            i.id for i in await self.catalogue.instances.listing(self.daemon)
            if i.node == self.node and i.id != self.id and not _process_exists(i.pid)
        ]  # fmt: skip
        for instance_id in gone:
            await self.catalogue.instances.forget(instance_id)
        if gone:
            log.info("dead_predecessors_forgotten", instances=gone)
        return gone

    async def renew(self) -> bool:
        """One renewal; False (and the instance stopping) once the lease is lost."""
        if self.lost:
            return False
        now = utcnow()
        if await self.catalogue.instances.renew(self.id, now, now + self.lease):
            self.expires = now + self.lease
            return True
        if self.lost:  # a concurrent renewal found it lost first and said so
            return False
        self.lost = True
        log.error(
            "instance_lease_lost", instance=self.id,
            detail="the lease ran out before it was renewed (catalogue unreachable or the process "
                   "paused); another instance may have taken this one's work over: stopping",
        )  # fmt: skip
        self._on_lost()
        return False

    def valid(self) -> bool:
        """Whether the lease still stands by this process's clock (work may go on)."""
        return not self.lost and self.expires is not None and utcnow() < self.expires

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if not self.lost:
            try:
                await self.catalogue.instances.forget(self.id)
            except Exception as exc:  # the catalogue gone at stop: the lease runs out by itself
                log.warning("instance_not_forgotten", instance=self.id, error=repr(exc))


@asynccontextmanager
async def held_lease(
    catalogue: Catalogue, daemon: str, node: str, lease_seconds: float
) -> AsyncIterator[InstanceLease]:
    lease = InstanceLease(catalogue, daemon, node, lease_seconds)
    await lease.start()
    try:
        yield lease
    finally:
        await lease.stop()
