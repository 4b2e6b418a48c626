"""The posix storage backend against real files: confinement, verified atomic copies, error classes.

Unwritable destinations are produced for real, not mocked. Tests run as root here, and root ignores
permission bits, so each cause of "not writable" gets its own genuine mechanism:

- EACCES: a ``chmod 0o555`` directory. As root, the copy runs in a child process started through
  ``setpriv --bounding-set -dac_override,-dac_read_search``, i.e. root without the capability that
  bypasses permission bits, so the kernel really answers EACCES.
- EROFS: a tmpfs mounted read-only (root only).
- EPERM: a directory made immutable with ``chattr +i`` (root, ext4 and similar).
- ENOSPC: a 64 KiB tmpfs (root only).
Each skips with its reason where the mechanism is unavailable.
"""

# The temp_kind fixture, imported from storage_fixtures, reappears as a test parameter:
# ruff: noqa: F811

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from common.config import StorageEndpoint
from common.errors import Permanent, Retryable
from common.storage import (
    CopyResult,
    PosixStorage,
    Storage,
    adler32_of_file,
    is_temp_name,
    normalise_adler32,
    open_storage,
    resolve_inside,
    tempfiles,
)
from common.storage.tempfiles import temp_name_for
from tests.storage_fixtures import adler, leftovers, temp_kind, unnamed_files_open, writing  # noqa: F401

IS_ROOT = os.geteuid() == 0
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def area(tmp_path: Path) -> Path:
    d = tmp_path / "area"
    d.mkdir()
    return d


@pytest.fixture
def storage(tmp_path: Path) -> Iterator[PosixStorage]:
    s = PosixStorage("disk1", tmp_path / "disk1")
    yield s
    s.close()


@pytest.fixture
def make_source(tmp_path: Path) -> Callable[[bytes, str], Path]:
    src_dir = tmp_path / "landing"
    src_dir.mkdir()

    def make(data: bytes, name: str = "file.dat") -> Path:
        p = src_dir / name
        p.write_bytes(data)
        return p

    return make


# --- confinement -----------------------------------------------------------------------------


def test_dotdot_traversal_is_path_outside_area(area: Path) -> None:
    with pytest.raises(Permanent) as err:
        resolve_inside(area, "../../etc/passwd")
    assert err.value.reason == "path_outside_area"
    assert "../../etc/passwd" in err.value.message


def test_absolute_path_elsewhere_is_path_outside_area(area: Path) -> None:
    with pytest.raises(Permanent) as err:
        resolve_inside(area, "/etc/passwd")
    assert err.value.reason == "path_outside_area"


def test_sibling_sharing_the_name_prefix_is_path_outside_area(area: Path) -> None:
    sibling = area.parent / (area.name + "2")
    sibling.mkdir()
    with pytest.raises(Permanent) as err:
        resolve_inside(area, sibling / "x")
    assert err.value.reason == "path_outside_area"


