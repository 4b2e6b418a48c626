"""How long ``spool status`` takes on a full site: 100,000 files in a SQLite catalogue, 10,000
failed requests among them, and 10,000 dead letters in ``<prefix>.ingest.dead``.

Each figure is the best and the median of ``--runs`` runs of the real command in a subprocess
(``python -m daemons --config CFG status --json``), wall time from start to exit, so it includes
the interpreter and the CLI's imports. Also timed, for comparison: the same command against an
empty catalogue (what start-up alone costs), ``spool queues --json``, and ``gather_status`` in
this process (the status itself, without start-up). First without the monitor (the CLI asks the
broker, the management API and the catalogue itself), then with the monitor running (the CLI
fetches ``/api/status``).

The catalogue is filled through ``catalogue.ingest.register`` in batches of 5,000; the failures
are inserted in one statement; the dead letters are published raw to the dead queue with the
headers the runner writes. Isolated like the tests (own exchange, prefix, state directory),
cleaned up at the end. Prints figures; exit code 0 unless a command failed.

    .venv/bin/python bench/status.py
    .venv/bin/python bench/status.py --files 100000 --dead 10000 --runs 5 --json
"""

from __future__ import annotations

import sys

# Run as ``python bench/status.py`` the bench directory heads sys.path; drop it (see ingest.py).
if sys.path and sys.path[0] and __file__.startswith(sys.path[0]) and __name__ == "__main__":
    sys.path.pop(0)

import argparse
import asyncio
import json
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
from sqlalchemy import Connection, insert

from common.bus import headers as H
from common.bus.connection import connect
from common.bus.topology import declare_topology, delete_topology
from common.catalogue import Catalogue, IngestRecord
from common.catalogue.schema import requests
from common.config import Settings, load_settings
from common.status import gather_status

REPO = Path(__file__).resolve().parent.parent
DATASET = "lst1.20261123.run012345.dl0"
# A night's failures: one dominant cause, a few rare ones, some still retrying.
CAUSES = [("ingest", "checksum_mismatch", "failed")] * 97 + [
    ("ingest", "file_missing", "failed"),
    ("replica", "destination_not_writable", "retrying"),
    ("archive", "tape_write_error", "failed"),
]


