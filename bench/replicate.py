"""Replication copy throughput: ``PosixStorage.copy_verified`` against ``cp -r`` of the same files.

Two data sets, each measured in one run on one file system (a directory next to the repository,
or ``--dir``): **large**, 16 files x 256 MiB (byte throughput), and **small**, 10,000 files x
64 KiB in 100 directories (per-file overhead). For each:

- ``cp``: ``cp -r SRC DST`` as a subprocess (coreutils uses ``copy_file_range`` too), then
  ``sync -f DST`` (``syncfs`` of the file system), timed separately;
- ``copy_verified``: every file copied by ``PosixStorage.copy_verified`` with the expected size
  and adler32 (the catalogue's, computed when the sources were written), ``max_transfers`` copies
  at once (asyncio tasks, as the replicator runs them; default 8 from ``StorageEndpoint``); small
  files (all within ``batch_copy_bytes``, no fsync) as the replicator copies a bulk request's,
  ``max_transfers`` calls of ``copy_verified_many`` with 256 files each at once; made
  durable the way the endpoint's ``durability`` asks: ``batch`` (the default) copies with
  ``fsync=False`` and calls ``storage.sync()`` (one ``syncfs``) at the end, like ``sync -f`` after
  ``cp``; ``file`` fsyncs each file and its directory, and needs no sync afterwards. With
  ``fsync=False`` a large copy starts its own writeback once copied (``EARLY_WRITEBACK_BYTES``),
  so part of the durability work happens before the final sync;
- ``copy_verified nowb``: the same copies with ``fsync=False`` and that early writeback switched
  off, i.e. the engine doing no durability work at all until the final ``syncfs``.

Two comparisons are judged, each fair in the sense that both sides do the same about durability:
*durable* (cp + sync versus ``copy_verified`` as the replicator runs it: this is the one that
matters, a replica is recorded only once durable) and *copied* (cp alone versus ``copy_verified
nowb`` alone: neither durable; it shows the engine's own cost). The other figures are printed for
information. The targets: >= 0.8 of cp's MB/s for large files, >= 0.5 of its files/s for small
ones. CPU seconds (user + system; cp's as a child process) are printed too: on a shared machine
they vary much less than elapsed times.

Page cache: the sources are written, flushed with ``sync`` and stay in the page cache, so both
sides read warm sources (24 GB of RAM hold the default data sets several times over); every
destination is deleted after its measurement and ``sync`` runs (untimed) before the next one, so
neither side pays for the other's writeback; with many files the copies are kept until the data set
is done instead, except in memory (see ``keeps_copies``: on ext4 without a journal, creating files
within about six minutes of deleting thousands costs several times more). Before each measurement,
memory for its page cache is touched and freed (``warm_memory``: on a virtual machine, fresh memory
costs more than the copying). The order of the measurements rotates between repetitions, and by
default each comes first once (the first copies of an invocation were often the fastest: file
creation grew dearer as the file system filled, even with warm memory); the best of ``--repeat``
runs counts. Everything generated is deleted at the end: for the reason above, leave six minutes
between two runs of this script (or after deleting many files on that file system).

The elapsed figures of one run vary by 2-10x on a machine where others run tests (file creation
waits for the journal, the disk is shared): repeat (``--repeat``) and compare within one run.

    .venv/bin/python -P bench/replicate.py                      # both data sets, default sizes
    .venv/bin/python -P bench/replicate.py --only small --small-files 2000 --repeat 3 --json
"""

from __future__ import annotations

import sys

# Run as ``python bench/replicate.py``, the bench directory heads sys.path, where a script named like
# a standard-library module (``copy.py``) would shadow it. Drop that entry (``-P`` does the same).
if sys.path and sys.path[0] and __file__.startswith(sys.path[0]) and __name__ == "__main__":
    sys.path.pop(0)

