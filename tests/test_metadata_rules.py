"""Rules after a metadata change (issue 20, part 3), through the real broker, a real ingest and a
real replicator: a file whose metadata a later change makes a rule's filters select gets the
rule's copy, whichever path made the change (the ``metadata.set`` event, ``spool meta set``); a
dataset's change and a key removed later change no copy; ``metadata.changed`` is stated once per
change (the outbox, its id derived from the change's)."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from common.catalogue import Catalogue
from common.catalogue.metadata import MetadataChange
from common.catalogue.schema import outbox
from common.config import load_settings
from common.messages import fact_id
from daemons.ingest.handlers import service as ingest_service
from daemons.replicator.handlers import service as replicator_service
from tests.conftest import cloudevent, dead_reasons, publish_raw, queue_depth, running, wait_for
from tests.replication_fixtures import (
    DATASET,
    available_on,
    drain,
    events_of,
    make_files,
    name_of,
    publish_ready,
    registered,
    replication_config,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# Only files whose quality is "good" go to disk2.
RULE = 'datasets = ".*"\nendpoints = "disk2"\nmetadata = ["quality=good"]'


async def _cli_change(settings: Any, change: MetadataChange) -> None:
    """What ``spool meta set|unset`` does: the change applied on the catalogue directly."""
    async with await Catalogue.open(settings.catalogue.url) as c:
        await c.metadata.apply(change)


async def test_a_metadata_change_places_the_file_by_the_rules_again(
    tmp_path: Path, tag: str, broker: Any
) -> None:
    settings = load_settings(replication_config(tmp_path, tag, **{"rules.good": RULE}))
    files = make_files(settings, 4)
    names = [name_of(settings, p) for p, _ in files]
    async with running([ingest_service, replicator_service], settings):
        watch = await events_of(broker, settings, "metadata.changed")
        await publish_ready(broker, settings, files[:1], metadata={"quality": "good"})
        await publish_ready(broker, settings, files[1:], metadata={"quality": "bad"})
        await wait_for(lambda: registered(settings, 4))
        await wait_for(lambda: _on_disk2(settings, {names[0]}))

        # The external event: f1 is good after all -> its copy.
        event_id = uuid.uuid4().hex
        for _ in range(2):  # delivered twice: one change, one event
            data = {"file": names[1], "set": {"quality": "good"}}
            body = cloudevent(data, type_="metadata.set", id_=event_id)
            await publish_raw(broker, settings, "metadata.set", body)
        await wait_for(lambda: _on_disk2(settings, {names[0], names[1]}), timeout=30)

        # The command line (directly on the catalogue): f2 too.
        await _cli_change(settings, _change(names[2], {"quality": "good"}))
        await wait_for(lambda: _on_disk2(settings, {names[0], names[1], names[2]}), timeout=30)

        # A dataset's change places nothing (rules read a file's own keys); a key removed
        # from a file removes no copy (its rule's lock holds it).
        await _cli_change(settings, _change(DATASET, {"quality": "good"}, scope="dataset"))
        await _cli_change(settings, _change(names[0], {}, unset=["quality"]))
        await wait_for(lambda: _changes_sent(settings, 4), timeout=30)
        await wait_for(lambda: _idle(broker, settings))
        assert await available_on(settings, "disk2") == {names[0], names[1], names[2]}
    events = [body for key, body in await drain(watch) if key == "metadata.changed"]
    by_id = {e["id"]: e for e in events}  # at least once: duplicates share the id
    assert fact_id("metadata.changed", event_id) in by_id
    seen = sorted((e.get("file") or "", e["dataset"], tuple(e["keys"])) for e in by_id.values())
    assert seen == sorted(
        [
            (names[1], DATASET, ("quality",)),
            (names[2], DATASET, ("quality",)),
            ("", DATASET, ("quality",)),  # the dataset's change
            (names[0], DATASET, ("quality",)),
        ]
    )
    assert await dead_reasons(broker, settings) == []


def _change(
    target: str, set_: dict[str, Any], *, unset: list[str] | None = None, scope: str = "file"
) -> MetadataChange:
    return MetadataChange(
        id=uuid.uuid4().hex, scope=scope, target=target, set=set_, unset=unset or [],  # type: ignore[arg-type]
        daemon="cli", source="spool-cli",
    )  # fmt: skip


async def _on_disk2(settings: Any, expected: set[str]) -> bool:
    return await available_on(settings, "disk2") == expected


async def _changes_sent(settings: Any, n: int) -> bool:
    """``n`` ``metadata.changed`` confirmed by the broker (their outbox rows marked sent)."""
    stmt = select(func.count()).where(outbox.c.routing_key == "metadata.changed", outbox.c.sent.is_not(None))
    async with await Catalogue.open(settings.catalogue.url) as c:
        return await c.read(lambda conn: int(conn.scalar(stmt) or 0)) >= n


async def _idle(broker: Any, settings: Any) -> bool:
    return (
        await queue_depth(broker, settings.queue("replicator")) == 0
        and await queue_depth(broker, settings.queue("ingest")) == 0
    )
