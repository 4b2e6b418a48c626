"""The xrootd backend against ``xrdcp``: is our verified, atomic copy as fast as the reference tool?

Two directions, each timed for ``xrdcp`` and for ``XrootdStorage`` with the same number of files
in flight (``--parallel``):

- posix -> xrootd: local files (in the page cache) uploaded to ``site-b`` of a local XRootD server
  (``common.storage.devserver``). ``xrdcp --parallel P src... root://.../dir/`` against
  ``XrootdStorage.upload`` (temporary name, the server's adler32 asked and compared, ``mv``);
- xrootd -> xrootd: third-party copy ``site-a`` -> ``site-b``. ``xrdcp --tpc only --parallel P``
  against ``XrootdStorage.copy_from`` (TPC with the end-to-end adler32, temporary name, ``mv``).

The server's files are kept in ``/dev/shm`` by default (``--server-dir``): on a disk, write-back
of gigabytes decides the large-file figures more than either client does.

``xrdcp`` runs without checksum verification (its plain form, what people compare with); ours
always verifies. Prints MB/s and files/s of each and our share of ``xrdcp``'s. Targets (issue
15): at least 0.8 of xrdcp's MB/s on 16 x 256 MiB and of ``xrdcp --parallel 8``'s files/s on
2,000 x 1 MiB.

Usage: ``python bench/remote.py --files 16 --size 256MiB`` and
``python bench/remote.py --files 2000 --size 1MiB``; ``--rounds 2`` alternates the order.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common.config import StorageEndpoint
from common.storage.devserver import LocalXrootd
from common.storage.xrootd import XrootdStorage

_UNITS = {
    "": 1,
    "B": 1,
    "KIB": 1024,
    "MIB": 1024**2,
    "GIB": 1024**3,
    "KB": 1000,
    "MB": 1000**2,
    "GB": 1000**3,
}


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).upper() not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 1MiB, 256MiB, 4096)")
    return int(m.group(1)) * _UNITS[m.group(2).upper()]


def make_files(directory: Path, count: int, size: int) -> list[tuple[Path, str]]:
    """``count`` files of ``size`` random-looking bytes (one random block, a distinct header each),
    with their adler32."""
    directory.mkdir(parents=True, exist_ok=True)
    block = bytearray(os.urandom(size))
    files = []
    for i in range(count):
        block[:8] = i.to_bytes(8, "little")
        path = directory / f"f{i:06d}.dat"
        path.write_bytes(block)
        files.append((path, f"{zlib.adler32(block):08x}"))
    return files


def xrdcp(*args: str) -> float:
    """Run ``xrdcp`` (its target directory, the last argument, made first); the wall time."""
    target = args[-1]
    host, _, path = target.removeprefix("root://").partition("/")
    subprocess.run(["xrdfs", host, "mkdir", "-p", "/" + path.strip("/")], check=True, capture_output=True)
    started = time.monotonic()
    done = subprocess.run(["xrdcp", "--nopbar", "--silent", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"xrdcp failed ({done.returncode}): {done.stderr[-2000:]}")
    return time.monotonic() - started


async def ours(jobs: list[asyncio.Future[object] | object], parallel: int) -> float:
    """Run coroutine factories ``parallel`` at a time; the wall time."""
    limit = asyncio.Semaphore(parallel)

    async def one(make: object) -> None:
        async with limit:
            await make()  # type: ignore[operator]

    started = time.monotonic()
    await asyncio.gather(*(one(j) for j in jobs))
    return time.monotonic() - started


def report(label: str, seconds: float, files: int, size: int, reference: float | None) -> None:
    mbs = files * size / seconds / 1e6
    line = f"{label:<34} {seconds:8.2f} s {mbs:9.1f} MB/s {files / seconds:9.1f} files/s"
    if reference is not None:
        line += f"   ratio {reference / seconds:.2f} of xrdcp"
    print(line, flush=True)


def clear(server: LocalXrootd, site: str, directory: str) -> None:
    shutil.rmtree(server.path(site, directory), ignore_errors=True)


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=16)
    ap.add_argument("--size", type=parse_size, default=parse_size("256MiB"))
    ap.add_argument("--parallel", type=int, default=8, help="files in flight, both tools (default 8)")
    ap.add_argument("--rounds", type=int, default=1, help="repeat, alternating which tool goes first")
    ap.add_argument("--skip-tpc", action="store_true")
    ap.add_argument(
        "--xrdcp-cksum",
        action="store_true",
        help="xrdcp verifies too (--cksum adler32: the source's and the destination's checksums compared)",
    )
    ap.add_argument(
        "--dir", type=Path, default=None, help="where the local files live (default: as --server-dir)"
    )
    ap.add_argument(
        "--server-dir",
        type=Path,
        default=Path("/dev/shm") if Path("/dev/shm").is_dir() else None,
        help="where the server keeps its files (default /dev/shm: the disk's write-back would otherwise "
        "decide the large-file figures, and the machine is shared)",
    )
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # clean up (server, files) when stopped

    work = Path(tempfile.mkdtemp(prefix="spool-bench-remote-", dir=args.dir or args.server_dir))
    work.chmod(0o755)
    served = Path(tempfile.mkdtemp(prefix="spool-bench-remote-", dir=args.server_dir))
    served.chmod(0o755)
    server = LocalXrootd(base=served)
    try:
        server.start()
        print(f"{args.files} x {args.size} bytes, {args.parallel} in flight; server {server.root_url('')}")
        files = make_files(work / "src", args.files, args.size)
        sources = [str(p) for p, _ in files]
        endpoint = StorageEndpoint(backend="xrootd", url=server.root_url("site-b"), tpc=True)
        site_b = XrootdStorage("site-b", endpoint)
        site_a = XrootdStorage("site-a", StorageEndpoint(backend="xrootd", url=server.root_url("site-a")))
        n, size, par = args.files, args.size, args.parallel
        verify = ["--cksum", "adler32"] if args.xrdcp_cksum else []
        named = "xrdcp --cksum adler32" if args.xrdcp_cksum else "xrdcp"

        for rnd in range(args.rounds):
            order = ["xrdcp", "ours"] if rnd % 2 == 0 else ["ours", "xrdcp"]
            print(f"-- posix -> xrootd (round {rnd + 1})")
            took: dict[str, float] = {}
            for who in order:
                if who == "xrdcp":
                    took[who] = xrdcp(
                        *verify, "--parallel", str(par), *sources, f"{server.root_url('site-b')}/xrdcp/"
                    )
                    clear(server, "site-b", "xrdcp")
                else:
                    jobs = [
                        (lambda p=p, a=a: site_b.upload(p, f"ours/{p.name}", size=size, adler32=a))
                        for p, a in files
                    ]
                    took[who] = await ours(jobs, par)  # type: ignore[arg-type]
                    clear(server, "site-b", "ours")
            report(f"{named} --parallel {par}", took["xrdcp"], n, size, None)
            report("XrootdStorage.upload", took["ours"], n, size, took["xrdcp"])

        if args.skip_tpc:
            return
        xrdcp("--parallel", str(par), *sources, f"{server.root_url('site-a')}/src/")
        shutil.rmtree(work / "src")  # not needed any more: memory back for the copies
        remote = [f"{server.root_url('site-a')}/src/{p.name}" for p, _ in files]
        for rnd in range(args.rounds):
            order = ["xrdcp", "ours"] if rnd % 2 == 0 else ["ours", "xrdcp"]
            print(f"-- xrootd -> xrootd, third-party copy (round {rnd + 1})")
            took = {}
            for who in order:
                if who == "xrdcp":
                    took[who] = xrdcp(
                        *verify,
                        "--tpc",
                        "only",
                        "--parallel",
                        str(par),
                        *remote,
                        f"{server.root_url('site-b')}/tpc-xrdcp/",
                    )
                    clear(server, "site-b", "tpc-xrdcp")
                else:
                    jobs = [
                        (
                            lambda p=p, a=a: site_b.copy_from(
                                site_a, f"src/{p.name}", f"tpc-ours/{p.name}", size=size, adler32=a
                            )
                        )
                        for p, a in files
                    ]
                    took[who] = await ours(jobs, par)  # type: ignore[arg-type]
                    clear(server, "site-b", "tpc-ours")
            report(f"{named} --tpc only --parallel {par}", took["xrdcp"], n, size, None)
            report("XrootdStorage.copy_from (tpc)", took["ours"], n, size, took["xrdcp"])
        await site_a.aclose()
        await site_b.aclose()
    finally:
        server.cleanup()
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(served, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
