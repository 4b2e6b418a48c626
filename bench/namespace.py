"""The namespace questions at scale: a catalogue of N files (default 1,000,000) in a tree of
nights / runs / subruns, each with a replica on two endpoints, and each question timed.

The rows are written straight through the driver (``executemany`` on SQLite, ``COPY`` on
PostgreSQL): filling a catalogue is not what is measured. Then, each best of ``--repeat`` runs:
``ls --dirs`` of the top, of one night (100 runs), of one run (1,000 files), the page after a
cursor in a night; ``du`` of a run and of everything; ``lfn`` of a pfn (at its name, and
elsewhere: the scan); one page of an endpoint's dump and a whole dump in pages of 5,000.

    .venv/bin/python -m bench.namespace                                # SQLite, 1,000,000 files
    .venv/bin/python -m bench.namespace --url postgresql+asyncpg://postgres@127.0.0.1/spool_bench
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy.engine import make_url

from common.catalogue import Catalogue
from common.config import StorageEndpoint

RUNS_PER_NIGHT = 100
FILES_PER_RUN = 1000


def names(n: int) -> list[str]:
    per_night = RUNS_PER_NIGHT * FILES_PER_RUN
    out = []
    for i in range(n):
        night, run, subrun = i // per_night, i // FILES_PER_RUN % RUNS_PER_NIGHT, i % FILES_PER_RUN
        out.append(f"lst1/night{night:03d}/run{run:05d}/subrun{subrun:04d}.fits")
    return out


async def fill(catalogue: Catalogue, url: str, n: int) -> None:
    await catalogue.endpoints.sync(
        {"disk1": StorageEndpoint(root=Path("/srv/disk1")), "disk2": StorageEndpoint(root=Path("/srv/disk2"))}
    )
    now = datetime.now(UTC)
    all_names = names(n)
    if catalogue.backend == "sqlite":
        import sqlite3

        db = sqlite3.connect(make_url(url).database or "")
        stamp = now.replace(tzinfo=None).isoformat(" ", "microseconds")
        db.execute("INSERT INTO datasets (id, name, state, created) VALUES (1, 'bench', 'open', ?)", (stamp,))
        db.executemany(
            "INSERT INTO files (id, name, dataset_id, size, adler32, meta, created) "
            "VALUES (?, ?, 1, ?, ?, '{}', ?)",
            ((i + 1, name, 1000 + i, "0badcafe", stamp) for i, name in enumerate(all_names)),
        )
        for sid, layout in ((1, "{}"), (2, "spool/{}")):
            db.executemany(
                "INSERT INTO replicas (file_id, storage_id, pfn, state, created, updated, priority) "
                "VALUES (?, ?, ?, 'available', ?, ?, 3)",
                ((i + 1, sid, layout.format(name), stamp, stamp) for i, name in enumerate(all_names)),
            )
        db.commit()
        db.execute("ANALYZE")
        db.close()
        return
    import asyncpg

    conn = await asyncpg.connect(
        make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    )
    try:
        await conn.execute(
            "INSERT INTO datasets (id, name, state, created) VALUES (1, 'bench', 'open', $1)", now
        )
        await conn.copy_records_to_table(
            "files",
            records=[(i + 1, name, 1, 1000 + i, "0badcafe", "{}", now) for i, name in enumerate(all_names)],
            columns=["id", "name", "dataset_id", "size", "adler32", "meta", "created"],
        )
        ids = {row["name"]: row["id"] for row in await conn.fetch("SELECT id, name FROM storage_endpoints")}
        for endpoint, layout in (("disk1", "{}"), ("disk2", "spool/{}")):
            await conn.copy_records_to_table(
                "replicas",
                records=[
                    (i + 1, ids[endpoint], layout.format(name), "available", now, now, 3)
                    for i, name in enumerate(all_names)
                ],
                columns=["file_id", "storage_id", "pfn", "state", "created", "updated", "priority"],
            )
        await conn.execute("ANALYZE")
    finally:
        await conn.close()


async def best(repeat: int, work: Callable[[], Awaitable[Any]]) -> tuple[float, Any]:
    times, result = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        result = await work()
        times.append(time.perf_counter() - start)
    return min(times), result


async def whole_dump(catalogue: Catalogue) -> int:
    return sum([1 async for _ in catalogue.namespace.dump("disk2", page=5000)])


async def run(url: str, n: int, repeat: int) -> dict[str, Any]:
    catalogue = await Catalogue.open(url)
    try:
        start = time.perf_counter()
        await fill(catalogue, url, n)
        filled = time.perf_counter() - start
        ns = catalogue.namespace
        last = names(n)[-1]
        night = last.rsplit("/", 2)[0]
        run_dir = last.rsplit("/", 1)[0]
        questions: dict[str, Callable[[], Awaitable[Any]]] = {
            "ls --dirs /": lambda: ns.list_directory(""),
            f"ls --dirs {night} (100 runs)": lambda: ns.list_directory(night),
            f"ls --dirs {run_dir} (1,000 files)": lambda: ns.list_directory(run_dir),
            "ls --dirs night, 10 after a cursor": lambda: ns.list_directory(
                night, after=("run00050", 1), limit=10
            ),
            f"du {run_dir}": lambda: ns.directory_size(run_dir),
            "du / (everything)": lambda: ns.directory_size(""),
            "lfn disk1 (at its name)": lambda: ns.lfn_for_pfn("disk1", f"/srv/disk1/{last}"),
            "lfn disk2 (elsewhere: a scan)": lambda: ns.lfn_for_pfn("disk2", f"/srv/disk2/spool/{last}"),
            "dump disk2, a page of 1,000 mid-way": lambda: ns.dump_page(
                "disk2", after=n + n // 2, limit=1000
            ),
            "exists (file, directory)": lambda: ns.exists([last, night]),
        }
        figures: dict[str, float] = {}
        for label, work in questions.items():
            seconds, _ = await best(repeat, work)
            figures[label] = round(seconds * 1000, 1)
        seconds, count = await best(1, lambda: whole_dump(catalogue))
        assert count == n, count
        figures[f"dump disk2 whole ({n:,} rows, pages of 5,000)"] = round(seconds * 1000, 1)
        return {"backend": catalogue.backend, "files": n, "fill_s": round(filled, 1), "ms": figures}
    finally:
        await catalogue.close()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--files", type=int, default=1_000_000)
    parser.add_argument("--url", help="a catalogue URL (an empty database); default: a new SQLite file")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="spool-bench-namespace-") as tmp:
        url = args.url or f"sqlite+aiosqlite:///{tmp}/catalogue.db"
        result = asyncio.run(run(url, args.files, args.repeat))
    if args.json:
        print(json.dumps(result))
        return
    print(f"{result['backend']}: {result['files']:,} files (filled in {result['fill_s']} s)")
    for label, ms in result["ms"].items():
        print(f"  {label:<50} {ms:>9.1f} ms")


if __name__ == "__main__":
    main()
