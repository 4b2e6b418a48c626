"""The bulk path of the replicator: a ``replica.request`` naming many files (``names``).

It takes the single-file steps (``handlers``) for all its files at once where nothing needs
deciding (``_copy_together``: every free lock, one catalogue read, the small copies due in whole
batches, one record); each file left over takes them on its own (``handlers._replicate_one``,
passed in as ``copy_one``). The handler announces what was made, then re-sends each failed file
as a request of its own; names the catalogue does not know are one failure of the whole request
(``unknown_names``).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Protocol

from pydantic import TypeAdapter

from common.bus.service import Context
from common.catalogue import CopyRecord, ReplicaTask, Source
from common.errors import Permanent
from common.messages import CreatedCopy, ReplicaRequest
from common.storage import CopyResult, PosixStorage, StorageBackend
from common.storage.posix import ReplicaCopy
from daemons.replicator import steps

if TYPE_CHECKING:
    from daemons.replicator.handlers import ReplicatorResources


class CopyOne(Protocol):
    """The single-file way: make (or verify) one copy, return what to announce."""

    async def __call__(
        self,
        name: str,
        msg: ReplicaRequest,
        ctx: Context[ReplicatorResources],
        request_id: str,
        correlation_id: str | None = None,
    ) -> CreatedCopy | None: ...


UNKNOWN_FILE = "unknown_file"


async def replicate_bulk(
    msg: ReplicaRequest, ctx: Context[ReplicatorResources], copy_one: CopyOne
) -> list[CreatedCopy | BaseException | None]:
    """The outcome for each file of a bulk request: first the small copies that can go straight
    all together (``_copy_together``), then every other file on its own (``copy_one``, all
    at once: the destination's slots bound the copies)."""
    res = ctx.resources
    claimed = res.locks.claim_free([(name, msg.destination) for name in dict.fromkeys(msg.names)])
    unknown: set[str] = set()
    correlation = {name: msg.correlation_of(i, ctx.correlation_id) for i, name in enumerate(msg.names)}
    try:
        done = await _copy_together([name for name, _ in claimed], msg, ctx, unknown, correlation)
    finally:
        res.locks.release(claimed)
    rest = [name for name in msg.names if name not in done and name not in unknown]
    alone = iter(
        await asyncio.gather(
            *(copy_one(name, msg, ctx, _item_id(msg.id, name), correlation[name]) for name in rest),
            return_exceptions=True,
        )
    )
    not_known = Permanent(UNKNOWN_FILE, "not in the catalogue")  # one object: counted, not raised
    return [
        done[name] if name in done else not_known if name in unknown else next(alone) for name in msg.names
    ]


async def _copy_together(
    names: Sequence[str],
    msg: ReplicaRequest,
    ctx: Context[ReplicatorResources],
    unknown: set[str],
    correlation: Mapping[str, str | None],
) -> dict[str, CreatedCopy]:
    """The common case of a bulk request, without a task, a lock wait or a future per file: one
    catalogue read for all, the copies that are plainly due (no row yet or ``queued``, small, a
    source to read, the endpoint writable) in whole batches (``copy_verified_many``), one record.
    Names the catalogue read finds unknown are added to ``unknown`` (no single-file lookup again).

    ``names`` are locked by the caller. Anything else — a copy to verify or cancel, a large one,
    an endpoint paused or down, a copy that failed here — is left out of the answer, and goes the
    single-file way, which decides it (so a failed copy is tried once more there, from the best
    source again, and only its failures there count for the endpoint's circuit breaker).
    """
    res = ctx.resources
    destination = msg.destination
    dest = res.storages[destination]
    if not isinstance(dest, PosixStorage):
        return {}  # a remote destination: each copy its own transfer (``handlers._copy_from_best``)
    if not names or not res.health.writable(destination) or dest.endpoint.durability == "file":
        return {}
    picked: list[tuple[ReplicaTask, Source]] = []
    # The files of a bulk request mostly have their copies on the same endpoints: the ranking
    # depends only on those (and on states and load, fixed meanwhile), so it is made once per set.
    best_of: dict[tuple[str, ...], str | None] = {}
    for name, task in zip(
        names, await res.catalogue.replication.replica_tasks([(n, destination) for n in names]), strict=True
    ):
        if task is None:
            unknown.add(name)
            continue
        if steps.action(task) != "copy" or not dest.batches_copy(task.size, False):
            continue
        where = tuple(s.storage for s in task.sources)
        if where not in best_of:
            ranked = steps.rank_sources(
                task.sources, destination, ctx.settings.storage, res.health.states, res.reading
            )
            best_of[where] = ranked[0].storage if ranked else None
        best = best_of[where]
        if best is not None and isinstance(res.storages.get(best), PosixStorage):
            picked.append((task, next(s for s in task.sources if s.storage == best)))
    if not picked:
        return {}
    copies = [
        ReplicaCopy(
            source_root=os.fspath(_posix(res.storages[source.storage]).root),
            source_pfn=source.pfn,
            relpath=task.pfn or task.name,
            size=task.size,
            adler32=task.adler32,
            sha256=task.sha256,
        )
        for task, source in picked
    ]
    reading = Counter(source.storage for _, source in picked)
    res.reading.update(reading)
    try:
        outcomes = await dest.copy_verified_many(copies)
    finally:
        res.reading.subtract(reading)
    made = [
        (task, source, out)
        for (task, source), out in zip(picked, outcomes, strict=True)
        if isinstance(out, CopyResult)
    ]
    if not made:
        return {}
    await res.health.success(destination)
    await res.registrar.submit_many(
        [
            CopyRecord(
                request_id=_item_id(msg.id, task.name),
                name=task.name,
                storage=destination,
                pfn=out.pfn,
                attempt=ctx.attempt,
                source=source.storage,
                correlation_id=correlation.get(task.name),
            )
            for task, source, out in made
        ]
    )
    created = _CREATED_COPIES.validate_python(
        [{"name": t.name, "pfn": out.pfn, "size": t.size, "adler32": t.adler32} for t, _, out in made]
    )
    return {c.name: c for c in created}


def _item_id(request_id: str, name: str) -> str:
    """A request id per file of a bulk request (the catalogue's request key stays short)."""
    return f"{request_id}-{hashlib.blake2b(name.encode(), digest_size=8).hexdigest()}"


def _posix(storage: StorageBackend) -> PosixStorage:
    assert isinstance(storage, PosixStorage)  # checked by the caller
    return storage


# A bulk request's copies, validated in one call (pydantic's core, not Python per copy): a fifth of
# the time of building each with ``model_construct``.
_CREATED_COPIES = TypeAdapter(list[CreatedCopy])