import argparse
import asyncio
import contextlib
import itertools
import json
import mmap
import os
import resource
import shutil
import sqlite3
import subprocess
import tempfile
import time
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import msgpack

from common.config import StorageEndpoint
from common.placement import BULK
from common.storage import PosixStorage, copy_engine, posix

SELF = Path(__file__).resolve()
REPO = SELF.parent.parent
MiB = 1024 * 1024
FILES_PER_DIR = 100
DEFER_DELETE_FILES = 1000  # see keeps_copies
TARGET_LARGE_MBPS_RATIO = 0.8  # of cp's MB/s, large files
TARGET_SMALL_FILES_RATIO = 0.5  # of cp's files/s, small files
_POOL_SIZE = 64 * MiB  # random bytes the sources are cut from (urandom for 4 GiB would take long)


def say(text: str) -> None:
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


# --- data sets ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class SourceFile:
    relpath: str
    size: int
    adler32: str


@dataclass
class DataSet:
    name: str
    root: Path
    files: list[SourceFile]

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def describe(self) -> str:
        size = self.files[0].size if self.files else 0
        unit = f"{size // MiB} MiB" if size % MiB == 0 else f"{size // 1024} KiB"
        return f"{len(self.files):,} files x {unit} ({self.total_bytes / 1e9:.2f} GB)"


def make_data_set(name: str, root: Path, count: int, size: int, pool: bytes) -> DataSet:
    """Write ``count`` files of ``size`` bytes, 100 per directory; their adler32 as the catalogue has it.

    Each MiB is a window of a random pool at an offset that is no multiple of 4 KiB, so no two
    files, and no two blocks of one, are alike: nothing can deduplicate or compress them.
    """
    files: list[SourceFile] = []
    started = time.monotonic()
    view = memoryview(pool)
    step = 1 * MiB
    for i in range(count):
        directory = f"run{i // FILES_PER_DIR:04d}"
        if i % FILES_PER_DIR == 0:
            (root / directory).mkdir(parents=True, exist_ok=True)
        relpath = f"{directory}/f{i:06d}.dat"
        value = 1
        with open(root / relpath, "wb", buffering=0) as f:
            left, k = size, 0
            while left:
                n = min(left, step)
                offset = (i * 7919 + k * 104729) % (len(pool) - n)
                chunk = view[offset : offset + n]
                value = zlib.adler32(chunk, value)
                f.write(chunk)
                left -= n
                k += 1
        files.append(SourceFile(relpath, size, f"{value & 0xFFFFFFFF:08x}"))
    say(f"{name}: wrote {count:,} source files in {time.monotonic() - started:.1f} s under {root}")
    return DataSet(name, root, files)


# --- measurements ------------------------------------------------------------------------------
@dataclass
class Timing:
    """One measurement: seconds to copy everything, then seconds to make it durable."""

    copy_seconds: float
    sync_seconds: float
    cpu_seconds: float  # user + system, copy and sync together
    note: str = ""

    @property
    def durable_seconds(self) -> float:
        return self.copy_seconds + self.sync_seconds


def cpu_now() -> float:
    """CPU seconds of this process (all threads) and of its children, finished or running (the
    storage's copy process runs until the storage closes)."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime + running_children_cpu()


def running_children_cpu() -> float:
    """utime + stime of this process's live children, from /proc (0 where there is none)."""
    total = 0
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return 0.0
    for task in tasks:
        try:
            with open(f"/proc/self/task/{task}/children") as f:
                pids = f.read().split()
        except OSError:
            continue
        for pid in pids:
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue  # exited meanwhile: counted in RUSAGE_CHILDREN once reaped
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


# A measurement copies ``ds`` into the (not yet existing) directory ``dest`` and times it.
Measure = Callable[[DataSet, Path, argparse.Namespace], Awaitable[Timing]]


