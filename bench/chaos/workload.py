"""What a chaos run asks of Spool: an observing night of small files (a few larger ones) in
datasets of two kinds, its configuration, the ``file.ready`` events published at a steady pace
through broker outages, and recalls of archived files.

- ``dl0`` datasets: a copy at the second site (rule ``offsite``, disk2) and on tape (``archive``).
- ``dl1`` datasets: tape only. Once one is wholly on tape, it is recalled: every other such
  dataset has its disk copies evicted first and is recalled whole to disk1 (the bytes come from
  tape), the others have some files recalled to disk2 (served from the disk copy).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
import uuid
import zlib
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aio_pika

from common.codec import to_cloudevent
from common.messages import FileReady, RecallRequest

PG_ADMIN_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/postgres"
LARGE_EVERY = 50  # one file in 50 is larger than batch_copy_bytes (copied on its own)


@dataclass
class SourceFile:
    name: str  # logical name: the path relative to the landing area
    path: Path
    dataset: str
    size: int
    adler32: str


@dataclass
class Night:
    files: list[SourceFile]
    datasets: list[str]  # in publish order
    events: list[dict[str, Any]]  # file.ready CloudEvents, in publish order

    @property
    def tape_only(self) -> list[str]:
        return [d for d in self.datasets if d.endswith(".dl1")]

    def of(self, dataset: str) -> list[SourceFile]:
        return [f for f in self.files if f.dataset == dataset]

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)


def make_night(landing: Path, files: int, datasets: int, rng: random.Random) -> Night:
    """Write the files (dataset after dataset, so early datasets are complete early) and their
    events; every third dataset is a tape-only ``dl1`` one."""
    day = datetime.now(UTC).strftime("%Y%m%d")
    names = [f"lst1.{day}.run{100 + i:06d}.{'dl1' if i % 3 == 1 else 'dl0'}" for i in range(datasets)]
    out: list[SourceFile] = []
    events: list[dict[str, Any]] = []
    for i in range(files):
        dataset = names[i * datasets // files]
        size = rng.randint(70_000, 400_000) if i % LARGE_EVERY == LARGE_EVERY - 1 else rng.randint(256, 8192)
        data = rng.randbytes(size)
        name = f"{dataset.split('.')[2]}/f{i:06d}.fits"
        path = landing / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        checksum = f"{zlib.adler32(data):08x}"
        out.append(SourceFile(name, path, dataset, size, checksum))
        run = 100 + i * datasets // files
        msg = FileReady(id=f"chaos-ready-{i:06d}", source="chaos-daq", path=str(path), dataset=dataset,
                        size=size, adler32=checksum, metadata={"run": run})  # fmt: skip
        events.append(to_cloudevent(msg))
    return Night(out, names, events)


def write_config(
    path: Path, state: Path, amqp_urls: list[str], catalogue_url: str, night: Night, *,
    shared: Path | None = None, node: str | None = None, side_queues: str | None = None,
) -> Path:  # fmt: skip
    """Two disk endpoints (disk1 for ingest, disk2 at another site), a tape pool in a simulated
    library run 1,000x faster than LTO-9, short retry tiers, small tape batches.

    ``state`` is the node's own directory (its daemons' staging areas); ``shared`` (default:
    ``state``) holds what every node reaches under the same names: the landing area, the storage
    roots and the library. Several broker URLs: ``bus.urls``, the nodes of a cluster."""
    shared = shared or state
    capacity = max(1_000_000, night.total_bytes // 6)  # the night fills about six cartridges
    bus = f"urls = {json.dumps(amqp_urls)}" if len(amqp_urls) > 1 else f'url = "{amqp_urls[0]}"'
    if side_queues:
        bus += f'\nside_queues = "{side_queues}"'
    node_line = f'node = "{node}"' if node else ""
    # One instance may hold 256 file.ready at once; beside another, a smaller share each (what the
    # operator guide asks of several instances), or the first to see a burst takes all of it.
    ingest = "prefetch = 40\nconcurrency = 32" if node else "prefetch = 256\nconcurrency = 128"
    text = f"""
