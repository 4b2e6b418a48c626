"""Shared set-up of the tape daemon tests: a small simulated library, a fast archive policy, and
helpers reading what the catalogue and the library say about tape copies."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import msgpack
from sqlalchemy import Connection, select

from common.bus.publisher import RecordingPublisher
from common.catalogue import Catalogue, IngestRecord
from common.catalogue import schema as s
from common.config import Settings
from common.instance import InstanceLease
from common.storage import open_storage
from common.tape import SimulatedLibrary, open_library
from daemons.relay import OutboxRelay
from daemons.tape.writer import Env
from tests.replication_fixtures import replication_config
from tests.storage_fixtures import adler

# 2 drives, pools of 3 cartridges (raw, vault) + 2 scratch, 100 kB tapes, no sleeping.
LIBRARY = (
    'root = "tape-library"\ndrives = 2\npools = { raw = 3, vault = 3 }\nscratch_cartridges = 2\n'
    "capacity_bytes = 100000\ntime_scale = 0\ndurable = false"
)
# Mount for 5 files or after half a second; look at the queues ten times a second.
POLICY = "mount_min_files = 5\nmount_min_bytes = 1000000000\nmount_max_age = 0.5\npoll_interval = 0.1"
# Files below 10 kB packed into aggregates of at most 40 kB (a 100 kB tape holds two). A policy
# that does not name ``aggregate_below`` writes every file as its own tape file (``tape_config``).
AGGREGATING = POLICY + "\naggregate_below = 10000\naggregate_size = 40000"
TAPE1 = {"storage.tape1": 'kind = "tape"\npool = "raw"'}
TAPE2 = {"storage.tape2": 'kind = "tape"\npool = "vault"'}
TO_TAPE1 = {"rules.archive": 'datasets = ".*"\nendpoints = "tape1"'}
# The holder of the copies the catalogue-level tests take (a tape daemon instance's id; no lease
# needed where nothing settles a dead instance's copies).
HOLDER = "tape@test:1:0000"


def tape_config(
    tmp_path: Path, tag: str, *, library: str = LIBRARY, policy: str = POLICY, **extra: str
) -> Path:
    if "aggregate_below" not in policy:
        policy += "\naggregate_below = 0"
    sections = {**TAPE1, "tape_libraries.default": library, "tape": policy, **TO_TAPE1, **extra}
    return replication_config(tmp_path, tag, **sections)


def _copies(conn: Connection, storage: str) -> dict[str, tuple[str, str | None, int | None]]:
    f, r, ep = s.files, s.replicas, s.storage_endpoints
    stmt = (
        select(f.c.name, r.c.state, r.c.cartridge, r.c.fseq)
        .join(r, r.c.file_id == f.c.id)
        .join(ep, ep.c.id == r.c.storage_id)
        .where(ep.c.name == storage)
    )
    return {name: (state, vid, fseq) for name, state, vid, fseq in conn.execute(stmt)}


async def tape_copies(
    settings: Settings, storage: str = "tape1"
) -> dict[str, tuple[str, str | None, int | None]]:
    """name -> (state, cartridge, fseq) of every copy on ``storage``."""
    async with await Catalogue.open(settings.catalogue.url) as cat:
        return await cat.read(_copies, storage)


async def on_tape(settings: Settings, library: str = "default") -> dict[str, list[tuple[int, str]]]:
    """vid -> [(fseq, name)] committed on each cartridge, as the library itself says."""
    lib = await open_library(settings.tape_libraries[library])
    try:
        return {
            c.vid: [(f.fseq, f.name) for f in await lib.list_files(c.vid)]
            for c in await lib.list_cartridges()
        }
    finally:
        await lib.close()


async def library_call(settings: Settings, method: str, *args: Any, library: str = "default") -> Any:
    """Call one method of the library from the test (fault injection, inspection)."""
    lib = await open_library(settings.tape_libraries[library])
    try:
        return await getattr(lib, method)(*args)
    finally:
        await lib.close()


def placed(copies: dict[str, tuple[str, str | None, int | None]]) -> dict[tuple[str, int], str]:
    """(cartridge, fseq) -> name of the available copies."""
    return {(vid, fseq): n for n, (st, vid, fseq) in copies.items() if st == "available" and vid and fseq}


def listed(tapes: dict[str, list[tuple[int, str]]]) -> dict[tuple[str, int], str]:
    return {(vid, fseq): name for vid, files in tapes.items() for fseq, name in files}


def names_on_tape(tapes: dict[str, list[tuple[int, str]]]) -> list[str]:
    return sorted(name for files in tapes.values() for _, name in files)


async def bind(broker: Any, settings: Settings, *keys: str) -> Any:
    channel = await broker.channel()
    queue = await channel.declare_queue(exclusive=True)
    for key in keys:
        await queue.bind(settings.bus.exchange, key)
    return queue


async def drain(queue: Any) -> list[tuple[str, dict[str, Any]]]:
    out = []
    while (m := await queue.get(fail=False)) is not None:
        out.append((m.routing_key, msgpack.unpackb(m.body)))
    return out


def as_json(result: Any) -> Any:
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


async def queue_for_tape(settings: Settings, catalogue: Catalogue, sizes: list[int]) -> dict[str, bytes]:
    """Files on disk1, registered and queued for tape1 (what ingest and the handler do)."""
    root = settings.storage["disk1"].root
    files = {f"night/f{i:03d}.fits": os.urandom(size) for i, size in enumerate(sizes)}
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    await catalogue.ingest.register(
        [
            IngestRecord(event_id=uuid.uuid4().hex, name=n, dataset="lst1.20261207.run000001.dl0",
                         size=len(d), adler32=adler(d), storage="disk1", pfn=n)
            for n, d in files.items()
        ]
    )  # fmt: skip
    for name in files:
        await catalogue.tape.ensure_queued(name, "tape1", 3)
    return files


@asynccontextmanager
async def writer_harness(
    settings: Settings, staging: Path, on_lost: Callable[[], None] | None = None
) -> AsyncIterator[tuple[Catalogue, Env, SimulatedLibrary]]:
    """What the tape writer runs with, without the daemon: the catalogue, an instance lease, the
    disk endpoints, the library and a recording relay (``daemons.tape.writer.Env``)."""
    catalogue = await Catalogue.open(settings.catalogue.url)
    await catalogue.endpoints.sync(settings.storage)
    library = await SimulatedLibrary.open(settings.tape_libraries["default"])
    storages = {n: open_storage(n, e) for n, e in settings.storage.items() if e.kind == "disk"}
    lease = InstanceLease(catalogue, "tape", "test", 30.0, **({"on_lost": on_lost} if on_lost else {}))
    await lease.start()
    env = Env(settings, catalogue, OutboxRelay(catalogue, RecordingPublisher()), storages, staging, lease)
    try:
        yield catalogue, env, library
    finally:
        await lease.stop()
        for storage in storages.values():
            await storage.aclose()
        await library.close()
        await catalogue.close()
