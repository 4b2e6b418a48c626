"""Recall scheduling against first-come-first-served, on the simulated tape library's clocks.

Archive 5,000 files over 50 cartridges (100 each, written in order, so each cartridge is full and
its files spread over the whole tape), then recall 2,000 of them chosen at random, one request per
file, in random order, all queued before the scheduler starts (a reprocessing campaign's burst).

- **Spool**: the recall daemon's own ``Scheduler`` (the code ``spool run recall`` runs, not a copy),
  with a SQLite catalogue and a disk buffer, and no broker (a recording publisher stands in).
- **FCFS baseline**, on a copy of the same library taken before the recall: each request in arrival
  order, one file at a time, reading from the drive that holds its cartridge, else mounting it in
  the least recently used drive (an unload first when that drive is full).

Printed for both: mounts and the simulated drive time (seconds summed over drives, from
``library.usage()``: mount, unmount, locate, read); for Spool also the lower bound on mounts (the
distinct cartridges involved), the ratios, and the process CPU time of the scheduler run per
recalled file (``cpu_ms_per_file``: scheduler, catalogue and the simulated library's reads,
comparable on a loaded machine) and, of it, the catalogue's transactions
(``catalogue_cpu_ms_per_file``: CPU time of the SQLite worker thread that runs them).
Targets: mounts / lower bound = 1.00 and Spool's drive time <= 1/5 of FCFS's. The library runs
with ``time_scale = 0`` (clocks only, no sleeping) and ``durable = False``; the LTO-9 timing
defaults apply (mount 16 s, unmount 56 s, mean locate 60 s over a full tape, 360 MB/s), with a
cartridge capacity equal to the data it holds.

    .venv/bin/python -P bench/recall.py            # 5,000 files, 50 cartridges, 2,000 recalled
    .venv/bin/python -P bench/recall.py --files 1000 --cartridges 20 --recall 300 --json
    # the issue's size: one request for 100,000 of 200,000 files (no FCFS: one mount per file)
    .venv/bin/python -P bench/recall.py --files 200000 --recall 100000 --cartridges 400 \
        --per-request 100000 --no-fcfs

``--status N`` measures ``spool recall status`` instead: N files registered (no tape), one request
for all of them, each planned on one of ``--cartridges`` cartridges and still waiting; printed:
seconds of the status document (catalogue query and JSON, as the command builds it) for the
table, for ``--json`` (the first ``STATUS_FILES`` waiting files listed) and for ``--json
--all-files`` (every one), best of three each.

    .venv/bin/python -P bench/recall.py --status 100000 --cartridges 400
"""

from __future__ import annotations

import sys

if sys.path and sys.path[0] and __file__.startswith(sys.path[0]) and __name__ == "__main__":
    sys.path.pop(0)  # see bench/replicate.py: the bench directory must not shadow modules

import argparse
import asyncio
import json
import logging
import os
import random
import shutil
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from sqlalchemy import Connection, update

from common.bus.publisher import RecordingPublisher
from common.catalogue import Catalogue, IngestRecord
from common.catalogue import recall as db
from common.catalogue import schema as s
from common.catalogue.sql import storage_ids_sync, utcnow
from common.config import RecallSettings, StorageEndpoint
from common.storage import PosixStorage
from common.tape import SimulatedLibrary, SimulatedLibraryConfig
from daemons.recall.announce import Announcer
from daemons.recall.scheduler import Scheduler

DATASET = "bench.20261124.run000001.dl0"
POOL = "raw"


@dataclass(frozen=True)
class Archived:
    name: str
    vid: str
    fseq: int


@dataclass(frozen=True)
class Figures:
    mounts: int
    seconds: float  # summed over drives
    busiest_drive: float  # seconds of the drive that worked most: the elapsed time, drives in parallel


@dataclass(frozen=True)
class Clocks:
    mounts: int
    drives: dict[str, float]


def library_config(root: Path, cartridges: int, drives: int, capacity: int) -> SimulatedLibraryConfig:
    return SimulatedLibraryConfig(
        root=root, drives=drives, pools={POOL: cartridges}, scratch_cartridges=0,
        capacity_bytes=capacity, time_scale=0.0, durable=False,
    )  # fmt: skip


