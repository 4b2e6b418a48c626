"""Recall under faults, against the real broker: an unknown name, a corrupt tape copy, a full
destination buffer, and the daemon killed with SIGKILL in the middle of a batch."""

from __future__ import annotations

import signal
from collections import defaultdict
from pathlib import Path

import pytest

from common.bus.topology import declare_topology
from common.config import load_settings
from daemons.recall.handlers import service as recall_service
from tests.conftest import queue_depth, running, start_daemon, wait_for
from tests.recall_fixtures import (
    LIBRARY,
    Events,
    archive,
    contents,
    corrupt,
    corrupt_keeping_adler32,
    recall_config,
    recall_settings,
    recalled_history,
    register,
    replica,
    request,
    status,
)
from tests.replication_fixtures import remount, tmpfs

pytestmark = [pytest.mark.integration, pytest.mark.slow]
REPO = Path(__file__).resolve().parent.parent


async def test_an_unknown_name_fails_alone_and_blocks_nothing(tmp_path, tag, broker):
    settings = recall_settings(tmp_path, tag)
    files = contents(3)
    names = sorted(files)
    await register(settings, files)
    await archive(settings, {"A00001": names}, files)

    async with running([recall_service], settings):
        events = await Events.watch(broker, settings)
        rid = await request(broker, settings, names=[names[0], "run42/nope.fits", names[1], names[2]])
        done = await events.completion(rid)
        refused = await request(broker, settings, dataset="lst1.20991231.run000001.dl0")
        await wait_for(lambda: _dead(broker, settings, 1))

    assert (done["files"], done["failed"]) == (4, ["run42/nope.fits"])
    assert sorted(events.recalled(rid)) == names
    view = await status(settings, rid)
    assert view is not None
    (failure,) = [f for f in view.file_states if f.state == "failed"]
    assert (failure.name, failure.reason) == ("run42/nope.fits", "unknown_file")
    assert await status(settings, refused) is None  # refused whole: dead-lettered with its reason


async def _dead(broker, settings, n: int) -> bool:  # type: ignore[no-untyped-def]
    return await queue_depth(broker, settings.dead_queue("recall")) == n


async def test_a_corrupt_tape_copy_is_read_from_another_copy_else_fails_with_reason(tmp_path, tag, broker):
    settings = recall_settings(tmp_path, tag)
    files = contents(3)
    twice, once, fine = sorted(files)
    await register(settings, files)
    fseqs = await archive(settings, {"A00001": [twice, once, fine], "A00005": [twice]}, files)
    await corrupt(settings, "A00001", fseqs[("A00001", twice)])
    await corrupt(settings, "A00001", fseqs[("A00001", once)])

    async with running([recall_service], settings):
        events = await Events.watch(broker, settings)
        rid = await request(broker, settings, names=[twice, once, fine])
        done = await events.completion(rid)

    assert (done["files"], done["failed"]) == (3, [once])
    root = settings.storage["disk2"].root
    assert (root / twice).read_bytes() == files[twice]  # from the tape2 copy
    assert (root / fine).read_bytes() == files[fine]
    assert not (root / once).exists()
    view = await status(settings, rid)
    assert view is not None
    reasons = {f.name: f.reason for f in view.file_states}
    assert reasons == {twice: None, once: "checksum_mismatch", fine: None}
    assert (await replica(settings, twice, "tape1")).state == "bad"
    assert (await replica(settings, twice, "tape2")).state == "available"