def test_symlink_escaping_the_area_is_path_outside_area(area: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("x")
    (area / "link").symlink_to(outside)
    # Issue 16: names are checked lexically; the symlink is refused when the file is opened
    # (common.storage.confined), with no cache of an earlier check to trust.
    assert resolve_inside(area, "link/secret") == area / "link" / "secret"
    with pytest.raises(Permanent) as err:
        adler32_of_file(resolve_inside(area, "link/secret"))
    assert err.value.reason == "path_outside_area"


def test_nul_byte_is_path_outside_area(area: Path) -> None:
    with pytest.raises(Permanent) as err:
        resolve_inside(area, "run1/file\x00.fits")
    assert err.value.reason == "path_outside_area"


def test_paths_inside_the_area_resolve_to_absolute_real_paths(area: Path, tmp_path: Path) -> None:
    (area / "night1").mkdir()
    (area / "alias").symlink_to(area / "night1")
    assert resolve_inside(area, "night1/a.fits") == area / "night1" / "a.fits"
    assert resolve_inside(area, area / "night1" / "a.fits") == area / "night1" / "a.fits"
    # Issue 16: a name only (the open refuses the symlink); '..' is refused outright.
    assert resolve_inside(area, "alias/a.fits") == area / "alias" / "a.fits"
    with pytest.raises(Permanent) as err:
        resolve_inside(area, "night1/../b.fits")
    assert err.value.reason == "path_outside_area"
    # A root that is itself a symlink (a mount point alias) still confines correctly.
    link_root = tmp_path / "area-link"
    link_root.symlink_to(area)
    assert resolve_inside(link_root, str(link_root / "night1" / "a.fits")) == area / "night1" / "a.fits"


def test_storage_refuses_the_root_itself_and_escapes(storage: PosixStorage) -> None:
    for bad in ("", ".", "a/..", "../disk2/x", "/etc/passwd"):
        with pytest.raises(Permanent) as err:
            storage.resolve(bad)
        assert err.value.reason == "path_outside_area", bad


async def test_put_from_outside_the_endpoint_copies_nothing(
    storage: PosixStorage, make_source: Callable[..., Path], tmp_path: Path
) -> None:
    src = make_source(b"data")
    with pytest.raises(Permanent) as err:
        await storage.put_from(src, "../escaped.dat")
    assert err.value.reason == "path_outside_area"
    assert not (tmp_path / "escaped.dat").exists()


# --- checksums -------------------------------------------------------------------------------


def test_adler32_of_file_matches_zlib_across_chunks(tmp_path: Path) -> None:
    data = os.urandom(3 * 1024 * 1024 + 17)
    (tmp_path / "f").write_bytes(data)
    (tmp_path / "empty").write_bytes(b"")
    assert adler32_of_file(tmp_path / "f") == adler(data)
    assert adler32_of_file(tmp_path / "f", chunk_size=4096) == adler(data)
    assert adler32_of_file(tmp_path / "empty") == "00000001"


def test_threads_checksumming_at_once_each_get_their_own_buffer_and_the_right_sum(tmp_path: Path) -> None:
    """The copy buffer is kept per thread: concurrent checksums never share one, and each is right."""
    from concurrent.futures import ThreadPoolExecutor

    from common.storage.checksum import chunk_buffer

    files = []
    for n in range(8):
        data = os.urandom(2 * 1024 * 1024 + n * 4099)
        (tmp_path / f"f{n}").write_bytes(data)
        files.append((tmp_path / f"f{n}", adler(data)))

    def checksum_twice(item: tuple[Path, str]) -> tuple[bool, int]:
        first = adler32_of_file(item[0]) == item[1] and adler32_of_file(item[0]) == item[1]
        return first, id(chunk_buffer())

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(checksum_twice, files * 4))
    assert all(ok for ok, _ in results)
    assert 1 < len({buf for _, buf in results}) <= 4  # one buffer per thread, made once


def test_checksums_from_outside_are_normalised() -> None:
    assert normalise_adler32("1A2b") == "00001a2b"
    assert normalise_adler32("0xDEADBEEF") == "deadbeef"
    with pytest.raises(ValueError):
        normalise_adler32("xyz")


# --- verified copies -------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1024, 5 * 1024 * 1024], ids=["0B", "1KiB", "5MiB"])
async def test_copy_is_verified_and_lands_under_its_final_name(
    storage: PosixStorage, make_source: Callable[..., Path], size: int
) -> None:
    data = os.urandom(size)
    src = make_source(data)
    result = await storage.put_from(
        src, "night1/run000042/file.dat", expected_size=size, expected_adler32=adler(data)
    )
    assert result == CopyResult(
        pfn="night1/run000042/file.dat",
        location=str(storage.resolve("night1/run000042/file.dat")),
        size=size,
        adler32=adler(data),
        sha256=hashlib.sha256(data).hexdigest(),  # the same read pass as adler32
    )
    assert result.path.read_bytes() == data
    assert storage.exists(result.pfn) and storage.size_of(result.pfn) == size
    assert await storage.checksum(result.pfn) == adler(data)
    assert leftovers(storage.root) == []


async def test_copy_without_expectations_reports_what_it_copied(
    storage: PosixStorage, make_source: Callable[..., Path]
) -> None:
    data = os.urandom(10_000)
    result = await storage.put_from(make_source(data), "a/./c.dat", fsync=False)
    assert (result.pfn, result.size, result.adler32) == ("a/c.dat", 10_000, adler(data))


async def test_expected_checksum_in_another_spelling_is_accepted(
    storage: PosixStorage, make_source: Callable[..., Path]
) -> None:
    data = b"\x00" * 10
    want = adler(data)  # "000a0001": leading zero dropped and upper-cased below
    result = await storage.put_from(make_source(data), "z.dat", expected_adler32=want.lstrip("0").upper())
    assert result.adler32 == want


