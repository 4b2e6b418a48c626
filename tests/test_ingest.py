"""ingest end to end against the real broker and a real SQLite catalogue: every bad input of the
issue ends in the dead-letter queue (or a failed request) with its reason, and the daemon keeps
running."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import msgpack
import pytest

from common.bus import headers as H
from common.catalogue import Catalogue
from common.config import Settings
from daemons.ingest.handlers import service as ingest_service
from tests.conftest import cloudevent, make_file, publish_raw, queue_depth, running, wait_for
from tests.storage_fixtures import adler

pytestmark = pytest.mark.integration
DATASET = "lst1.20261123.run012345.dl0"


def landing(settings: Settings) -> Path:
    return settings.landing_areas["lst1"]


def ready(path: Path | str, **data: Any) -> dict[str, Any]:
    return {"path": str(path), "dataset": DATASET, **data}


async def dead_reasons(broker, settings) -> list[str]:
    channel = await broker.channel()
    queue = await channel.get_queue(settings.dead_queue("ingest"))
    reasons = []
    while (m := await queue.get(no_ack=False, fail=False)) is not None:
        reasons.append(m.headers[H.REASON])
    await channel.close()  # requeues them
    return reasons


async def registered(settings: Settings) -> int:
    async with await Catalogue.open(settings.catalogue.url) as c:
        return (await c.queries.counts()).files


async def test_good_file_is_copied_verified_registered_and_announced(settings, broker, topology):
    channel = await broker.channel()
    watcher = await channel.declare_queue(exclusive=True)
    await watcher.bind(settings.bus.exchange, "file.ingested")
    content = b"x" * 5000
    src = make_file(settings, "run012345/subrun0001.fits.fz", content)
    body = cloudevent(
        ready(
            src,
            size=5000,
            adler32=adler(content),
            metadata={"run": 12345, "telescope": "LST1"},
            parents=["raw/run012345.r0"],
        )
    )
    async with running([ingest_service], settings):
        await publish_raw(broker, settings, "file.ready", body)
        await wait_for(lambda: _registered_is(settings, 1))
        ingested = await _get(watcher)
    event = msgpack.unpackb(ingested.body)
    name = "run012345/subrun0001.fits.fz"
    assert (event["name"], event["size"], event["adler32"], event["storage"]) == (
        name,
        5000,
        adler(content),
        "disk1",
    )
    replica = settings.storage["disk1"].root / name
    assert replica.read_bytes() == content
    async with await Catalogue.open(settings.catalogue.url) as c:
        view = await c.queries.show_file(name)
        found = await c.queries.find_files([_filter("run>=12000")])
    assert view is not None and view.metadata == {"run": 12345, "telescope": "LST1"}
    assert view.parents == ["raw/run012345.r0"]
    assert [(r.storage, r.state) for r in view.replicas] == [("disk1", "available")]
    assert [f.name for f in found] == [name]
    await channel.close()


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("missing_file", "file_missing"),
        ("dotdot", "path_outside_area"),
        ("symlink_escape", "path_outside_area"),
        ("size_mismatch", "size_mismatch"),
        ("checksum_mismatch", "checksum_mismatch"),
        ("bad_dataset", "bad_dataset_name"),
        ("unknown_type", "unknown_type"),
        ("malformed_json", "undecodable"),
        ("not_cloudevent", "not_cloudevent"),
        ("missing_field", "invalid_message"),
    ],
)
async def test_bad_input_is_dead_lettered_with_its_reason_and_ingest_keeps_going(
    settings, broker, topology, tmp_path, case, reason
):
    content = b"payload"
    src = make_file(settings, "run012345/bad.fits.fz", content)
    outside = tmp_path / "secret.txt"
    outside.write_text("outside")
    bodies = {
        "missing_file": cloudevent(ready(landing(settings) / "run012345/nope.fits.fz")),
        "dotdot": cloudevent(ready(f"{landing(settings)}/../../etc/passwd")),
        "symlink_escape": cloudevent(ready(_symlink(landing(settings) / "link.fits", outside))),
        "size_mismatch": cloudevent(ready(src, size=999)),
        "checksum_mismatch": cloudevent(ready(src, adler32="deadbeef")),
        "bad_dataset": cloudevent({"path": str(src), "dataset": "Not A Dataset"}),
        "unknown_type": cloudevent(ready(src), type_="file.teleported"),
        "malformed_json": b'{"specversion": "1.0", ',
        "not_cloudevent": json.dumps({"path": str(src)}).encode(),
        "missing_field": cloudevent({"path": str(src)}),
    }
    good = make_file(settings, "run012345/good.fits.fz", b"good")
    async with running([ingest_service], settings):
        await publish_raw(broker, settings, "file.ready", bodies[case])
        await wait_for(lambda: _depth_is(broker, settings.dead_queue("ingest"), 1))
        await publish_raw(broker, settings, "file.ready", cloudevent(ready(good)))
        await wait_for(lambda: _registered_is(settings, 1))
    assert await dead_reasons(broker, settings) == [reason]
    assert not list((settings.storage["disk1"].root).rglob("*spool-tmp*"))
    assert not (settings.storage["disk1"].root / "run012345/bad.fits.fz").exists()


async def test_permanent_failure_is_recorded_as_the_files_last_error(settings, broker, topology):
    src = make_file(settings, "run012345/corrupt.fits.fz", b"abc")
    async with running([ingest_service], settings):
        await publish_raw(
            broker, settings, "file.ready", cloudevent(ready(src, adler32="00000001"), id_="ev-c")
        )
        await wait_for(lambda: _depth_is(broker, settings.dead_queue("ingest"), 1))
    async with await Catalogue.open(settings.catalogue.url) as c:
        state = (await c.queries.request_state(["ev-c"]))["ev-c"]
    assert (state.state, state.reason, state.path) == ("failed", "checksum_mismatch", str(src))


async def test_duplicate_event_id_is_a_no_op_that_republishes(settings, broker, topology):
    channel = await broker.channel()
    watcher = await channel.declare_queue(exclusive=True)
    await watcher.bind(settings.bus.exchange, "file.ingested")
    src = make_file(settings, "run012345/dup.fits.fz", b"same")
    body = cloudevent(ready(src), id_="ev-dup")
    async with running([ingest_service], settings):
        await publish_raw(broker, settings, "file.ready", body)
        await wait_for(lambda: _depth_is(broker, watcher.name, 1))
        await publish_raw(broker, settings, "file.ready", body)
        await wait_for(lambda: _depth_is(broker, watcher.name, 2))
    assert await registered(settings) == 1
    assert await dead_reasons(broker, settings) == []
    await channel.close()


async def test_same_name_same_checksum_under_a_new_id_is_a_duplicate(settings, broker, topology):
    src = make_file(settings, "run012345/again.fits.fz", b"same")
    async with running([ingest_service], settings) as process:
        await publish_raw(broker, settings, "file.ready", cloudevent(ready(src)))
        await wait_for(lambda: _registered_is(settings, 1))
        await publish_raw(broker, settings, "file.ready", cloudevent(ready(src, adler32=adler(b"same"))))
        await wait_for(lambda: _processed(process, 2))
    assert await registered(settings) == 1
    assert await dead_reasons(broker, settings) == []


async def test_same_name_other_checksum_is_a_conflict_and_never_overwrites(settings, broker, topology):
    src = make_file(settings, "run012345/conflict.fits.fz", b"first")
    async with running([ingest_service], settings):
        await publish_raw(broker, settings, "file.ready", cloudevent(ready(src)))
        await wait_for(lambda: _registered_is(settings, 1))
        src.write_bytes(b"second version")
        await publish_raw(broker, settings, "file.ready", cloudevent(ready(src)))
        await wait_for(lambda: _depth_is(broker, settings.dead_queue("ingest"), 1))
    assert await dead_reasons(broker, settings) == ["name_conflict"]
    assert (settings.storage["disk1"].root / "run012345/conflict.fits.fz").read_bytes() == b"first"


async def test_unwritable_destination_is_retried_with_backoff_then_succeeds(settings, broker, topology):
    chattr = shutil.which("chattr")
    root = settings.storage["disk1"].root
    root.mkdir(parents=True, exist_ok=True)
    if chattr is None or subprocess.run([chattr, "+i", str(root)], capture_output=True).returncode != 0:
        pytest.skip("needs chattr +i (root on ext4) to make the destination really unwritable")
    src = make_file(settings, "run012345/later.fits.fz", b"patience")
    try:
        async with running([ingest_service], settings) as process:
            await publish_raw(broker, settings, "file.ready", cloudevent(ready(src), id_="ev-w"))
            await wait_for(lambda: _retried(process, 2))
            async with await Catalogue.open(settings.catalogue.url) as c:
                state = (await c.queries.request_state(["ev-w"]))["ev-w"]
            assert (state.state, state.reason) == ("retrying", "destination_not_writable")
            subprocess.run([chattr, "-i", str(root)], check=True)
            await wait_for(lambda: _registered_is(settings, 1), timeout=20)
    finally:
        subprocess.run([chattr, "-i", str(root)], capture_output=True)
    assert await dead_reasons(broker, settings) == []
    assert (root / "run012345/later.fits.fz").read_bytes() == b"patience"


# --- helpers ------------------------------------------------------------------------------------
def _filter(text: str) -> Any:
    from common.catalogue import parse_filter

    return parse_filter(text)


def _symlink(link: Path, target: Path) -> Path:
    link.symlink_to(target)
    return link


async def _registered_is(settings: Settings, n: int) -> bool:
    return await registered(settings) == n


async def _depth_is(broker, name: str, n: int) -> bool:
    return await queue_depth(broker, name) == n


async def _processed(process, n: int) -> bool:
    return process.runners[0].stats.processed >= n


async def _retried(process, n: int) -> bool:
    return process.runners[0].stats.retried >= n


async def _get(queue, timeout: float = 10.0):
    import asyncio

    for _ in range(int(timeout / 0.05)):
        msg = await queue.get(no_ack=True, fail=False)
        if msg is not None:
            return msg
        await asyncio.sleep(0.05)
    raise AssertionError("no message arrived")
