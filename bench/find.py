"""``spool find`` over metadata at scale: 1,000,000 files x 10 metadata keys, in 1,000 datasets
named by the nomenclature (4 dataset keys each), one replica per file.

The rows are loaded in bulk (SQLite: executemany in one transaction; PostgreSQL: COPY), the
metadata indexes built after the load and the statistics gathered (ANALYZE), as a catalogue that
grew a night at a time has them. Then each query is run once to warm the caches and timed as the
best of ``--repeat`` runs, through the catalogue's own code (``catalogue.queries.find_files``, what
``spool find`` runs; ``find_detailed``, what ``spool find --json`` runs), and its plan printed
(EXPLAIN QUERY PLAN / EXPLAIN ANALYZE).

    .venv/bin/python -P bench/find.py --url sqlite+aiosqlite:////work/bench-meta/catalogue.db
    .venv/bin/python -P bench/find.py --url postgresql+asyncpg://postgres@127.0.0.1/spool_bench_find

``--files`` scales the load down (tests); ``--reuse`` skips the load when the catalogue is full.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sqlite3
import time
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from typing import Any

import asyncpg
from sqlalchemy import select, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url

from common.catalogue import Catalogue, parse_filter
from common.catalogue import find as find_sql
from common.catalogue.filters import typed_value

FILES_PER_DATASET = 1000
TELESCOPES = ("lst1", "lst2", "lst3", "lst4")
LEVELS = ("dl0", "dl1", "dl2")
QUALITY = ("good",) * 16 + ("bad",) * 3 + ("unknown",)
MODES = ("wobble", "on", "calib")
META_INDEXES = ("value_num", "value_int", "value_str")
ENDPOINT_SQL = (
    "INSERT INTO storage_endpoints (id, name, kind, backend, root, attributes, state, updated, health)"
    " VALUES (1, 'disk1', 'disk', 'posix', '/srv/disk1', '{{}}', 'online', {}, 'ok')"
)
# Three conditions each: file keys only; a dataset key with file keys; the inherited key (``run``
# is both the file's and its dataset's).
QUERIES = (
    ("zenith<30", "quality=good", "n_events>=500000"),
    ("dataset.telescope=lst2", "moon=false", "energy_threshold<=50"),
    ("run>=500", "mode=wobble,on", "azimuth>=180"),
)


def file_metadata(i: int, run: int, rnd: random.Random) -> dict[str, Any]:
    return {
        "run": run,
        "subrun": i % FILES_PER_DATASET,
        "zenith": round(rnd.uniform(0, 90), 3),
        "azimuth": round(rnd.uniform(0, 360), 3),
        "quality": rnd.choice(QUALITY),
        "mode": rnd.choice(MODES),
        "energy_threshold": rnd.randrange(20, 200),
        "moon": rnd.random() < 0.3,
        "n_events": rnd.randrange(0, 1_000_000),
        "obs_id": f"obs{i // 100:06d}",
    }


def dataset_rows(n: int) -> Iterator[tuple[int, str, dict[str, Any]]]:
    for k in range(n):
        tel, level = TELESCOPES[k % 4], LEVELS[k % 3]
        meta = {"telescope": tel, "date": f"2026-11-{1 + k % 28:02d}", "run": k, "level": level}
        yield k + 1, f"{tel}.202611{1 + k % 28:02d}.run{k:06d}.{level}", meta


def file_rows(files: int, seed: int = 7) -> Iterator[tuple[int, int, str, dict[str, Any]]]:
    rnd = random.Random(seed)
    for i in range(files):
        ds = i // FILES_PER_DATASET
        name = f"run{ds:06d}/subrun{i % FILES_PER_DATASET:06d}.fits.fz"
        yield i + 1, ds + 1, name, file_metadata(i, ds, rnd)


def _meta_rows(owner: int, meta: dict[str, Any]) -> Iterator[tuple[Any, ...]]:
    for k, v in meta.items():
        yield (owner, k, *typed_value(v))


async def load_sqlite(path: str, files: int) -> None:
    import json

    db = sqlite3.connect(path)
    now = datetime.now(UTC).replace(tzinfo=None).isoformat(" ", "microseconds")
    db.execute("PRAGMA synchronous=OFF")
    for col in META_INDEXES:
        db.execute(f"DROP INDEX IF EXISTS ix_file_metadata_key_{col}")
    with db:
        db.execute(ENDPOINT_SQL.format("?"), (now,))
        datasets = list(dataset_rows(-(-files // FILES_PER_DATASET)))
        db.executemany("INSERT INTO datasets (id, name, state, created) VALUES (?, ?, 'open', ?)",
                       [(i, n, now) for i, n, _ in datasets])  # fmt: skip
        db.executemany("INSERT INTO dataset_metadata VALUES (?, ?, ?, ?, ?)",
                       [r for i, _, m in datasets for r in _meta_rows(i, m)])  # fmt: skip
        batch: list[tuple[Any, ...]] = []
        metas: list[tuple[Any, ...]] = []
        reps: list[tuple[Any, ...]] = []
        for fid, did, name, meta in file_rows(files):
            batch.append((fid, name, did, 1_000_000 + fid, f"{fid & 0xFFFFFFFF:08x}", json.dumps(meta), now))
            metas.extend(_meta_rows(fid, meta))
            reps.append((fid, fid, 1, name, "available", now, now, 3))
            if len(batch) >= 50_000:
                _flush_sqlite(db, batch, metas, reps)
        _flush_sqlite(db, batch, metas, reps)
    for col in META_INDEXES:
        db.execute(f"CREATE INDEX ix_file_metadata_key_{col} ON file_metadata (key, {col})")
    db.execute("ANALYZE")
    db.close()


def _flush_sqlite(db: sqlite3.Connection, batch: list[Any], metas: list[Any], reps: list[Any]) -> None:
    db.executemany(
        "INSERT INTO files (id, name, dataset_id, size, adler32, meta, created) VALUES (?,?,?,?,?,?,?)", batch
    )
    db.executemany("INSERT INTO file_metadata VALUES (?, ?, ?, ?, ?)", metas)
    db.executemany("INSERT INTO replicas (id, file_id, storage_id, pfn, state, created, updated, priority)"
                   " VALUES (?,?,?,?,?,?,?,?)", reps)  # fmt: skip
    for rows in (batch, metas, reps):
        rows.clear()


async def load_postgres(url: str, files: int) -> None:
    import json

    dsn = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    conn = await asyncpg.connect(dsn)
    now = datetime.now(UTC)
    try:
        for col in META_INDEXES:
            await conn.execute(f"DROP INDEX IF EXISTS ix_file_metadata_key_{col}")
        await conn.execute(ENDPOINT_SQL.format("$1"), now)
        datasets = list(dataset_rows(-(-files // FILES_PER_DATASET)))
        await conn.copy_records_to_table(
            "datasets",
            records=[(i, n, "open", now) for i, n, _ in datasets],
            columns=["id", "name", "state", "created"],
        )
        await conn.copy_records_to_table(
            "dataset_metadata", records=[r for i, _, m in datasets for r in _meta_rows(i, m)]
        )
        batch: list[tuple[Any, ...]] = []
        metas: list[tuple[Any, ...]] = []
        reps: list[tuple[Any, ...]] = []
        for fid, did, name, meta in file_rows(files):
            batch.append((fid, name, did, 1_000_000 + fid, f"{fid & 0xFFFFFFFF:08x}", json.dumps(meta), now))
            metas.extend(_meta_rows(fid, meta))
            reps.append((fid, fid, 1, name, "available", now, now, 3))
            if len(batch) >= 100_000:
                await _flush_pg(conn, batch, metas, reps)
        await _flush_pg(conn, batch, metas, reps)
        for col in META_INDEXES:
            await conn.execute(f"CREATE INDEX ix_file_metadata_key_{col} ON file_metadata (key, {col})")
        for table in ("files", "datasets", "replicas"):
            await conn.execute(
                f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), (SELECT max(id) FROM {table}))"
            )
        await conn.execute("VACUUM ANALYZE")
    finally:
        await conn.close()


async def _flush_pg(conn: asyncpg.Connection, batch: list[Any], metas: list[Any], reps: list[Any]) -> None:
    await conn.copy_records_to_table(
        "files", records=batch, columns=["id", "name", "dataset_id", "size", "adler32", "meta", "created"]
    )
    await conn.copy_records_to_table("file_metadata", records=metas)
    await conn.copy_records_to_table(
        "replicas", records=reps,
        columns=["id", "file_id", "storage_id", "pfn", "state", "created", "updated", "priority"],
    )  # fmt: skip
    for rows in (batch, metas, reps):
        rows.clear()


async def plan(catalogue: Catalogue, filters: Sequence[str]) -> str:
    """The plan of the find statement (a walk's first page by name; a stream's rest beyond the
    first page), as the database prints it."""
    parsed = [parse_filter(x) for x in filters]
    async with catalogue.connect() as conn:
        how = await find_sql.plan(conn, parsed)
        if how.how == "stream":
            how = await find_sql.with_source(conn, how)
        f = find_sql.f
        upper = await conn.scalar(select(f.c.name).order_by(f.c.name).offset(find_sql.PAGE - 1).limit(1))
        # The walk's first page; a streamed find's rest beyond it, as find_sql._streamed runs it.
        if how.how == "walk":
            stmt = find_sql.walked(how).where(f.c.name <= upper)
        else:
            stmt = find_sql.statement(how, catalogue.backend)
        if how.how == "stream":
            stmt = stmt.where(f.c.name > upper)
            if catalogue.backend == "postgresql":
                for name, value in find_sql.STREAM_SETTINGS.items():
                    await conn.execute(text(f"SET LOCAL {name} = {value}"))
        stmt = stmt.limit(1000)
        dialect = postgresql.dialect() if catalogue.backend == "postgresql" else sqlite.dialect()
        sql = str(stmt.compile(dialect=dialect, compile_kwargs={"literal_binds": True}))
        prefix = "EXPLAIN (ANALYZE, BUFFERS) " if catalogue.backend == "postgresql" else "EXPLAIN QUERY PLAN "
        rows = (await conn.execute(text(prefix + sql))).all()
    lines = [str(r[0]) if catalogue.backend == "postgresql" else f"{r[1]:>3} {r[3]}" for r in rows]
    described = {
        "set": "driven by the most selective condition's set of ids",
        "stream": "pages by name while they pay off, then the rest streamed from the sampled most"
        " selective condition's index, the others probed; the plan of that rest, used only when the"
        " pages fall short",
        "walk": f"files read in name order, {find_sql.PAGE} a page",
    }
    return f"({described[how.how]})\n" + sql + "\n" + "\n".join(lines)


async def best_of(repeat: int, work: Any) -> tuple[float, float, int]:
    """Best wall time and best CPU time (this process's: on SQLite the database's work too, on
    PostgreSQL only the client's) of ``repeat`` runs after a warm-up, and the row count."""
    n = len(await work())
    wall = cpu = float("inf")
    for _ in range(repeat):
        t0, c0 = time.perf_counter(), time.process_time()
        await work()
        wall, cpu = min(wall, time.perf_counter() - t0), min(cpu, time.process_time() - c0)
    return wall, cpu, n


async def run(url: str, files: int, repeat: int, reuse: bool) -> None:
    catalogue = await Catalogue.open(url)
    try:
        have = (await catalogue.queries.counts()).files
        if not (reuse and have == files):
            if have:
                raise SystemExit(f"the catalogue at {url} holds {have} files: give an empty one (or --reuse)")
            t0 = time.perf_counter()
            if catalogue.backend == "sqlite":
                await catalogue.close()
                await load_sqlite(make_url(url).database or "", files)
                catalogue = await Catalogue.open(url)
            else:
                await load_postgres(url, files)
            print(f"loaded {files} files x 10 keys in {time.perf_counter() - t0:.0f} s")
        for filters in QUERIES:
            print(f"\n=== spool find {' '.join(filters)}  ({catalogue.backend})")
            print(await plan(catalogue, filters))
            for what, ask in (
                ("find", catalogue.queries.find_files),
                ("find --json", catalogue.queries.find_detailed),
            ):
                wall, cpu, n = await best_of(repeat, lambda f=filters, ask=ask: ask(list(f), limit=1000))
                shown = f"{wall * 1000:.1f} ms (CPU of this process {cpu * 1000:.1f} ms)"
                print(f"{what}: {n} files, best of {repeat}: {shown}")
    finally:
        await catalogue.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--url", required=True, help="catalogue URL (an empty one: the script loads it)")
    p.add_argument("--files", type=int, default=1_000_000)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--reuse", action="store_true", help="keep a catalogue already loaded with --files files")
    args = p.parse_args()
    asyncio.run(run(args.url, args.files, args.repeat, args.reuse))


if __name__ == "__main__":
    main()
