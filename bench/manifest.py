"""Signed release manifests: signing and verifying a dataset of 10,000 files, against sha256's speed.

What the issue bounds: the work of a manifest must be that of sha256 over the bytes, nothing more.
Printed:

- ``sha256_mb_s_1`` / ``sha256_mb_s_all``: the machine alone, hashlib's sha256 over an in-memory
  buffer in one thread and in one thread per core (hashlib releases the GIL);
- ``sign_s``: ``spool dataset manifest``'s work once the catalogue has answered (the sha256 of
  each file is recorded at ingest, so signing reads no file): sort, check the names, canonical
  bytes, Ed25519, encode, write the file (fsync-ed);
- ``verify_s``: ``spool dataset verify``'s work: read and parse the manifest, check the signature,
  hash every file of the copy (page cache warm: the files were just written) and list the
  directories for added files;
- ``verify_bound_s``: the dataset's bytes at ``sha256_mb_s_all``, and ``verify_vs_bound``
  (``verify_s / verify_bound_s``: 1.0 is sha256's speed exactly).

    .venv/bin/python -P bench/manifest.py                 # 10,000 files of 100 KiB (1 GB)
    .venv/bin/python -P bench/manifest.py --files 2000 --size 1048576 --json
"""

from __future__ import annotations

import sys

if sys.path and sys.path[0] and __file__.startswith(sys.path[0]) and __name__ == "__main__":
    sys.path.pop(0)  # see bench/replicate.py: the bench directory must not shadow modules

import argparse
import hashlib
import json
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from common.catalogue.releases import ReleaseContents, ReleaseFile
from common.manifest.check import check_directory, check_signature
from common.manifest.document import parse
from common.manifest.keys import load_public_key, load_signing_key, write_new_key
from common.manifest.release import build_manifest, write_atomically

MB = 1e6


def sha256_rate(threads: int, seconds: float = 1.0) -> float:
    """MB/s of sha256 over a 1 MiB buffer, in ``threads`` threads at once, for about ``seconds``."""
    buf = os.urandom(1024 * 1024)

    def spin(_: int) -> int:
        done, end = 0, time.perf_counter() + seconds
        while time.perf_counter() < end:
            hashlib.sha256(buf).digest()
            done += len(buf)
        return done

    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        total = sum(pool.map(spin, range(threads)))
    return total / (time.perf_counter() - start) / MB


def make_dataset(root: Path, files: int, size: int) -> list[ReleaseFile]:
    """``files`` files of ``size`` bytes in 100-file run directories; their (name, size, sha256)."""
    block = os.urandom(size + files)
    out = []
    for i in range(files):
        name = f"run{i // 100:06d}/subrun{i % 100:04d}.fits.fz"
        data = block[i : i + size]  # each file different
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
        out.append(ReleaseFile(name, size, hashlib.sha256(data).hexdigest()))
    return out


def main(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="spool-bench-manifest-", dir=args.dir))
    try:
        cores = os.cpu_count() or 1
        rate_1, rate_all = sha256_rate(1, args.rate_seconds), sha256_rate(cores, args.rate_seconds)
        copy = work / "copy"
        files = make_dataset(copy, args.files, args.size)
        private, public = work / "key.pem", work / "key.pub"
        write_new_key(private, public)
        contents = ReleaseContents("bench.release", "closed", files)
        path = work / "bench.manifest.json"

        start = time.perf_counter()
        manifest = build_manifest(contents, load_signing_key(private))
        write_atomically(path, manifest.encode())
        sign_s = time.perf_counter() - start

        start = time.perf_counter()
        parsed = parse(path.read_bytes())
        bad = check_signature(parsed, [load_public_key(str(public))])
        problems = check_directory(copy, parsed)
        verify_s = time.perf_counter() - start
        if bad is not None or problems:
            raise AssertionError(f"the bench's own copy does not verify: {bad or problems[:3]}")

        total = args.files * args.size
        bound = total / MB / rate_all
        return {
            "files": args.files,
            "bytes": total,
            "cores": cores,
            "sha256_mb_s_1": round(rate_1),
            "sha256_mb_s_all": round(rate_all),
            "manifest_bytes": path.stat().st_size,
            "sign_s": round(sign_s, 3),
            "verify_s": round(verify_s, 3),
            "verify_bound_s": round(bound, 3),
            "verify_vs_bound": round(verify_s / bound, 2) if bound else None,
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--files", type=int, default=10_000)
    p.add_argument("--size", type=int, default=100 * 1024, help="bytes per file")
    p.add_argument("--rate-seconds", type=float, default=1.0, help="seconds of each sha256 rate measure")
    p.add_argument("--dir", default=None, help="where to write the dataset (default: the temp dir)")
    p.add_argument("--json", action="store_true")
    return p.parse_args(argv)


if __name__ == "__main__":
    a = parse_args()
    result = main(a)
    if a.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:>18}  {v}")