def warm_memory(nbytes: int) -> None:
    """Touch ``nbytes`` of fresh anonymous memory and free it again, just before a measurement.

    On a virtual machine whose host backs guest memory lazily (and takes back what the guest's
    free-page reporting returns: pages free for a second or two), the first write to a page costs
    far more than the copy into it. Measured here: 2 GB written into the page cache took 5.0 s
    with cold memory, 0.9 s right after 3 GB of anonymous memory was touched and freed. A
    measurement's page cache lands on whatever the previous one left, so without this the order of
    the measurements decided a 2-5x difference. Freed right before the clock starts, these pages
    are what the measured copies get, as on a machine with real memory.
    """
    zeros = bytes(MiB)
    with mmap.mmap(-1, nbytes) as m:
        for offset in range(0, nbytes - MiB + 1, MiB):
            m[offset : offset + MiB] = zeros


def syncfs(path: Path) -> None:
    subprocess.run(["sync", "-f", str(path)], check=True)


async def measure_cp(ds: DataSet, dest: Path, args: argparse.Namespace) -> Timing:
    """``cp -r`` of the source directory, then ``sync -f`` (syncfs) of the destination."""
    c0 = cpu_now()
    t0 = time.perf_counter()
    subprocess.run(["cp", "-r", str(ds.root), str(dest)], check=True)
    t1 = time.perf_counter()
    syncfs(dest)
    t2 = time.perf_counter()
    return Timing(t1 - t0, t2 - t1, cpu_now() - c0, "cp -r, then sync -f")


async def measure_copy_verified(ds: DataSet, dest: Path, args: argparse.Namespace) -> Timing:
    """Every file through ``copy_verified`` as the replicator copies: durable as configured."""
    return await copy_all(ds, dest, args, per_file_fsync=args.durability == "file", early_writeback=True)


async def measure_copy_verified_nowb(ds: DataSet, dest: Path, args: argparse.Namespace) -> Timing:
    """The same with fsync=False and no early writeback: no durability work before the sync."""
    return await copy_all(ds, dest, args, per_file_fsync=False, early_writeback=False)


async def copy_all(
    ds: DataSet, dest: Path, args: argparse.Namespace, *, per_file_fsync: bool, early_writeback: bool
) -> Timing:
    endpoint = StorageEndpoint(
        root=dest,
        durability=args.durability,
        max_transfers=args.concurrency,
        copy_processes=args.copy_processes,
    )
    storage = PosixStorage("bench-dst", endpoint, io_threads=endpoint.max_transfers)
    todo = iter(ds.files)
    saved = copy_engine.EARLY_WRITEBACK_BYTES
    if not early_writeback:
        copy_engine.EARLY_WRITEBACK_BYTES = sys.maxsize

    together = not per_file_fsync and all(storage.batches_copy(f.size, False) for f in ds.files)

    async def worker() -> None:
        # Workers pulling from one iterator: the replicator's per-endpoint limit, without 10,000
        # tasks waiting on a semaphore.
        for f in todo:
            await storage.copy_verified(
                ds.root / f.relpath, f.relpath,
                expected_size=f.size, expected_adler32=f.adler32, fsync=per_file_fsync,
            )  # fmt: skip

    async def bulk_worker() -> None:
        # Small copies as the replicator makes those of a bulk request: BULK at once.
        while chunk := list(itertools.islice(todo, BULK)):
            copies = [posix.ReplicaCopy(str(ds.root), f.relpath, f.relpath, f.size, f.adler32) for f in chunk]
            for outcome in await storage.copy_verified_many(copies):
                if not isinstance(outcome, posix.CopyResult):
                    raise SystemExit(f"BENCHMARK BROKE: {outcome}")

    try:
        await storage.start_copy_process()  # as a daemon does when it starts (small copies only)
        c0 = cpu_now()
        t0 = time.perf_counter()
        await asyncio.gather(
            *((bulk_worker if together else worker)() for _ in range(endpoint.max_transfers))
        )
        t1 = time.perf_counter()
        if not per_file_fsync:
            await storage.sync()  # the batch's group commit: one syncfs before recording replicas
        t2 = time.perf_counter()
        cpu = cpu_now() - c0
    finally:
        storage.close()
        copy_engine.EARLY_WRITEBACK_BYTES = saved
    if per_file_fsync:
        how = "fsync per file and directory"
    else:
        how = "fsync=False, then storage.sync() (syncfs)"
        how += "" if early_writeback else ", early writeback off"
    unit = f"bulks of {BULK} (copy_verified_many)" if together else "copies"
    return Timing(t1 - t0, t2 - t1, cpu, f"{endpoint.max_transfers} {unit} at once, {how}")


