"""Does the monitor keep up with the bus? Two ways to ask, each with the monitor as its own process
(``python -m daemons --config CFG run monitor``) and its CPU time and RSS sampled every 0.1 s.

- ``backlog`` (default): N events queued first, then the monitor started; timed until
  ``/metrics`` has counted every one. The rate is its ceiling: from its start (imports,
  catalogue, HTTP included) and in steady state (from the first event counted to the last).
- ``live``: the monitor running while events are published at a fixed rate (``--rate``, 5,000/s)
  for ``--seconds``; reports the rate actually published, the monitor's CPU share meanwhile, how far
  it fell behind at worst, and how long it took to count the last event after publishing stopped.

CPU share is the monitor's CPU seconds over wall seconds: 1.0 is one core busy. The mix is a night's:
a ``file.ready`` and a ``file.ingested`` per file, one file in 20 failing. Events are published
without publisher confirms (the bench's own publisher must not be the bottleneck); the monitor's
queue depth is checked before the backlog run starts, so none is missing. Isolated like the tests
(own exchange, prefix, state directory), cleaned up at the end. Prints figures; exit code 0 unless
events went uncounted.

    .venv/bin/python bench/monitor.py                              # backlog of 50,000 events
    .venv/bin/python bench/monitor.py live --rate 5000 --seconds 30
    .venv/bin/python bench/monitor.py backlog --events 200000 --json
"""

from __future__ import annotations

import sys

# Run as ``python bench/monitor.py`` the bench directory heads sys.path; drop it (see ingest.py).
if sys.path and sys.path[0] and __file__.startswith(sys.path[0]) and __name__ == "__main__":
    sys.path.pop(0)

import argparse
import asyncio
import json
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import aiormq
import psutil
from pamqp.commands import Basic

from common import codec
from common.bus.connection import connect
from common.bus.topology import declare_topology, delete_topology
from common.config import Settings, load_settings
from common.messages import FileFailed, FileIngested, FileReady, Message

REPO = Path(__file__).resolve().parent.parent
REASONS = ("destination_not_writable", "checksum_mismatch", "file_missing")


def write_config(state: Path, tag: str, port: int) -> Path:
    state.mkdir(parents=True, exist_ok=True)
    path = state / "spool.toml"
    path.write_text(
        f'state_dir = "{state}"\n[bus]\nexchange = "spool-bench-{tag}"\nqueue_prefix = "b{tag}"\n'
        f'heartbeat_interval = 1\n[log]\nformat = "json"\n[monitor]\nhttp_host = "127.0.0.1"\n'
        f"http_port = {port}\npoll_interval = 2\n"
    )
    return path