def write_config(state: Path, tag: str, port: int) -> Path:
    (state / "landing").mkdir(parents=True, exist_ok=True)
    path = state / "spool.toml"
    path.write_text(
        f'state_dir = "{state}"\n[bus]\nexchange = "spool-bench-{tag}"\nqueue_prefix = "b{tag}"\n'
        f'heartbeat_interval = 1\n[log]\nformat = "json"\n[monitor]\nhttp_host = "127.0.0.1"\n'
        f"http_port = {port}\npoll_interval = 1\n"
    )
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def record(i: int) -> IngestRecord:
    name = f"run{i // 1000:06d}/f{i}.fits.fz"
    return IngestRecord(
        event_id=f"ev-{i}", name=name, dataset=DATASET, size=1_000_000 + i, adler32=f"{i & 0xFFFFFFFF:08x}",
        metadata={"run": i // 1000}, storage="disk1", pfn=name,
    )  # fmt: skip


def dead_letter(settings: Settings, i: int) -> aio_pika.Message:
    """A dead letter as the runner parks it (``common.bus.consumer``)."""
    headers: dict[str, Any] = {
        H.REASON: "checksum_mismatch" if i % 10 else "file_missing", H.ERROR: "adler32 differs",
        H.ATTEMPTS: 1, H.DAEMON: "ingest", H.HOST: "bench", H.QUEUE: settings.queue("ingest"),
        H.ROUTING_KEY: "file.ready", H.TIME: datetime.now(UTC).isoformat(),
    }  # fmt: skip
    body = b'{"path": "/landing/x", "dataset": "d"}'
    return aio_pika.Message(body, content_type="application/json", message_id=f"dead-{i}", headers=headers)


async def fill_catalogue(settings: Settings, files: int, failures: int) -> float:
    t0 = time.monotonic()
    catalogue = await Catalogue.open(settings.catalogue.url)
    try:
        await catalogue.endpoints.sync(settings.storage)
        for start in range(0, files, 5000):
            await catalogue.ingest.register([record(i) for i in range(start, min(files, start + 5000))])
        now = datetime.now(UTC)
        rows = []
        for i in range(failures):
            kind, reason, state = CAUSES[i % len(CAUSES)]
            when = now - timedelta(seconds=failures - i)
            rows.append({
                "id": f"failed-{i}", "kind": kind, "name": f"run{i // 1000:06d}/f{i}.fits.fz", "path": None,
                "dataset": DATASET, "state": state, "attempts": 8, "reason": reason,
                "error": f"{reason}: file {i}", "created": when, "updated": when,
            })  # fmt: skip

        def insert_failures(conn: Connection) -> None:
            conn.execute(insert(requests), rows)

        if rows:
            await catalogue.write(insert_failures)
    finally:
        await catalogue.close()
    return time.monotonic() - t0


async def fill_dead_queue(settings: Settings, n: int) -> float:
    t0 = time.monotonic()
    connection = await connect(settings.bus, name="spool-bench-publisher")
    try:
        channel = await connection.channel(publisher_confirms=True)
        await declare_topology(channel, settings)
        dead = settings.dead_queue("ingest")
        for start in range(0, n, 1000):
            await asyncio.gather(
                *(
                    channel.default_exchange.publish(dead_letter(settings, i), routing_key=dead)
                    for i in range(start, min(n, start + 1000))
                )
            )
    finally:
        await connection.close()
    return time.monotonic() - t0


def timed_command(config: Path, args: list[str], runs: int) -> dict[str, Any]:
    walls = []
    for _ in range(runs):
        t0 = time.monotonic()
        out = subprocess.run(
            [sys.executable, "-m", "daemons", "--config", str(config), *args],
            cwd=REPO, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        walls.append(time.monotonic() - t0)
        if out.returncode != 0:
            raise SystemExit(f"spool {' '.join(args)} failed ({out.returncode}): {out.stderr[-2000:]}")
    return {"best_s": round(min(walls), 3), "median_s": round(statistics.median(walls), 3)}


async def timed_gather(settings: Settings, runs: int) -> dict[str, Any]:
    walls, doc = [], {}
    for _ in range(runs):
        t0 = time.monotonic()
        doc = await gather_status(settings)
        walls.append(time.monotonic() - t0)
    return {
        "best_s": round(min(walls), 3), "median_s": round(statistics.median(walls), 3),
        "source": doc["source"], "failure_lines": len(doc["failures"] or []),
        "failures_counted": sum(g["count"] for g in doc["failures"] or []),
        "dead_letters": next(q["dead"] for q in doc["queues"]["queues"] if q["daemon"] == "ingest"),
    }  # fmt: skip


async def monitor_answering(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            try:
                async with session.get(url) as r:
                    doc = await r.json()
                    if doc["queues"] is not None and doc["endpoints"] is not None:
                        return
            except (aiohttp.ClientError, OSError):
                pass
            await asyncio.sleep(0.2)
    raise SystemExit(f"the monitor did not answer at {url}")


async def run(files: int, dead: int, runs: int) -> dict[str, Any]:
    tag, port = uuid.uuid4().hex[:8], free_port()
    root = Path(tempfile.mkdtemp(prefix="spool-bench-status-"))
    config = write_config(root / "full", tag, port)
    empty = write_config(root / "empty", tag + "e", free_port())
    settings, empty_settings = load_settings(config), load_settings(empty)
    result: dict[str, Any] = {"files": files, "failed_requests": dead, "dead_letters": dead}
    try:
        result["fill_catalogue_s"] = round(await fill_catalogue(settings, files, dead), 1)
        result["fill_dead_queue_s"] = round(await fill_dead_queue(settings, dead), 1)
        await fill_catalogue(empty_settings, 0, 0)
        await fill_dead_queue(empty_settings, 0)
        result["without_monitor"] = {
            "spool status --json": timed_command(config, ["status", "--json"], runs),
            "spool status": timed_command(config, ["status"], runs),
            "spool queues --json": timed_command(config, ["queues", "--json"], runs),
            "empty catalogue: spool status --json": timed_command(empty, ["status", "--json"], runs),
            "gather_status in-process": await timed_gather(settings, runs),
        }
        monitor = subprocess.Popen(
            [sys.executable, "-m", "daemons", "--config", str(config), "run", "monitor"],
            cwd=REPO, stdout=subprocess.DEVNULL, stderr=(root / "monitor.log").open("wb"),
        )  # fmt: skip
        try:
            await monitor_answering(f"http://127.0.0.1:{port}/api/status")
            result["with_monitor"] = {
                "spool status --json": timed_command(config, ["status", "--json"], runs),
                "spool status": timed_command(config, ["status"], runs),
                "gather_status in-process": await timed_gather(settings, runs),
            }
        finally:
            monitor.terminate()
            monitor.wait(timeout=60)
    finally:
        for s in (settings, empty_settings):
            connection = await connect(s.bus)
            channel = await connection.channel()
            await delete_topology(channel, s)
            await connection.close()
        shutil.rmtree(root, ignore_errors=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--dead", type=int, default=10_000, help="dead letters, and failed requests")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = asyncio.run(run(args.files, args.dead, args.runs))
    if args.json:
        print(json.dumps(result))
        return
    for key, value in result.items():
        if isinstance(value, dict):
            print(f"{key}:")
            for what, fig in value.items():
                print(f"  {what:>40}  {fig}")
        else:
            print(f"{key:>42}  {value}")


if __name__ == "__main__":
    main()
