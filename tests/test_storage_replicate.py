"""``PosixStorage.copy_verified`` (the replicator's copy) and ``verify``, against real files.

What matters to the replicator is *who is at fault* when a copy fails: a bad source replica is
marked bad and another source tried, a destination problem is retried. So every failure below is
checked for its class, its reason code and the side (``SOURCE_REASONS`` / ``DESTINATION_REASONS``)
it belongs to, and for leaving no temporary file behind.

Destination corruption cannot be produced honestly on a healthy disk: it is injected by replacing
``_kernel_copy``, the one function that moves the bytes. Full and read-only file systems are real
small tmpfs mounts (root only, skipped with the reason otherwise). As root, permission bits do not
apply, so "not writable" is a read-only remount rather than a ``chmod``.
"""

# The temp_kind fixture, imported from storage_fixtures, reappears as a test parameter:
# ruff: noqa: F811

from __future__ import annotations

import asyncio
import ctypes
import errno
import mmap
import os
import subprocess
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from common.config import StorageEndpoint
from common.errors import Permanent, Retryable, SpoolError
from common.storage import CopyResult, PosixStorage, copy_engine, kernel, posix
from common.storage.reasons import DESTINATION_REASONS, REQUEST_REASONS, SOURCE_REASONS
from tests.storage_fixtures import adler, leftovers, temp_kind, unnamed_files_open, writing  # noqa: F401

IS_ROOT = os.geteuid() == 0
MiB = 1024 * 1024


@pytest.fixture
def storage(tmp_path: Path) -> Iterator[PosixStorage]:
    s = PosixStorage("disk2", tmp_path / "disk2")
    yield s
    s.close()


@pytest.fixture
def threaded_storage(tmp_path: Path) -> Iterator[PosixStorage]:
    """Batches of small copies in a worker thread, where a monkeypatch of ``posix`` reaches them
    (the default, the copy process, imports its own)."""
    s = PosixStorage("disk2", StorageEndpoint(root=tmp_path / "disk2", small_copies="thread"))
    yield s
    s.close()


@pytest.fixture
def replica(tmp_path: Path) -> Callable[..., Path]:
    """Write a source replica on "another endpoint" (a directory beside the destination root)."""
    src_dir = tmp_path / "disk1" / "night1"
    src_dir.mkdir(parents=True)

    def make(data: bytes, name: str = "file.dat") -> Path:
        p = src_dir / name
        p.write_bytes(data)
        return p

    return make


def assert_side(err: SpoolError, side: frozenset[str]) -> None:
    assert err.reason in side, f"{err.reason} is not in {sorted(side)}"


# --- success -----------------------------------------------------------------------------------


@pytest.mark.parametrize("fsync", [True, False], ids=["fsync", "nofsync"])
@pytest.mark.parametrize("size", [0, 1024, 70_000, 5 * MiB], ids=["0B", "1KiB", "70kB", "5MiB"])
async def test_good_copy_is_verified_and_lands_under_its_final_name(
    storage: PosixStorage, replica: Callable[..., Path], size: int, fsync: bool
) -> None:
    # 1 KiB without fsync runs inline on the event loop, the others in a worker thread.
    data = os.urandom(size)
    src = replica(data)
    result = await storage.copy_verified(
        src, "night1/run1/file.dat", expected_size=size, expected_adler32=adler(data), fsync=fsync
    )
    assert result == CopyResult(
        pfn="night1/run1/file.dat",
        location=str(storage.resolve("night1/run1/file.dat")),
        size=size,
        adler32=adler(data),
    )
    assert result.path.read_bytes() == data
    assert src.read_bytes() == data
    assert leftovers(storage.root) == []
    assert await storage.verify(result.pfn, expected_size=size, expected_adler32=adler(data)) is None


