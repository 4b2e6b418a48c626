"""The tape daemon's events go through the outbox: ``file.archived`` is committed with the copy's
new state (SQLite and PostgreSQL), under the id of the fact that the handler's re-announcement
shares; a batch written while the broker is away announces every file once it is back."""

# Fixtures imported from catalogue_fixtures (not conftest) reappear as test parameters:
# ruff: noqa: F811

from __future__ import annotations

from collections import Counter

import aio_pika
import msgpack
import pytest
from sqlalchemy import Connection, select

from common.bus.publisher import AmqpPublisher
from common.catalogue import Catalogue
from common.catalogue import schema as s
from common.catalogue import tape as db
from common.config import load_settings
from common.messages import FileFailed
from daemons.ingest.handlers import service as ingest_service
from daemons.tape.handlers import open_resources
from tests.catalogue_fixtures import catalogue, catalogue_url, rec  # noqa: F401
from tests.conftest import running, wait_for
from tests.replication_fixtures import count_on, make_files, name_of, publish_ready
from tests.tape_fixtures import HOLDER, bind, tape_config, tape_copies


def _queued_events(conn: Connection) -> list[tuple[str, str, dict[str, object]]]:
    o = s.outbox
    rows = conn.execute(select(o.c.routing_key, o.c.id, o.c.body).order_by(o.c.seq))
    return [(k, i, msgpack.unpackb(b)) for k, i, b in rows]


async def _take(cat: Catalogue, *names: str) -> list[int]:
    for name in names:
        await cat.tape.ensure_queued(name, "tape1", 3)
    ids = [c.replica_id for c in await cat.tape.queue_head("tape1", 10)]
    await cat.tape.take_batch(ids, "A00001", holder=HOLDER)
    return ids


async def test_recording_a_file_on_tape_commits_its_file_archived_with_the_fact_id(catalogue: Catalogue):
    await catalogue.ingest.register([rec("a"), rec("b")])
    ids = await _take(catalogue, "a", "b")
    done = [db.Archived(ids[0], "a", "tape1", "A00001", 1), db.Archived(ids[1], "b", "tape1", "A00001", 2)]
    await catalogue.tape.record_archived(done, holder=HOLDER)
    await catalogue.tape.record_archived(done, holder=HOLDER)  # recorded once: announced once
    queued = await catalogue.read(_queued_events)
    assert [(k, i) for k, i, _ in queued] == [("file.archived", db.archived_event(a).id) for a in done]
    assert [(b["name"], b["cartridge"], b["fseq"]) for _, _, b in queued] == [
        ("a", "A00001", 1),
        ("b", "A00001", 2),
    ]
    assert await catalogue.outbox.backlog() == 2
    # The handler, asked again for a copy already on tape, re-announces it under the same id.
    again = db.archived_event(db.Archived(0, "a", "tape1", "A00001", 1))
    assert again.id == queued[0][1]
    # Another copy of the same file elsewhere on tape is another fact: another id.
    assert db.archived_event(db.Archived(0, "a", "tape1", "A00002", 1)).id != again.id


async def test_a_failed_copy_commits_its_file_failed_and_only_when_it_moved(catalogue: Catalogue):
    await catalogue.ingest.register([rec("a")])
    [rid] = await _take(catalogue, "a")
    event = FileFailed(daemon="tape", reason="no_source", error="tape1: none", attempts=1, name="a")
    assert await catalogue.tape.mark_failed(rid, event, holder=HOLDER)
    assert not await catalogue.tape.mark_failed(rid, event.model_copy(update={"id": "x"}), holder=HOLDER)
    assert [(k, i) for k, i, _ in await catalogue.read(_queued_events)] == [("file.failed", event.id)]


@pytest.mark.integration
async def test_a_batch_written_while_the_broker_is_away_announces_every_file_once_it_is_back(
    tmp_path, tag, broker
):
    settings = load_settings(tape_config(tmp_path, tag))
    files = make_files(settings, 6, size=3000)
    names = sorted(name_of(settings, p) for p, _ in files)
    async with running([ingest_service], settings):  # declares the topology, queues the copies
        await publish_ready(broker, settings, files)
        await wait_for(lambda: _count(settings, 6, "queued"), timeout=60)
    events = await bind(broker, settings, "file.archived", "tape.mounted")

    gone = await aio_pika.connect(settings.bus.url)
    dead = await AmqpPublisher.create(gone, settings.bus.exchange, "tape")  # type: ignore[arg-type]
    await gone.close()  # the broker is unreachable for the whole batch
    async with open_resources(settings, dead) as res:
        await wait_for(lambda: _count(settings, 6), timeout=60)
        assert res.relay.outage
        assert await res.catalogue.outbox.backlog() >= 7  # six files and at least one mount
        assert await events.get(fail=False) is None

        res.relay.publisher = await AmqpPublisher.create(broker, settings.bus.exchange, "tape")
        await res.relay.flush()  # the broker is back (the loop would retry within seconds)
        assert await res.catalogue.outbox.backlog() == 0
    got = []
    while (m := await events.get(fail=False)) is not None:
        got.append((m.routing_key, m.message_id, msgpack.unpackb(m.body)))
    copies = await tape_copies(settings)
    archived = {body["name"]: mid for key, mid, body in got if key == "file.archived"}
    assert sorted(archived) == names
    assert archived == {
        n: db.archived_event(db.Archived(0, n, "tape1", str(vid), int(fseq or 0))).id
        for n, (_, vid, fseq) in copies.items()
    }
    assert Counter(key for key, _, _ in got)["file.archived"] == 6  # each once
    assert Counter(key for key, _, _ in got)["tape.mounted"] >= 1


async def _count(settings, n: int, state: str = "available") -> bool:  # type: ignore[no-untyped-def]
    return await count_on(settings, "tape1", state) == n