def events(n: int) -> list[tuple[str, bytes]]:
    """(routing key, msgpack body) of a night's mix, encoded once before anything is timed."""
    out: list[Message] = []
    for i in range(n // 2):
        name = f"run{i // 1000:06d}/f{i}.fits.fz"
        out.append(FileReady(path=f"/landing/{name}", dataset="lst1.20261123.run012345.dl0"))
        if i % 20 == 0:
            out.append(
                FileFailed(daemon="ingest", reason=REASONS[i % 3], error="bench", attempts=1, name=name)
            )
        else:
            out.append(
                FileIngested(name=name, dataset="d", size=1024, adler32="00000001", storage="disk1", pfn=name)
            )
    return [(m.ROUTING_KEY, codec.encode(m)) for m in out]


class Sampler:
    """CPU seconds and peak RSS of one process, sampled from a thread (the bench's loop is busy)."""

    def __init__(self, pid: int) -> None:
        self.proc = psutil.Process(pid)
        self.peak_rss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def cpu(self) -> float:
        try:
            t = self.proc.cpu_times()
        except psutil.NoSuchProcess:
            return 0.0
        return float(t.user + t.system)

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            try:
                self.peak_rss = max(self.peak_rss, self.proc.memory_info().rss)
            except psutil.NoSuchProcess:
                return

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


class Bench:
    def __init__(self) -> None:
        self.tag = uuid.uuid4().hex[:8]
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.state = Path(tempfile.mkdtemp(prefix="spool-bench-monitor-"))
        self.config = write_config(self.state, self.tag, self.port)
        self.settings: Settings = load_settings(self.config)
        self.metrics = f"http://127.0.0.1:{self.port}/metrics"
        self.session: aiohttp.ClientSession | None = None

    async def counted(self) -> int:
        """Events the monitor has counted (its own heartbeats and alerts excluded); -1: no answer.

        From ``/metrics``, computed per request, rather than ``/api/status``, which is shared for a
        second between viewers and would blur the end of a run by as much."""
        assert self.session is not None
        try:
            async with self.session.get(self.metrics, timeout=aiohttp.ClientTimeout(total=5)) as r:
                text = await r.text()
        except (aiohttp.ClientError, TimeoutError, OSError):
            return -1
        total = 0
        for line in text.splitlines():
            if line.startswith(("spool_events_total{", "spool_malformed_events_total{")):
                labels, value = line.rsplit(" ", 1)
                if 'type="daemon.heartbeat"' not in labels and 'type="alert.raised"' not in labels:
                    total += int(float(value))
        return total

    @asynccontextmanager
    async def monitor(self) -> AsyncIterator[Sampler]:
        proc = subprocess.Popen(
            [sys.executable, "-m", "daemons", "--config", str(self.config), "run", "monitor"],
            cwd=REPO, stdout=subprocess.DEVNULL, stderr=(self.state / "monitor.log").open("wb"),
        )  # fmt: skip
        sampler = Sampler(proc.pid)
        try:
            yield sampler
        finally:
            sampler.stop()
            proc.terminate()
            proc.wait(timeout=60)

    @asynccontextmanager
    async def publisher(self) -> AsyncIterator[tuple[aio_pika.abc.AbstractRobustConnection, Raw]]:
        connection = await connect(self.settings.bus, name="spool-bench-publisher")
        try:
            channel = await connection.channel(publisher_confirms=False)
            await declare_topology(channel, self.settings)
            yield connection, Raw(await channel.get_underlay_channel(), self.settings.bus.exchange)
        finally:
            await connection.close()

    async def cleanup(self) -> None:
        if self.session is not None:
            await self.session.close()
        connection = await connect(self.settings.bus)
        channel = await connection.channel()
        await delete_topology(channel, self.settings)
        await connection.close()
        shutil.rmtree(self.state, ignore_errors=True)


@dataclass
class Raw:
    """The bench's publisher: aiormq directly, no confirms. Measured here, it publishes about 5,000
    messages/s against 3,100/s through aio-pika: the bench must be the last thing to run short."""

    channel: aiormq.abc.AbstractChannel
    exchange: str
    properties: Basic.Properties = field(default_factory=lambda: Basic.Properties(content_type=codec.MSGPACK))


async def publish(raw: Raw, batch: list[tuple[str, bytes]]) -> None:
    await asyncio.gather(
        *(
            raw.channel.basic_publish(body, exchange=raw.exchange, routing_key=key, properties=raw.properties)
            for key, body in batch
        )
    )


async def wait_queued(
    connection: aio_pika.abc.AbstractRobustConnection, name: str, n: int, timeout: float = 120
) -> None:
    """Without confirms, the queue depth is the proof every event arrived before timing starts."""
    deadline = time.monotonic() + timeout
    while True:
        channel = await connection.channel()  # a fresh one: a robust channel caches declare results
        queue = await channel.declare_queue(name, passive=True)
        depth = queue.declaration_result.message_count or 0
        await channel.close()
        if depth >= n:
            return
        if time.monotonic() > deadline:
            raise SystemExit(f"only {depth} of {n} events reached {name}")
        await asyncio.sleep(0.2)


async def backlog(n: int, timeout: float) -> dict[str, Any]:
    bench = Bench()
    batch = events(n)
    try:
        async with bench.publisher() as (connection, exchange):
            for start in range(0, len(batch), 1000):
                await publish(exchange, batch[start : start + 1000])
            await wait_queued(connection, bench.settings.queue("monitor"), len(batch))
        bench.session = aiohttp.ClientSession()
        async with bench.monitor() as sampler:
            t0, seen, first, first_seen = time.monotonic(), 0, None, 0
            first_cpu = 0.0
            while seen < len(batch) and time.monotonic() - t0 < timeout:
                await asyncio.sleep(0.1)
                seen = await bench.counted()
                if first is None and seen > 0:
                    first, first_seen, first_cpu = time.monotonic(), seen, sampler.cpu()
            end, cpu = time.monotonic(), sampler.cpu()
            peak = sampler.peak_rss
    finally:
        await bench.cleanup()
    elapsed = end - t0
    steady = end - first if first is not None else 0.0
    return {
        "mode": "backlog", "events": len(batch), "counted": seen, "seconds": round(elapsed, 2),
        "events_per_second": round(len(batch) / elapsed),
        "steady_events_per_second": round((seen - first_seen) / steady) if first and steady > 0 else None,
        "cpu_share": round(cpu / elapsed, 2),
        "steady_cpu_share": round((cpu - first_cpu) / steady, 2) if steady > 0 else None,
        "peak_rss_mb": round(peak / 2**20),
        "note": "events_per_second: from the monitor's start (imports, catalogue, HTTP) to the last count",
    }  # fmt: skip


async def live(rate: int, seconds: float, timeout: float) -> dict[str, Any]:
    bench = Bench()
    batch = events(int(rate * seconds))
    tick = 0.01  # publish every 10 ms what is due by then
    try:
        bench.session = aiohttp.ClientSession()
        async with bench.publisher() as (_connection, exchange), bench.monitor() as sampler:
            while await bench.counted() < 0:  # up and serving: its start-up is not what is measured
                await asyncio.sleep(0.1)
            worst_lag, sent, done = 0, 0, asyncio.Event()

            async def watch() -> None:
                nonlocal worst_lag
                while not done.is_set():
                    await asyncio.sleep(0.5)
                    worst_lag = max(worst_lag, sent - max(0, await bench.counted()))

            watcher = asyncio.create_task(watch())
            cpu0, t0 = sampler.cpu(), time.monotonic()
            while sent < len(batch):
                due = min(len(batch), int((time.monotonic() - t0) * rate) + 1)
                if due > sent:
                    await publish(exchange, batch[sent:due])
                    sent = due
                await asyncio.sleep(max(0.0, t0 + sent / rate - time.monotonic(), tick / 10))
            t_pub, cpu_pub = time.monotonic(), sampler.cpu()
            done.set()
            await watcher
            seen = 0
            while seen < sent and time.monotonic() - t_pub < timeout:
                seen = await bench.counted()
                await asyncio.sleep(0.05)
            caught_up = time.monotonic() - t_pub
            peak = sampler.peak_rss
    finally:
        await bench.cleanup()
    published = t_pub - t0
    return {
        "mode": "live", "target_rate": rate, "events": sent, "counted": seen,
        "published_per_second": round(sent / published),
        "cpu_share": round((cpu_pub - cpu0) / published, 2),
        "worst_lag_events": worst_lag, "last_counted_after_s": round(caught_up, 2),
        "peak_rss_mb": round(peak / 2**20),
        "note": "lag sampled every 0.5 s through /metrics, which the monitor serves meanwhile",
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("mode", nargs="?", choices=("backlog", "live"), default="backlog")
    parser.add_argument("--events", type=int, default=50_000, help="backlog: events queued")
    parser.add_argument("--rate", type=int, default=5_000, help="live: events published per second")
    parser.add_argument("--seconds", type=float, default=30, help="live: how long")
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.mode == "live":
        result = asyncio.run(live(args.rate, args.seconds, args.timeout))
    else:
        result = asyncio.run(backlog(args.events, args.timeout))
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:>26}  {value}")
    sys.exit(0 if result["counted"] >= result["events"] else 1)


if __name__ == "__main__":
    main()
