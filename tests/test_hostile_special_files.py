"""Issue 16, class 2 (the open half): never block on an untrusted path.

A FIFO, socket, device or directory where a file is expected is opened non-blocking and refused
after ``fstat`` (``not_a_file`` at ingest and for replicas, ``source_corrupt`` for a source
replica): no worker thread waits for a writer that never comes. Each case is bounded by a
timeout (a blocked open would hang it), then a good file still goes through.
"""

from __future__ import annotations

import asyncio
import os
import socket
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from common.catalogue import Catalogue
from common.config import Settings, StorageEndpoint
from common.errors import Permanent
from common.storage import PosixStorage
from common.storage.checksum import adler32_of_file
from common.tape.data import write_data
from daemons.ingest.handlers import service as ingest_service
from tests.conftest import cloudevent, publish_raw, queue_depth, running, wait_for
from tests.conftest import dead_reasons as _dead
from tests.storage_fixtures import adler, leftovers

DATASET = "lst1.20261123.run012345.dl0"
KINDS = ["fifo", "socket", "device", "directory"]


def make_special(path: Path, kind: str) -> None:
    """Put a ``kind`` of non-regular file at ``path`` (a socket is bound, so it exists)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "socket":
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(path))
        _SOCKETS.append(s)
    elif kind == "device":
        try:
            os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(1, 3))  # /dev/null's numbers
        except PermissionError:
            pytest.skip("creating a device node needs CAP_MKNOD")
    else:
        path.mkdir()


_SOCKETS: list[socket.socket] = []


@pytest.fixture(autouse=True)
def _close_sockets() -> Iterator[None]:
    yield
    while _SOCKETS:
        _SOCKETS.pop().close()


@pytest.mark.parametrize("kind", KINDS)
def test_checksum_of_a_special_file_is_not_a_file_without_blocking(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "odd"
    make_special(path, kind)
    with pytest.raises(Permanent) as err:
        adler32_of_file(path)  # a blocking open of a FIFO would hang this test, not fail it
    assert err.value.reason == "not_a_file"


@pytest.mark.parametrize("kind", KINDS)
async def test_special_files_as_ingest_source_and_as_replicas(tmp_path: Path, kind: str) -> None:
    storage = PosixStorage("disk", StorageEndpoint(root=tmp_path / "disk", small_copies="thread"))
    make_special(tmp_path / "src" / "odd", kind)
    make_special(storage.root / "night" / "odd", kind)
    try:
        for fsync in (True, False):  # a worker thread, a batch of small copies
            with pytest.raises(Permanent) as err:
                await asyncio.wait_for(
                    storage.put_from(tmp_path / "src" / "odd", "x", expected_size=1, fsync=fsync), 10
                )
            assert err.value.reason == "not_a_file"
        with pytest.raises(Permanent) as err:
            await asyncio.wait_for(storage.stat("night/odd", checksum=True), 10)
        assert err.value.reason == "not_a_file"
        with pytest.raises(Permanent) as err:
            await asyncio.wait_for(storage.checksum("night/odd"), 10)
        assert err.value.reason == "not_a_file"
        assert await asyncio.wait_for(storage.verify("night/odd", expected_size=1, expected_adler32="1"), 10)
        other = PosixStorage("disk2", tmp_path / "disk2")
        with pytest.raises(Permanent) as err:
            await asyncio.wait_for(
                other.copy_verified(storage.resolve("night/odd"), "y", expected_size=0, expected_adler32="1"),
                10,
            )
        assert err.value.reason == "source_corrupt"  # the source replica's fault, not the destination's
        other.close()
        # A good copy still goes through the same pool afterwards: no thread is stuck.
        (tmp_path / "src" / "good").write_bytes(b"good")
        done = await asyncio.wait_for(storage.put_from(tmp_path / "src" / "good", "good", fsync=False), 10)
        assert done.adler32 == adler(b"good")
    finally:
        storage.close()
    assert leftovers(storage.root) == [] and not (storage.root / "x").exists()


@pytest.mark.parametrize("kind", ["fifo", "socket"])
def test_tape_write_of_a_special_source_is_not_a_file(tmp_path: Path, kind: str) -> None:
    make_special(tmp_path / "odd", kind)
    with pytest.raises(Permanent) as err:
        write_data(threading.Event(), tmp_path / "odd", tmp_path / "t.tmp", tmp_path / "t", 1, "00000001")
    assert err.value.reason == "not_a_file"
    assert not (tmp_path / "t").exists() and not (tmp_path / "t.tmp").exists()


async def test_a_regular_file_swapped_for_a_fifo_between_check_and_open_is_refused(tmp_path: Path) -> None:
    storage = PosixStorage("disk", StorageEndpoint(root=tmp_path / "disk", small_copies="thread"))
    src = tmp_path / "src.fits"
    src.write_bytes(b"checked")
    assert adler32_of_file(src) == adler(b"checked")  # the check
    src.unlink()
    os.mkfifo(src)  # the swap
    try:
        with pytest.raises(Permanent) as err:
            await asyncio.wait_for(storage.put_from(src, "x", fsync=True), 10)  # the use
        assert err.value.reason == "not_a_file"
    finally:
        storage.close()


# --- ingest through the bus ----------------------------------------------------------------------
def _ready(path: Path | str, **data: object) -> bytes:
    return cloudevent({"path": str(path), "dataset": DATASET, **data})


async def _files(settings: Settings) -> int:
    async with await Catalogue.open(settings.catalogue.url) as c:
        return (await c.queries.counts()).files


async def _is(value: object, expected: int) -> bool:
    assert asyncio.iscoroutine(value)
    return await value == expected


@pytest.mark.integration
async def test_special_files_announced_to_ingest_are_not_a_file_and_a_good_file_follows(
    settings: Settings, broker, topology
) -> None:  # type: ignore[no-untyped-def]
    area = settings.landing_areas["lst1"]
    odd = {kind: area / "night" / f"{kind}.fits" for kind in KINDS}
    for kind, path in odd.items():
        make_special(path, kind)
    async with running([ingest_service], settings):
        # Several FIFOs at once: more than would have blocked every worker thread of old.
        for _ in range(3):
            for path in odd.values():
                await publish_raw(broker, settings, "file.ready", _ready(path))
        await wait_for(lambda: _is(queue_depth(broker, settings.dead_queue("ingest")), 3 * len(odd)))
        (area / "night" / "good.fits").write_bytes(b"good")
        await publish_raw(broker, settings, "file.ready", _ready(area / "night" / "good.fits"))
        await wait_for(lambda: _is(_files(settings), 1))
    assert await _dead(broker, settings) == ["not_a_file"] * (3 * len(odd))
    assert leftovers(settings.storage["disk1"].root) == []


@pytest.mark.integration
async def test_a_registered_name_re_announced_as_a_fifo_does_not_block_ingest(
    settings: Settings, broker, topology
) -> None:  # type: ignore[no-untyped-def]
    """The duplicate path checksums the source to compare it with the registered copy: a FIFO
    there blocked a worker thread in ``open()`` for ever (issue 16)."""
    area = settings.landing_areas["lst1"]
    path = area / "night" / "again.fits"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"first")
    async with running([ingest_service], settings):
        await publish_raw(broker, settings, "file.ready", _ready(path))
        await wait_for(lambda: _is(_files(settings), 1))
        path.unlink()
        os.mkfifo(path)
        for _ in range(12):  # more than the worker threads of asyncio's default pool on 2 cores (6)
            await publish_raw(broker, settings, "file.ready", _ready(path))
        await wait_for(lambda: _is(queue_depth(broker, settings.dead_queue("ingest")), 12))
        (area / "night" / "good.fits").write_bytes(b"good")
        await publish_raw(broker, settings, "file.ready", _ready(area / "night" / "good.fits"))
        await wait_for(lambda: _is(_files(settings), 2))
    assert await _dead(broker, settings) == ["not_a_file"] * 12


@pytest.mark.parametrize("kind", ["fifo", "directory"])
def test_remote_backends_local_reads_refuse_special_files_without_blocking(tmp_path: Path, kind: str) -> None:
    """The XRootD and HTTPS backends' opens of a local file (an upload's source: a posix
    replica, a staging file, a landing file) are non-blocking and regular-file checked too."""
    from common.storage.https import _open_source
    from common.storage.xrootd_local import _LocalReader

    make_special(tmp_path / "odd", kind)
    with pytest.raises(Permanent) as err:
        _open_source(tmp_path / "odd", 0)
    assert err.value.reason == "source_corrupt"
    reader = _LocalReader(tmp_path / "odd")
    try:
        with pytest.raises(Permanent) as err:
            reader.read(10)
        assert err.value.reason == "source_corrupt"
    finally:
        reader.close()