state_dir = "{state}"
{node_line}
[bus]
{bus}
retry_tiers = [0.5, 1, 2, 4]
max_attempts = 10
heartbeat_interval = 2
stop_grace = 5
connect_timeout = 10
[catalogue]
url = "{catalogue_url}"
[storage.disk1]
root = "{shared}/storage/disk1"
attributes = {{ site = "LOCAL" }}
[storage.disk2]
root = "{shared}/storage/disk2"
attributes = {{ site = "PIC" }}
[storage.tape1]
kind = "tape"
library = "default"
attributes = {{ site = "LOCAL" }}
[tape_libraries.default]
root = "{shared}/tape-library"
drives = 2
pools = {{ tape1 = 2 }}
scratch_cartridges = 12
capacity_bytes = {capacity}
time_scale = 0.001
durable = false
[tape]
mount_min_files = 200
mount_min_bytes = 1_000_000_000
mount_max_age = 2
batch_max_files = 400
poll_interval = 0.2
record_every = 16
[recall]
poll_interval = 0.2
buffer_wait = 10
retry_delay = 1
[replication]
poll_interval = 0.5
reaper_interval = 5
breaker_failures = 5
breaker_cooldown = 1
breaker_max_cooldown = 5
[landing_areas]
lst1 = "{shared}/landing"
[rules.offsite]
datasets = 'lst1\\..*\\.dl0'
endpoints = "site=PIC&kind=disk"
copies = 1
[rules.archive]
datasets = 'lst1\\..*'
endpoints = "kind=tape"
copies = 1
[daemons.ingest]
{ingest}
[monitor]
http_host = "127.0.0.1"
http_port = 0
poll_interval = 2
[log]
level = "info"
format = "json"
"""
    path.write_text(text.lstrip())
    return path


@asynccontextmanager
async def pg_database(admin_url: str = PG_ADMIN_URL) -> AsyncIterator[str]:
    """A fresh PostgreSQL database for one run (dropped afterwards, whatever happens)."""
    import asyncpg
    from sqlalchemy.engine import make_url

    base = make_url(admin_url)
    admin = await asyncpg.connect(base.set(drivername="postgresql").render_as_string(False), timeout=10)
    name = f"spool_chaos_{uuid.uuid4().hex[:12]}"
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield base.set(database=name).render_as_string(hide_password=False)
        finally:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@dataclass
class Publisher:
    """Publishes JSON CloudEvents (persistent, mandatory, confirmed) on the run's broker and
    keeps trying through outages (on the next node of a cluster): a batch the broker did not
    confirm is sent again whole (an event repeated under its id is a no-op for Spool)."""

    urls: list[str]  # the broker's nodes: after a failure the next batch goes to the next one
    exchange: str = "spool"
    resent_batches: int = 0
    _connection: aio_pika.abc.AbstractConnection | None = None
    _at: int = 0

    async def _channel(self) -> aio_pika.abc.AbstractChannel:
        if self._connection is None or self._connection.is_closed:
            self._connection = await aio_pika.connect(self.urls[self._at % len(self.urls)], timeout=5)
        return await self._connection.channel(publisher_confirms=True, on_return_raises=True)

    async def send(self, events: list[tuple[str, dict[str, Any], str | None]], give_up: float = 600) -> None:
        """(routing key, CloudEvent, reply_to) each; returns once the broker confirmed them all."""
        import json

        deadline = time.monotonic() + give_up
        while True:
            try:
                channel = await self._channel()
                exchange = await channel.get_exchange(self.exchange, ensure=False)
                await asyncio.gather(*(
                    exchange.publish(
                        aio_pika.Message(json.dumps(e).encode(), content_type="application/cloudevents+json",
                                         message_id=e["id"], correlation_id=e["id"], reply_to=reply_to,
                                         delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                        routing_key=key, mandatory=True, timeout=30,
                    )
                    for key, e, reply_to in events
                ))  # fmt: skip
                await channel.close()
                return
            except Exception:  # the broker is down or going down: reconnect and send again
                if time.monotonic() > deadline:
                    raise
                self.resent_batches += 1
                self._at += 1
                await self.close()
                await asyncio.sleep(1.0)

    async def close(self) -> None:
        if self._connection is not None:
            with contextlib.suppress(Exception):  # closing a connection to a dead broker
                await asyncio.wait_for(self._connection.close(), 5)
            self._connection = None


async def publish_night(
    publisher: Publisher, night: Night, rate: float, published: Callable[[int], None]
) -> None:
    """Every ``file.ready`` at about ``rate`` events a second, in batches every half second."""
    batch = max(1, int(rate / 2))
    t0 = time.monotonic()
    for start in range(0, len(night.events), batch):
        chunk = night.events[start : start + batch]
        await publisher.send([("file.ready", e, None) for e in chunk])
        published(start + len(chunk))
        ahead = t0 + (start + len(chunk)) / rate - time.monotonic()
        if ahead > 0:
            await asyncio.sleep(ahead)


@dataclass
class Recall:
    id: str
    kind: str  # "tape": evicted from disk first, recalled whole to disk1; "disk": names to disk2
    dataset: str
    names: list[str]
    destination: str
    evicted: int = 0


@dataclass
class Recalls:
    requested: list[Recall] = field(default_factory=list)
    done: asyncio.Event = field(default_factory=asyncio.Event)


def recall_request(r: Recall) -> dict[str, Any]:
    if r.kind == "tape":
        msg = RecallRequest(id=r.id, source="chaos", dataset=r.dataset, destination=r.destination, priority=5)
    else:
        msg = RecallRequest(id=r.id, source="chaos", names=r.names, destination=r.destination, priority=4)
    return to_cloudevent(msg)
