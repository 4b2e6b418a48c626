"""Issue 19's finding, with real processes: every copy process frozen, files sitting in flight,
every daemon alive, and no alert. Now the monitor raises one ``stalled`` alert naming the holder
(daemon, host, pid) and the work, and ``spool status`` lists it."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import zlib
from pathlib import Path

import aio_pika
import msgpack
import psutil
import pytest

from common.config import load_settings
from tests.cli_fixtures import spool
from tests.conftest import cloudevent, publish_raw, queue_consumers, start_daemon, wait_for
from tests.monitor_fixtures import monitor_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]
DATASET = "lst1.20261123.run012345.dl0"


def announce(landing: Path, name: str) -> bytes:
    data = os.urandom(2048)
    path = landing / name
    path.write_bytes(data)
    return cloudevent({"path": str(path), "dataset": DATASET, "size": len(data),
                       "adler32": f"{zlib.adler32(data):08x}"})  # fmt: skip


async def test_a_frozen_copy_is_alerted_once_as_stalled_and_shown_by_spool_status(
    tmp_path: Path, tag: str
) -> None:
    config = monitor_config(tmp_path, tag, stall_limits="{ delivery = 2.0 }")
    settings = load_settings(config)
    landing = settings.landing_areas["lst1"]
    connection = await aio_pika.connect_robust(settings.bus.url)
    procs = [start_daemon(config, d, tmp_path / f"{d}.log") for d in ("ingest", "monitor")]
    copier: psutil.Process | None = None
    try:
        channel = await connection.channel()
        exchange = await channel.declare_exchange(
            settings.bus.exchange, aio_pika.ExchangeType.TOPIC, durable=True
        )
        alerts = await channel.declare_queue(exclusive=True)
        await alerts.bind(exchange, "alert.raised")
        ingested = await channel.declare_queue(exclusive=True)
        await ingested.bind(exchange, "file.ingested")

        async def consuming() -> bool:
            return await queue_consumers(connection, settings.queue("ingest")) > 0

        await wait_for(consuming, timeout=60)
        await publish_raw(connection, settings, "file.ready", announce(landing, "warm.fits"))
        await wait_for(lambda: _got(ingested), timeout=60)  # the copy process is running now
        [copier] = psutil.Process(procs[0].pid).children()
        copier.send_signal(signal.SIGSTOP)
        await publish_raw(connection, settings, "file.ready", announce(landing, "frozen.fits"))

        raised = None
        for _ in range(120):
            m = await alerts.get(no_ack=True, fail=False)
            if m is not None and (body := msgpack.unpackb(m.body))["kind"] == "stalled":
                raised = body
                break
            await asyncio.sleep(0.25)
        assert raised is not None, "no stalled alert"
        holder = f"ingest@{socket.gethostname()}:{procs[0].pid}"
        assert holder in raised["summary"] and raised["reason"] == "delivery"
        assert "frozen.fits" in raised["example"] and raised["daemon"] == "ingest"

        status = spool(config, "status", "--json")
        doc = json.loads(status.stdout)
        assert [(s["kind"], s["holder"]) for s in doc["stalled"]] == [("delivery", holder)]
        text = spool(config, "status", env={"COLUMNS": "300"}).stdout
        assert f"stalled delivery: held by {holder}" in text
        await asyncio.sleep(2.0)  # more heartbeats of the same stall: no second alert
        again = [
            msgpack.unpackb(m.body) for m in [await alerts.get(no_ack=True, fail=False)] if m is not None
        ]
        assert [a for a in again if a["kind"] == "stalled"] == []
    finally:
        if copier is not None:
            copier.send_signal(signal.SIGCONT)
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            p.wait(timeout=60)
        await connection.close()


async def _got(queue: aio_pika.abc.AbstractQueue) -> bool:
    return await queue.get(no_ack=True, fail=False) is not None
