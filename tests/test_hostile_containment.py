"""Issue 16, class 1: a check trusted after it stopped being true.

Containment must hold at the moment of each open, create and delete (``common.storage.confined``),
never on an earlier check or a cache of resolved names. Each case: the hostile layout gives its
reason code, nothing is read, written or deleted outside the root, and (through the bus) the
daemon still handles a good file afterwards. The confined primitives are exercised with both of
their implementations: ``openat2`` and the ``O_NOFOLLOW`` walk of kernels without it.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Iterator
from pathlib import Path

import pytest

from common.catalogue import Catalogue
from common.config import Settings, StorageEndpoint
from common.errors import Permanent
from common.storage import PosixStorage, confined
from common.storage.checksum import adler32_of_file
from daemons.ingest import steps
from daemons.ingest.handlers import service as ingest_service
from daemons.recall import delivery
from tests.conftest import cloudevent, dead_reasons, publish_raw, queue_depth, running, wait_for
from tests.storage_fixtures import adler, leftovers

DATASET = "lst1.20261123.run012345.dl0"


@pytest.fixture(params=["openat2", "walk"])
def resolver(request: pytest.FixtureRequest) -> Iterator[str]:
    """Both implementations of ``confined``: the kernel's openat2 and the O_NOFOLLOW walk."""
    if request.param == "openat2" and not confined.has_openat2():
        pytest.skip("this kernel has no openat2")  # the walk case below still runs
    confined.use_walk_only(request.param == "walk")
    try:
        yield request.param
    finally:
        confined.use_walk_only(False)


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A directory outside every root, holding a file an attacker would like read or deleted."""
    d = tmp_path / "outside"
    d.mkdir()
    (d / "secret").write_bytes(b"secret")
    (d / ".x.spool-tmp-0123456789ab").write_bytes(b"looks like a temporary")
    return d


def untouched(outside: Path) -> bool:
    return (
        sorted(p.name for p in outside.iterdir()) == [".x.spool-tmp-0123456789ab", "secret"]
        and (outside / "secret").read_bytes() == b"secret"
    )


# --- the primitives ------------------------------------------------------------------------------
def test_symlink_at_any_component_is_refused_by_the_kernel(
    resolver: str, tmp_path: Path, outside: Path
) -> None:
    area = tmp_path / "area"
    (area / "night").mkdir(parents=True)
    (area / "night" / "good").write_bytes(b"good")
    (area / "out").symlink_to(outside)  # an intermediate component pointing out
    (area / "alias").symlink_to(area / "night")  # an intermediate pointing *inside*: refused too
    (area / "night" / "last").symlink_to(outside / "secret")  # the final component
    fd, st = confined.open_regular_beneath(str(area), "night/good")
    os.close(fd)
    assert st.st_size == 4
    for rel in ("out/secret", "alias/good", "night/last"):
        with pytest.raises(OSError) as err:
            confined.open_regular_beneath(str(area), rel)
        assert confined.is_refused(err.value), rel
        with pytest.raises(OSError) as err:
            confined.open_regular(f"{area}/{rel}")  # the absolute form: no symlink from /
        assert confined.is_refused(err.value), rel
    # Creating through a symlinked directory creates nothing outside.
    with pytest.raises(OSError) as err:
        confined.parent_of(str(area), "out/new/file", create=True)
    assert confined.is_refused(err.value)
    with pytest.raises(OSError):
        confined.unlink_beneath(str(area), "out/secret")
    assert untouched(outside)


@pytest.mark.parametrize(
    "path", ["../outside/secret", "night/../../outside/secret", "night/../x", "/etc/passwd"]
)
def test_dotdot_and_absolute_paths_outside_are_path_outside_area(tmp_path: Path, path: str) -> None:
    area = tmp_path / "area"
    (area / "night").mkdir(parents=True)
    storage = PosixStorage("disk", area)
    with pytest.raises(Permanent) as err:
        storage.resolve(path)
    assert err.value.reason == "path_outside_area"
    announced = path if path.startswith("/") else f"{area}/{path}"
    with pytest.raises(Permanent) as err:
        steps.locate(announced, {"lst1": area})
    assert err.value.reason == "path_outside_area"


@pytest.mark.parametrize("path", ["", ".", "./", "night/.."])
def test_the_root_itself_is_no_replica(tmp_path: Path, path: str) -> None:
    with pytest.raises(Permanent) as err:
        PosixStorage("disk", tmp_path).resolve(path)
    assert err.value.reason == "path_outside_area"


def test_a_directory_swapped_for_a_symlink_after_locate_is_refused_at_the_open(
    resolver: str, tmp_path: Path, outside: Path
) -> None:
    """Check, then swap, then use: the open decides, not the earlier check."""
    area = tmp_path / "area"
    (area / "night").mkdir(parents=True)
    (area / "night" / "secret").write_bytes(b"fine")
    located = steps.locate(str(area / "night" / "secret"), {"lst1": area})
    assert adler32_of_file(located.source) == adler(b"fine")  # an earlier good answer
    (area / "night").rename(area / "night.old")
    (area / "night").symlink_to(outside)
    with pytest.raises(Permanent) as err:
        adler32_of_file(located.source)
    assert err.value.reason == "path_outside_area"


def test_the_area_root_swapped_for_a_symlink_is_refused(resolver: str, tmp_path: Path, outside: Path) -> None:
    area = tmp_path / "area"
    area.mkdir()
    (area / "f").write_bytes(b"f")
    located = steps.locate(str(area / "secret"), {"lst1": area})
    area.rename(tmp_path / "area.old")
    area.symlink_to(outside)
    with pytest.raises(Permanent) as err:
        adler32_of_file(located.source)
    assert err.value.reason == "path_outside_area"


# --- the posix backend ---------------------------------------------------------------------------
async def test_symlinked_destination_is_the_destinations_fault_and_writes_nothing_outside(
    resolver: str, tmp_path: Path, outside: Path
) -> None:
    src = PosixStorage("disk1", StorageEndpoint(root=tmp_path / "disk1", small_copies="thread"))
    dst = PosixStorage("disk2", StorageEndpoint(root=tmp_path / "disk2", small_copies="thread"))
    (src.root / "night").mkdir(parents=True)
    (src.root / "night" / "f").write_bytes(b"payload")
    (dst.root / "night").mkdir(parents=True)
    (dst.root / "copy").symlink_to(outside)  # a directory of the destination path
    (dst.root / "night" / "f").symlink_to(outside / "secret")  # the final component: replaced, not followed
    try:
        for fsync in (True, False):  # a worker thread, and a batch of small copies
            with pytest.raises(Permanent) as err:
                await src_copy(dst, src, "night/f", "copy/f", fsync)
            assert err.value.reason == "path_outside_area"  # not source_corrupt / source_missing
            assert "destination" in err.value.message
        done = await dst.copy_verified(
            src.resolve("night/f"), "night/f", expected_size=7, expected_adler32=adler(b"payload")
        )
        assert done.pfn == "night/f" and not (dst.root / "night" / "f").is_symlink()
        with pytest.raises(Permanent) as err:
            await dst.put_from(src.resolve("night/f"), "copy/g")
        assert err.value.reason == "path_outside_area"
    finally:
        src.close()
        dst.close()
    assert untouched(outside)
    assert (src.root / "night" / "f").read_bytes() == b"payload"
    assert leftovers(dst.root) == []


async def src_copy(dst: PosixStorage, src: PosixStorage, pfn: str, relpath: str, fsync: bool) -> object:
    return await dst.copy_verified(
        src.resolve(pfn), relpath, expected_size=7, expected_adler32=adler(b"payload"), fsync=fsync
    )


async def test_symlinked_source_replica_is_source_corrupt(
    resolver: str, tmp_path: Path, outside: Path
) -> None:
    src = PosixStorage("disk1", tmp_path / "disk1")
    dst = PosixStorage("disk2", tmp_path / "disk2")
    src.root.mkdir()
    (src.root / "night").symlink_to(outside)
    try:
        with pytest.raises(Permanent) as err:
            await dst.copy_verified(
                src.resolve("night/secret"), "x", expected_size=6, expected_adler32=adler(b"secret")
            )
        assert err.value.reason == "source_corrupt"
        with pytest.raises(Permanent) as err:
            await dst.copy_from(src, "night/secret", "y", size=6, adler32=adler(b"secret"))
        assert err.value.reason == "source_corrupt"
    finally:
        src.close()
        dst.close()
    assert not (dst.root / "x").exists() and not (dst.root / "y").exists()


async def test_reaper_delete_stat_list_and_sweep_never_pass_a_symlink(
    resolver: str, tmp_path: Path, outside: Path
) -> None:
    storage = PosixStorage("disk", tmp_path / "disk")
    (storage.root / "night").mkdir(parents=True)
    (storage.root / "night" / "kept").write_bytes(b"k")
    (storage.root / "out").symlink_to(outside)
    try:
        with pytest.raises(Permanent) as err:
            await storage.delete("out/secret")  # the reaper's delete
        assert err.value.reason == "path_outside_area"
        with pytest.raises(Permanent) as err:
            await storage.stat("out/secret")
        assert err.value.reason == "path_outside_area"
        assert storage.exists("out/secret") is False
        with pytest.raises(Permanent) as err:
            await storage.checksum("out/secret")
        assert err.value.reason == "path_outside_area"
        assert (
            await storage.verify("out/secret", expected_size=6, expected_adler32=adler(b"secret")) is not None
        )
        listed = [f.relpath async for f in storage.list()]
        assert listed == ["night/kept"]
        assert [f.relpath async for f in storage.list("out")] == []
        assert storage.cleanup_temp() == 0  # the temporary-looking file outside is not swept
    finally:
        storage.close()
    assert untouched(outside)


# --- recall's staging directory ------------------------------------------------------------------
async def test_a_planted_spool_recall_symlink_makes_startup_delete_nothing_and_recall_write_nothing(
    resolver: str, tmp_path: Path, outside: Path
) -> None:
    storage = PosixStorage("disk2", tmp_path / "disk2")
    storage.root.mkdir()
    (storage.root / delivery.STAGING_DIR).symlink_to(outside)
    assert delivery.clean_staging(storage, tmp_path / "local", older_than=0) == 0
    assert untouched(outside)

    class Library:  # what read_from_tape asks of a library: write the bytes at ``dest``
        async def read(self, drive: str, fseq: int, dest: Path, *, verify: bool = True) -> object:
            raise AssertionError("no read may start into a refused staging directory")

    item = _item("night/f.fits", b"data")
    with pytest.raises(Permanent) as err:
        await delivery.read_from_tape(Library(), "DR01", item, storage, tmp_path / "local")  # type: ignore[arg-type]
    assert err.value.reason == "path_outside_area"
    assert untouched(outside)
    assert not (storage.root / "night").exists()


async def test_recall_delivery_into_a_symlinked_destination_directory_writes_nothing_outside(
    resolver: str, tmp_path: Path, outside: Path
) -> None:
    storage = PosixStorage("disk2", tmp_path / "disk2")
    storage.root.mkdir()
    (storage.root / "night").symlink_to(outside)
    content = b"recalled bytes"

    class Library:
        async def read(self, drive: str, fseq: int, dest: Path, *, verify: bool = True) -> object:
            dest.write_bytes(content)
            from common.tape.library import ReadResult

            return ReadResult(len(content), adler(content))

    with pytest.raises(Permanent) as err:
        await delivery.read_from_tape(Library(), "DR01", _item("night/f", content), storage, tmp_path)  # type: ignore[arg-type]
    assert err.value.reason == "path_outside_area"
    assert untouched(outside)
    assert list((storage.root / delivery.STAGING_DIR).iterdir()) == []  # the staged file removed
    # The same read to a plain directory lands, and the staging directory is left empty.
    pfn = await delivery.read_from_tape(Library(), "DR01", _item("day/f", content), storage, tmp_path)  # type: ignore[arg-type]
    assert (pfn, (storage.root / "day" / "f").read_bytes()) == ("day/f", content)
    assert list((storage.root / delivery.STAGING_DIR).iterdir()) == []


def _item(name: str, content: bytes) -> object:
    from types import SimpleNamespace

    copy = SimpleNamespace(fseq=1, cartridge="A00001", storage="tape1")
    return SimpleNamespace(
        name=name,
        file_id=7,
        size=len(content),
        adler32=adler(content),
        copy=copy,
        member_offset=None,
        sha256=None,
    )


# --- ingest through the bus ----------------------------------------------------------------------
def _ready(path: Path | str) -> bytes:
    return cloudevent({"path": str(path), "dataset": DATASET})


async def _files(settings: Settings) -> int:
    async with await Catalogue.open(settings.catalogue.url) as c:
        return (await c.queries.counts()).files


@pytest.mark.integration
@pytest.mark.parametrize("swapped", ["subdirectory", "area root"])
async def test_landing_dir_swapped_for_a_symlink_after_a_good_file_is_refused(
    settings: Settings, broker, topology, tmp_path: Path, outside: Path, swapped: str
) -> None:  # type: ignore[no-untyped-def]
    area = settings.landing_areas["lst1"]
    (area / "night").mkdir(parents=True, exist_ok=True)
    (area / "night" / "first.fits").write_bytes(b"first")
    disk = settings.storage["disk1"].root
    async with running([ingest_service], settings):
        await publish_raw(broker, settings, "file.ready", _ready(area / "night" / "first.fits"))
        await wait_for(lambda: _is(_files(settings), 1))
        # Within what used to be the resolved-directory cache's lifetime: swap, then announce.
        if swapped == "subdirectory":
            (area / "night").rename(area / "night.old")
            (area / "night").symlink_to(outside)
        else:
            area.rename(tmp_path / "area.old")
            area.symlink_to(outside)
            (outside / "night").mkdir()
            (outside / "night" / "secret").write_bytes(b"secret")
        await publish_raw(broker, settings, "file.ready", _ready(area / "night" / "secret"))
        await wait_for(lambda: _is(queue_depth(broker, settings.dead_queue("ingest")), 1))
        if swapped == "area root":
            area.unlink()
            (tmp_path / "area.old").rename(area)
        (area / "good.fits").write_bytes(b"good")
        await publish_raw(broker, settings, "file.ready", _ready(area / "good.fits"))
        await wait_for(lambda: _is(_files(settings), 2))
    assert await dead_reasons(broker, settings) == ["path_outside_area"]
    assert not (disk / "night" / "secret").exists()
    assert sorted(p.relative_to(disk).as_posix() for p in disk.rglob("*") if p.is_file()) == [
        "good.fits",
        "night/first.fits",
    ]


@pytest.mark.integration
async def test_symlinked_intermediate_and_final_components_are_refused_by_ingest(
    settings: Settings, broker, topology, outside: Path
) -> None:  # type: ignore[no-untyped-def]
    area = settings.landing_areas["lst1"]
    (area / "night").mkdir(parents=True, exist_ok=True)
    (area / "night" / "real.fits").write_bytes(b"real")
    (area / "out").symlink_to(outside)
    (area / "alias").symlink_to(area / "night")  # pointing inside the area: refused too
    (area / "night" / "final.fits").symlink_to(area / "night" / "real.fits")
    bad = [area / "out" / "secret", area / "alias" / "real.fits", area / "night" / "final.fits"]
    async with running([ingest_service], settings):
        for path in bad:
            await publish_raw(broker, settings, "file.ready", _ready(path))
        await wait_for(lambda: _is(queue_depth(broker, settings.dead_queue("ingest")), len(bad)))
        await publish_raw(broker, settings, "file.ready", _ready(area / "night" / "real.fits"))
        await wait_for(lambda: _is(_files(settings), 1))
    assert await dead_reasons(broker, settings) == ["path_outside_area"] * len(bad)
    assert leftovers(settings.storage["disk1"].root) == []
    assert untouched(outside)


async def _is(value: object, expected: int) -> bool:
    assert asyncio.iscoroutine(value)
    return await value == expected


# --- the replicator through the bus --------------------------------------------------------------
@pytest.mark.integration
async def test_replicator_symlinked_destination_keeps_the_source_available(
    tmp_path: Path, tag, broker
) -> None:  # type: ignore[no-untyped-def]
    """Issue 16: a symlinked destination path made a healthy *source* copy be marked ``bad``."""
    from common.config import load_settings
    from daemons.replicator.handlers import service as replicator_service
    from tests.replication_fixtures import (
        make_files,
        name_of,
        publish_ready,
        replica_states,
        replication_config,
    )

    rule = {"rules.cnaf": 'datasets = ".*"\nendpoints = "disk2"'}
    settings = load_settings(replication_config(tmp_path, tag, **rule))
    night = make_files(settings, 1, prefix="night")
    day = make_files(settings, 1, prefix="day")
    bad, good = name_of(settings, night[0][0]), name_of(settings, day[0][0])
    outside = tmp_path / "outside"
    outside.mkdir()
    disk2 = settings.storage["disk2"].root
    disk2.mkdir(parents=True, exist_ok=True)
    (disk2 / "night").symlink_to(outside)  # a directory of the destination path
    async with running([ingest_service, replicator_service], settings):
        await publish_ready(broker, settings, night)
        # One dead letter, or two: the rule, evaluated over files already registered when it is
        # first seen, may ask for the same copy again (each is refused the same way).
        await wait_for(
            lambda: _at_least(queue_depth(broker, settings.dead_queue("replicator")), 1), timeout=60
        )
        await publish_ready(broker, settings, day)  # the daemon still copies a good file
        await wait_for(lambda: _state_is(settings, good, "disk2", "available"), timeout=60)
    states = await replica_states(settings)
    assert states[(bad, "disk1")] == "available"  # the healthy source: not marked bad
    assert states.get((bad, "disk2")) != "available"
    assert (disk2 / good).read_bytes() == day[0][1]
    assert list(outside.iterdir()) == []
    assert leftovers(disk2) == []
    reasons = await dead_reasons(broker, settings, "replicator")
    assert reasons and set(reasons) == {"path_outside_area"}, reasons


async def _at_least(depth: Awaitable[int], n: int) -> bool:
    return await depth >= n


async def _state_is(settings: Settings, name: str, storage: str, state: str) -> bool:
    from tests.replication_fixtures import replica_states

    return (await replica_states(settings)).get((name, storage)) == state


async def test_recall_from_disk_into_a_symlinked_destination_is_not_the_sources_fault(
    resolver: str, tmp_path: Path, outside: Path
) -> None:
    from daemons.recall.scheduler import DISK_SOURCE_BAD

    src = PosixStorage("disk1", tmp_path / "disk1")
    dst = PosixStorage("disk2", tmp_path / "disk2")
    (src.root / "night").mkdir(parents=True)
    (src.root / "night" / "f").write_bytes(b"payload")
    dst.root.mkdir()
    (dst.root / "night").symlink_to(outside)
    try:
        with pytest.raises(Permanent) as err:
            await delivery.copy_from_disk(src, "night/f", dst, "night/f", 7, adler(b"payload"))
        assert err.value.reason not in DISK_SOURCE_BAD  # the scheduler marks no source bad
        assert err.value.reason == "path_outside_area"
        with pytest.raises(Permanent) as err:  # a pfn escaping the source root: that copy's fault
            await delivery.copy_from_disk(src, "../x", dst, "day/f", 7, adler(b"payload"))
        assert err.value.reason in DISK_SOURCE_BAD
    finally:
        src.close()
        dst.close()
    assert untouched(outside)


async def test_a_remote_backend_uploads_a_posix_replica_through_its_confined_descriptor(
    resolver: str, tmp_path: Path, outside: Path
) -> None:
    """XRootD / HTTPS destinations read a posix source through ``transfer.local_source``: the
    replica opened beneath its root without a symlink, handed over as /proc/self/fd/N."""
    from common.storage.transfer import local_source

    storage = PosixStorage("disk1", tmp_path / "disk1")
    (storage.root / "night").mkdir(parents=True)
    (storage.root / "night" / "f").write_bytes(b"replica")
    (storage.root / "out").symlink_to(outside)
    os.mkfifo(storage.root / "night" / "fifo")
    try:
        async with local_source(storage, "night/f") as local:
            assert local is not None and local.read_bytes() == b"replica"
        for pfn, reason in (
            ("out/secret", "source_corrupt"),
            ("night/fifo", "source_corrupt"),
            ("night/nope", "source_missing"),
            ("../x", "source_corrupt"),
        ):
            with pytest.raises(Permanent) as err:
                async with local_source(storage, pfn):
                    raise AssertionError("never reached")
            assert err.value.reason == reason, pfn
    finally:
        storage.close()
    assert untouched(outside)