async def archive(
    work: Path, cartridges: int, per_cartridge: int, drives: int, rng: random.Random
) -> tuple[list[Archived], list[tuple[str, int, str]], int]:
    """Write the files through the library API, cartridge by cartridge, and unload every drive;
    returns them and the cartridges' capacity."""
    sizes = [[rng.randint(8_000, 24_000) for _ in range(per_cartridge)] for _ in range(cartridges)]
    capacity = max(sum(c) for c in sizes)
    lib = await SimulatedLibrary.open(library_config(work / "library", cartridges, drives, capacity))
    source = work / "source"
    archived: list[Archived] = []
    files: list[tuple[str, int, str]] = []
    try:
        drive = await lib.claim_drive("bench archive")
        assert drive is not None
        for c, cart_sizes in enumerate(sizes):
            vid = (await lib.allocate_cartridge(POOL, sum(cart_sizes))).vid
            await lib.mount(drive, vid)
            for size in cart_sizes:
                name = f"run000001/f{len(files):06d}.fits"
                data = rng.randbytes(size)
                source.write_bytes(data)
                adler = f"{zlib.adler32(data):08x}"
                # Buffered, one flush per cartridge (as the tape daemon writes): the set-up of
                # 200,000 files took longer than the recall with a synchronous tape mark each.
                fseq = await lib.write(drive, source, name, size, adler, flush=False)
                archived.append(Archived(name, vid, fseq))
                files.append((name, size, adler))
            await lib.flush(drive)
            print(f"\rarchived {c + 1}/{cartridges} cartridges", end="", file=sys.stderr, flush=True)
        print(file=sys.stderr)
        for d in await lib.list_drives():
            await lib.unmount(d.drive_id)
    finally:
        await lib.close()
    return archived, files, capacity


def _tape_copies(conn: Connection, archived: list[Archived]) -> None:
    """The bench's bookkeeping of what the tape daemon would record: one tape copy per file, and
    the landing copy gone (so the recall has to go to tape)."""
    ids = storage_ids_sync(conn, {"tape1", "landing"})
    fids = dict(conn.execute(s.files.select().with_only_columns(s.files.c.name, s.files.c.id)).all())
    now = utcnow()
    conn.execute(
        s.replicas.insert(),
        [
            {"file_id": fids[a.name], "storage_id": ids["tape1"], "pfn": f"{a.vid}/{a.fseq}",
             "state": "available", "cartridge": a.vid, "fseq": a.fseq, "created": now, "updated": now,
             "tombstone": None, "priority": 3}
            for a in archived
        ],
    )  # fmt: skip
    conn.execute(update(s.replicas).where(s.replicas.c.storage_id == ids["landing"]).values(state="deleted"))


async def clocks(lib: SimulatedLibrary) -> Clocks:
    u = await lib.usage()
    return Clocks(u.total.mounts, {d: x.total_seconds for d, x in u.drives.items()})


def minus(after: Clocks, before: Clocks) -> Figures:
    spent = [after.drives[d] - before.drives.get(d, 0.0) for d in after.drives]
    return Figures(after.mounts - before.mounts, sum(spent), max(spent))


async def spool_run(
    work: Path, cfg: SimulatedLibraryConfig, archived: list[Archived], files: list[tuple[str, int, str]],
    order: list[Archived], per_request: int = 1,
) -> tuple[Figures, float, float, dict[str, float], int]:  # fmt: skip
    endpoints = {
        "landing": StorageEndpoint(root=work / "landing"),
        "buffer": StorageEndpoint(root=work / "buffer"),
        "tape1": StorageEndpoint(kind="tape", backend="simulated", library="bench", pool=POOL),
    }
    catalogue = await Catalogue.open(f"sqlite+aiosqlite:///{work / 'catalogue.db'}")
    lib = await SimulatedLibrary.open(cfg)
    storages = {n: PosixStorage(n, ep) for n, ep in endpoints.items() if ep.kind == "disk"}
    try:
        await catalogue.endpoints.sync(endpoints)
        records = [
            IngestRecord(event_id=f"ev{i}", name=n, dataset=DATASET, size=size, adler32=adler,
                         storage="landing", pfn=n)
            for i, (n, size, adler) in enumerate(files)
        ]  # fmt: skip
        for i in range(0, len(records), 500):
            await catalogue.ingest.register(records[i : i + 500])
        await catalogue.write(_tape_copies, archived)
        for i in range(0, len(order), per_request):
            names = tuple(a.name for a in order[i : i + per_request])
            spec = db.RecallSpec(id=f"req{i:06d}", destination="buffer", priority=3, names=names)
            await catalogue.recall.create_recall(spec)
        scheduler = Scheduler(
            catalogue=catalogue, libraries={"bench": lib}, storages=storages, endpoints=endpoints,
            settings=RecallSettings(poll_interval=0.05), announcer=Announcer(catalogue, RecordingPublisher()),
        )  # fmt: skip
        before = await clocks(lib)
        catalogue_cpu = _count_catalogue_cpu(catalogue)
        started, cpu = time.monotonic(), time.process_time()
        await scheduler.start()
        await scheduler.until_idle()
        wall, cpu = time.monotonic() - started, time.process_time() - cpu
        figures = minus(await clocks(lib), before)
        done = sum(v.state == "done" for v in await catalogue.recall.list_recalls(len(order) + 1))
    finally:
        await lib.close()
        for storage in storages.values():
            storage.close()
        await catalogue.close()
    return figures, wall, cpu, catalogue_cpu, done


