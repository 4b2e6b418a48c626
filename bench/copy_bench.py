"""Throughput of ``PosixStorage.put_from`` against plain ``shutil.copyfile``.

Answers "what does verification and crash safety cost?" for the two shapes that matter: many
small files (per-file overhead: temp name, fsync, rename, directory fsync) and a few large ones
(byte throughput: the adler32 pass and the Python read/write loop). Variants, all run with the
same concurrency through threads:

- ``put_from``            streamed copy + adler32 in one pass, fsync, atomic rename (production)
- ``put_from nofsync``    the same without the two fsyncs (shows what durability costs)
- ``copyfile``            shutil.copyfile (kernel sendfile/copy_file_range): no checksum, no fsync
- ``copyfile+readback``   kernel copy then adler32 of the written copy (DESIGN.md section 5 variant)
- ``copyfile+fsync+rb``   the same made as durable as put_from: fsync before the read-back

Source files stay in the page cache between variants; destination files are deleted after each.
``os.sync()`` runs before each variant: otherwise the first one to fsync pays for flushing the
freshly written sources too (on ext4, a journal commit writes out all pending dirty data).
Usage: ``python bench/copy.py`` or ``python -m bench.copy`` (both default scenarios) or
``python bench/copy.py --count 1000 --size 256KiB --concurrency 32 --dir /data/bench``.
"""

from __future__ import annotations

import sys

# Run as ``python bench/copy.py``, this file's directory heads sys.path and the file would shadow
# the standard library's ``copy`` module (imported by dataclasses, pydantic ...). Drop that entry.
if sys.path and sys.path[0] and __file__.startswith(sys.path[0]) and __name__ == "__main__":
    sys.path.pop(0)

import argparse
import asyncio
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common.storage import PosixStorage, adler32_of_file

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 10**6, "mb": 10**6, "mib": 1024**2}
_UNITS |= {"g": 10**9, "gb": 10**9, "gib": 1024**3}


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"bad size {text!r} (e.g. 1KiB, 64MiB)")
    return int(m.group(1)) * _UNITS[m.group(2).lower()]


def human(n: int) -> str:
    for unit, k in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= k and n % k == 0:
            return f"{n // k} {unit}"
    return f"{n} B"


def make_sources(where: Path, count: int, size: int) -> list[Path]:
    where.mkdir(parents=True, exist_ok=True)
    block = os.urandom(min(size, 1024 * 1024))
    paths = []
    for i in range(count):
        p = where / f"f{i:05d}.dat"
        with open(p, "wb") as f:
            left = size
            while left:
                n = min(left, len(block))
                f.write(block[:n])
                left -= n
        paths.append(p)
    return paths


async def run_put_from(sources: list[Path], dest: Path, concurrency: int, fsync: bool) -> None:
    storage = PosixStorage("bench", dest, io_threads=concurrency)
    sem = asyncio.Semaphore(concurrency)

    async def one(i: int, src: Path) -> None:
        async with sem:
            await storage.put_from(src, f"d{i % 16}/{src.name}", fsync=fsync)

    try:
        await asyncio.gather(*(one(i, s) for i, s in enumerate(sources)))
    finally:
        storage.close()


def run_threads(
    sources: list[Path], dest: Path, concurrency: int, fn: Callable[[Path, Path], object]
) -> None:
    for i in range(16):
        (dest / f"d{i}").mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(lambda ia: fn(ia[1], dest / f"d{ia[0] % 16}" / ia[1].name), enumerate(sources)))


def copy_then_readback(src: Path, dst: Path) -> None:
    shutil.copyfile(src, dst)
    adler32_of_file(dst)


def copy_fsync_then_readback(src: Path, dst: Path) -> None:
    shutil.copyfile(src, dst)
    fd = os.open(dst, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    adler32_of_file(dst)


def scenario(base: Path, count: int, size: int, concurrency: int, repeat: int) -> None:
    sources = make_sources(base / "src", count, size)
    total = count * size
    variants: list[tuple[str, Callable[[Path], None]]] = [
        ("put_from", lambda d: asyncio.run(run_put_from(sources, d, concurrency, True))),
        ("put_from nofsync", lambda d: asyncio.run(run_put_from(sources, d, concurrency, False))),
        ("copyfile", lambda d: run_threads(sources, d, concurrency, shutil.copyfile)),
        ("copyfile+readback", lambda d: run_threads(sources, d, concurrency, copy_then_readback)),
        ("copyfile+fsync+rb", lambda d: run_threads(sources, d, concurrency, copy_fsync_then_readback)),
    ]
    print(f"\n{count} x {human(size)} ({total / 1e6:.1f} MB), concurrency {concurrency}, best of {repeat}")
    print(f"  {'variant':<20} {'seconds':>8} {'MB/s':>9} {'files/s':>9}")
    for name, fn in variants:
        best = float("inf")
        for _ in range(repeat):
            dest = base / "dst"
            os.sync()
            t0 = time.perf_counter()
            fn(dest)
            best = min(best, time.perf_counter() - t0)
            shutil.rmtree(dest)
        print(f"  {name:<20} {best:8.3f} {total / 1e6 / best:9.1f} {count / best:9.1f}")
    shutil.rmtree(base / "src")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--count", "-n", type=int, help="files per run (with --size; default: both scenarios)")
    ap.add_argument("--size", "-s", type=parse_size, help="bytes per file, e.g. 1KiB, 64MiB")
    ap.add_argument("--concurrency", "-c", type=int, default=16, help="copies in flight (default 16)")
    ap.add_argument("--repeat", "-r", type=int, default=3, help="runs per variant; the best counts")
    ap.add_argument(
        "--dir", type=Path, help="work directory on the file system to measure (default: a temp dir)"
    )
    args = ap.parse_args()
    if (args.count is None) != (args.size is None):
        ap.error("--count and --size go together")
    runs = [(args.count, args.size)] if args.count is not None else [(200, 1024), (4, 64 * 1024**2)]
    with tempfile.TemporaryDirectory(prefix="spool-bench-", dir=args.dir) as tmp:
        for count, size in runs:
            scenario(Path(tmp), count, size, args.concurrency, args.repeat)


if __name__ == "__main__":
    main()
