"""The recall daemon end to end against the real broker: requests by names and by dataset, one
mount per cartridge, fseq order, files served at once from disk, pinned copies, the reply to
``reply_to``, and the ``spool recall`` commands."""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aio_pika
import pytest

from common.config import load_settings
from daemons.recall.handlers import service as recall_service
from tests.conftest import running, wait_for
from tests.recall_fixtures import (
    DATASET,
    Events,
    archive,
    contents,
    mounts,
    recall_config,
    recall_settings,
    register,
    replica,
    request,
    status,
)

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parent.parent


async def test_recall_by_names_mounts_each_cartridge_once_and_reads_in_fseq_order(tmp_path, tag, broker):
    settings = recall_settings(tmp_path, tag)
    files = contents(12)
    names = sorted(files)
    layout = {"A00001": names[0:4], "A00002": names[4:8], "A00003": names[8:12]}
    await register(settings, files)
    fseqs = await archive(settings, layout, files)
    wanted = [n for vid_names in layout.values() for n in vid_names[1:]]  # 3 of each cartridge
    random.Random(7).shuffle(wanted)
    before = await mounts(settings)

    async with running([recall_service], settings):
        events = await Events.watch(broker, settings)
        rid = await request(broker, settings, names=wanted)
        done = await events.completion(rid)

    assert (done["files"], done["failed"]) == (9, [])
    assert await mounts(settings) - before == 3  # one mount per cartridge
    root = settings.storage["disk2"].root
    for name in wanted:
        assert (root / name).read_bytes() == files[name]
    for vid, vid_names in layout.items():
        order = [n for n in events.recalled(rid) if n in vid_names]
        assert [fseqs[(vid, n)] for n in order] == sorted(fseqs[(vid, n)] for n in order)
    assert sorted(events.recalled(rid)) == sorted(wanted)
    view = await status(settings, rid)
    assert view is not None and (view.state, view.done, view.failed) == ("done", 9, 0)
    pinned = await replica(settings, wanted[0], "disk2")
    assert pinned.state == "available"
    assert (
        datetime.now(UTC) + timedelta(minutes=50) < pinned.tombstone < datetime.now(UTC) + timedelta(hours=1)
    )
    assert not list((root / ".spool-recall").iterdir())


async def test_recall_by_dataset_brings_back_every_file_of_it(tmp_path, tag, broker):
    settings = recall_settings(tmp_path, tag)
    files = contents(5)
    names = sorted(files)
    await register(settings, files)
    await archive(settings, {"A00001": names[:3], "A00002": names[3:]}, files)

    async with running([recall_service], settings):
        events = await Events.watch(broker, settings)
        rid = await request(broker, settings, dataset=DATASET, destination="disk3", priority=7)
        done = await events.completion(rid)

    assert (done["files"], done["failed"]) == (5, [])
    assert sorted(events.recalled(rid)) == names
    for name in names:
        assert (settings.storage["disk3"].root / name).read_bytes() == files[name]


async def test_files_with_a_disk_copy_are_served_at_once_without_a_mount(tmp_path, tag, broker):
    settings = recall_settings(tmp_path, tag)
    files = contents(3)
    names = sorted(files)
    await register(settings, files, keep_on_disk=set(names))
    await archive(settings, {"A00001": names}, files)
    before = await mounts(settings)

    async with running([recall_service], settings):
        events = await Events.watch(broker, settings)
        here = await request(broker, settings, names=names, destination="disk1")  # already there
        there = await request(broker, settings, names=names[:2], destination="disk2")  # copied
        assert (await events.completion(here))["failed"] == []
        assert (await events.completion(there))["failed"] == []

    assert await mounts(settings) == before
    for name in names[:2]:
        assert (settings.storage["disk2"].root / name).read_bytes() == files[name]
    assert (await replica(settings, names[0], "disk1")).tombstone is None  # ingest's copy stays unpinned
    assert (await replica(settings, names[0], "disk2")).tombstone is not None


async def test_the_completion_is_sent_to_reply_to_as_a_cloudevent(tmp_path, tag, broker):
    settings = recall_settings(tmp_path, tag)
    files = contents(2)
    await register(settings, files)
    await archive(settings, {"A00001": sorted(files)}, files)
    channel = await broker.channel()
    replies = await channel.declare_queue(f"{settings.bus.queue_prefix}.reply.pipeline", exclusive=True)

    async with running([recall_service], settings):
        rid = await request(
            broker, settings, names=[*sorted(files), "run42/missing.fits"], reply_to=replies.name,
            correlation_id="pipeline-job-17",
        )  # fmt: skip
        got: list[aio_pika.abc.AbstractIncomingMessage] = []

        async def replied() -> bool:
            if (m := await replies.get(fail=False, no_ack=True)) is not None:
                got.append(m)
            return bool(got)

        await wait_for(replied, timeout=60)

    (reply,) = got
    assert reply.content_type == "application/cloudevents+json"
    assert reply.correlation_id == "pipeline-job-17"
    event = json.loads(reply.body)
    assert (event["specversion"], event["type"]) == ("1.0", "recall.completed")
    assert event["data"]["request_id"] == rid
    assert (event["data"]["files"], event["data"]["failed"]) == (3, ["run42/missing.fits"])


def _spool(config: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "daemons", "--config", str(config), *args]


async def _cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The CLI in a subprocess, awaited: the daemon under test runs on this event loop."""
    proc = await asyncio.create_subprocess_exec(
        *_spool(config, *args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=120)
    assert proc.returncode is not None
    return subprocess.CompletedProcess(args, proc.returncode, out.decode(), err.decode())


async def test_recall_commands_request_wait_status_and_list(tmp_path, tag, broker):
    config = recall_config(tmp_path, tag)
    settings = load_settings(config)
    files = contents(4)
    names = sorted(files)
    await register(settings, files)
    await archive(settings, {"A00001": names[:2], "A00002": names[2:]}, files)

    async with running([recall_service], settings):
        waited = await _cli(
            config, "recall", "request", *names, "nope/x.fits", "--to", "disk2", "--wait", "--json"
        )
        assert waited.returncode == 0, waited.stderr
        out = json.loads(waited.stdout)
        rid = out["id"]
        assert (out["completed"]["files"], out["completed"]["failed"]) == (5, ["nope/x.fits"])
        shown = await _cli(config, "recall", "status", rid, "--json")
        listed = await _cli(config, "recall", "list", "--json")
        table = await _cli(config, "recall", "status", rid)
        bad = await _cli(config, "recall", "request", names[0], "--to", "tape1")

    doc = json.loads(shown.stdout)
    assert (doc["state"], doc["files"], doc["done"], doc["failed"], doc["queued"]) == ("failed", 5, 4, 1, 0)
    assert doc["failures"] == [
        {"name": "nope/x.fits", "reason": "unknown_file", "error": "nope/x.fits is not in the catalogue"}
    ]
    assert doc["cartridges"] == {"-": {"failed": 1}, "A00001": {"done": 2}, "A00002": {"done": 2}}
    assert [r["id"] for r in json.loads(listed.stdout)] == [rid]
    assert "unknown_file" in table.stdout and "A00002" in table.stdout
    assert bad.returncode == 1 and "not a disk endpoint" in bad.stderr
    missing = await _cli(config, "recall", "status", "no-such-id")
    assert missing.returncode == 1 and "no recall request" in missing.stderr