async def measure_replicator(ds: DataSet, dest: Path, args: argparse.Namespace) -> Timing:
    """The replicator daemon end to end: a rule asks for every file at ``dest``; timed from the
    moment the rule is due to the ``replica.created`` announcing the last copy (which the daemon
    publishes once the copies are durable and recorded available; the catalogue is checked after).

    Due: a new rule waits, on purpose, three poll intervals after its creation before it is
    evaluated (``rules.settle_time``: ingest must see it first), here 0.15 s. That wait is a fixed
    latency, not copying: in a run of 10,000 small files it was an eighth of the time, in one of
    100,000 it would be nothing, so the clock starts when it is over. The time from the rule's
    creation is in the note (and the JSON).

    The files are registered as replicas of a source endpoint rooted at the data set (a fresh
    SQLite catalogue next to the copies); the daemon runs in this process (its CPU is counted),
    against the real RabbitMQ with an exchange and queues of its own, deleted afterwards. It
    evaluates the new rule (``replication.poll_interval`` 0.05 s, so the rule waits 0.15 s to
    settle), publishes bulk ``replica.request``s (``BULK`` files each), and copies them as it
    copies any bulk request (small files in batches to the copy process, larger ones with
    ``copy_verified``, ``max_transfers`` at once), syncing and recording in batches.
    ``sync_seconds`` is 0: the daemon makes every copy durable before recording it.
    """
    import uuid

    from common.bus.connection import connect
    from common.bus.topology import delete_topology
    from common.catalogue import Catalogue, IngestRecord
    from common.catalogue.policy import Rule
    from common.config import Settings
    from common.runtime import Process
    from daemons.replicator.handlers import service
    from daemons.replicator.rules import settle_time

    tag = uuid.uuid4().hex[:8]
    state = dest.parent / f"state-{dest.name}"
    settings = Settings.model_validate(
        {
            "state_dir": state,
            "bus": {"url": args.amqp_url, "exchange": f"spool-bench-{tag}", "queue_prefix": f"bench{tag}"},
            "storage": {
                "src": {"root": ds.root},
                "dst": {
                    "root": dest,
                    "max_transfers": args.concurrency,
                    "durability": args.durability,
                    "copy_processes": args.copy_processes,
                },
            },
            "replication": {"poll_interval": 0.05, "reaper_interval": 3600},
            "daemons": {"replicator": {"prefetch": 512, "concurrency": 256}},
            "log": {"level": "warning", "format": "json"},
        }
    )
    catalogue = await Catalogue.open(settings.catalogue.url)
    process = Process([service], settings, tune_gc=True)  # as ``spool run`` does
    task: asyncio.Task[int] | None = None
    try:
        await catalogue.endpoints.sync(settings.storage)
        records = [
            IngestRecord(
                event_id=f"bench-{f.relpath}",
                name=f.relpath,
                dataset="bench.20261124.run000001.dl0",
                size=f.size,
                adler32=f.adler32,
                storage="src",
                pfn=f.relpath,
            )
            for f in ds.files
        ]
        for i in range(0, len(records), 1000):
            await catalogue.ingest.register(records[i : i + 1000])
        task = asyncio.create_task(process.run())
        while len(process.runners) < 1:
            if task.done():
                task.result()
            await asyncio.sleep(0.05)
        # Started: its copy process too (the daemon starts it in the background, as it consumes).
        await process.runners[0].resources.storages["dst"].start_copy_process()
        # The end is the replica.created that announces the last copy (published once the copies
        # are durable and recorded): to the millisecond, where polling the catalogue every 50 ms
        # added 25 ms on average to a 0.8 s run. The catalogue is checked afterwards.
        watcher = await connect(settings.bus, name="bench-watch")
        announced = AnnouncedCopies("dst", len(ds.files))
        queue = await (await watcher.channel()).declare_queue(exclusive=True, auto_delete=True)
        await queue.bind(settings.bus.exchange, "replica.created")
        await queue.consume(announced.on_message, no_ack=True)
        c0 = cpu_now()
        created = time.perf_counter()
        await catalogue.replication.add_rule(Rule("bench", endpoints="dst", datasets=".*"))
        t0 = created + settle_time(settings).total_seconds()
        while not announced.all.is_set():
            if task.done():
                task.result()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(announced.all.wait(), 1.0)
        t1 = announced.last
        cpu = cpu_now() - c0
        await watcher.close()
        db_path = settings.catalogue.url.split("///", 1)[1]
        with contextlib.closing(sqlite3.connect(db_path)) as db:
            recorded = count_available(db, "dst")
        if recorded != len(ds.files):
            raise SystemExit(f"BENCHMARK BROKE: {recorded} copies recorded, {len(ds.files)} announced")
    finally:
        process.request_stop()
        if task is not None:
            await asyncio.wait_for(task, timeout=120)
        await catalogue.close()
        connection = await connect(settings.bus, name="bench-cleanup")
        channel = await connection.channel()
        await delete_topology(channel, settings)
        await connection.close()
        shutil.rmtree(state, ignore_errors=True)
    note = (
        f"daemon end to end: rule due -> {len(ds.files)} requests -> copies recorded, {args.concurrency}"
        f" at once ({t1 - created:.2f} s from the rule's creation)"
    )
    return Timing(t1 - t0, 0.0, cpu, note)