async def test_expected_checksum_in_another_spelling_is_accepted(
    storage: PosixStorage, replica: Callable[..., Path]
) -> None:
    data = b"\x00" * 10  # adler32 "000a0001"
    result = await storage.copy_verified(
        replica(data), "z.dat", expected_size=10, expected_adler32="A0001", fsync=False
    )
    assert result.adler32 == "000a0001"


async def test_existing_file_is_replaced_atomically(
    storage: PosixStorage, replica: Callable[..., Path], temp_kind: str
) -> None:
    old = os.urandom(3 * MiB)
    await storage.copy_verified(
        replica(old, "old"), "f.dat", expected_size=len(old), expected_adler32=adler(old)
    )
    new = os.urandom(2 * MiB)
    result = await storage.copy_verified(
        replica(new, "new"), "f.dat", expected_size=len(new), expected_adler32=adler(new)
    )
    assert result.path.read_bytes() == new
    assert leftovers(storage.root) == []


async def test_many_concurrent_copies_are_all_verified(
    storage: PosixStorage, replica: Callable[..., Path]
) -> None:
    blobs = [os.urandom(i * 9973 % 300_000) for i in range(60)]
    sources = [replica(b, f"f{i:03d}.dat") for i, b in enumerate(blobs)]
    results = await asyncio.gather(
        *(
            storage.copy_verified(
                src, f"night1/run{i % 5}/f{i:03d}.dat", expected_size=len(b), expected_adler32=adler(b),
                fsync=i % 2 == 0,
            )
            for i, (src, b) in enumerate(zip(sources, blobs, strict=True))
        )
    )  # fmt: skip
    for res, b in zip(results, blobs, strict=True):
        assert res.path.read_bytes() == b
    assert leftovers(storage.root) == []


# --- the source is at fault --------------------------------------------------------------------


async def test_missing_source_is_source_missing(storage: PosixStorage, tmp_path: Path) -> None:
    with pytest.raises(Permanent) as err:
        await storage.copy_verified(tmp_path / "nope.dat", "x.dat", expected_size=1, expected_adler32="1")
    assert err.value.reason == "source_missing"  # not "file_missing": that names the destination
    assert "nope.dat" in err.value.message
    assert_side(err.value, SOURCE_REASONS)
    assert not storage.root.exists()


async def test_corrupt_source_of_the_right_size_is_source_corrupt(
    storage: PosixStorage, replica: Callable[..., Path]
) -> None:
    good = os.urandom(3 * MiB)
    bad = bytearray(good)
    bad[MiB + 7] ^= 0xFF  # one flipped byte, same size: only the checksum can tell
    src = replica(bytes(bad))
    with pytest.raises(Permanent) as err:
        await storage.copy_verified(src, "d/f.dat", expected_size=len(good), expected_adler32=adler(good))
    assert err.value.reason == "source_corrupt"
    assert adler(bytes(bad)) in err.value.message and adler(good) in err.value.message
    assert_side(err.value, SOURCE_REASONS)
    assert not storage.exists("d/f.dat")
    assert leftovers(storage.root) == []


async def test_source_of_the_wrong_size_is_source_corrupt_before_writing(
    storage: PosixStorage, replica: Callable[..., Path]
) -> None:
    data = os.urandom(4096)
    with pytest.raises(Permanent) as err:
        await storage.copy_verified(
            replica(data), "d/f.dat", expected_size=4097, expected_adler32=adler(data)
        )
    assert err.value.reason == "source_corrupt"
    assert "4096" in err.value.message and "4097" in err.value.message
    assert not storage.root.exists()  # refused before any directory or byte was written


@pytest.mark.parametrize("kind", ["directory", "fifo", "symlink"])
async def test_source_that_is_not_a_regular_file_is_source_corrupt(
    storage: PosixStorage, replica: Callable[..., Path], tmp_path: Path, kind: str
) -> None:
    src = tmp_path / "odd"
    if kind == "directory":
        src.mkdir()
    elif kind == "fifo":
        os.mkfifo(src)  # opening it must not block waiting for a writer
    else:
        src.symlink_to(replica(b"x"))
    with pytest.raises(Permanent) as err:
        await asyncio.wait_for(
            storage.copy_verified(src, "x.dat", expected_size=1, expected_adler32=adler(b"x")), timeout=5
        )
    assert err.value.reason == "source_corrupt"
    assert leftovers(storage.root) == []


