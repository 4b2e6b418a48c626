"""The tape daemon end to end against the real broker and a simulated library: rules to tape,
the mount policy, copies in two pools, full cartridges, missing sources; the handler on its own;
``spool tape list`` and ``spool drive list``."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path
from typing import Any

import msgpack
import pytest
from sqlalchemy import Connection, select

from common.bus.publisher import RecordingPublisher
from common.bus.service import Context
from common.catalogue import Catalogue, IngestRecord
from common.catalogue import schema as s
from common.config import Settings, load_settings
from common.errors import Permanent, Retryable
from common.instance import InstanceLease
from common.messages import FileArchived, TapeArchive
from common.storage import open_storage
from common.tape import TapeLibrary, open_library
from daemons.ingest.handlers import service as ingest_service
from daemons.relay import OutboxRelay
from daemons.tape import steps, writer
from daemons.tape.handlers import archive, open_resources
from daemons.tape.handlers import service as tape_service
from daemons.tape.writer import Env
from tests.cli_fixtures import spool
from tests.conftest import queue_depth, running, wait_for
from tests.replication_fixtures import count_on, make_files, name_of, publish_ready
from tests.storage_fixtures import adler, alter_keeping_adler32
from tests.tape_fixtures import (
    LIBRARY,
    POLICY,
    TAPE2,
    as_json,
    bind,
    drain,
    library_call,
    listed,
    names_on_tape,
    on_tape,
    placed,
    tape_config,
    tape_copies,
)

pytestmark = pytest.mark.integration
SERVICES = [ingest_service, tape_service]


async def _count(settings: Settings, storage: str, n: int, state: str = "available") -> bool:
    return await count_on(settings, storage, state) == n


async def test_rule_to_tape_archives_every_file_once_with_cartridge_and_fseq_in_write_order(
    tmp_path, tag, broker
):
    path = tape_config(tmp_path, tag)
    settings = load_settings(path)
    files = make_files(settings, 12, size=3000)
    async with running(SERVICES, settings):
        archived = await bind(broker, settings, "file.archived")
        mounted = await bind(broker, settings, "tape.mounted")
        await publish_ready(broker, settings, files)
        await wait_for(lambda: _count(settings, "tape1", 12), timeout=60)
    copies = await tape_copies(settings)
    tapes = await on_tape(settings)
    names = {name_of(settings, p) for p, _ in files}
    assert set(copies) == names and all(state == "available" for state, _, _ in copies.values())
    # The catalogue and the library agree on where each file is, and each is on tape once.
    assert placed(copies) == listed(tapes)
    assert names_on_tape(tapes) == sorted(names)
    # Files were appended in sequence: each cartridge's fseqs run 1..n without gaps.
    for vid, on_cart in tapes.items():
        assert [fseq for fseq, _ in on_cart] == list(range(1, len(on_cart) + 1)), vid
    # Every byte on tape is the file's.
    lib_root = settings.tape_libraries["default"].root
    for p, content in files:
        _, vid, fseq = copies[name_of(settings, p)]
        assert (lib_root / "cartridges" / str(vid) / f"{fseq:08d}").read_bytes() == content
    events = {
        body["name"]: (body["cartridge"], body["fseq"], body["storage"]) for _, body in await drain(archived)
    }
    assert events == {n: (vid, fseq, "tape1") for n, (_, vid, fseq) in copies.items()}
    assert await queue_depth(broker, settings.dead_queue("tape")) == 0
    # One tape.mounted per cartridge actually loaded (what the monitor counts as mounts).
    mounts = [body for _, body in await drain(mounted)]
    assert mounts and {m["cartridge"] for m in mounts} == {vid for vid, on_cart in tapes.items() if on_cart}
    assert {m["purpose"] for m in mounts} == {"archive"}

    cartridges = as_json(spool(path, "tape", "list", "--json"))
    used = [c for c in cartridges if c["files"]]
    assert {c["pool"] for c in used} == {"raw"}
    assert sum(c["files"] for c in used) == 12
    assert all(c["catalogued"] == c["files"] for c in cartridges)
    assert all(0 < c["fill"] <= 100 for c in used)
    drives = as_json(spool(path, "drive", "list", "--json"))
    assert [d["drive"] for d in drives] == ["DR01", "DR02"]
    assert {d["status"] for d in drives} == {"idle"} and not any(d["claimed"] for d in drives)
    # The last cartridge written stays mounted: the pool's next batch needs no mount.
    assert {d["cartridge"] for d in drives} & {c["vid"] for c in used}
    shown = as_json(spool(path, "show", name_of(settings, files[0][0]), "--json"))
    tape = next(r for r in shown["replicas"] if r["storage"] == "tape1")
    assert (tape["state"], tape["cartridge"], tape["fseq"]) == ("available", *copies[shown["name"]][1:])


async def test_below_every_threshold_the_queue_waits_for_the_age_of_its_oldest_request(tmp_path, tag, broker):
    policy = "mount_min_files = 100\nmount_min_bytes = 1000000000\nmount_max_age = 3\npoll_interval = 0.1"
    settings = load_settings(tape_config(tmp_path, tag, policy=policy))
    files = make_files(settings, 4)
    async with running(SERVICES, settings):
        await publish_ready(broker, settings, files)
        await wait_for(lambda: _count(settings, "tape1", 4, "queued"), timeout=30)
        assert (await library_call(settings, "usage")).total.mounts == 0
        await wait_for(lambda: _count(settings, "tape1", 4), timeout=30)
    assert (await library_call(settings, "usage")).total.mounts == 1  # one mount for the four
    async with await Catalogue.open(settings.catalogue.url) as cat:
        for p, _ in files:
            view = await cat.queries.show_file(name_of(settings, p))
            assert view is not None
            queued_at = next(r.created for r in view.replicas if r.storage == "tape1")
            written = next(e.time for e in await cat.queries.history(view.name) if e.type == "file.archived")
            assert (written - queued_at).total_seconds() >= 2.9  # not before mount_max_age


async def test_enough_files_mount_at_once_and_one_less_keeps_waiting(tmp_path, tag, broker):
    policy = "mount_min_files = 5\nmount_min_bytes = 1000000000\nmount_max_age = 3600\npoll_interval = 0.1"
    settings = load_settings(tape_config(tmp_path, tag, policy=policy))
    files = make_files(settings, 5)
    async with running(SERVICES, settings):
        await publish_ready(broker, settings, files[:4])
        await wait_for(lambda: _count(settings, "tape1", 4, "queued"), timeout=30)
        await asyncio.sleep(1.0)  # ten scheduler ticks
        assert await count_on(settings, "tape1", "queued") == 4
        assert (await library_call(settings, "usage")).total.mounts == 0
        await publish_ready(broker, settings, files[4:])
        await wait_for(lambda: _count(settings, "tape1", 5), timeout=30)
    assert (await library_call(settings, "usage")).total.mounts == 1
    tapes = await on_tape(settings)
    [(_vid, on_cart)] = [(v, fs) for v, fs in tapes.items() if fs]
    assert [fseq for fseq, _ in on_cart] == [1, 2, 3, 4, 5]


async def test_copies_in_two_pools_land_on_different_cartridges(tmp_path, tag, broker):
    two = {**TAPE2, "rules.archive": 'datasets = ".*"\nendpoints = "kind=tape"\ncopies = 2'}
    path = tape_config(tmp_path, tag, **two)
    settings = load_settings(path)
    files = make_files(settings, 10)
    async with running(SERVICES, settings):
        await publish_ready(broker, settings, files)
        await wait_for(lambda: _count(settings, "tape1", 10), timeout=60)
        await wait_for(lambda: _count(settings, "tape2", 10), timeout=60)
    first, second = await tape_copies(settings, "tape1"), await tape_copies(settings, "tape2")
    pools = {c["vid"]: c["pool"] for c in as_json(spool(path, "tape", "list", "--json"))}
    for name in first:
        assert first[name][1] != second[name][1]
        assert (pools[first[name][1]], pools[second[name][1]]) == ("raw", "vault")
    tapes = await on_tape(settings)
    assert Counter(names_on_tape(tapes)) == Counter({n: 2 for n in first})  # two copies, no more


async def test_pools_waiting_for_the_one_drive_take_turns(tmp_path, tag, broker):
    one_drive = LIBRARY.replace("drives = 2", "drives = 1")
    policy = (
        "mount_min_files = 3\nmount_min_bytes = 1000000000\nmount_max_age = 3600\npoll_interval = 0.1\n"
        "batch_max_files = 3"
    )
    two = {**TAPE2, "rules.archive": 'datasets = ".*"\nendpoints = "kind=tape"\ncopies = 2'}
    settings = load_settings(tape_config(tmp_path, tag, library=one_drive, policy=policy, **two))
    files = make_files(settings, 9)
    async with running([ingest_service], settings):  # both queues full before the tape daemon starts
        await publish_ready(broker, settings, files)
        await wait_for(lambda: _count(settings, "tape1", 9, "queued"), timeout=30)
        await wait_for(lambda: _count(settings, "tape2", 9, "queued"), timeout=30)
    async with running([tape_service], settings):
        await wait_for(lambda: _count(settings, "tape1", 9), timeout=60)
        await wait_for(lambda: _count(settings, "tape2", 9), timeout=60)
    async with await Catalogue.open(settings.catalogue.url) as cat:
        order = await cat.read(_archived_order)
    # Batches of three, one pool after the other: neither pool keeps the drive.
    assert order[:3] != order[3:6] and order == (order[:3] + order[3:6]) * 3
    assert {order[0], order[3]} == {"tape1", "tape2"} and len(set(order[:3])) == 1
    assert (await library_call(settings, "usage")).total.mounts == 6


def _archived_order(conn: Connection) -> list[str]:
    stmt = select(s.events.c.storage).where(s.events.c.type == "file.archived").order_by(s.events.c.id)
    return list(conn.scalars(stmt))


async def test_a_full_cartridge_is_closed_and_the_next_one_of_the_pool_taken(tmp_path, tag, broker):
    small = LIBRARY.replace("capacity_bytes = 100000", "capacity_bytes = 10000").replace("raw = 3", "raw = 6")
    policy = "mount_min_files = 10\nmount_min_bytes = 1000000000\nmount_max_age = 3600\npoll_interval = 0.1"
    path = tape_config(tmp_path, tag, library=small, policy=policy)
    settings = load_settings(path)
    files = make_files(settings, 10, size=3000)  # three fit a cartridge
    async with running(SERVICES, settings):
        await publish_ready(broker, settings, files)
        await wait_for(lambda: _count(settings, "tape1", 10), timeout=60)
    tapes = {vid: fs for vid, fs in (await on_tape(settings)).items() if fs}
    assert sorted(len(fs) for fs in tapes.values()) == [1, 3, 3, 3]
    assert placed(await tape_copies(settings)) == listed(tapes)
    states = {c["vid"]: c["state"] for c in as_json(spool(path, "tape", "list", "--json"))}
    assert sorted(states[v] for v in tapes) == ["filling", "full", "full", "full"]
    assert (await library_call(settings, "usage")).total.mounts == 4  # one batch, four cartridges


async def test_a_file_without_a_usable_disk_copy_fails_and_the_batch_goes_on(tmp_path, tag, broker):
    policy = "mount_min_files = 5\nmount_min_bytes = 1000000000\nmount_max_age = 3600\npoll_interval = 0.1"
    path = tape_config(tmp_path, tag, policy=policy)
    settings = load_settings(path)
    files = make_files(settings, 5)
    lost = name_of(settings, files[0][0])
    async with running(SERVICES, settings):
        failed = await bind(broker, settings, "file.failed")
        await publish_ready(broker, settings, files[:4])
        await wait_for(lambda: _count(settings, "tape1", 4, "queued"), timeout=30)
        (settings.storage["disk1"].root / lost).unlink()
        await publish_ready(broker, settings, files[4:])
        await wait_for(lambda: _count(settings, "tape1", 4), timeout=30)
        await wait_for(lambda: _count(settings, "tape1", 1, "failed"), timeout=30)
    copies = await tape_copies(settings)
    assert copies[lost][0] == "failed"
    assert lost not in names_on_tape(await on_tape(settings))
    [(_, event)] = await drain(failed)
    assert (event["name"], event["daemon"], event["reason"]) == (lost, "tape", "no_source")
    shown = as_json(spool(path, "show", lost, "--json"))
    assert shown["last_error"]["reason"] == "no_source"
    assert {r["storage"]: r["state"] for r in shown["replicas"]} == {"disk1": "bad", "tape1": "failed"}


async def test_a_disk_copy_altered_under_its_adler32_is_refused_by_its_sha256_on_the_way_to_tape(
    tmp_path, tag, broker
):
    """Issue 20: the tape write checks the sha256 recorded at ingest (small files: as the member
    is packed into its aggregate, in the same pass as adler32). The disk copy keeps its size and
    adler32: only sha256 can refuse it."""
    policy = "mount_min_files = 5\nmount_min_bytes = 1000000000\nmount_max_age = 3600\npoll_interval = 0.1"
    path = tape_config(tmp_path, tag, policy=policy)
    settings = load_settings(path)
    files = make_files(settings, 5)
    altered = name_of(settings, files[0][0])
    async with running(SERVICES, settings):
        await publish_ready(broker, settings, files[:4])
        await wait_for(lambda: _count(settings, "tape1", 4, "queued"), timeout=30)
        disk_copy = settings.storage["disk1"].root / altered
        disk_copy.write_bytes(alter_keeping_adler32(disk_copy.read_bytes()))
        await publish_ready(broker, settings, files[4:])
        await wait_for(lambda: _count(settings, "tape1", 4), timeout=30)
        await wait_for(lambda: _count(settings, "tape1", 1, "failed"), timeout=30)
    assert altered not in names_on_tape(await on_tape(settings))
    shown = as_json(spool(path, "show", altered, "--json"))
    assert shown["last_error"]["reason"] == "no_source"
    assert {r["storage"]: r["state"] for r in shown["replicas"]} == {"disk1": "bad", "tape1": "failed"}


# --- the handler on its own (no broker) ---------------------------------------------------------
@pytest.fixture
async def ctx(tmp_path: Path, tag: str):
    policy = "mount_max_age = 3600\npoll_interval = 0.1"  # nothing is written while these run
    settings = load_settings(tape_config(tmp_path, tag, policy=policy))
    publisher = RecordingPublisher()
    async with open_resources(settings, publisher) as resources:
        rec = IngestRecord(
            event_id="e1", name="n/a.fits", dataset="lst1.20261124.run000042.dl0", size=3,
            adler32=adler(b"abc"), storage="disk1", pfn="n/a.fits",
        )  # fmt: skip
        await resources.catalogue.ingest.register([rec])
        yield Context(daemon="tape", settings=settings, publisher=publisher, resources=resources)


async def test_handler_queues_the_copy_once_and_keeps_the_higher_priority(ctx):
    await archive(TapeArchive(name="n/a.fits", destination="tape1", priority=2), ctx)
    await archive(TapeArchive(name="n/a.fits", destination="tape1", priority=6), ctx)
    await archive(TapeArchive(name="n/a.fits", destination="tape1", priority=1), ctx)
    view = await ctx.resources.catalogue.queries.show_file("n/a.fits")
    assert [(r.storage, r.state) for r in view.replicas] == [("disk1", "available"), ("tape1", "queued")]
    async with ctx.resources.catalogue.engine.connect() as conn:
        prio = (await conn.exec_driver_sql("select priority from replicas where state = 'queued'")).scalar()
    assert prio == 6
    assert ctx.publisher.of_type(FileArchived) == []


async def test_handler_re_announces_a_copy_already_on_tape(ctx):
    cat = ctx.resources.catalogue
    await cat.replication.set_replica(name="n/a.fits", storage="tape1", pfn="n/a.fits", state="available",
                          cartridge="A00002", fseq=7)  # fmt: skip
    await archive(TapeArchive(name="n/a.fits", destination="tape1"), ctx)
    [event] = ctx.publisher.of_type(FileArchived)
    assert (event.name, event.storage, event.cartridge, event.fseq) == ("n/a.fits", "tape1", "A00002", 7)


@pytest.mark.parametrize(
    ("name", "destination", "reason"),
    [("nosuch", "tape1", "unknown_file"), ("n/a.fits", "disk1", "not_a_tape_endpoint"),
     ("n/a.fits", "nowhere", "unknown_storage")],
)  # fmt: skip
async def test_handler_refuses_unknown_files_and_non_tape_destinations(ctx, name, destination, reason):
    with pytest.raises(Permanent) as err:
        await archive(TapeArchive(name=name, destination=destination), ctx)
    assert err.value.reason == reason


class _FlushFails:
    """The library, whose synchronous tape marks fail ``times`` times after the first ``ok``
    (a drive that breaks between writes and their flush)."""

    def __init__(self, library: TapeLibrary, ok: int, times: int) -> None:
        self._library, self.ok, self.times = library, ok, times

    def __getattr__(self, name: str) -> Any:
        return getattr(self._library, name)

    async def flush(self, drive_id: str) -> list[int]:
        if self.ok:
            self.ok -= 1
            return await self._library.flush(drive_id)
        if self.times:
            self.times -= 1
            raise Retryable("drive_broken", f"drive {drive_id} broke before the tape mark")
        return await self._library.flush(drive_id)


async def _queued_by_ingest(tmp_path: Path, tag: str, broker: Any, n: int, policy: str) -> Settings:
    """``n`` files ingested and their tape copies queued, no tape daemon running (the test runs the
    writer's batches itself); ``policy``: more ``[tape]`` lines."""
    policy = POLICY.replace("mount_min_files = 5", "mount_min_files = 1000") + "\n" + policy
    settings = load_settings(tape_config(tmp_path, tag, policy=policy))
    files = make_files(settings, n, size=3000)
    async with running([ingest_service], settings):
        await publish_ready(broker, settings, files)
        await wait_for(lambda: _count(settings, "tape1", n, "queued"), timeout=60)
    return settings


async def test_files_written_but_not_flushed_are_queued_again_and_written_once(tmp_path, tag, broker):
    """Flushes every 2 files; the second flush fails (and its retry at the end of the batch): the
    2 flushed files are recorded, the 2 written after them are dropped from the cartridge and go
    back to the queue with the rest. The next batch writes them again, reusing their fseqs."""
    settings = await _queued_by_ingest(tmp_path, tag, broker, 6, "flush_files = 2")
    target = steps.targets(settings.storage)["tape1"]
    catalogue = await Catalogue.open(settings.catalogue.url)
    library = await open_library(settings.tape_libraries["default"])
    storages = {n: open_storage(n, e) for n, e in settings.storage.items() if e.kind == "disk"}
    lease = InstanceLease(catalogue, "tape", "test", 30.0)
    await lease.start()
    try:
        relay = OutboxRelay(catalogue, RecordingPublisher())
        env = Env(settings, catalogue, relay, storages, tmp_path / "staging", lease)
        flaky = _FlushFails(library, ok=1, times=2)
        with pytest.raises(Retryable, match="before the tape mark"):
            await writer.run_batch(env, target, flaky, "test")  # type: ignore[arg-type]
        assert await count_on(settings, "tape1") == 2  # what the first flush covered
        assert await count_on(settings, "tape1", "queued") == 4  # two written, never flushed
        tapes = await on_tape(settings)
        assert sum(len(on_cart) for on_cart in tapes.values()) == 2  # the unflushed ones are gone
        first = await tape_copies(settings)

        assert await writer.run_batch(env, target, library, "test") == 4
        copies = await tape_copies(settings)
        tapes = await on_tape(settings)
        assert {st for st, _, _ in copies.values()} == {"available"} and len(copies) == 6
        assert placed(copies) == listed(tapes)
        assert names_on_tape(tapes) == sorted(copies)  # each on tape once
        for vid, on_cart in tapes.items():  # the dropped fseqs were reused: no gap
            assert [fseq for fseq, _ in on_cart] == list(range(1, len(on_cart) + 1)), vid
        assert {n: c for n, c in copies.items() if first[n][0] == "available"} == {
            n: c for n, c in first.items() if c[0] == "available"
        }  # the flushed ones were recorded once and never moved
        announced = Counter(e.name for e in await catalogue.read(_archived_in_outbox))
        assert announced == Counter(list(copies))  # each file.archived once
    finally:
        await lease.stop()
        for storage in storages.values():
            await storage.aclose()
        await library.close()
        await catalogue.close()


def _archived_in_outbox(conn: Connection) -> list[Any]:
    o = s.outbox
    rows = conn.execute(select(o.c.body).where(o.c.routing_key == "file.archived"))
    return [FileArchived.model_validate(msgpack.unpackb(b)) for (b,) in rows]


class _Counting:
    """The library, counting the mounts asked of it."""

    def __init__(self, library: TapeLibrary) -> None:
        self._library = library
        self.mounts = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._library, name)

    async def mount(self, drive_id: str, vid: str, *, request: str | None = None) -> bool:
        self.mounts += 1
        return await self._library.mount(drive_id, vid, request=request)


