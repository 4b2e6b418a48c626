"""Throughput of ``Catalogue.register_ingested``: the catalogue's share of the ingest budget.

Each record carries 2 metadata keys and 1 parent, as a typical DL0 file does. Records are built
before the clock starts; the figure covers only the catalogue (one transaction per batch).

    .venv/bin/python bench/catalogue.py --files 20000 --batch 256
    .venv/bin/python bench/catalogue.py --url postgresql+asyncpg://postgres@127.0.0.1/spool_bench
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
import uuid
from pathlib import Path

from common.catalogue import Catalogue, IngestRecord
from common.config import StorageEndpoint


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


async def run(url: str, files: int, batch: int) -> float:
    records = make_records(files, uuid.uuid4().hex[:8])
    async with await Catalogue.open(url) as cat:
        await cat.sync_endpoints({"disk1": StorageEndpoint(root=Path("/data/disk1"))})
        start = time.perf_counter()
        for i in range(0, files, batch):
            outcomes = await cat.register_ingested(records[i : i + batch])
            assert all(o.outcome == "registered" for o in outcomes), outcomes[0]
        elapsed = time.perf_counter() - start
    rate = files / elapsed
    print(f"{files} records in batches of {batch}: {elapsed:.2f} s, {rate:,.0f} records/s ({cat.backend})")
    return rate


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--files", type=int, default=20_000)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--url", default=None, help="catalogue URL (default: a SQLite file in a temp dir)")
    args = p.parse_args()
    if args.url:
        asyncio.run(run(args.url, args.files, args.batch))
        return
    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(run(f"sqlite+aiosqlite:///{tmp}/catalogue.db", args.files, args.batch))


if __name__ == "__main__":
    main()
