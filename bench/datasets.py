"""``spool dataset show`` of a big dataset: the catalogue's answer must come within a second at
100,000 files (issue 20). Also times the replicator's completion check (``datasets.advance``) on
the same dataset, which runs every ``replication.poll_interval`` while it is closed.

The dataset: ``--files`` files registered through ``catalogue.ingest.register`` (batches of 1,000),
each with its copy on disk1; a rule wants a copy on disk2 and one on tape1, so the view has
wanted copies and missing ones (a tenth of the disk2 copies are made, every tape copy missing,
and a few files carry a last error). The figures are the median and worst of ``--repeat`` runs of
the view (wall and CPU time), after one warm-up run.

    .venv/bin/python -P bench/datasets.py --files 100000
    .venv/bin/python -P bench/datasets.py --files 100000 --url postgresql+asyncpg://postgres@127.0.0.1/spool_bench

On PostgreSQL, give an empty database (created for the run).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from common.catalogue import Catalogue, CopyRecord, IngestRecord
from common.catalogue.policy import Rule, endpoint_attributes
from common.config import StorageEndpoint

DATASET = "lst1.20261123.run012345.dl0"
ENDPOINTS = {
    "disk1": StorageEndpoint(root=Path("/data/disk1")),
    "disk2": StorageEndpoint(root=Path("/data/disk2")),
    "tape1": StorageEndpoint(kind="tape", root=Path("/data/tape1")),
}
RULES = [
    Rule("to-disk2", endpoints="disk2", datasets=".*"),
    Rule("to-tape", endpoints="tape1", datasets=".*"),
]
BATCH = 1000


def record(i: int) -> IngestRecord:
    name = f"run012345/subrun{i:06d}.fits.fz"
    return IngestRecord(
        event_id=f"ev-{i}", name=name, dataset=DATASET, size=1_000_000 + i, adler32=f"{i:08x}",
        metadata={"run": 12345, "subrun": i}, parents=[], storage="disk1", pfn=name,
        path=f"/landing/{name}", source="bench",
    )  # fmt: skip


async def fill(cat: Catalogue, files: int) -> None:
    await cat.endpoints.sync(ENDPOINTS)
    for rule in RULES:
        await cat.replication.add_rule(rule)
        await cat.replication.activate_rule(rule.id)
    table = {n: endpoint_attributes(n, e.kind, e.attributes) for n, e in ENDPOINTS.items()}
    for start in range(0, files, BATCH):
        records = [record(i) for i in range(start, min(files, start + BATCH))]
        await cat.ingest.register(records)
        await cat.replication.plan_copies([(r.name, DATASET, {}) for r in records], RULES, table)
        made = [CopyRecord(f"c-{r.event_id}", r.name, "disk2", r.name, 1, "disk1") for r in records[::10]]
        await cat.replication.record_copies(made)
    for i in range(1, 50):
        await cat.history.record_failure(
            request_id=f"fail-{i}", kind="replica", daemon="replicator", reason="disk_full",
            error="no space left on disk2", attempts=4, final=True, name=record(i).name,
        )  # fmt: skip
    await cat.datasets.close(DATASET, "bench", datetime.now(UTC))


async def timed(label: str, repeat: int, work: object) -> None:
    """Wall time (what the operator waits for) and this process's CPU time (on SQLite the query's
    own cost, steady on a shared machine; on PostgreSQL the server's work is not in it)."""
    times, cpu = [], []
    for i in range(repeat + 1):
        t0, c0 = time.perf_counter(), time.process_time()
        await work()  # type: ignore[operator]
        if i:  # the first run warms the caches
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    print(
        f"{label}: wall median {statistics.median(times) * 1000:.0f} ms, worst {max(times) * 1000:.0f} ms;"
        f" cpu median {statistics.median(cpu) * 1000:.0f} ms"
    )


async def run(url: str, files: int, repeat: int) -> None:
    async with await Catalogue.open(url) as cat:
        t0 = time.perf_counter()
        await fill(cat, files)
        print(f"{cat.backend}: {files} files registered and planned in {time.perf_counter() - t0:.0f} s")
        if cat.backend == "postgresql":  # what autovacuum does to a table that grew: the planner's statistics
            await cat.write(lambda conn: conn.exec_driver_sql("ANALYZE"))
        view = await cat.datasets.show(DATASET, datetime.now(UTC), wanted=True)
        assert view is not None and view.files == files and view.wanted is not None
        missing = {w.storage: w.missing for w in view.wanted}
        print(f"view: {view.files} files, copies {len(view.copies)} rows, missing {missing}")
        await timed("dataset show", repeat, lambda: cat.datasets.show(DATASET, datetime.now(UTC)))
        await timed(
            "dataset show --wanted",
            repeat,
            lambda: cat.datasets.show(DATASET, datetime.now(UTC), wanted=True),
        )
        later = datetime.now(UTC) + timedelta(seconds=1)
        await timed("completion check", repeat, lambda: cat.datasets.advance(later, datetime.now(UTC)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--files", type=int, default=100_000)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--url", help="catalogue URL (default: a new SQLite file)")
    args = p.parse_args()
    if args.url:
        asyncio.run(run(args.url, args.files, args.repeat))
        return
    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(run(f"sqlite+aiosqlite:///{tmp}/catalogue.db", args.files, args.repeat))


if __name__ == "__main__":
    main()
