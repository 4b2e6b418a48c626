"""Tape faults: broken drives, cartridges that will not load, and the tape daemon killed with
SIGKILL in the middle of a write batch. Work waits or moves elsewhere, never fails for a drive's
sake; after a kill every file is on tape exactly once and the catalogue records nothing that is
not wholly written there."""

from __future__ import annotations

import signal
from collections import Counter
from pathlib import Path

import msgpack
import pytest

from common.catalogue import tape as db
from common.config import Settings, load_settings
from common.tape import SimulatedLibraryConfig, open_library
from daemons.ingest.handlers import service as ingest_service
from daemons.tape.drives import Mount, MountFailures
from daemons.tape.handlers import service as tape_service
from tests.cli_fixtures import spool
from tests.conftest import queue_depth, running, start_daemon, wait_for
from tests.replication_fixtures import count_on, make_files, name_of, publish_ready
from tests.tape_fixtures import (
    LIBRARY,
    as_json,
    bind,
    library_call,
    listed,
    names_on_tape,
    on_tape,
    placed,
    tape_config,
    tape_copies,
)

REPO = Path(__file__).resolve().parent.parent
SERVICES = [ingest_service, tape_service]


async def _count(settings: Settings, n: int, state: str = "available") -> bool:
    return await count_on(settings, "tape1", state) == n


# --- drives ------------------------------------------------------------------------------------
def small_library(tmp_path: Path, **overrides: object) -> SimulatedLibraryConfig:
    values: dict[str, object] = {
        "root": tmp_path / "lib", "drives": 2, "pools": {"raw": 3}, "scratch_cartridges": 0,
        "capacity_bytes": 10_000, "time_scale": 0.0, "durable": False,
    }  # fmt: skip
    values.update(overrides)
    return SimulatedLibraryConfig.model_validate(values)


async def test_a_drive_that_breaks_after_it_was_claimed_is_replaced_by_another(tmp_path):
    async with await open_library(small_library(tmp_path)) as lib:
        moves: list[str] = []

        async def moved(vid: str) -> None:
            moves.append(vid)

        mount = Mount(lib, "raw", "test", MountFailures(), 3, moved)
        assert await mount.acquire()
        first = mount.drive
        await lib.set_drive_broken(str(first))
        await mount.load()
        drives = {d.drive_id: d for d in await lib.list_drives()}
        assert mount.drive != first and drives[str(mount.drive)].vid == mount.vid
        assert drives[str(first)].claim is None  # the broken drive was given back
        assert moves == []  # same cartridge
        await mount.release()


async def test_a_cartridge_that_fails_to_load_twice_loads_on_another_drive_and_stays_good(tmp_path):
    async with await open_library(small_library(tmp_path)) as lib:
        failures = MountFailures()
        mount = Mount(lib, "raw", "test", failures, 3, lambda vid: _never(vid))
        assert await mount.acquire()
        vid = str(mount.vid)
        await lib.fail_next_mounts(vid, 2)
        await mount.load()
        assert mount.vid == vid and failures == {}
        assert {c.vid: c.state for c in await lib.list_cartridges()}[vid] == "filling"
        await mount.release()


async def _never(vid: str) -> None:
    raise AssertionError(f"the batch should have stayed on its cartridge, not moved to {vid}")


@pytest.mark.integration
async def test_broken_drives_make_the_work_wait_and_a_repaired_one_takes_it(tmp_path, tag, broker):
    path = tape_config(tmp_path, tag)
    settings = load_settings(path)
    files = make_files(settings, 6)
    for drive in ("DR01", "DR02"):
        await library_call(settings, "set_drive_broken", drive)
    async with running(SERVICES, settings):
        await publish_ready(broker, settings, files)
        await wait_for(lambda: _count(settings, 6, "queued"), timeout=30)
        statuses = {d["drive"]: d["status"] for d in as_json(spool(path, "drive", "list", "--json"))}
        assert statuses == {"DR01": "broken", "DR02": "broken"}
        assert await count_on(settings, "tape1", "queued") == 6  # nothing failed: it waits
        await library_call(settings, "set_drive_broken", "DR02", False)
        await wait_for(lambda: _count(settings, 6), timeout=30)
    usage = await library_call(settings, "usage")
    assert usage.drives["DR01"].mounts == 0 and usage.drives["DR02"].files_written == 6
    assert await queue_depth(broker, settings.dead_queue("tape")) == 0


@pytest.mark.integration
async def test_a_cartridge_that_keeps_failing_to_mount_is_marked_suspect_and_another_used(
    tmp_path, tag, broker
):
    path = tape_config(tmp_path, tag)
    settings = load_settings(path)
    files = make_files(settings, 6)
    await library_call(settings, "fail_next_mounts", "A00001", 10)
    async with running(SERVICES, settings):
        await publish_ready(broker, settings, files)
        await wait_for(lambda: _count(settings, 6), timeout=30)
    cartridges = {c["vid"]: c for c in as_json(spool(path, "tape", "list", "--json"))}
    assert cartridges["A00001"]["state"] == "suspect" and cartridges["A00001"]["files"] == 0
    assert cartridges["A00002"]["files"] == 6 and cartridges["A00002"]["pool"] == "raw"
    assert {vid for _, vid, _ in (await tape_copies(settings)).values()} == {"A00002"}


