"""The start-up sweep of temporaries a killed process left on a remote endpoint, against the real
server: stale ones deleted, a fresh one (a copy in progress) and every final file kept."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from common.config import StorageEndpoint
from common.storage import open_storage
from common.storage.devserver import LocalXrootd
from common.storage.tempfiles import temp_name_for
from common.storage.transfer import remove_stale_temporaries
from tests.storage_fixtures import adler
from tests.xrootd_fixtures import remote_dir, xrootd_server  # noqa: F401  (fixtures)

pytestmark = pytest.mark.integration


def endpoint(server: LocalXrootd, where: str, backend: str) -> StorageEndpoint:
    if backend == "xrootd":
        return StorageEndpoint(backend="xrootd", url=f"{server.root_url('site-a')}/{where}")
    return StorageEndpoint(
        backend="https", url=f"{server.https_url('site-a')}/{where}", ca_path=server.ca_file
    )


@pytest.mark.parametrize("backend", ["xrootd", "https"])
async def test_stale_temporaries_are_removed_fresh_ones_and_files_kept(
    tmp_path: Path,
    xrootd_server: LocalXrootd,  # noqa: F811
    remote_dir: str,  # noqa: F811
    backend: str,
) -> None:
    storage = open_storage("remote", endpoint(xrootd_server, remote_dir, backend))
    try:
        data = os.urandom(10_000)
        (tmp_path / "f").write_bytes(data)
        checksum = adler(data)
        for rel in ("run1/a.fits", "run1/deep/b.fits"):
            await storage.upload(tmp_path / "f", rel, size=len(data), adler32=checksum)
        on_disk = xrootd_server.path("site-a", remote_dir)
        stale = [on_disk / "run1" / temp_name_for("c.fits"), on_disk / "run1/deep" / temp_name_for("d.fits")]
        fresh = on_disk / "run1" / temp_name_for("e.fits")
        an_hour_ago = time.time() - 3600
        for path in [*stale, fresh]:
            path.write_bytes(b"half a copy")
        for path in stale:
            os.utime(path, (an_hour_ago, an_hour_ago))
        listed = sorted([f.relpath async for f in storage.list(temporaries=True)])
        assert listed == sorted(p.relative_to(on_disk).as_posix() for p in [*stale, fresh])
        assert await remove_stale_temporaries(storage, time.time() - 600) == 2
        assert not any(p.exists() for p in stale)
        assert fresh.exists()
        assert sorted([f.relpath async for f in storage.list()]) == ["run1/a.fits", "run1/deep/b.fits"]
    finally:
        await storage.aclose()
