"""Throughput of ``catalogue.ingest.register`` and ``known``: the catalogue's share of ingest.
With ``--replication``, the replicator's share instead (see ``run_replication``).

Each record carries 2 metadata keys and 1 parent, as a typical DL0 file does. Records are built
before the clock starts; the figures cover only the catalogue (one transaction per batch). Each
batch is first asked about with ``ingest_known`` (as ingest does before copying: nothing is known
yet), then registered; at the end every batch is asked about again, now that all are known.

CPU seconds come from ``time.process_time`` (every thread of the process, so the SQLite worker
thread too, but not the PostgreSQL server): unlike wall time it is stable on a shared machine, and
the ingest daemon is bound by its own CPU (the GIL), not by the database's.

    .venv/bin/python -P bench/catalogue.py --files 20000 --batch 256
    .venv/bin/python -P bench/catalogue.py --files 20000 --batch 256 --varied
    .venv/bin/python -P bench/catalogue.py --url postgresql+asyncpg://postgres@127.0.0.1/spool_bench
    .venv/bin/python -P bench/catalogue.py --replication --files 10000 [--no-rule] [--varied]
    .venv/bin/python -P bench/catalogue.py --replication --files 10000 --url postgresql+asyncpg://...

``--replication`` needs an empty catalogue (its rule selects every file): on PostgreSQL, a new
database for each run.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import tempfile
import time
import uuid
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from common.catalogue import Catalogue, CopyRecord, FileInfo, IngestRecord
from common.catalogue.policy import Rule, endpoint_attributes
from common.config import StorageEndpoint

T = TypeVar("T")


def make_records(n: int, tag: str) -> list[IngestRecord]:
    dataset = "lst1.20261123.run012345.dl0"
    return [
        IngestRecord(
            event_id=f"{tag}-{i}",
            name=f"{tag}/run012345/subrun{i:06d}.fits.fz",
            dataset=dataset,
            size=1_000_000 + i,
            adler32=f"{i & 0xFFFFFFFF:08x}",
            metadata={"run": 12345, "subrun": i},
            parents=[f"{tag}/raw/subrun{i:06d}.bin"],
            storage="disk1",
            pfn=f"/data/disk1/{tag}/run012345/subrun{i:06d}.fits.fz",
            path=f"/landing/run012345/subrun{i:06d}.fits.fz",
            source="bench",
        )
        for i in range(n)
    ]


@dataclass
class Timer:
    """Wall and CPU time accumulated over the calls of one kind."""

    label: str
    wall: float = 0.0
    cpu: float = 0.0
    records: int = 0

    async def time(self, call: Awaitable[T], n: int) -> T:
        wall, cpu = time.perf_counter(), time.process_time()
        out = await call
        self.wall += time.perf_counter() - wall
        self.cpu += time.process_time() - cpu
        self.records += n
        return out

    def report(self) -> str:
        rate = self.records / self.wall if self.wall else float("inf")
        cpu_us = 1e6 * self.cpu / self.records if self.records else 0.0
        return (
            f"{self.label:<22} {self.records} records: {self.wall:6.2f} s wall, {rate:9,.0f} records/s,"
            f" {self.cpu:6.2f} s CPU, {cpu_us:6.1f} us CPU/record"
        )


def batches(records: Sequence[IngestRecord], size: int, varied: bool) -> list[Sequence[IngestRecord]]:
    """Batches of ``size``, or (``varied``) of sizes drawn from 1..size, as a daemon that is not
    saturated sends them: every size then needs its own statements, prepared or cached."""
    out: list[Sequence[IngestRecord]] = []
    rnd = random.Random(1)
    i = 0
    while i < len(records):
        n = rnd.randint(1, size) if varied else size
        out.append(records[i : i + n])
        i += n
    return out


async def run(url: str, files: int, batch: int, varied: bool) -> None:
    records = make_records(files, uuid.uuid4().hex[:8])
    register, unknown, known = (
        Timer("register_ingested"),
        Timer("ingest_known (new)"),
        Timer("ingest_known (known)"),
    )
    async with await Catalogue.open(url) as cat:
        await cat.endpoints.sync({"disk1": StorageEndpoint(root=Path("/data/disk1"))})

        def ask(b: Sequence[IngestRecord]) -> Awaitable[tuple[set[str], dict[str, FileInfo]]]:
            return cat.ingest.known([r.event_id for r in b], [r.name for r in b])

        for b in batches(records, batch, varied):
            done, found = await unknown.time(ask(b), len(b))
            assert not done and not found
            outcomes = await register.time(cat.ingest.register(b), len(b))
            assert all(o.outcome == "registered" for o in outcomes), outcomes[0]
        for b in batches(records, batch, varied):
            done, found = await known.time(ask(b), len(b))
            assert len(done) == len(found) == len(b)
    print(f"{cat.backend}, batches of {'1 to ' if varied else ''}{batch}:")
    for t in (register, unknown, known):
        print("  " + t.report())


async def run_replication(url: str, files: int, batch: int, varied: bool, rule: bool) -> None:
    """The replicator's catalogue work for ``files`` files registered on disk1 (untimed): a rule
    asking for a copy on disk2 evaluated over them (``files_for_rule`` pages and ``plan_copies``,
    as ``daemons.replicator.rules`` does; skipped with ``--no-rule``: the copies then have no row
    yet), ``replica_tasks`` for every (file, disk2), and ``record_copies`` of every copy made, both
    in batches of ``--batch`` (the daemon's micro-batchers; ``--varied``: of 1 to ``--batch``)."""
    records = make_records(files, uuid.uuid4().hex[:8])
    disks = {name: StorageEndpoint(root=Path(f"/data/{name}")) for name in ("disk1", "disk2")}
    table = {name: endpoint_attributes(name, e.kind, e.attributes) for name, e in disks.items()}
    evaluate, plan, tasks, made = (
        Timer("files_for_rule"),
        Timer("plan_copies"),
        Timer("replica_tasks"),
        Timer("record_copies"),
    )
    async with await Catalogue.open(url) as cat:
        if await cat.queries.list_files(limit=1):
            raise SystemExit(f"{url}: not an empty catalogue")
        await cat.endpoints.sync(disks)
        for b in batches(records, batch, False):
            await cat.ingest.register(b)
        if rule:
            to_disk2 = Rule(f"bench-{uuid.uuid4().hex[:8]}", endpoints="disk2", datasets=".*")
            await cat.replication.add_rule(to_disk2)
            after = (0, 0)
            # As the replicator asks: without metadata when no rule places by it.
            pages = lambda after: cat.replication.files_for_rule(  # noqa: E731
                to_disk2, after=after, limit=1000, metadata=bool(to_disk2.filters)
            )
            while page := await evaluate.time(pages(after), 0):
                evaluate.records += len(page)
                items = [(x.name, x.dataset, x.metadata) for x in page]
                wanted = await plan.time(cat.replication.plan_copies(items, [to_disk2], table), len(page))
                assert all(len(w) == 1 for w in wanted), wanted[0]
                after = page[-1].cursor
        for b in batches(records, batch, varied):
            answers = await tasks.time(cat.replication.replica_tasks([(r.name, "disk2") for r in b]), len(b))
            assert all(t is not None and t.needed == rule and len(t.sources) == 1 for t in answers)
        for b in batches(records, batch, varied):
            copies = [CopyRecord(f"rep-{r.event_id}", r.name, "disk2", r.pfn, 1, "disk1") for r in b]
            await made.time(cat.replication.record_copies(copies), len(b))
        usage = {u.name: u.replicas for u in await cat.endpoints.usage()}
        assert usage["disk2"] == {"available": files}, usage
    sizes = f"{'1 to ' if varied else ''}{batch}"
    print(f"{cat.backend}, {files} files, batches of {sizes}{'' if rule else ', no rule'}:")
    for t in (evaluate, plan, tasks, made) if rule else (tasks, made):
        print("  " + t.report())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--files", type=int, default=20_000)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--varied", action="store_true", help="batch sizes drawn from 1..--batch")
    p.add_argument("--url", default=None, help="catalogue URL (default: a SQLite file in a temp dir)")
    p.add_argument("--replication", action="store_true", help="time the replicator's catalogue work")
    p.add_argument("--no-rule", action="store_true", help="--replication without a rule (no queued rows)")
    args = p.parse_args()

    def bench(url: str) -> None:
        if args.replication:
            asyncio.run(run_replication(url, args.files, args.batch, args.varied, not args.no_rule))
        else:
            asyncio.run(run(url, args.files, args.batch, args.varied))

    if args.url:
        bench(args.url)
        return
    with tempfile.TemporaryDirectory() as tmp:
        bench(f"sqlite+aiosqlite:///{tmp}/catalogue.db")


if __name__ == "__main__":
    main()