async def test_malformed_expected_checksum_is_permanent(
    storage: PosixStorage, make_source: Callable[..., Path]
) -> None:
    with pytest.raises(Permanent) as err:
        await storage.put_from(make_source(b"x"), "x.dat", expected_adler32="not-hex")
    assert err.value.reason == "invalid_checksum"


async def test_copy_replaces_an_existing_replica_atomically(
    storage: PosixStorage, make_source: Callable[..., Path]
) -> None:
    await storage.put_from(make_source(b"old", "old"), "f.dat")
    result = await storage.put_from(make_source(b"new contents", "new"), "f.dat")
    assert result.path.read_bytes() == b"new contents"
    assert leftovers(storage.root) == []


async def test_size_mismatch_leaves_no_temp_and_no_final_file(
    storage: PosixStorage, make_source: Callable[..., Path]
) -> None:
    data = os.urandom(2048)
    with pytest.raises(Permanent) as err:
        await storage.put_from(make_source(data), "d/f.dat", expected_size=2047, expected_adler32=adler(data))
    assert err.value.reason == "size_mismatch"
    assert "file.dat" in err.value.message
    assert not storage.exists("d/f.dat")
    assert leftovers(storage.root) == []


async def test_checksum_mismatch_leaves_no_temp_and_no_final_file(
    storage: PosixStorage, make_source: Callable[..., Path]
) -> None:
    data = os.urandom(3 * 1024 * 1024)
    with pytest.raises(Permanent) as err:
        await storage.put_from(
            make_source(data), "d/f.dat", expected_size=len(data), expected_adler32="00000001"
        )
    assert err.value.reason == "checksum_mismatch"
    assert adler(data) in err.value.message
    assert not storage.exists("d/f.dat")
    assert leftovers(storage.root) == []


async def test_missing_source_is_file_missing(storage: PosixStorage, tmp_path: Path) -> None:
    with pytest.raises(Permanent) as err:
        await storage.put_from(tmp_path / "nope.dat", "x.dat")
    assert err.value.reason == "file_missing"
    assert "nope.dat" in err.value.message


@pytest.mark.parametrize("kind", ["directory", "fifo", "symlink"])
async def test_source_that_is_not_a_regular_file_is_not_a_file(
    storage: PosixStorage, make_source: Callable[..., Path], tmp_path: Path, kind: str
) -> None:
    src = tmp_path / "odd"
    if kind == "directory":
        src.mkdir()
    elif kind == "fifo":
        os.mkfifo(src)  # opening it must not block waiting for a writer
    else:
        src.symlink_to(make_source(b"x"))
    with pytest.raises(Permanent) as err:
        await asyncio.wait_for(storage.put_from(src, "x.dat"), timeout=5)
    # Issue 16: a symlink is refused as one on the path (common.storage.confined).
    assert err.value.reason == ("path_outside_area" if kind == "symlink" else "not_a_file")
    assert leftovers(storage.root) == []


async def test_source_read_error_is_retryable_source_io_error(storage: PosixStorage) -> None:
    # /proc/self/mem is a regular file whose first page (address 0, never mapped) reads as EIO.
    with pytest.raises(Retryable) as err:
        await storage.put_from(Path(f"/proc/{os.getpid()}/mem"), "mem.dat")  # /proc/self: a link
    assert err.value.reason == "source_io_error"
    assert not storage.exists("mem.dat")
    assert leftovers(storage.root) == []


async def test_destination_under_a_file_is_retryable_storage_io_error(
    storage: PosixStorage, make_source: Callable[..., Path]
) -> None:
    # ENOTDIR: a plain file sits where a directory of the destination path should be.
    await storage.put_from(make_source(b"x", "a"), "night1")
    with pytest.raises(Retryable) as err:
        await storage.put_from(make_source(b"y", "b"), "night1/f.dat")
    assert err.value.reason == "storage_io_error"
    assert "night1" in err.value.message


# --- unwritable and full destinations --------------------------------------------------------