async def test_a_tape_copy_altered_under_its_adler32_is_found_by_its_sha256(tmp_path, tag, broker):
    """Issue 20: the sha256 recorded at ingest is checked on the bytes read off tape (same pass as
    adler32). The altered copies keep their size and adler32: only sha256 can refuse them."""
    settings = recall_settings(tmp_path, tag)
    files = contents(2)
    twice, once = sorted(files)
    await register(settings, files)
    fseqs = await archive(settings, {"A00001": [twice, once], "A00005": [twice]}, files)
    await corrupt_keeping_adler32(settings, "A00001", fseqs[("A00001", twice)])
    await corrupt_keeping_adler32(settings, "A00001", fseqs[("A00001", once)])

    async with running([recall_service], settings):
        events = await Events.watch(broker, settings)
        rid = await request(broker, settings, names=[twice, once])
        done = await events.completion(rid)

    assert (done["files"], done["failed"]) == (2, [once])
    root = settings.storage["disk2"].root
    assert (root / twice).read_bytes() == files[twice]  # from the tape2 copy
    assert not (root / once).exists()
    view = await status(settings, rid)
    assert view is not None
    assert {f.name: f.reason for f in view.file_states} == {twice: None, once: "checksum_mismatch"}
    assert (await replica(settings, twice, "tape1")).state == "bad"


async def test_a_full_buffer_makes_recall_wait_then_resume_as_space_frees(tmp_path, tag, broker):
    settings = recall_settings(tmp_path, tag)
    files = contents(6, size=300_000)
    names = sorted(files)
    await register(settings, files)
    await archive(settings, {"A00001": names[:3], "A00002": names[3:]}, files)

    with tmpfs(settings.storage["disk2"].root, "1m") as root:
        async with running([recall_service], settings):
            events = await Events.watch(broker, settings)
            rid = await request(broker, settings, names=names)
            await wait_for(lambda: _done(settings, rid, 3), timeout=60)
            for _ in range(20):  # the 4th file does not fit: recall waits, it does not fail
                view = await status(settings, rid)
                assert view is not None and (view.state, view.done, view.failed) == ("active", 3, 0)
                await events.poll()
            remount(root, "size=16m")  # space frees
            done = await events.completion(rid)
        assert (done["files"], done["failed"]) == (6, [])
        for name in names:
            assert (root / name).read_bytes() == files[name]


async def _done(settings, rid: str, n: int) -> bool:  # type: ignore[no-untyped-def]
    view = await status(settings, rid)
    return view is not None and view.done >= n


# Reads take real time (a 3 kB file at 20 kB/s), so the kill lands in the middle of the batch.
SLOW = {
    "tape_libraries.default": LIBRARY + "time_scale = 1.0\ntiming = { mount_seconds = 0.5, "
    "unmount_seconds = 0.5, locate_average_seconds = 0.0, read_rate = 20000.0 }",
}


async def test_recall_killed_mid_batch_completes_after_restart_without_delivering_twice(
    tmp_path, tag, broker
):
    config = recall_config(tmp_path, tag, **SLOW)
    settings = load_settings(config)
    files = contents(30)
    names = sorted(files)
    await register(settings, files)
    await archive(settings, {"A00001": names[:10], "A00002": names[10:20], "A00003": names[20:]}, files)
    channel = await broker.channel()
    await declare_topology(channel, settings)  # the daemon is not up yet to declare it
    events = await Events.watch(broker, settings)
    log = tmp_path / "recall.log"
    proc = start_daemon(config, "recall", log)
    try:
        rid = await request(broker, settings, names=names)
        await wait_for(lambda: _done(settings, rid, 8), timeout=120, interval=0.05)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=10) == -signal.SIGKILL
        view = await status(settings, rid)
        assert view is not None and view.done < 30, "the kill came too late to prove anything"
        proc = start_daemon(config, "recall", log)
        done = await events.completion(rid, timeout=180)
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
    assert code == 0, log.read_text()[-3000:]
    assert (done["files"], done["failed"]) == (30, [])
    await events.poll()
    ids: dict[str, set[str | None]] = defaultdict(set)
    for key, body, message_id in events.seen:
        ids[body.get("name") or key].add(message_id)
    assert {n: len(ids[n]) for n in names} == dict.fromkeys(names, 1)  # once each (duplicates share the id)
    assert len(ids["recall.completed"]) == 1
    for name in names:
        assert await recalled_history(settings, name) == 1  # delivered once
        assert (settings.storage["disk2"].root / name).read_bytes() == files[name]
    assert not list((settings.storage["disk2"].root / ".spool-recall").iterdir())