class AnnouncedCopies:
    """Counts the distinct files ``replica.created`` announced on ``storage``; ``all`` is set, and
    ``last`` is the time, when ``expected`` of them have been (a copy announced twice, by a
    redelivered request, counts once)."""

    def __init__(self, storage: str, expected: int) -> None:
        self.storage, self.expected = storage, expected
        self.names: set[str] = set()
        self.all = asyncio.Event()
        self.last = 0.0

    async def on_message(self, message: Any) -> None:
        event = msgpack.unpackb(message.body)
        if event["storage"] == self.storage:
            self.names.update(c["name"] for c in event["copies"])
        if len(self.names) >= self.expected and not self.all.is_set():
            self.last = time.perf_counter()
            self.all.set()


def count_available(db: sqlite3.Connection, storage: str) -> int:
    row = db.execute(
        "SELECT count(*) FROM replicas r JOIN storage_endpoints s ON s.id = r.storage_id"
        " WHERE s.name = ? AND r.state = 'available'",
        (storage,),
    ).fetchone()
    return int(row[0])


MEASUREMENTS: dict[str, Measure] = {
    "cp": measure_cp,
    "copy_verified": measure_copy_verified,
    "copy_verified nowb": measure_copy_verified_nowb,
    "replicator": measure_replicator,
}
BASELINE = "cp"
# (measurement, stage) pairs the targets are judged on; the other rows are for information.
JUDGED = {("copy_verified", "durable"), ("copy_verified nowb", "copied"), ("replicator", "durable")}