_CHILD_COPY = """
import asyncio, json, sys
from pathlib import Path
from common.errors import SpoolError
from common.storage import PosixStorage, is_temp_name

async def main():
    root = Path(sys.argv[1])
    try:
        await PosixStorage("ro", root).put_from(Path(sys.argv[2]), "night1/f.dat")
        out = {"ok": True}
    except SpoolError as exc:
        out = {"ok": False, "class": type(exc).__name__, "reason": exc.reason, "message": exc.message}
    out["leftovers"] = [p.name for p in root.rglob("*") if is_temp_name(p.name)]
    print(json.dumps(out))

asyncio.run(main())
"""


def test_directory_without_write_permission_is_destination_not_writable(
    tmp_path: Path, make_source: Callable[..., Path]
) -> None:
    root = tmp_path / "ro"
    (root / "night1").mkdir(parents=True)
    src = make_source(os.urandom(4096))
    (root / "night1").chmod(0o555)
    try:
        if IS_ROOT:
            # Root bypasses permission bits through CAP_DAC_OVERRIDE; drop it for a child process.
            setpriv = shutil.which("setpriv")
            if setpriv is None:
                pytest.skip("running as root and setpriv is not available to drop CAP_DAC_OVERRIDE")
            cmd = [setpriv, "--bounding-set", "-dac_override,-dac_read_search", "--"]
        else:
            cmd = []
        cmd += [sys.executable, "-c", _CHILD_COPY, str(root), str(src)]
        res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=60)
        assert res.returncode == 0, res.stderr
        out = json.loads(res.stdout)
    finally:
        (root / "night1").chmod(0o755)
    assert out["ok"] is False
    assert (out["class"], out["reason"]) == ("Retryable", "destination_not_writable")
    assert "night1" in out["message"]
    assert out["leftovers"] == []


async def test_read_only_file_system_is_destination_not_writable(
    mount_tmpfs: Callable[..., Path], make_source: Callable[..., Path]
) -> None:
    root = mount_tmpfs("ro", "ro")
    storage = PosixStorage("ro", root)
    with pytest.raises(Retryable) as err:
        await storage.put_from(make_source(b"data"), "night1/f.dat")
    assert err.value.reason == "destination_not_writable"
    storage.close()


@pytest.fixture
def immutable_dir(tmp_path: Path) -> Iterator[Path]:
    """An empty directory nobody, root included, may add entries to (``chattr +i``)."""
    root = tmp_path / "immutable"
    root.mkdir()
    chattr = shutil.which("chattr")
    if not IS_ROOT or chattr is None:
        pytest.skip("chattr +i needs root and the chattr tool")
    res = subprocess.run([chattr, "+i", str(root)], capture_output=True)
    if res.returncode != 0:
        pytest.skip(f"chattr +i unsupported on this file system: {res.stderr.decode().strip()}")
    yield root
    subprocess.run([chattr, "-i", str(root)], check=True)


async def test_immutable_directory_is_destination_not_writable(
    immutable_dir: Path, make_source: Callable[..., Path]
) -> None:
    storage = PosixStorage("imm", immutable_dir)
    with pytest.raises(Retryable) as err:
        await storage.put_from(make_source(b"data"), "night1/f.dat")
    assert err.value.reason == "destination_not_writable"
    assert os.listdir(immutable_dir) == []
    storage.close()


async def test_full_file_system_is_disk_full_and_leaves_nothing(
    mount_tmpfs: Callable[..., Path], make_source: Callable[..., Path]
) -> None:
    root = mount_tmpfs("small")
    storage = PosixStorage("small", root)
    data = os.urandom(256 * 1024)  # four times the 64 KiB file system
    with pytest.raises(Retryable) as err:
        await storage.put_from(make_source(data), "night1/f.dat", expected_adler32=adler(data))
    assert err.value.reason == "disk_full"
    assert leftovers(root) == []
    assert not storage.exists("night1/f.dat")
    # Space came back with the temp file: a small file fits afterwards.
    assert (await storage.put_from(make_source(b"ok", "small"), "night1/g.dat")).size == 2
    storage.close()


# --- housekeeping ----------------------------------------------------------------------------


def test_temp_names_are_recognisable() -> None:
    name = temp_name_for("cta.20240101.run000042.dl0.fits")
    assert is_temp_name(name) and name.startswith(".cta.")
    assert len(temp_name_for("x" * 255)) <= 255
    for ordinary in ("file.fits", ".hidden", ".f.spool-tmp-", "f.spool-tmp-0123456789ab", ".f.spool-tmp-xyz"):
        assert not is_temp_name(ordinary), ordinary