def _count_catalogue_cpu(catalogue: Catalogue) -> dict[str, float]:
    """CPU seconds of the catalogue's transactions from now on, by the function each ran (SQLite:
    all of recall's run in its worker thread, timed there with ``thread_time``): the scheduler's
    catalogue cost, and where it goes."""
    spent: dict[str, float] = {}
    run = catalogue._sync_tx

    def timed(fn: Any, args: tuple[Any, ...], write: bool) -> Any:
        started = time.thread_time()
        try:
            return run(fn, args, write)
        finally:
            key = getattr(fn, "__qualname__", type(fn).__name__)
            spent[key] = spent.get(key, 0.0) + time.thread_time() - started

    catalogue._sync_tx = timed  # type: ignore[method-assign]
    return spent


async def fcfs_run(work: Path, cfg: SimulatedLibraryConfig, order: list[Archived]) -> Figures:
    lib = await SimulatedLibrary.open(cfg)
    out = work / "fcfs-out"
    out.mkdir()
    try:
        before = await clocks(lib)
        last_used: dict[str, int] = {}
        for i, a in enumerate(order):
            drives = await lib.list_drives()
            holder = next((d.drive_id for d in drives if d.vid == a.vid), None)
            if holder is None:
                empty = [d.drive_id for d in drives if d.vid is None]
                holder = (
                    empty[0] if empty else min(drives, key=lambda d: last_used.get(d.drive_id, -1)).drive_id
                )
                await lib.mount(holder, a.vid)
            last_used[holder] = i
            target = out / "f"
            await lib.read(holder, a.fseq, target)
            target.unlink()
        return minus(await clocks(lib), before)
    finally:
        await lib.close()


