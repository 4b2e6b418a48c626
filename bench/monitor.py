"""How fast the monitor digests the bus: a queued backlog of events, then the monitor as its own
process (``python -m common.cli --config CFG run monitor``), timed from its start until
``/api/status`` has counted every event. RSS sampled every 0.1 s.

At 1,000 files/s ingest the monitor sees about 2,000 messages/s (``file.ready`` and
``file.ingested``, plus heartbeats); below that it falls behind and its queue (newest million kept)
grows. Isolated like the tests (own exchange, prefix, state directory), cleaned up at the end. Prints
figures; exit code 0 unless something broke.

    .venv/bin/python bench/monitor.py                   # 50,000 events
    .venv/bin/python bench/monitor.py --events 200000 --json
"""

from __future__ import annotations

import sys

# Run as ``python bench/monitor.py`` the bench directory heads sys.path; drop it (see ingest.py).
if sys.path and sys.path[0] and __file__.startswith(sys.path[0]) and __name__ == "__main__":
    sys.path.pop(0)

import argparse
import asyncio
import json
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import psutil

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


def events(n: int) -> list[Message]:
    """A night's mix: a ``file.ready`` and a ``file.ingested`` per file, one file in 20 failing."""
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
    return out


async def publish(settings: Settings, messages: list[Message]) -> None:
    connection = await connect(settings.bus, name="spool-bench-publisher")
    try:
        channel = await connection.channel(publisher_confirms=True)
        await declare_topology(channel, settings)
        exchange = await channel.get_exchange(settings.bus.exchange)
        for start in range(0, len(messages), 1000):
            await asyncio.gather(
                *(
                    exchange.publish(
                        aio_pika.Message(codec.encode(m), content_type=codec.MSGPACK),
                        routing_key=m.ROUTING_KEY,
                    )
                    for m in messages[start : start + 1000]
                )
            )
    finally:
        await connection.close()


async def counted(url: str) -> int:
    try:
        async with aiohttp.ClientSession() as s, s.get(url, timeout=aiohttp.ClientTimeout(total=5)) as r:
            doc = await r.json()
    except (aiohttp.ClientError, TimeoutError, OSError):
        return -1
    return (
        sum(n for kind, n in doc["events"].items() if kind not in ("daemon.heartbeat", "alert.raised"))
        + doc["malformed"]["total"]
    )


async def run(n: int, timeout: float) -> dict[str, Any]:
    tag = uuid.uuid4().hex[:8]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    state = Path(tempfile.mkdtemp(prefix="spool-bench-monitor-"))
    config = write_config(state, tag, port)
    settings = load_settings(config)
    messages = events(n)
    await publish(settings, messages)
    url = f"http://127.0.0.1:{port}/api/status"
    proc = subprocess.Popen(
        [sys.executable, "-m", "common.cli", "--config", str(config), "run", "monitor"],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=(state / "monitor.log").open("wb"),
    )  # fmt: skip
    t0, peak, seen = time.monotonic(), 0, 0
    try:
        while seen < len(messages) and time.monotonic() - t0 < timeout:
            await asyncio.sleep(0.1)
            peak = max(peak, psutil.Process(proc.pid).memory_info().rss)
            seen = await counted(url)
        elapsed = time.monotonic() - t0
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        connection = await connect(settings.bus)
        channel = await connection.channel()
        await delete_topology(channel, settings)
        await connection.close()
    return {
        "events": len(messages), "counted": seen, "seconds": round(elapsed, 2),
        "events_per_second": round(len(messages) / elapsed), "peak_rss_mb": round(peak / 2**20),
        "note": "from the monitor's start (imports, catalogue, HTTP) to the last event counted",
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = asyncio.run(run(args.events, args.timeout))
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:>18}  {value}")
    sys.exit(0 if result["counted"] >= result["events"] else 1)


if __name__ == "__main__":
    main()