# --- SIGKILL mid-batch ---------------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.slow
async def test_tape_daemon_killed_mid_batch_archives_every_file_exactly_once(tmp_path, tag, broker):
    n = 40
    # Durable, and slow enough that a batch lasts seconds: a 4 kB file takes 0.2 s to write, a
    # mount 0.5 s, a flush (synchronous tape mark) 2 s. Files are flushed and recorded in groups
    # of 5, so a kill lands between the writes and their flush.
    slow = (
        LIBRARY.replace("time_scale = 0", "time_scale = 1").replace("durable = false", "durable = true")
        + "\ntiming = { mount_seconds = 0.5, unmount_seconds = 0.5, locate_average_seconds = 0.5,"
        " write_rate = 20000, read_rate = 20000 }"
    )
    policy = (
        "mount_min_files = 5\nmount_min_bytes = 1000000000\nmount_max_age = 0.5\npoll_interval = 0.1\n"
        "record_every = 5\nflush_files = 5"
    )
    path = tape_config(tmp_path, tag, library=slow, policy=policy)
    settings = load_settings(path)
    files = make_files(settings, n, size=4000)
    async with running([ingest_service], settings):
        await publish_ready(broker, settings, files)
        await wait_for(lambda: _count(settings, n, "queued"), timeout=60)
    archived = await bind(broker, settings, "file.archived")
    log = tmp_path / "tape.log"
    proc = start_daemon(path, "tape", log)
    try:
        # An operator sees the drive at work: what it does, with which cartridge, for whom.
        await wait_for(lambda: _drive_writing(path), timeout=60, interval=0)
        # First kill: files written on tape but not flushed (the library drops them, they are
        # queued and written again). Second: in the middle of the batch, whatever it is doing.
        for ready in (lambda: _unflushed(settings, 2), lambda: _at_least(settings, 21)):
            await wait_for(ready, timeout=120, interval=0.05)
            proc.send_signal(signal.SIGKILL)
            assert proc.wait(timeout=10) == -signal.SIGKILL
            assert await count_on(settings, "tape1") < n, "the kill came too late to prove anything"
            proc = start_daemon(path, "tape", log)
        await wait_for(lambda: _count(settings, n), timeout=180, interval=0.2)
        await wait_for(lambda: _depth_is(broker, settings.queue("tape"), 0), timeout=60)
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
    assert code == 0, log.read_text()[-3000:]
    copies = await tape_copies(settings)
    tapes = await on_tape(settings)
    names = sorted(name_of(settings, p) for p, _ in files)
    assert sorted(copies) == names and {st for st, _, _ in copies.values()} == {"available"}
    assert names_on_tape(tapes) == names  # each file on tape once: none written twice
    assert placed(copies) == listed(tapes)  # the catalogue records exactly what is on tape
    for vid, on_cart in tapes.items():  # a killed write left no gap: its fseq was reused
        assert [fseq for fseq, _ in on_cart] == list(range(1, len(on_cart) + 1)), vid
    root = settings.tape_libraries["default"].root
    for p, content in files:
        _, vid, fseq = copies[name_of(settings, p)]
        assert (root / "cartridges" / str(vid) / f"{fseq:08d}").read_bytes() == content
    assert not [p for p in root.rglob("*.tmp")]
    assert Counter(d["status"] for d in as_json(spool(path, "drive", "list", "--json"))) == {"idle": 2}
    assert await queue_depth(broker, settings.dead_queue("tape")) == 0
    # Every file was announced despite the kills (through the outbox), each under the id of its
    # fact: a file announced twice (killed between publish and ``sent``) is a duplicate by id.
    ids: dict[str, set[str]] = {}
    while (m := await archived.get(fail=False)) is not None:
        ids.setdefault(msgpack.unpackb(m.body)["name"], set()).add(str(m.message_id))
    assert sorted(ids) == names
    assert ids == {
        name: {db.archived_event(db.Archived(0, name, "tape1", str(vid), int(fseq or 0))).id}
        for name, (_, vid, fseq) in copies.items()
    }


async def _drive_writing(config: Path) -> bool:
    drives = as_json(spool(config, "drive", "list", "--json"))
    return any(
        d["status"] == "writing" and d["claimed"] and d["cartridge"] and d["since"]
        and d["request"] == "archive tape1 (pool raw): 40 files"
        for d in drives
    )  # fmt: skip


async def _unflushed(settings: Settings, n: int) -> bool:
    """At least ``n`` files are written on tape (their data is there) but not flushed yet."""
    root = settings.tape_libraries["default"].root
    data = sum(1 for p in root.glob("cartridges/*/*") if p.name.isdigit())  # first: commits follow
    return data - len(names_on_tape(await on_tape(settings))) >= n


async def _at_least(settings: Settings, n: int) -> bool:
    return await count_on(settings, "tape1") >= n


async def _depth_is(broker, name: str, n: int) -> bool:  # type: ignore[no-untyped-def]
    return await queue_depth(broker, name) == n