async def main(args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    per_cartridge = args.files // args.cartridges
    work = Path(tempfile.mkdtemp(prefix="spool-bench-recall-", dir=args.dir))
    try:
        archived, files, capacity = await archive(work, args.cartridges, per_cartridge, args.drives, rng)
        cfg = library_config(work / "library", args.cartridges, args.drives, capacity)
        shutil.copytree(work / "library", work / "library-fcfs")
        order = rng.sample(archived, args.recall)  # random files, in random request order
        lower_bound = len({a.vid for a in order})
        print(f"recalling {len(order)} files ({lower_bound} cartridges) ...", file=sys.stderr)
        spool, wall, cpu, catalogue_cpu, done = await spool_run(
            work, cfg, archived, files, order, args.per_request
        )
        fcfs = (
            None if args.no_fcfs
            else await fcfs_run(work, cfg.model_copy(update={"root": work / "library-fcfs"}), order)
        )  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {
        "files": len(archived), "cartridges": args.cartridges, "drives": args.drives, "recalled": len(order),
        "requests_done": done, "wall_seconds": round(wall, 1),
        "cpu_ms_per_file": round(cpu * 1000 / len(order), 2),
        "catalogue_cpu_ms_per_file": round(sum(catalogue_cpu.values()) * 1000 / len(order), 2),
        "catalogue_cpu_ms_per_file_by_transaction": {
            k: round(v * 1000 / len(order), 3) for k, v in sorted(catalogue_cpu.items(), key=lambda x: -x[1])
        },
        "spool": {"mounts": spool.mounts, "drive_seconds": round(spool.seconds, 1),
                  "busiest_drive_seconds": round(spool.busiest_drive, 1)},
        "lower_bound_mounts": lower_bound,
        "requests": -(-len(order) // args.per_request),
        "fcfs": None if fcfs is None else {
            "mounts": fcfs.mounts, "drive_seconds": round(fcfs.seconds, 1),
            "busiest_drive_seconds": round(fcfs.busiest_drive, 1)},
        "mounts_ratio": round(spool.mounts / lower_bound, 2),
        "time_ratio": None if fcfs is None else round(spool.seconds / fcfs.seconds, 3),
    }  # fmt: skip


async def status_run(work: Path, n: int, cartridges: int) -> dict[str, Any]:
    """``spool recall status`` of one ``n``-file request, timed as the command builds it."""
    from common.cli import recall as cli_recall  # the command's own document (``_status``)
    from common.cli._util import jsonable

    catalogue = await Catalogue.open(f"sqlite+aiosqlite:///{work / 'catalogue.db'}")
    try:
        endpoints = {
            "landing": StorageEndpoint(root=work / "landing"),
            "buffer": StorageEndpoint(root=work / "buffer"),
            "tape1": StorageEndpoint(kind="tape", backend="simulated", library="bench", pool=POOL),
        }
        await catalogue.endpoints.sync(endpoints)
        names = [f"run000001/f{i:06d}.fits" for i in range(n)]
        for i in range(0, n, 500):
            await catalogue.ingest.register(
                [IngestRecord(event_id=f"ev{j}", name=names[j], dataset=DATASET, size=1000,
                              adler32="00000001", storage="landing", pfn=names[j])
                 for j in range(i, min(i + 500, n))]
            )  # fmt: skip
        spec = db.RecallSpec(id="big", destination="buffer", priority=3, names=tuple(names))
        await catalogue.recall.create_recall(spec)
        per = max(1, n // cartridges)
        plan = [
            ("big", name, db.TapeCopy("tape1", f"A{i // per:05d}", i % per + 1))
            for i, name in enumerate(names)
        ]
        await catalogue.recall.assign(plan)

        async def timed(with_waiting: bool, limit: int | None) -> float:
            best = float("inf")
            for _ in range(3):
                started = time.perf_counter()
                try:
                    doc = await cli_recall._status(catalogue, "big", with_waiting, limit)
                except TypeError:  # a version without the bound lists them all
                    doc = await cli_recall._status(catalogue, "big", with_waiting)
                json.dumps(jsonable(doc))
                best = min(best, time.perf_counter() - started)
            return round(best, 3)

        limit = getattr(cli_recall, "STATUS_FILES", None)
        return {
            "status_files": n, "cartridges": cartridges,
            "table_seconds": await timed(False, limit),
            "json_seconds": await timed(True, limit),
            "json_all_files_seconds": await timed(True, None),
        }  # fmt: skip
    finally:
        await catalogue.close()


def report(r: dict[str, Any]) -> None:
    sp, fc = r["spool"], r["fcfs"]
    print(
        f"{r['files']} files on {r['cartridges']} cartridges, {r['drives']} drives; "
        f"{r['recalled']} recalled ({r['requests_done']}/{r['requests']} requests done, "
        f"{r['wall_seconds']} s wall, "
        f"{r['cpu_ms_per_file']} ms CPU per file, {r['catalogue_cpu_ms_per_file']} ms of it the catalogue's)"
    )
    print(
        f"  spool : {sp['mounts']:5d} mounts  {sp['drive_seconds']:10.1f} s drive time "
        f"(busiest drive {sp['busiest_drive_seconds']:.1f} s)"
    )
    print(f"  lower bound (distinct cartridges): {r['lower_bound_mounts']} mounts")
    if fc is None:
        print(
            f"  mounts / lower bound = {r['mounts_ratio']:.2f} (target 1.00); first-come-first-served not run"
        )
        return
    print(
        f"  fcfs  : {fc['mounts']:5d} mounts  {fc['drive_seconds']:10.1f} s drive time "
        f"(busiest drive {fc['busiest_drive_seconds']:.1f} s)"
    )
    print(f"  mounts / lower bound = {r['mounts_ratio']:.2f} (target 1.00); "
          f"drive time spool / fcfs = {r['time_ratio']:.3f} (target <= 0.200)")  # fmt: skip


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=5000)
    parser.add_argument("--cartridges", type=int, default=50)
    parser.add_argument("--recall", type=int, default=2000)
    parser.add_argument("--drives", type=int, default=4)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--per-request", type=int, default=1, metavar="N",
        help="files per recall request (default 1; --recall N with --per-request N: one request)",
    )  # fmt: skip
    parser.add_argument(
        "--no-fcfs", action="store_true",
        help="skip the first-come-first-served comparison (one mount per file: hours at 100,000)",
    )  # fmt: skip
    parser.add_argument("--dir", default=None, help="where the temporary library and buffer go")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--status", type=int, default=0, metavar="N", help="time `recall status` of N files")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    os.environ.setdefault("PYTHONHASHSEED", "0")
    if args.status:
        work = Path(tempfile.mkdtemp(prefix="spool-bench-recall-", dir=args.dir))
        try:
            print(json.dumps(asyncio.run(status_run(work, args.status, args.cartridges)), indent=2))
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return
    result = asyncio.run(main(args))
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        report(result)


if __name__ == "__main__":
    cli()