async def test_a_batch_is_taken_from_the_queue_a_window_at_a_time_in_one_mount(
    tmp_path, tag, broker, monkeypatch
):
    """``batch_max_files = 7`` over 8 queued files, windows of 3: one mount writes 7 files, taken
    3, 3 and 1 at a time (never the whole batch at once: its rows and sources would all be held
    in memory), the 8th waits in the queue for the next batch."""
    settings = await _queued_by_ingest(tmp_path, tag, broker, 8, "batch_max_files = 7")
    monkeypatch.setattr(writer, "TAKE_WINDOW", 3)
    target = steps.targets(settings.storage)["tape1"]
    catalogue = await Catalogue.open(settings.catalogue.url)
    library = await open_library(settings.tape_libraries["default"])
    storages = {n: open_storage(n, e) for n, e in settings.storage.items() if e.kind == "disk"}
    taken: list[int] = []
    repository = type(catalogue.tape)
    take_batch = repository.take_batch

    async def counted(self: Any, ids: list[int], cartridge: str, *, holder: str) -> Any:
        taken.append(len(ids))
        return await take_batch(self, ids, cartridge, holder=holder)

    monkeypatch.setattr(repository, "take_batch", counted)
    lease = InstanceLease(catalogue, "tape", "test", 30.0)
    await lease.start()
    try:
        relay = OutboxRelay(catalogue, RecordingPublisher())
        env = Env(settings, catalogue, relay, storages, tmp_path / "st", lease)
        counting = _Counting(library)
        assert await writer.run_batch(env, target, counting, "test") == 7  # type: ignore[arg-type]
        assert taken == [3, 3, 1] and counting.mounts == 1
        assert await count_on(settings, "tape1") == 7 and await count_on(settings, "tape1", "queued") == 1
        assert await writer.run_batch(env, target, counting, "test") == 1
        copies = await tape_copies(settings)
        assert {st for st, _, _ in copies.values()} == {"available"} and len(copies) == 8
        assert placed(copies) == listed(await on_tape(settings))
    finally:
        await lease.stop()
        for storage in storages.values():
            await storage.aclose()
        await library.close()
        await catalogue.close()