def test_cleanup_temp_removes_leftovers_only(storage: PosixStorage) -> None:
    (storage.root / "a" / "b").mkdir(parents=True)
    keep = [storage.root / "a" / "f.fits", storage.root / "a" / ".hidden"]
    junk = [
        storage.root / temp_name_for("x"),
        storage.root / "a" / temp_name_for("f.fits"),
        storage.root / "a" / "b" / temp_name_for("g.fits"),
    ]
    for p in keep + junk:
        p.write_bytes(b"partial")
    assert storage.cleanup_temp() == 3
    assert all(p.exists() for p in keep)
    assert not any(p.exists() for p in junk)


def test_cleanup_temp_spares_recent_temp_files_when_asked(storage: PosixStorage) -> None:
    storage.root.mkdir()
    old, fresh = storage.root / temp_name_for("old"), storage.root / temp_name_for("fresh")
    old.write_bytes(b"")
    fresh.write_bytes(b"")
    an_hour_ago = time.time() - 3600
    os.utime(old, (an_hour_ago, an_hour_ago))
    assert storage.cleanup_temp(older_than=600) == 1
    assert fresh.exists() and not old.exists()


def test_cleanup_temp_on_a_missing_root_is_zero(tmp_path: Path) -> None:
    assert PosixStorage("none", tmp_path / "missing").cleanup_temp() == 0


async def test_cancelled_copy_removes_its_temp_file(
    tmp_path: Path, make_source: Callable[..., Path], temp_kind: str
) -> None:
    storage = PosixStorage("slow", tmp_path / "slow", chunk_size=4096)  # many chunks: time to cancel
    src = make_source(os.urandom(64 * 1024 * 1024))
    task = asyncio.create_task(storage.put_from(src, "big.dat", fsync=False))
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
    storage.close()


async def test_delete_is_idempotent(storage: PosixStorage, make_source: Callable[..., Path]) -> None:
    await storage.put_from(make_source(b"x"), "d/f.dat")
    assert await storage.delete("d/f.dat") is True
    assert await storage.delete("d/f.dat") is False
    assert not storage.exists("d/f.dat")
    with pytest.raises(Permanent) as err:
        await storage.delete("d")
    assert err.value.reason == "not_a_file"


async def test_inspecting_a_missing_replica_is_file_missing(storage: PosixStorage) -> None:
    storage.root.mkdir()
    assert storage.exists("nope") is False
    with pytest.raises(Permanent) as err:
        storage.size_of("nope")
    assert err.value.reason == "file_missing"
    with pytest.raises(Permanent) as err:
        await storage.checksum("nope")
    assert err.value.reason == "file_missing"


def test_free_bytes_reports_the_file_system(storage: PosixStorage) -> None:
    storage.root.mkdir()
    st = os.statvfs(storage.root)
    assert storage.free_bytes() == st.f_bavail * st.f_frsize > 0


def test_free_bytes_of_a_missing_root_is_retryable(tmp_path: Path) -> None:
    with pytest.raises(Retryable) as err:
        PosixStorage("gone", tmp_path / "unmounted").free_bytes()
    assert err.value.reason == "storage_io_error"


async def test_one_hundred_concurrent_copies_are_all_verified(
    storage: PosixStorage, make_source: Callable[..., Path]
) -> None:
    blobs = [os.urandom(i * 997 % 70_000) for i in range(100)]
    sources = [make_source(b, f"f{i:03d}.dat") for i, b in enumerate(blobs)]
    results = await asyncio.gather(
        *(
            storage.put_from(
                src, f"night1/run{i % 7}/f{i:03d}.dat", expected_size=len(b), expected_adler32=adler(b)
            )
            for i, (src, b) in enumerate(zip(sources, blobs, strict=True))
        )
    )
    for i, (res, b) in enumerate(zip(results, blobs, strict=True)):
        assert res.pfn == f"night1/run{i % 7}/f{i:03d}.dat"
        assert res.path.read_bytes() == b
    checks = await asyncio.gather(*(storage.checksum(r.pfn) for r in results))
    assert checks == [adler(b) for b in blobs]
    assert leftovers(storage.root) == []


