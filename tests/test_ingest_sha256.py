"""Strong checksums through ingest, against the real broker and catalogue: sha256 computed in the
copy's one read pass and recorded (compared here with hashlib), announced on ``file.ingested``;
an announced sha256 that differs from the bytes is a dead letter ``checksum_mismatch`` (as
adler32's); a malformed one is ``invalid_message``; ingest keeps going after each."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import msgpack
import pytest

from common.catalogue import Catalogue
from common.config import Settings
from daemons.ingest.handlers import service as ingest_service
from tests.conftest import cloudevent, dead_reasons, make_file, publish_raw, queue_depth, running, wait_for
from tests.storage_fixtures import adler, alter_keeping_adler32

pytestmark = pytest.mark.integration
DATASET = "lst1.20261123.run012345.dl0"


def ready(path: Path, **data: Any) -> dict[str, Any]:
    return {"path": str(path), "dataset": DATASET, **data}


async def recorded_sha256(settings: Settings, name: str) -> str | None:
    async with await Catalogue.open(settings.catalogue.url) as c:
        view = await c.queries.show_file(name)
    return None if view is None else view.sha256


async def registered(settings: Settings) -> int:
    async with await Catalogue.open(settings.catalogue.url) as c:
        return (await c.queries.counts()).files


@pytest.mark.parametrize("announced", [False, True], ids=["computed", "announced-and-verified"])
async def test_sha256_is_recorded_and_announced(settings, broker, topology, announced: bool) -> None:
    channel = await broker.channel()
    watcher = await channel.declare_queue(exclusive=True)
    await watcher.bind(settings.bus.exchange, "file.ingested")
    small, large = os.urandom(3000), os.urandom(3 * 1024 * 1024)  # a batched copy and a threaded one
    files = {"run012345/small.fits.fz": small, "run012345/large.fits.fz": large}
    async with running([ingest_service], settings):
        for name, data in files.items():
            extra = {"sha256": hashlib.sha256(data).hexdigest().upper()} if announced else {}
            body = cloudevent(ready(make_file(settings, name, data), size=len(data), **extra))
            await publish_raw(broker, settings, "file.ready", body)
        await wait_for(lambda: _depth(broker, watcher.name, 2))
    events = {}
    while (m := await watcher.get(no_ack=True, fail=False)) is not None:
        event = msgpack.unpackb(m.body)
        events[event["name"]] = event["sha256"]
    expected = {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}
    assert events == expected
    for name in files:
        assert await recorded_sha256(settings, name) == expected[name]
    assert await dead_reasons(broker, settings) == []
    await channel.close()


async def test_an_announced_sha256_that_differs_is_a_dead_letter_checksum_mismatch(
    settings, broker, topology
) -> None:
    data = os.urandom(5000)
    src = make_file(settings, "run012345/liar.fits.fz", data)
    # Right size and adler32, other sha256: only the strong checksum can refuse it.
    wrong = hashlib.sha256(alter_keeping_adler32(data)).hexdigest()
    good = make_file(settings, "run012345/good.fits.fz", b"good")
    async with running([ingest_service], settings):
        body = cloudevent(ready(src, size=5000, adler32=adler(data), sha256=wrong), id_="ev-liar")
        await publish_raw(broker, settings, "file.ready", body)
        await wait_for(lambda: _depth(broker, settings.dead_queue("ingest"), 1))
        await publish_raw(broker, settings, "file.ready", cloudevent(ready(good)))
        await wait_for(lambda: _registered_is(settings, 1))
    assert await dead_reasons(broker, settings) == ["checksum_mismatch"]
    assert not (settings.storage["disk1"].root / "run012345/liar.fits.fz").exists()
    async with await Catalogue.open(settings.catalogue.url) as c:
        state = (await c.queries.request_state(["ev-liar"]))["ev-liar"]
    assert (state.state, state.reason) == ("failed", "checksum_mismatch")
    assert f"expected {wrong}" in (state.error or "")


@pytest.mark.parametrize(
    "bad",
    ["ab" * 31, "ab" * 33, "zz" * 32, "sha256:" + "ab" * 32, 12345, ["ab" * 32], {"hex": "ab" * 32}, ""],
    ids=["63-hex", "65-hex", "not-hex", "prefixed", "number", "list", "object", "empty"],
)
async def test_a_malformed_sha256_is_an_invalid_message(settings, broker, topology, bad: object) -> None:
    src = make_file(settings, "run012345/f.fits.fz", b"bytes")
    good = make_file(settings, "run012345/good.fits.fz", b"good")
    async with running([ingest_service], settings):
        await publish_raw(broker, settings, "file.ready", cloudevent(ready(src, sha256=bad)))
        await wait_for(lambda: _depth(broker, settings.dead_queue("ingest"), 1))
        await publish_raw(broker, settings, "file.ready", cloudevent(ready(good)))
        await wait_for(lambda: _registered_is(settings, 1))
    assert await dead_reasons(broker, settings) == ["invalid_message"]
    assert not (settings.storage["disk1"].root / "run012345/f.fits.fz").exists()


async def _depth(broker, name: str, n: int) -> bool:
    return await queue_depth(broker, name) == n


async def _registered_is(settings: Settings, n: int) -> bool:
    return await registered(settings) == n
