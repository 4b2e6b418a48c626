"""The archive scheduler: every ``tape.poll_interval`` it looks at the per-pool queues in the
catalogue and starts write batches on free drives.

Why a loop over the catalogue rather than work driven by messages: a mount is worth it only for
a whole queue (``steps.due``), and writing one lasts minutes to hours, far past the broker's
consumer timeout. So the ``tape.archive`` handler only queues the copy (catalogue row ``queued``)
and acks; this loop decides when and where it is written.

Per tick: settle copies a dead writer left behind (``reconcile``: a neighbour instance's whose
lease ran out, on any endpoint; our own a failed batch left, on the endpoints we are not writing),
read the queues of the endpoints an operator left online and no batch of ours is writing, count
the free drives of each library, and start a batch for each queue ``steps.plan_mounts`` picks
(one batch per pool at a time in this instance: a pool fills one cartridge after the other, and
other pools and recalls get the other drives). Batches run as tasks of their own; the loop never
waits for one.

Several instances (``common.instance``: each holds a lease) may share the library: each runs this
loop; the drives are shared through the library's claims, the queue through the catalogue (a
copy is taken by one instance, ``take_batch``). Two instances may then write the same pool at
once, on two cartridges. An instance whose lease is running low (renewals failing, see
``writer.Env.may_commit``) starts nothing and settles nothing until a renewal succeeds; once the
lease is lost, it stops (``instance_lease_lost``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping

from common.catalogue import Catalogue
from common.config import Settings
from common.errors import SpoolError
from common.instance import InstanceLease
from common.logging import get_logger
from common.messages import utcnow
from common.periodic import every
from common.storage import StorageBackend
from common.tape import TapeLibrary
from daemons.relay import OutboxRelay
from daemons.tape import staging, steps
from daemons.tape.reconcile import reconcile
from daemons.tape.writer import Env, run_batch

log = get_logger("spool.tape")


class Scheduler:
    def __init__(
        self,
        settings: Settings,
        catalogue: Catalogue,
        relay: OutboxRelay,
        libraries: Mapping[str, TapeLibrary],
        targets: Mapping[str, steps.TapeTarget],
        storages: Mapping[str, StorageBackend],
        lease: InstanceLease,
    ) -> None:
        self.settings = settings
        self.catalogue = catalogue
        self.relay = relay
        self.libraries = libraries
        self.targets = targets
        self.lease = lease
        self.staging_root = staging.staging_dir(settings.state_dir)
        staged = staging.instance_dir(self.staging_root, lease.id)
        self.env = Env(settings, catalogue, relay, storages, staged, lease)
        self.active: dict[str, asyncio.Task[None]] = {}  # endpoint -> its running batch
        self.last_served: dict[str, float] = {}
        self._complaint: dict[str, str] = {}  # endpoint -> reason last logged (no repeats)
        self._loop: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Settle what a killed predecessor left half done (copies ``archiving``, staging files),
        then start the loop."""
        await self._clean_staging()
        await self._reconcile()
        if self.targets:
            loop = every(
                self.settings.tape.poll_interval, self.tick, name="tape-scheduler", on_error=_tick_failed
            )
            self._loop = asyncio.create_task(loop, name="tape-scheduler")

    async def _clean_staging(self) -> None:
        """Remove what dead instances of this node left in their staging directories (at start,
        and each tick once a neighbour's lease has run out)."""
        # The directories first, the live instances after: a directory seen is one of an instance
        # registered before (``staging.clean``).
        seen = await asyncio.to_thread(staging.entries, self.staging_root)
        if all(name == self.env.staging.name for name in seen):
            return  # nobody else's: no catalogue query
        live = await self.catalogue.instances.live_ids("tape", utcnow())
        removed = await asyncio.to_thread(staging.clean, self.staging_root, seen, live)
        if removed:
            log.info("tape_staging_cleaned", files=removed)

    async def _reconcile(self) -> None:
        idle = [s for s in self.targets if s not in self.active]
        await reconcile(
            self.catalogue, self.relay, self.libraries, self.targets, list(self.targets), self.lease.id, idle,
            self.env.own_drives,
        )  # fmt: skip

    async def tick(self) -> None:
        if not self.env.may_commit():
            return  # renewals failing: about to stop, or to start again once one succeeds
        await self._reconcile()
        await self._clean_staging()
        idle = [s for s in self.targets if s not in self.active]
        if not idle:
            return
        states = {e.name: e.state for e in await self.catalogue.endpoints.all()}
        online = [s for s in idle if states.get(s, "online") == "online"]
        stats = await self.catalogue.tape.queue_stats(online)
        queues = [
            steps.PoolQueue(
                q.storage, self.targets[q.storage].library, q.files, q.bytes, q.oldest, q.priority
            )
            for q in stats
        ]
        now = utcnow()
        if not any(steps.due(q, self.settings.tape, now) for q in queues):
            return
        free = {name: await self._free_drives(name) for name in {q.library for q in queues}}
        for q, why in steps.plan_mounts(queues, self.settings.tape, now, free, self.last_served):
            self.last_served[q.storage] = time.monotonic()
            self.active[q.storage] = asyncio.create_task(
                self._batch(q.storage, why), name=f"archive-{q.storage}"
            )

    async def _free_drives(self, library: str) -> int:
        drives = await self.libraries[library].list_drives()
        return sum(1 for d in drives if not d.broken and d.claim is None and d.op is None)

    async def _batch(self, storage: str, why: str) -> None:
        target = self.targets[storage]
        try:
            await run_batch(self.env, target, self.libraries[target.library], why)
            self._complaint.pop(storage, None)
        except SpoolError as exc:
            # e.g. no_cartridge, or every drive broken: the copies wait in the queue; one line per
            # cause, not one per tick.
            if self._complaint.get(storage) != exc.reason:
                self._complaint[storage] = exc.reason
                log.warning("archive_batch_stopped", storage=storage, reason=exc.reason, error=exc.message)
        except Exception:
            log.exception("archive_batch_crashed", storage=storage)
        finally:
            self.active.pop(storage, None)

    async def close(self, grace: float) -> None:
        """Stop: no new batch; running ones stop after their current file (within ``grace``
        seconds, else they are cancelled: the library aborts the write, the copies go back to
        the queue)."""
        if self._loop is not None:
            self._loop.cancel()
            await asyncio.gather(self._loop, return_exceptions=True)
        self.env.stopping.set()
        batches = list(self.active.values())
        if batches:
            _done, pending = await asyncio.wait(batches, timeout=grace)
            for task in pending:
                task.cancel()
            await asyncio.gather(*batches, return_exceptions=True)
        await asyncio.to_thread(staging.forget, self.env.staging)


def _tick_failed(exc: Exception) -> None:
    """The next tick tries again (``every``): one line per failed tick."""
    log.error("tape_scheduler_failed", error=str(exc), error_type=type(exc).__name__)