# --- factory ---------------------------------------------------------------------------------


def test_open_storage_builds_a_posix_disk_endpoint(tmp_path: Path) -> None:
    ep = StorageEndpoint(root=tmp_path / "d", attributes={"site": "PIC"})
    s = open_storage("disk1", ep)
    assert isinstance(s, PosixStorage) and isinstance(s, Storage)
    assert (s.name, s.kind, s.root, s.attributes) == ("disk1", "disk", tmp_path / "d", {"site": "PIC"})


def test_open_storage_refuses_unknown_backends_and_tape(tmp_path: Path) -> None:
    odd = StorageEndpoint.model_construct(kind="disk", backend="s3", root=tmp_path, attributes={})
    tape = StorageEndpoint(kind="tape", root=tmp_path)
    for ep in (odd, tape):
        with pytest.raises(Permanent) as err:
            open_storage("x", ep)
        assert err.value.reason == "unknown_storage"


async def test_sync_flushes_the_endpoint_file_system_without_error(tmp_path: Path) -> None:
    storage = PosixStorage("d", tmp_path / "root")
    src = tmp_path / "src.bin"
    src.write_bytes(b"group commit")
    result = await storage.put_from(src, "a/b.bin", fsync=False)
    await storage.sync()  # syncfs of the root's file system: the batch is durable after this
    assert (tmp_path / "root" / result.pfn).read_bytes() == b"group commit"
    storage.close()


async def test_small_file_copied_in_a_batch_is_verified_like_any_other(tmp_path: Path) -> None:
    # The former spelling of the setting is still read.
    storage = PosixStorage("d", StorageEndpoint(root=tmp_path / "root", inline_copy_bytes=1024))
    assert storage.endpoint.batch_copy_bytes == 1024
    src = tmp_path / "small.bin"
    src.write_bytes(b"x" * 100)
    with pytest.raises(Permanent) as err:
        await storage.put_from(src, "s.bin", expected_size=100, expected_adler32="00000001")
    assert err.value.reason == "checksum_mismatch"
    assert not list((tmp_path / "root").rglob("*spool-tmp*"))
    storage.close()


async def test_small_copies_batched_together_fail_one_by_one(tmp_path: Path) -> None:
    """Concurrent small copies share worker-thread hand-offs; a bad one fails alone, with its reason."""
    storage = PosixStorage("d", StorageEndpoint(root=tmp_path / "root", batch_copy_bytes=4096))
    sources = []
    for i in range(200):
        src = tmp_path / "in" / f"f{i}.bin"
        src.parent.mkdir(exist_ok=True)
        data = os.urandom(100 + i)
        src.write_bytes(data)
        sources.append((src, len(data), f"{zlib.adler32(data) & 0xFFFFFFFF:08x}"))
    bad = {17: "size", 90: "checksum"}

    async def copy(i: int) -> object:
        src, size, adler = sources[i]
        if bad.get(i) == "size":
            size += 1
        if bad.get(i) == "checksum":
            adler = "00000001"
        return await storage.put_from(
            src, f"out/f{i}.bin", expected_size=size, expected_adler32=adler, fsync=False
        )

    results = await asyncio.gather(*(copy(i) for i in range(200)), return_exceptions=True)
    failed = {i: r for i, r in enumerate(results) if isinstance(r, BaseException)}
    assert {i: getattr(r, "reason", r) for i, r in failed.items()} == {
        17: "size_mismatch",
        90: "checksum_mismatch",
    }
    for i, (src, _, _) in enumerate(sources):
        copied = tmp_path / "root" / "out" / f"f{i}.bin"
        assert copied.exists() == (i not in bad)
        if i not in bad:
            assert copied.read_bytes() == src.read_bytes()
    assert not list((tmp_path / "root").rglob("*spool-tmp*"))
    storage.close()


def test_a_forked_child_links_through_its_own_proc_fd_directory() -> None:
    """The descriptor of /proc/self/fd names the process that opened it: a forked child (that
    then copies files) must open its own, or it would link its parent's descriptors."""
    assert tempfiles._proc_fds() is not None
    pid = os.fork()
    if pid == 0:  # the child: report through the exit code only
        os._exit(0 if tempfiles._proc_fd_dir is None else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert tempfiles._proc_fd_dir is not None  # the parent keeps its own
