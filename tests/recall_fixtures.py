"""Shared set-up of the recall tests: a config with two tape pools in a small simulated library,
files archived through the library API and recorded as the tape daemon would, requests published
as an external system would, and the bus events collected."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import uuid
from collections.abc import Collection
from pathlib import Path
from typing import Any

import aio_pika
import msgpack
from sqlalchemy import Connection, select

from common.catalogue import Catalogue, IngestRecord
from common.catalogue import recall as db
from common.catalogue import schema as s
from common.config import Settings, StorageEndpoint, load_settings
from common.tape import SimulatedLibrary
from tests.replication_fixtures import replication_config
from tests.storage_fixtures import adler, alter_keeping_adler32

DATASET = "lst1.20261124.run000042.dl0"
# Pool tape1 has A00001-A00004, pool tape2 A00005-A00006.
LIBRARY = (
    'root = "tape-library"\ndrives = 2\npools = { tape1 = 4, tape2 = 2 }\nscratch_cartridges = 0\n'
    "capacity_bytes = 4000000\ndurable = false\n"
)
TAPE = {
    "storage.tape1": 'kind = "tape"',
    "storage.tape2": 'kind = "tape"',
    "tape_libraries.default": LIBRARY + "time_scale = 0.0",
    "recall": "poll_interval = 0.1\nbuffer_wait = 1.0\nretry_delay = 0.5\npin_seconds = 3600",
}


def recall_config(tmp_path: Path, tag: str, **extra: str) -> Path:
    return replication_config(tmp_path, tag, **{**TAPE, **extra})


def recall_settings(tmp_path: Path, tag: str, **extra: str) -> Settings:
    return load_settings(recall_config(tmp_path, tag, **extra))


def contents(n: int, size: int = 3000, prefix: str = "run42") -> dict[str, bytes]:
    return {f"{prefix}/f{i:03d}.fits": os.urandom(size) for i in range(n)}


async def register(
    settings: Settings, files: dict[str, bytes], *, keep_on_disk: Collection[str] = ()
) -> None:
    """Register the files as ingest would (a copy on disk1); only ``keep_on_disk`` keep that copy."""
    root = settings.storage["disk1"].root
    async with await Catalogue.open(settings.catalogue.url) as cat:
        await cat.endpoints.sync(settings.storage)
        await cat.ingest.register(
            [
                IngestRecord(event_id=uuid.uuid4().hex, name=n, dataset=DATASET, size=len(b),
                             adler32=adler(b), sha256=hashlib.sha256(b).hexdigest(), storage="disk1", pfn=n)
                for n, b in files.items()
            ]
        )  # fmt: skip
        for name, data in files.items():
            if name in keep_on_disk:
                (root / name).parent.mkdir(parents=True, exist_ok=True)
                (root / name).write_bytes(data)
            else:
                await cat.replication.set_replica(name=name, storage="disk1", pfn=name, state="deleted")


async def archive(
    settings: Settings, layout: dict[str, list[str]], files: dict[str, bytes]
) -> dict[tuple[str, str], int]:
    """Write ``layout`` (vid -> names, in order) through the library API and record each tape copy
    as the tape daemon does; every drive is empty afterwards. Returns (vid, name) -> fseq."""
    pools = {f"A{n:05d}": "tape1" if n <= 4 else "tape2" for n in range(1, 7)}
    source = settings.state_dir / "tape-source"
    fseqs: dict[tuple[str, str], int] = {}
    lib = await SimulatedLibrary.open(settings.tape_libraries["default"])
    try:
        async with await Catalogue.open(settings.catalogue.url) as cat:
            await cat.endpoints.sync(settings.storage)
            for vid, names in layout.items():
                await lib.mount("DR01", vid)
                for name in names:
                    source.write_bytes(files[name])
                    fseq = await lib.write("DR01", source, name, len(files[name]), adler(files[name]))
                    await cat.replication.set_replica(name=name, storage=pools[vid], pfn=f"{vid}/{fseq}",
                                          state="available", cartridge=vid, fseq=fseq)  # fmt: skip
                    fseqs[(vid, name)] = fseq
            await lib.unmount("DR01")
    finally:
        await lib.close()
    return fseqs


async def corrupt(settings: Settings, vid: str, fseq: int) -> None:
    lib = await SimulatedLibrary.open(settings.tape_libraries["default"])
    try:
        path = lib.data_path(vid, fseq)
        data = bytearray(path.read_bytes())
        data[10] ^= 0xFF
        path.write_bytes(bytes(data))
    finally:
        await lib.close()


async def corrupt_keeping_adler32(settings: Settings, vid: str, fseq: int) -> None:
    """Alter a tape file's bytes without changing its size or adler32 (only sha256 sees it)."""
    lib = await SimulatedLibrary.open(settings.tape_libraries["default"])
    try:
        path = lib.data_path(vid, fseq)
        path.write_bytes(alter_keeping_adler32(path.read_bytes()))
    finally:
        await lib.close()


async def mounts(settings: Settings) -> int:
    lib = await SimulatedLibrary.open(settings.tape_libraries["default"])
    try:
        return (await lib.usage()).total.mounts
    finally:
        await lib.close()


