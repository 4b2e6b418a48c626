"""sha256 in the posix copies: computed in the same read pass as adler32, checked against the
catalogue's on a replication copy. The source replicas here are altered *without changing their
size or adler32* (``alter_keeping_adler32``), so each test fails if only adler32 were checked."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from common.config import StorageEndpoint
from common.errors import Permanent
from common.storage import CopyResult, PosixStorage, posix
from tests.storage_fixtures import adler, alter_keeping_adler32, leftovers, sha256_hex

MiB = 1024 * 1024
SIZES = pytest.mark.parametrize("size", [4096, 3 * MiB], ids=["small-batched", "large-threaded"])


@pytest.fixture(params=["process", "thread"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[PosixStorage]:
    s = PosixStorage("disk2", StorageEndpoint(root=tmp_path / "disk2", small_copies=request.param))
    yield s
    s.close()


def source(tmp_path: Path, data: bytes, name: str = "night1/f.dat") -> Path:
    path = tmp_path / "disk1" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


@SIZES
async def test_ingest_copy_reports_the_sha256_of_what_it_read(
    storage: PosixStorage, tmp_path: Path, size: int
) -> None:
    data = os.urandom(size)
    got = await storage.put_from(source(tmp_path, data), "a/f.dat", expected_size=size, fsync=False)
    assert (got.adler32, got.sha256) == (adler(data), sha256_hex(data))


@SIZES
async def test_ingest_copy_refuses_an_announced_sha256_that_differs(
    storage: PosixStorage, tmp_path: Path, size: int
) -> None:
    data = os.urandom(size)
    announced = sha256_hex(alter_keeping_adler32(data))
    with pytest.raises(Permanent) as err:
        await storage.put_from(
            source(tmp_path, data), "a/f.dat", expected_size=size, expected_adler32=adler(data),
            expected_sha256=announced, fsync=False,
        )  # fmt: skip
    assert err.value.reason == "checksum_mismatch"
    assert f"sha256 {sha256_hex(data)}, expected {announced}" in err.value.message
    assert not (storage.root / "a/f.dat").exists() and leftovers(storage.root) == []


@SIZES
async def test_replication_copy_of_a_source_altered_under_its_adler32_is_source_corrupt(
    storage: PosixStorage, tmp_path: Path, size: int
) -> None:
    data = os.urandom(size)
    src = source(tmp_path, data)
    src.write_bytes(alter_keeping_adler32(data))  # after "ingest": same size, same adler32
    with pytest.raises(Permanent) as err:
        await storage.copy_verified(
            src, "night1/f.dat", expected_size=size, expected_adler32=adler(data),
            expected_sha256=sha256_hex(data), fsync=False,
        )  # fmt: skip
    assert err.value.reason == "source_corrupt"
    assert f"expected {sha256_hex(data)}" in err.value.message
    assert not (storage.root / "night1/f.dat").exists() and leftovers(storage.root) == []


async def test_without_a_recorded_sha256_the_same_alteration_passes(
    storage: PosixStorage, tmp_path: Path
) -> None:
    """Files registered before sha256 was recorded keep adler32 alone as their check."""
    data = os.urandom(4096)
    src = source(tmp_path, data)
    src.write_bytes(alter_keeping_adler32(data))
    got = await storage.copy_verified(src, "night1/f.dat", expected_size=4096, expected_adler32=adler(data))
    assert got.sha256 is None


async def test_a_bulk_copy_checks_each_files_sha256(storage: PosixStorage, tmp_path: Path) -> None:
    blobs = {f"night1/f{i}.dat": os.urandom(2000 + i) for i in range(4)}
    for name, data in blobs.items():
        source(tmp_path, data, name)
    source(tmp_path, alter_keeping_adler32(blobs["night1/f2.dat"]), "night1/f2.dat")
    root = str(tmp_path / "disk1")
    copies = [
        posix.ReplicaCopy(root, n, f"copy/{n}", len(d), adler(d), sha256_hex(d)) for n, d in blobs.items()
    ]
    outcomes = await storage.copy_verified_many(copies)
    kinds = [o.sha256 if isinstance(o, CopyResult) else o.reason for o in outcomes]  # type: ignore[union-attr]
    assert kinds == [sha256_hex(blobs["night1/f0.dat"]), sha256_hex(blobs["night1/f1.dat"]), "source_corrupt",
                     sha256_hex(blobs["night1/f3.dat"])]  # fmt: skip
    assert not (storage.root / "copy/night1/f2.dat").exists()


@SIZES
async def test_verify_reads_sha256_in_the_same_pass(storage: PosixStorage, tmp_path: Path, size: int) -> None:
    data = os.urandom(size)
    await storage.put_from(source(tmp_path, data), "a/f.dat", fsync=False)
    (storage.root / "a/f.dat").write_bytes(alter_keeping_adler32(data))
    problem = await storage.verify("a/f.dat", expected_size=size, expected_adler32=adler(data),
                                   expected_sha256=sha256_hex(data))  # fmt: skip
    assert (
        problem is not None and problem.startswith("sha256 ") and problem.endswith(f"!= {sha256_hex(data)}")
    )
    assert await storage.verify("a/f.dat", expected_size=size, expected_adler32=adler(data)) is None


@pytest.mark.parametrize("bad", ["ab" * 31, "ab" * 33, "zz" * 32, "sha256:" + "ab" * 32])
async def test_a_malformed_expected_sha256_is_invalid_checksum(
    storage: PosixStorage, tmp_path: Path, bad: str
) -> None:
    with pytest.raises(Permanent) as err:
        await storage.put_from(source(tmp_path, b"x"), "a/f.dat", expected_sha256=bad)
    assert err.value.reason == "invalid_checksum"