async def test_unreadable_source_is_retryable_source_io_error(
    storage: PosixStorage, replica: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A failing source disk: the kernel copy reports EIO (which does not say which side failed),
    # and so do reads of the source, where the read/write fallback finds the culprit.
    data = os.urandom(3 * MiB)
    src = replica(data)

    def eio(*_: object) -> int:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    real_readv = os.readv

    def readv(fd: int, buffers: list[memoryview]) -> int:
        if os.readlink(f"/proc/self/fd/{fd}") == str(src):
            eio()
        return real_readv(fd, buffers)

    monkeypatch.setattr(kernel, "_copy_file_range", eio)
    monkeypatch.setattr(copy_engine.os, "readv", readv)
    with pytest.raises(Retryable) as err:
        await storage.copy_verified(src, "f.dat", expected_size=len(data), expected_adler32=adler(data))
    assert err.value.reason == "source_io_error"
    assert str(src) in err.value.message
    assert_side(err.value, SOURCE_REASONS)
    assert not storage.exists("f.dat")
    assert leftovers(storage.root) == []


async def test_empty_replica_is_copied_without_reading_the_source(storage: PosixStorage) -> None:
    # /proc/<pid>/mem (not /proc/self: a symlink, refused) is a regular file of size 0 whose
    # reads fail: an empty copy never reads.
    res = await storage.copy_verified(
        Path(f"/proc/{os.getpid()}/mem"), "e.dat", expected_size=0, expected_adler32="1"
    )
    assert (res.size, res.adler32, res.path.read_bytes()) == (0, "00000001", b"")


# --- the destination is at fault ---------------------------------------------------------------


def corrupting_copy(src: int, dst: int, limit: int, cancelled: threading.Event) -> int:
    """Stands in for ``_kernel_copy``: writes the right number of bytes, one of them wrong."""
    data = bytearray(os.read(src, limit))
    if data:
        data[len(data) // 2] ^= 0x01
    os.write(dst, data)
    return len(data)


@pytest.mark.parametrize("size", [1024, 3 * MiB], ids=["batched", "alone"])
async def test_corrupted_destination_copy_is_retryable_checksum_mismatch(
    threaded_storage: PosixStorage, replica: Callable[..., Path], monkeypatch: pytest.MonkeyPatch, size: int
) -> None:
    storage = threaded_storage
    previous = os.urandom(100)
    await storage.copy_verified(
        replica(previous, "prev"), "d/f.dat", expected_size=100, expected_adler32=adler(previous)
    )
    monkeypatch.setattr(copy_engine, "_kernel_copy", corrupting_copy)
    data = os.urandom(size)
    with pytest.raises(Retryable) as err:
        await storage.copy_verified(
            replica(data), "d/f.dat", expected_size=size, expected_adler32=adler(data), fsync=False
        )
    assert err.value.reason == "checksum_mismatch"
    assert err.value.message.startswith("destination copy of ")
    assert f"expected adler32 {adler(data)}" in err.value.message
    assert_side(err.value, DESTINATION_REASONS)
    assert leftovers(storage.root) == []
    # The replica an earlier attempt made is untouched: a failed copy never replaces it.
    assert storage.resolve("d/f.dat").read_bytes() == previous


async def test_truncated_destination_copy_is_checksum_mismatch(
    storage: PosixStorage, replica: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    def short_copy(src: int, dst: int, limit: int, cancelled: threading.Event) -> int:
        os.write(dst, os.read(src, 1000))
        os.lseek(src, 0, os.SEEK_END)  # and claim the end of the source was reached
        os.lseek(dst, 0, os.SEEK_END)
        return 1000

    monkeypatch.setattr(copy_engine, "_kernel_copy", short_copy)
    data = os.urandom(5000)
    with pytest.raises(Retryable) as err:
        await storage.copy_verified(replica(data), "f.dat", expected_size=5000, expected_adler32=adler(data))
    assert err.value.reason == "checksum_mismatch"
    assert "1000 bytes" in err.value.message
    assert leftovers(storage.root) == []


async def test_min_free_bytes_refuses_the_copy_before_writing(
    tmp_path: Path, replica: Callable[..., Path]
) -> None:
    data = os.urandom(4096)
    src = replica(data)
    storage = PosixStorage("tight", StorageEndpoint(root=tmp_path / "tight", min_free_bytes=2**62))
    with pytest.raises(Retryable) as err:
        await storage.copy_verified(src, "d/f.dat", expected_size=4096, expected_adler32=adler(data))
    assert err.value.reason == "disk_full"
    assert "min_free_bytes" in err.value.message
    assert_side(err.value, DESTINATION_REASONS)
    assert not (tmp_path / "tight").exists()  # not even the directories
    roomy = PosixStorage("roomy", StorageEndpoint(root=tmp_path / "roomy", min_free_bytes=1))
    assert (await roomy.copy_verified(src, "d/f.dat", expected_size=4096, expected_adler32=adler(data))).size
    storage.close()
    roomy.close()


async def test_min_free_bytes_counts_copies_in_progress(
    mount_tmpfs: Callable[..., Path], replica: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    # On a private tmpfs nobody else writes to, so free space is exactly what the copies leave.
    root = mount_tmpfs("reserve", "size=16m")
    free = os.statvfs(root).f_bavail * os.statvfs(root).f_frsize
    size = 2 * MiB
    # Room for one copy above the reserve, not for two.
    storage = PosixStorage("r", StorageEndpoint(root=root, min_free_bytes=free - 3 * MiB))
    data = os.urandom(size)
    src = replica(data)
    entered, release = threading.Event(), threading.Event()
    real_copy = kernel._kernel_copy

    def held_copy(s: int, d: int, limit: int, cancelled: threading.Event) -> int:
        entered.set()
        release.wait(10)
        return real_copy(s, d, limit, cancelled)

    monkeypatch.setattr(copy_engine, "_kernel_copy", held_copy)
    first = asyncio.create_task(
        storage.copy_verified(src, "a.dat", expected_size=size, expected_adler32=adler(data))
    )
    assert await asyncio.to_thread(entered.wait, 10)
    with pytest.raises(Retryable) as err:  # the first copy has not written a byte yet
        await storage.copy_verified(src, "b.dat", expected_size=size, expected_adler32=adler(data))
    assert err.value.reason == "disk_full"
    release.set()
    assert (await first).size == size
    storage.close()


async def test_full_file_system_is_disk_full_and_leaves_nothing(
    mount_tmpfs: Callable[..., Path], replica: Callable[..., Path]
) -> None:
    root = mount_tmpfs("small", "size=1m")
    storage = PosixStorage("small", root)
    data = os.urandom(2 * MiB)  # twice the file system
    with pytest.raises(Retryable) as err:
        await storage.copy_verified(
            replica(data), "night1/f.dat", expected_size=len(data), expected_adler32=adler(data)
        )
    assert err.value.reason == "disk_full"
    assert_side(err.value, DESTINATION_REASONS)
    assert leftovers(root) == []
    assert not storage.exists("night1/f.dat")
    # The space came back with the temporary file: a small copy fits afterwards.
    small = os.urandom(100 * 1024)
    result = await storage.copy_verified(
        replica(small, "small"), "night1/g.dat", expected_size=len(small), expected_adler32=adler(small)
    )
    assert result.path.read_bytes() == small
    storage.close()


@pytest.mark.parametrize("where", ["existing directory", "new directory"])
async def test_read_only_destination_is_destination_not_writable(
    mount_tmpfs: Callable[..., Path], replica: Callable[..., Path], where: str
) -> None:
    root = mount_tmpfs("ro", "size=1m")
    (root / "night1").mkdir()
    res = subprocess.run(["mount", "-o", "remount,ro", str(root)], capture_output=True)
    if res.returncode != 0:
        pytest.skip(f"remounting the tmpfs read-only is not permitted: {res.stderr.decode().strip()}")
    storage = PosixStorage("ro", root)
    data = os.urandom(200 * 1024)
    relpath = "night1/f.dat" if where == "existing directory" else "night2/f.dat"
    with pytest.raises(Retryable) as err:
        await storage.copy_verified(
            replica(data), relpath, expected_size=len(data), expected_adler32=adler(data)
        )
    assert err.value.reason == "destination_not_writable"
    assert_side(err.value, DESTINATION_REASONS)
    storage.close()


# --- the kernel copy and its fallback ----------------------------------------------------------


@pytest.mark.parametrize("code", [errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EIO])
async def test_copy_falls_back_to_read_write_where_the_kernel_copy_fails(
    storage: PosixStorage, replica: Callable[..., Path], monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    # The kernel copies the first 100,000 bytes, then refuses: the rest is copied by read/write
    # from where it stopped. (EIO too: copy_file_range does not say which side failed.)
    real = os.copy_file_range
    calls = 0

    def partial(src: int, dst: int, count: int) -> int:
        nonlocal calls
        calls += 1
        if calls == 1:
            return real(src, dst, min(count, 100_000))
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(kernel, "_copy_file_range", partial)
    data = os.urandom(3 * MiB + 5)
    result = await storage.copy_verified(
        replica(data), "f.dat", expected_size=len(data), expected_adler32=adler(data)
    )
    assert calls == 2
    assert result.path.read_bytes() == data


@pytest.mark.parametrize("fsync", [False, True], ids=["nofsync", "fsync"])
async def test_large_copy_starts_its_writeback_only_when_not_fsynced(
    storage: PosixStorage, replica: Callable[..., Path], monkeypatch: pytest.MonkeyPatch, fsync: bool
) -> None:
    # With fsync=False the caller syncs the batch later: a large copy starts writing back at once
    # so that sync has less left to do. With fsync=True the fsync does it; no hint then.
    calls: list[tuple[int, int, int, int]] = []

    def recording(fd: int, offset: int, nbytes: int, flags: int) -> int:
        calls.append((fd, offset, nbytes, flags))
        return 0

    monkeypatch.setattr(copy_engine, "_SYNC_FILE_RANGE", recording)
    monkeypatch.setattr(copy_engine, "EARLY_WRITEBACK_BYTES", MiB)
    small, large = os.urandom(MiB - 1), os.urandom(2 * MiB)
    for name, data in (("small", small), ("large", large)):
        res = await storage.copy_verified(
            replica(data, name), name, expected_size=len(data), expected_adler32=adler(data), fsync=fsync
        )
        assert res.path.read_bytes() == data
    assert [c[1:] for c in calls] == ([] if fsync else [(0, 0, kernel._SYNC_FILE_RANGE_WRITE)])


def test_adler32_in_use_agrees_with_zlib() -> None:
    # ISA-L's adler32 is used where the isal package is installed: same values, chaining included.
    data = os.urandom(3 * MiB + 17)
    value = 1
    for start in range(0, len(data), 700_001):
        value = kernel._adler32(data[start : start + 700_001], value)
    assert value == zlib.adler32(data)
    assert kernel._adler32(b"", 0xFFFFFFFF) == zlib.adler32(b"", 0xFFFFFFFF)


def test_copy_buffers_are_page_aligned() -> None:
    # The kernel copies page-cache pages into them: unaligned, that ran several times slower.
    buf = kernel._buffer(MiB)
    address = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    assert address % mmap.PAGESIZE == 0
    assert kernel._buffer(MiB) is buf  # reused by the thread


async def test_copy_works_without_copy_file_range(
    storage: PosixStorage, replica: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(kernel, "_copy_file_range", None)
    data = os.urandom(MiB + 1)
    result = await storage.copy_verified(
        replica(data), "f.dat", expected_size=len(data), expected_adler32=adler(data)
    )
    assert result.path.read_bytes() == data


async def test_kernel_copy_error_on_a_full_destination_is_not_retried_by_read_write(
    storage: PosixStorage, replica: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(src: int, dst: int, count: int) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(kernel, "_copy_file_range", full)
    data = os.urandom(MiB)
    with pytest.raises(Retryable) as err:
        await storage.copy_verified(
            replica(data), "f.dat", expected_size=len(data), expected_adler32=adler(data)
        )
    assert err.value.reason == "disk_full"
    assert leftovers(storage.root) == []


def test_kernel_copy_stops_when_cancelled(tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(b"x" * 1000)
    src = os.open(tmp_path / "a", os.O_RDONLY)
    dst = os.open(tmp_path / "b", os.O_WRONLY | os.O_CREAT)
    cancelled = threading.Event()
    cancelled.set()
    try:
        with pytest.raises(kernel._Aborted):
            kernel._kernel_copy(src, dst, 1000, cancelled)
    finally:
        os.close(src)
        os.close(dst)
    assert (tmp_path / "b").read_bytes() == b""


async def test_cancelled_copy_removes_its_temp_file(
    storage: PosixStorage, replica: Callable[..., Path], monkeypatch: pytest.MonkeyPatch, temp_kind: str
) -> None:
    real_copy = kernel._kernel_copy

    def slow_copy(src: int, dst: int, limit: int, cancelled: threading.Event) -> int:
        real_copy(src, dst, 1024, cancelled)
        while True:  # stands for a long copy: the loop checks the event between chunks
            if cancelled.is_set():
                raise kernel._Aborted()
            time.sleep(0.001)

    monkeypatch.setattr(copy_engine, "_kernel_copy", slow_copy)
    data = os.urandom(2 * MiB)
    task = asyncio.create_task(
        storage.copy_verified(replica(data), "big.dat", expected_size=len(data), expected_adler32=adler(data))
    )
    deadline = time.monotonic() + 10
    while not writing(storage.root):
        assert not task.done(), "copy finished before it could be cancelled"
        assert time.monotonic() < deadline
        await asyncio.sleep(0.001)
    assert bool(leftovers(storage.root)) == (temp_kind == "named")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert leftovers(storage.root) == [] and unnamed_files_open(storage.root) == []
    assert not storage.exists("big.dat")


# --- the request is wrong ----------------------------------------------------------------------


async def test_malformed_requests_are_permanent_and_copy_nothing(
    storage: PosixStorage, replica: Callable[..., Path]
) -> None:
    src = replica(b"data")
    ok = adler(b"data")
    cases = [
        ({"relpath": "f.dat", "expected_size": 4, "expected_adler32": "not-hex"}, "invalid_checksum"),
        ({"relpath": "f.dat", "expected_size": -1, "expected_adler32": ok}, "invalid_size"),
        ({"relpath": "../../etc/x", "expected_size": 4, "expected_adler32": ok}, "path_outside_area"),
    ]
    for kwargs, reason in cases:
        with pytest.raises(Permanent) as err:
            await storage.copy_verified(src, **kwargs)  # type: ignore[arg-type]
        assert err.value.reason == reason
        assert_side(err.value, REQUEST_REASONS)
    assert not storage.root.exists()


def test_reason_sets_do_not_overlap() -> None:
    assert not SOURCE_REASONS & DESTINATION_REASONS
    assert not REQUEST_REASONS & (SOURCE_REASONS | DESTINATION_REASONS)
    assert {"source_missing", "source_corrupt", "source_io_error"} <= SOURCE_REASONS
    assert {"destination_not_writable", "disk_full", "storage_io_error", "checksum_mismatch"} <= (
        DESTINATION_REASONS
    )


# --- verify ------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [1000, 3 * MiB], ids=["inline", "thread"])
async def test_verify_describes_what_is_wrong(
    storage: PosixStorage, replica: Callable[..., Path], size: int
) -> None:
    data = os.urandom(size)
    res = await storage.copy_verified(
        replica(data), "d/f.dat", expected_size=size, expected_adler32=adler(data)
    )
    ok = adler(data)
    assert await storage.verify(res.pfn, expected_size=size, expected_adler32=ok) is None
    assert await storage.verify(res.pfn, expected_size=size, expected_adler32=ok.lstrip("0").upper()) is None
    assert await storage.verify("d/other.dat", expected_size=size, expected_adler32=ok) == "missing"
    assert await storage.verify("d/f.dat/x", expected_size=size, expected_adler32=ok) == "missing"
    assert (
        await storage.verify(res.pfn, expected_size=size + 1, expected_adler32=ok)
        == f"size {size} != {size + 1}"
    )
    wrong = "00000001"
    assert (
        await storage.verify(res.pfn, expected_size=size, expected_adler32=wrong)
        == f"adler32 {ok} != {wrong}"
    )
    assert await storage.verify("d", expected_size=size, expected_adler32=ok) == "not a regular file"
    with pytest.raises(Permanent) as err:
        await storage.verify(res.pfn, expected_size=size, expected_adler32="zz")
    assert err.value.reason == "invalid_checksum"


# --- many copies at once (a bulk request) ------------------------------------------------------


@pytest.mark.parametrize("mode", ["process", "thread"])
async def test_copy_verified_many_answers_each_copy_and_raises_for_none(tmp_path: Path, mode: str) -> None:
    """Good copies land verified; each bad one is answered with the error ``copy_verified`` would
    raise, classified by side, and nothing is left under a temporary name."""
    storage = PosixStorage("disk2", StorageEndpoint(root=tmp_path / "disk2", small_copies=mode))
    source_root = tmp_path / "disk1"
    (source_root / "night1").mkdir(parents=True)
    outside = tmp_path / "elsewhere.dat"
    outside.write_bytes(b"secret")
    blobs = {f"night1/f{i}.dat": os.urandom(1000 + i) for i in range(150)}  # more than one batch
    for name, data in blobs.items():
        (source_root / name).write_bytes(data)
    (source_root / "night1" / "inside-link.dat").symlink_to(source_root / "night1" / "f0.dat")
    (source_root / "night1" / "outside-link.dat").symlink_to(outside)
    good = [posix.ReplicaCopy(str(source_root), n, f"copy/{n}", len(d), adler(d)) for n, d in blobs.items()]
    f0 = blobs["night1/f0.dat"]
    bad = {
        "missing": posix.ReplicaCopy(str(source_root), "night1/nope.dat", "copy/nope", 1, "00000001"),
        "escapes": posix.ReplicaCopy(
            str(source_root), "../elsewhere.dat", "copy/escapes", 6, adler(b"secret")
        ),
        "link out": posix.ReplicaCopy(
            str(source_root), "night1/outside-link.dat", "copy/out", 6, adler(b"secret")
        ),
        "wrong sum": posix.ReplicaCopy(str(source_root), "night1/f1.dat", "copy/wrong", 1001, "00000001"),
        "dest escapes": posix.ReplicaCopy(
            str(source_root), "night1/f2.dat", "../../x", 1002, adler(blobs["night1/f2.dat"])
        ),
    }
    linked = posix.ReplicaCopy(str(source_root), "night1/inside-link.dat", "copy/linked", len(f0), adler(f0))
    try:
        outcomes = await storage.copy_verified_many([*good, *bad.values(), linked])
    finally:
        storage.close()
    for copy, out in zip(good, outcomes, strict=False):
        assert isinstance(out, CopyResult) and out.pfn == copy.relpath
        assert (storage.root / copy.relpath).read_bytes() == blobs[copy.source_pfn]
    errors = dict(zip(bad, outcomes[len(good) : len(good) + len(bad)], strict=True))
    assert {k: (type(e).__name__, e.reason) for k, e in errors.items()} == {  # type: ignore[union-attr]
        "missing": ("Permanent", "source_missing"),
        "escapes": ("Permanent", "source_corrupt"),
        "link out": ("Permanent", "source_corrupt"),
        "wrong sum": ("Permanent", "source_corrupt"),
        "dest escapes": ("Permanent", "path_outside_area"),
    }
    assert "outside" in errors["escapes"].message  # type: ignore[union-attr]
    # Issue 16: a symlink in the source endpoint is never followed, even one pointing inside it.
    assert (type(outcomes[-1]).__name__, outcomes[-1].reason) == ("Permanent", "source_corrupt")  # type: ignore[union-attr]
    assert not (storage.root / "copy/linked").exists()
    assert not (tmp_path / "x").exists() and not (storage.root / "copy" / "out").exists()
    assert leftovers(storage.root) == []


async def test_copy_verified_many_replaces_a_symlink_at_the_destination(
    storage: PosixStorage, tmp_path: Path
) -> None:
    """The destination's last component is renamed onto: a symlink planted there is replaced,
    its target (outside the endpoint) untouched."""
    victim = tmp_path / "victim.dat"
    victim.write_bytes(b"keep me")
    (storage.root / "copy").mkdir(parents=True)
    (storage.root / "copy" / "f.dat").symlink_to(victim)
    src = tmp_path / "disk1" / "f.dat"
    src.parent.mkdir()
    src.write_bytes(b"new bytes")
    [out] = await storage.copy_verified_many(
        [posix.ReplicaCopy(str(src.parent), "f.dat", "copy/f.dat", 9, adler(b"new bytes"))]
    )
    assert isinstance(out, CopyResult)
    assert not (storage.root / "copy" / "f.dat").is_symlink()
    assert (storage.root / "copy" / "f.dat").read_bytes() == b"new bytes"
    assert victim.read_bytes() == b"keep me"


async def test_copy_verified_many_refuses_a_copy_that_is_not_small(
    storage: PosixStorage, tmp_path: Path
) -> None:
    big = storage.endpoint.batch_copy_bytes + 1
    with pytest.raises(ValueError, match="not a small copy"):
        await storage.copy_verified_many([posix.ReplicaCopy(str(tmp_path), "f", "f", big, "00000001")])


async def test_copy_verified_many_detects_a_corrupted_destination_copy(
    threaded_storage: PosixStorage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bytes that land wrong (injected where every replication copy moves them) are caught by the
    read-back, whichever way the copy went: checksum_mismatch, the destination's fault."""
    real_copy = kernel._kernel_copy

    def corrupting_copy(src: int, dst: int, limit: int, cancelled: threading.Event) -> int:
        n = real_copy(src, dst, limit, cancelled)
        os.pwrite(dst, b"\xff", 0)
        return n

    monkeypatch.setattr(copy_engine, "_kernel_copy", corrupting_copy)
    source = tmp_path / "disk1"
    source.mkdir()
    (source / "f.dat").write_bytes(b"\x00" * 1000)
    [out] = await threaded_storage.copy_verified_many(
        [posix.ReplicaCopy(str(source), "f.dat", "copy/f.dat", 1000, adler(b"\x00" * 1000))]
    )
    assert isinstance(out, Retryable) and out.reason == "checksum_mismatch"
    assert_side(out, DESTINATION_REASONS)
    assert not (threaded_storage.root / "copy" / "f.dat").exists()
    assert leftovers(threaded_storage.root) == []