def keeps_copies(count: int, where: Path) -> bool:
    """Whether a case keeps its copies until it ends instead of deleting each after its run.

    ext4 does not reuse an inode freed in the last ~30 s: every file creation scans past them
    (``recently_deleted`` under ``ext4_create``). Right after 10,000 copies were deleted, that
    scan was over half of the CPU time of the next 10,000 creations, and whichever measurement
    came next looked several times slower. A few large files do not matter (and would need tens
    of GB if kept). Not in memory (tmpfs): no such scan there, and 16 kept copies of the small
    set filled most of ``/dev/shm`` (half the RAM), the later runs slowed by memory reclaim.
    """
    return count >= DEFER_DELETE_FILES and fs_type(where) not in IN_MEMORY


IN_MEMORY = frozenset({"tmpfs", "ramfs"})


def fs_type(path: Path) -> str:
    """The type of the file system holding ``path`` (its longest mount point in /proc/self/mounts)."""
    real, best, kind = os.path.realpath(path), "", ""
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                fields = line.split()
                point = fields[1].replace("\\040", " ")
                inside = real == point or real.startswith(point.rstrip("/") + "/")
                if len(fields) > 2 and inside and len(point) >= len(best):
                    best, kind = point, fields[2]
    except OSError:
        pass
    return kind


def drop_kept_copies_from_memory(ds: DataSet) -> None:
    """Free the page cache, dentries and inodes the kept copies hold (``drop_caches``, after the
    caller's ``sync``: they are clean), then read the sources back in, so that every measurement
    starts from the same memory: sources cached, nothing else.

    Why: with copies kept, each 10,000-file measurement found the caches of all the earlier ones
    in memory and ran slower than the one before, whatever it was (``cp -r`` 0.4 s in the first
    place, 2.1-2.3 s later in the same invocation; the replicator 1.7 s, then 2.7-2.8): the order
    decided the comparison. Five ``cp -r`` of the set one after another took 1.8-3.8 s each; with
    this before each, 0.6-1.0 s. Needs root (``/proc/sys/vm/drop_caches``); without it, a note is
    printed once and the caches stay.
    """
    global _cannot_drop
    if _cannot_drop:
        return
    try:
        with open("/proc/sys/vm/drop_caches", "w") as control:
            control.write("3\n")
    except OSError as exc:
        _cannot_drop = True
        say(f"note: cannot drop caches between measurements ({exc.strerror}); later ones may run slower")
        return
    buf = bytearray(MiB)
    for f in ds.files:
        with open(ds.root / f.relpath, "rb", buffering=0) as src:
            while src.readinto(buf):
                pass


_cannot_drop = False


async def run_case(ds: DataSet, work: Path, args: argparse.Namespace) -> dict[str, list[Timing]]:
    """Each measurement ``--repeat`` times, the order rotated between repetitions."""
    runs: dict[str, list[Timing]] = {name: [] for name in MEASUREMENTS}
    names = list(MEASUREMENTS)
    keep = keeps_copies(len(ds.files), work)
    kept: list[Path] = []
    # The copies' page cache, with room for the replicator's catalogue and the daemon itself.
    warm_bytes = ds.total_bytes * 5 // 4 + 256 * MiB
    try:
        for rep in range(args.repeat):
            order = names[rep % len(names) :] + names[: rep % len(names)]
            for name in order:
                dest = work / f"dst-{ds.name}-{name.replace(' ', '-')}-{rep}"
                os.sync()  # untimed: nothing left over (sources, the previous copies) to flush
                if keep:
                    drop_kept_copies_from_memory(ds)  # untimed, see there
                warm_memory(warm_bytes)  # untimed: the copies' page cache on warm memory
                timing = await MEASUREMENTS[name](ds, dest, args)
                say(
                    f"{ds.name}: {name:<19} copy {timing.copy_seconds:7.2f} s, + sync "
                    f"{timing.sync_seconds:6.2f} s, CPU {timing.cpu_seconds:6.2f} s"
                    f"  (run {rep + 1}/{args.repeat})"
                )
                check_copy(ds, dest)
                if keep:
                    kept.append(dest)
                else:
                    shutil.rmtree(dest)
                runs[name].append(timing)
    finally:
        for dest in kept:
            shutil.rmtree(dest, ignore_errors=True)
    return runs