async def request(
    broker: aio_pika.abc.AbstractRobustConnection,
    settings: Settings,
    *,
    names: list[str] | None = None,
    dataset: str | None = None,
    destination: str | None = "disk2",
    priority: int = 3,
    reply_to: str | None = None,
    correlation_id: str | None = None,
) -> str:
    """Publish a recall.request CloudEvent (structured JSON) as an external system would."""
    data: dict[str, Any] = {"priority": priority}
    if names is not None:
        data["names"] = names
    if dataset is not None:
        data["dataset"] = dataset
    if destination is not None:
        data["destination"] = destination
    event_id = uuid.uuid4().hex
    event = {
        "specversion": "1.0",
        "id": event_id,
        "source": "test-pipeline",
        "type": "recall.request",
        "data": data,
    }
    channel = await broker.channel(publisher_confirms=True)
    try:
        exchange = await channel.get_exchange(settings.bus.exchange)
        await exchange.publish(
            aio_pika.Message(json.dumps(event).encode(), content_type="application/cloudevents+json",
                             message_id=event_id, reply_to=reply_to, correlation_id=correlation_id),
            routing_key="recall.request",
        )  # fmt: skip
    finally:
        await channel.close()
    return event_id


class Events:
    """Every ``file.recalled`` / ``recall.completed`` published, collected from a queue of our own."""

    def __init__(self, queue: aio_pika.abc.AbstractQueue) -> None:
        self.queue = queue
        self.seen: list[tuple[str, dict[str, Any], str | None]] = []  # routing key, body, message id

    @classmethod
    async def watch(cls, broker: aio_pika.abc.AbstractRobustConnection, settings: Settings) -> Events:
        channel = await broker.channel()
        queue = await channel.declare_queue(exclusive=True)
        for key in ("file.recalled", "recall.completed"):
            await queue.bind(settings.bus.exchange, key)
        return cls(queue)

    async def poll(self) -> None:
        while (m := await self.queue.get(fail=False, no_ack=True)) is not None:
            self.seen.append((m.routing_key or "", msgpack.unpackb(m.body), m.message_id))

    async def completion(self, request_id: str, timeout: float = 60.0) -> dict[str, Any]:
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            await self.poll()
            for key, body, _ in self.seen:
                if key == "recall.completed" and body["request_id"] == request_id:
                    return body
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"no recall.completed for {request_id} within {timeout} s")
            await asyncio.sleep(0.1)

    def recalled(self, request_id: str | None = None) -> list[str]:
        """Names in the order their file.recalled arrived."""
        return [
            b["name"]
            for k, b, _ in self.seen
            if k == "file.recalled" and request_id in (None, b["request_id"])
        ]


async def status(settings: Settings, recall_id: str) -> db.RecallView | None:
    async with await Catalogue.open(settings.catalogue.url) as cat:
        return await cat.recall.status(recall_id)


def _replica_row(conn: Connection, name: str, storage: str) -> Any:
    return conn.execute(
        select(s.replicas.c.state, s.replicas.c.tombstone, s.replicas.c.pfn)
        .join(s.files, s.files.c.id == s.replicas.c.file_id)
        .join(s.storage_endpoints, s.storage_endpoints.c.id == s.replicas.c.storage_id)
        .where(s.files.c.name == name, s.storage_endpoints.c.name == storage)
    ).first()


async def replica(settings: Settings, name: str, storage: str) -> Any:
    async with await Catalogue.open(settings.catalogue.url) as cat:
        return await cat.read(_replica_row, name, storage)


async def recalled_history(settings: Settings, name: str) -> int:
    """``file.recalled`` rows in the file's history (one per delivery to a request)."""
    async with await Catalogue.open(settings.catalogue.url) as cat:
        return sum(e.type == "file.recalled" for e in await cat.queries.history(name))


# --- the scheduler tests' rig (tests/test_recall_scheduler.py, tests/test_recall_instances.py) ---
SIZE = 2000


async def archive_on_tape(
    tmp_path: Path, cat: Catalogue, lib: SimulatedLibrary, layout: dict[str, int]
) -> None:
    """``layout``: vid -> number of files, named ``<vid>/<fseq>``; only their tape copy is left."""
    source = tmp_path / "source"
    for vid, n in layout.items():
        await lib.mount("DR01", vid)
        for fseq in range(1, n + 1):
            name = f"{vid}/{fseq}"
            data = os.urandom(SIZE)
            source.write_bytes(data)
            checksum = adler(data)
            assert await lib.write("DR01", source, name, SIZE, checksum) == fseq
            await cat.ingest.register(
                [IngestRecord(event_id=name, name=name, dataset="lst1.20261124.run000001.dl0", size=SIZE,
                              adler32=checksum, storage="landing", pfn=name)]
            )  # fmt: skip
            await cat.replication.set_replica(name=name, storage="landing", pfn=name, state="deleted")
            await cat.replication.set_replica(
                name=name, storage="tape1", pfn=name, state="available", cartridge=vid, fseq=fseq
            )
    await lib.unmount("DR01")


def recall_endpoints(tmp_path: Path) -> dict[str, StorageEndpoint]:
    return {
        "landing": StorageEndpoint(root=tmp_path / "landing"),
        "buffer": StorageEndpoint(root=tmp_path / "buffer"),
        "tape1": StorageEndpoint(kind="tape", backend="simulated", library="lib"),
    }
