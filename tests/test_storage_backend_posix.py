"""The posix backend through the shared interface (``common.storage.interface.StorageBackend``),
against real files: what every backend promises (confined paths, verified atomic copies, None for
a missing file, classified errors), served by the posix backend's own copy code."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from common.errors import Permanent
from common.storage import PosixStorage
from common.storage.interface import CopyDone, ListedFile, ObjectStat, StorageBackend
from common.storage.tempfiles import temp_name_for
from tests.storage_fixtures import adler, leftovers, unnamed_files_open


@pytest.fixture
async def storage(tmp_path: Path) -> AsyncIterator[PosixStorage]:
    s = PosixStorage("disk1", tmp_path / "disk1")
    s.root.mkdir()
    yield s
    await s.aclose()


@pytest.fixture
async def other(tmp_path: Path) -> AsyncIterator[PosixStorage]:
    s = PosixStorage("disk2", tmp_path / "disk2")
    s.root.mkdir()
    yield s
    await s.aclose()


def put(storage: PosixStorage, relpath: str, data: bytes) -> Path:
    path = storage.root / relpath
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


async def listing(storage: PosixStorage, prefix: str = "") -> list[ListedFile]:
    return [f async for f in storage.list(prefix)]


def test_the_posix_backend_is_a_storage_backend_of_scheme_file(storage: PosixStorage) -> None:
    assert isinstance(storage, StorageBackend)
    assert storage.scheme == "file"
    assert storage.can_pull_from(storage)


def test_url_names_the_file_below_the_root_without_touching_it(storage: PosixStorage) -> None:
    assert storage.url("night1/a.fits") == f"file://{storage.root}/night1/a.fits"
    assert storage.url("night1/../b.fits") == f"file://{storage.root}/b.fits"
    assert not (storage.root / "night1").exists()
    for bad in ("../escape", "/etc/passwd", ".", "a\x00b"):
        with pytest.raises(Permanent) as err:
            storage.url(bad)
        assert err.value.reason == "path_outside_area"


async def test_local_path_is_the_confined_real_path(storage: PosixStorage, tmp_path: Path) -> None:
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "x.dat").write_bytes(b"x")
    (storage.root / "out").symlink_to(tmp_path / "elsewhere")
    assert storage.local_path("a/b.dat") == storage.root.resolve() / "a" / "b.dat"
    # Issue 16: a name (checked lexically); the symlink is refused when the file is opened.
    with pytest.raises(Permanent) as err:
        storage.local_path("../x.dat")
    assert err.value.reason == "path_outside_area"
    with pytest.raises(Permanent) as err:
        await storage.stat("out/x.dat")
    assert err.value.reason == "path_outside_area"


async def test_stat_gives_size_and_on_request_the_adler32_read_back(storage: PosixStorage) -> None:
    data = os.urandom(3 * 1024 * 1024 + 17)
    put(storage, "night1/f.dat", data)
    assert await storage.stat("night1/f.dat") == ObjectStat(len(data))
    assert await storage.stat("night1/f.dat", checksum=True) == ObjectStat(len(data), adler(data))
    assert await storage.stat("night1/empty.dat") is None
    assert await storage.stat("nowhere/f.dat", checksum=True) is None


async def test_stat_of_a_directory_is_not_a_file_and_of_an_escape_path_outside_area(
    storage: PosixStorage,
) -> None:
    (storage.root / "night1").mkdir()
    with pytest.raises(Permanent) as err:
        await storage.stat("night1")
    assert err.value.reason == "not_a_file"
    with pytest.raises(Permanent) as err:
        await storage.stat("../disk2/f.dat")
    assert err.value.reason == "path_outside_area"


async def test_upload_lands_verified_under_its_final_name(storage: PosixStorage, tmp_path: Path) -> None:
    data = os.urandom(200_000)
    local = tmp_path / "landing.dat"
    local.write_bytes(data)
    done = await storage.upload(local, "night1/run1/f.dat", size=len(data), adler32=adler(data).upper())
    assert done == CopyDone("night1/run1/f.dat", len(data), adler(data), "local")
    assert (storage.root / "night1/run1/f.dat").read_bytes() == data
    assert await storage.stat(done.relpath, checksum=True) == ObjectStat(len(data), adler(data))


async def test_upload_of_a_file_that_does_not_verify_leaves_nothing(
    storage: PosixStorage, tmp_path: Path
) -> None:
    local = tmp_path / "landing.dat"
    local.write_bytes(b"the bytes that arrived")
    with pytest.raises(Permanent) as err:
        await storage.upload(local, "night1/f.dat", size=22, adler32="00000001")
    assert err.value.reason == "checksum_mismatch"
    with pytest.raises(Permanent) as err:
        await storage.upload(tmp_path / "nope.dat", "night1/g.dat", size=1, adler32="00000001")
    assert err.value.reason == "file_missing"
    assert await listing(storage) == []
    assert not leftovers(storage.root) and not unnamed_files_open(storage.root)


async def test_download_copies_to_a_local_file_verified(storage: PosixStorage, tmp_path: Path) -> None:
    data = os.urandom(100_000)
    put(storage, "night1/f.dat", data)
    local = tmp_path / "scratch" / "sub" / "copy.dat"
    done = await storage.download("night1/f.dat", local, size=len(data), adler32=adler(data))
    assert done == CopyDone("night1/f.dat", len(data), adler(data), "local")
    assert local.read_bytes() == data
    assert [p.name for p in local.parent.iterdir()] == ["copy.dat"]


async def test_download_of_a_missing_or_corrupt_file_is_the_sources_fault(
    storage: PosixStorage, tmp_path: Path
) -> None:
    put(storage, "night1/f.dat", b"rotten bytes")
    local = tmp_path / "scratch" / "copy.dat"
    with pytest.raises(Permanent) as err:
        await storage.download("night1/nope.dat", local, size=12, adler32=adler(b"rotten bytes"))
    assert err.value.reason == "source_missing"
    with pytest.raises(Permanent) as err:
        await storage.download("night1/f.dat", local, size=12, adler32=adler(b"good  bytes!"))
    assert err.value.reason == "source_corrupt"
    assert not local.exists() and not leftovers(tmp_path / "scratch")


async def test_copy_from_another_posix_endpoint_is_the_verified_kernel_copy(
    storage: PosixStorage, other: PosixStorage
) -> None:
    data = os.urandom(70_000)
    put(other, "night1/f.dat", data)
    assert storage.can_pull_from(other)
    done = await storage.copy_from(other, "night1/f.dat", "copies/f.dat", size=len(data), adler32=adler(data))
    assert done == CopyDone("copies/f.dat", len(data), adler(data), "local")
    assert (storage.root / "copies/f.dat").read_bytes() == data


async def test_copy_from_classifies_the_side_at_fault_and_leaves_nothing(
    storage: PosixStorage, other: PosixStorage
) -> None:
    put(other, "night1/f.dat", b"rotten bytes")
    cases = {
        "night1/nope.dat": "source_missing",
        "../disk1/x.dat": "source_corrupt",  # the source's pfn escapes its own root
        "night1/f.dat": "source_corrupt",  # not the catalogue's bytes
    }
    for source_relpath, reason in cases.items():
        with pytest.raises(Permanent) as err:
            await storage.copy_from(other, source_relpath, "copies/f.dat", size=12, adler32="00000001")
        assert err.value.reason == reason, source_relpath
    for size, checksum, reason in ((-1, "00000001", "invalid_size"), (12, "xyz", "invalid_checksum")):
        with pytest.raises(Permanent) as err:
            await storage.copy_from(other, "night1/f.dat", "copies/f.dat", size=size, adler32=checksum)
        assert err.value.reason == reason
    assert await listing(storage) == []
    assert not leftovers(storage.root) and not unnamed_files_open(storage.root)


async def test_delete_says_whether_the_file_was_there(storage: PosixStorage) -> None:
    put(storage, "night1/f.dat", b"x")
    assert await storage.delete("night1/f.dat") is True
    assert await storage.delete("night1/f.dat") is False
    assert await storage.stat("night1/f.dat") is None


async def test_free_space_is_what_the_file_system_has_available(storage: PosixStorage) -> None:
    st = os.statvfs(storage.root)
    free = await storage.free_space()
    assert isinstance(free, int)
    assert abs(free - st.f_bavail * st.f_frsize) < 64 * 1024 * 1024  # others write meanwhile


async def test_list_gives_every_file_below_a_prefix_without_temporaries_or_links(
    storage: PosixStorage, tmp_path: Path
) -> None:
    put(storage, "night2/b.dat", b"bb")
    put(storage, "night1/run2/c.dat", b"ccc")
    put(storage, "night1/a.dat", b"a")
    put(storage, "night1/run1/d.dat", b"")
    put(storage, f"night1/run1/{temp_name_for('e.dat')}", b"copy in progress")
    (tmp_path / "outside.dat").write_bytes(b"not ours")
    (storage.root / "night1" / "link.dat").symlink_to(tmp_path / "outside.dat")
    (storage.root / "night1" / "linkdir").symlink_to(tmp_path)
    assert await listing(storage) == [
        ListedFile("night1/a.dat", 1),
        ListedFile("night1/run1/d.dat", 0),
        ListedFile("night1/run2/c.dat", 3),
        ListedFile("night2/b.dat", 2),
    ]
    assert await listing(storage, "night1/run2") == [ListedFile("night1/run2/c.dat", 3)]
    assert await listing(storage, "/night2/") == [ListedFile("night2/b.dat", 2)]
    assert await listing(storage, ".") == await listing(storage)
    assert await listing(storage, "night3") == []
    assert await listing(storage, "night2/b.dat") == []  # a file: nothing below it
    with pytest.raises(Permanent) as err:
        await listing(storage, "../")
    assert err.value.reason == "path_outside_area"


async def test_aclose_stops_the_threads_and_the_backend_starts_them_again(
    storage: PosixStorage, tmp_path: Path
) -> None:
    put(storage, "f.dat", b"data")
    assert await storage.stat("f.dat") == ObjectStat(4)
    await storage.aclose()
    assert storage._executor is None and storage._copiers == []
    assert await storage.stat("f.dat", checksum=True) == ObjectStat(4, adler(b"data"))