def check_copy(ds: DataSet, dest: Path) -> None:
    """Every file arrived with its size (a cheap guard against measuring a copy that did nothing)."""
    for f in ds.files[:: max(1, len(ds.files) // 50)]:
        size = (dest / f.relpath).stat().st_size
        if size != f.size:
            raise SystemExit(f"BENCHMARK BROKE: {dest / f.relpath} has {size} bytes, expected {f.size}")


# --- report ------------------------------------------------------------------------------------
@dataclass
class Row:
    case: str
    measurement: str
    stage: str  # "copied" or "durable"
    seconds: float
    mb_per_s: float
    files_per_s: float
    ratio: float | None = None  # of the baseline's figure that the case's target is about
    target: float | None = None
    ok: bool | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def rows_for(ds: DataSet, runs: dict[str, list[Timing]]) -> list[Row]:
    """Best (shortest) run of each measurement, stage by stage, and its ratio to cp's best."""
    rows: list[Row] = []
    target = TARGET_LARGE_MBPS_RATIO if ds.name == "large" else TARGET_SMALL_FILES_RATIO

    def seconds(t: Timing, stage: str) -> float:
        return t.copy_seconds if stage == "copied" else t.durable_seconds

    for stage in ("copied", "durable"):
        base_s = min(seconds(t, stage) for t in runs[BASELINE])
        for name, timings in runs.items():
            best = min(timings, key=lambda t: seconds(t, stage))
            s = seconds(best, stage)
            row = Row(ds.name, name, stage, s, ds.total_bytes / 1e6 / s, len(ds.files) / s)
            row.extra = {"cpu_seconds": best.cpu_seconds, "all_seconds": [seconds(t, stage) for t in timings]}
            if name != BASELINE:
                # Same bytes and files on both sides: the MB/s ratio equals the files/s ratio.
                row.ratio = base_s / s
            if (name, stage) in JUDGED:
                row.target = target
                row.ok = row.ratio is not None and row.ratio >= target
            rows.append(row)
    return rows


def print_table(ds: DataSet, rows: list[Row], runs: dict[str, list[Timing]], repeat: int) -> None:
    metric = "MB/s" if ds.name == "large" else "files/s"
    target = TARGET_LARGE_MBPS_RATIO if ds.name == "large" else TARGET_SMALL_FILES_RATIO
    print(f"\n{ds.name}: {ds.describe()}, best of {repeat}; target: >= {target} of cp's {metric}")
    head = ("", "stage", "seconds", "MB/s", "files/s", "CPU s", "ratio", "")
    table = [head]
    for r in rows:
        verdict = "" if r.ok is None else ("PASS" if r.ok else "MISS")
        ratio = "" if r.ratio is None else f"{r.ratio:.2f}"
        table.append(
            (r.measurement, r.stage, f"{r.seconds:.2f}", f"{r.mb_per_s:,.0f}", f"{r.files_per_s:,.0f}",
             f"{r.extra['cpu_seconds']:.2f}", ratio, verdict)
        )  # fmt: skip
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    for row in table:
        print(
            "  "
            + "  ".join(
                c.ljust(w) if i in (0, 1) else c.rjust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            ).rstrip()
        )
    for name, timings in runs.items():
        print(f"  {name}: {timings[0].note}")


# --- main --------------------------------------------------------------------------------------
async def bench(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    pool = os.urandom(_POOL_SIZE)
    cases = []
    if args.only in (None, "large"):
        cases.append(("large", args.large_files, args.large_mib * MiB))
    if args.only in (None, "small"):
        cases.append(("small", args.small_files, args.small_kib * 1024))
    figures: dict[str, Any] = {
        "concurrency": args.concurrency, "durability": args.durability, "repeat": args.repeat,
        "dir": str(work), "cpus": os.cpu_count(), "cases": {},
    }  # fmt: skip
    for name, count, size in cases:
        copies = len(MEASUREMENTS) * args.repeat if keeps_copies(count, work) else 1
        need = (1 + copies) * count * size + 256 * MiB
        free = shutil.disk_usage(work).free
        if free < need:
            raise SystemExit(f"{name}: needs {need / 1e9:.1f} GB free under {work}, has {free / 1e9:.1f}")
        ds = make_data_set(name, work / f"src-{name}", count, size, pool)
        try:
            runs = await run_case(ds, work, args)
        finally:
            shutil.rmtree(ds.root)
        rows = rows_for(ds, runs)
        print_table(ds, rows, runs, args.repeat)
        figures["cases"][name] = {
            "files": count, "file_size": size, "bytes": ds.total_bytes,
            "runs": {k: [asdict(t) for t in v] for k, v in runs.items()},
            "rows": [asdict(r) for r in rows],
            "ok": all(r.ok for r in rows if r.ok is not None),
        }  # fmt: skip
    return figures


def main() -> None:
    default = StorageEndpoint(root=Path("."))
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--large-files", type=int, default=16, help="files in the large set (default 16)")
    p.add_argument("--large-mib", type=int, default=256, help="MiB per large file (default 256)")
    p.add_argument("--small-files", type=int, default=10_000, help="files in the small set (default 10000)")
    p.add_argument("--small-kib", type=int, default=64, help="KiB per small file (default 64)")
    p.add_argument("--only", choices=["large", "small"], help="measure one data set only")
    p.add_argument(
        "--concurrency", type=int, default=default.max_transfers,
        help=f"copies at once (default: max_transfers, {default.max_transfers})",
    )  # fmt: skip
    p.add_argument(
        "--durability", choices=["batch", "file"], default=default.durability,
        help=f"batch: one syncfs at the end; file: fsync per file (default: {default.durability})",
    )  # fmt: skip
    p.add_argument(
        "--copy-processes", type=int, default=default.copy_processes,
        help=f"copy processes of the destination (default {default.copy_processes})",
    )  # fmt: skip
    p.add_argument(
        "--repeat", type=int, default=len(MEASUREMENTS),
        help=f"runs of each measurement, best counts (default {len(MEASUREMENTS)}: each comes first once)",
    )  # fmt: skip
    p.add_argument(
        "--amqp-url", default=os.environ.get("SPOOL_AMQP_URL", "amqp://guest:guest@localhost:5672/"),
        help="broker for the replicator measurement",
    )  # fmt: skip
    p.add_argument(
        "--dir", type=Path, default=REPO.parent,
        help=f"where the work directory is made: the file system measured (default {REPO.parent})",
    )  # fmt: skip
    p.add_argument("--json", action="store_true", help="also print the figures as one JSON object")
    args = p.parse_args()
    if (
        min(
            args.large_files,
            args.large_mib,
            args.small_files,
            args.small_kib,
            args.concurrency,
            args.copy_processes,
        )
        < 1
    ):
        p.error("counts, sizes and --concurrency must be positive")
    if args.repeat < 1:
        p.error("--repeat must be positive")
    for tool in ("cp", "sync"):
        if shutil.which(tool) is None:
            p.error(f"{tool} is not on PATH")
    work = Path(tempfile.mkdtemp(prefix="spool-bench-replicate-", dir=args.dir))
    say(f"work directory {work}")
    try:
        # The event loop ``spool run`` gives a daemon (uvloop where installed): the replicator
        # measurement runs the daemon in this process.
        from common.runtime import run_loop

        figures = run_loop(bench(args, work))
    except KeyboardInterrupt:
        say("\ninterrupted")
        sys.exit(130)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps(figures))


if __name__ == "__main__":
    main()
