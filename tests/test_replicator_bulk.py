"""Issue 16, classes 5 and 11, against the real broker: bulk replica requests.

- A bulk ``replica.request`` naming unknown files is one outcome (one dead letter, one
  ``file.failed``), not one per name; its known files are still copied.
- Every event and history row of a file carries the correlation id its ``file.ready`` had, through
  bulk replica requests (``replica.created``) and the tape writer (``file.archived``).
"""

from __future__ import annotations

import uuid
from typing import Any

import aio_pika
import msgpack
import pytest
import sqlalchemy as sa

from common.bus.publisher import connection_user
from common.catalogue import Catalogue
from common.codec import encode
from common.config import Settings, load_settings
from common.messages import ReplicaRequest
from daemons.ingest.handlers import service as ingest_service
from daemons.replicator.handlers import service as replicator_service
from daemons.tape.handlers import service as tape_service
from tests.conftest import cloudevent, publish_raw, queue_depth, running, wait_for
from tests.replication_fixtures import available_on, make_files, name_of, replication_config
from tests.storage_fixtures import adler
from tests.tape_fixtures import bind, tape_config

pytestmark = pytest.mark.integration
DATASET = "lst1.20261123.run012345.dl0"
TO_DISK2 = {"rules.cnaf": 'datasets = ".*"\nendpoints = "disk2"'}


async def _publish_ready_correlated(broker: Any, settings: Settings, files: list[Any]) -> dict[str, str]:
    """file.ready for each file, each with a correlation id of its own; returns name -> id."""
    channel = await broker.channel(publisher_confirms=True)
    exchange = await channel.get_exchange(settings.bus.exchange)
    ids: dict[str, str] = {}
    for path, content in files:
        cid = "cid-" + uuid.uuid4().hex
        ids[name_of(settings, path)] = cid
        body = cloudevent(
            {"path": str(path), "dataset": DATASET, "size": len(content), "adler32": adler(content)}
        )
        message = aio_pika.Message(body, content_type="application/cloudevents+json", correlation_id=cid)
        await exchange.publish(message, routing_key="file.ready")
    await channel.close()
    return ids


async def _drain(queue: Any) -> list[tuple[str | None, dict[str, Any]]]:
    out = []
    while (m := await queue.get(fail=False)) is not None:
        out.append((m.correlation_id, msgpack.unpackb(m.body)))
    return out


def _copy_correlations(events: list[tuple[str | None, dict[str, Any]]]) -> dict[str, str | None]:
    """name -> the correlation id its replica.created gives it (the copy's own, else the event's)."""
    return {c["name"]: c.get("correlation_id") or cid for cid, body in events for c in body["copies"]}


async def _available(settings: Settings, storage: str, names: set[str]) -> bool:
    return names <= await available_on(settings, storage)


async def test_files_keep_their_file_ready_correlation_id_through_bulk_replicas_and_tape(
    tmp_path, tag, broker
):
    settings = load_settings(tape_config(tmp_path, tag, **TO_DISK2))
    files = make_files(settings, 12, size=500)
    async with running([ingest_service, replicator_service, tape_service], settings):
        created = await bind(broker, settings, "replica.created")
        archived = await bind(broker, settings, "file.archived")
        # The configured rules evaluated (over no file yet) first: a rule evaluated over files
        # already registered asks for their copies as ``rule-<id>``, a race with ingest's own.
        await wait_for(lambda: _rules_active(settings), timeout=30)
        ids = await _publish_ready_correlated(broker, settings, files)
        names = set(ids)
        await wait_for(lambda: _available(settings, "disk2", names), timeout=60)
        await wait_for(lambda: _available(settings, "tape1", names), timeout=60)
        created_events = await _drain(created)
        # Ingest sent the disk copies of its batches as bulk requests: each file kept its id.
        assert any(len(body["copies"]) > 1 for _, body in created_events), created_events
        assert _copy_correlations(created_events) == ids
        # The tape writer recorded them from catalogue rows, and still knows each file's id.
        await wait_for(lambda: _count_archived(archived, ids), timeout=30)
        # A single-file request (here: the copy exists, so it is verified and announced again)
        # keeps the correlation id it is sent with.
        name = sorted(names)[0]
        single = ReplicaRequest(name=name, destination="disk2")
        channel = await broker.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(settings.bus.exchange)
        message = aio_pika.Message(  # as Spool's own publishers send it: an internal command
            encode(single), content_type="application/msgpack", correlation_id="again-1",
            user_id=connection_user(broker),
        )  # fmt: skip
        await exchange.publish(message, routing_key=single.ROUTING_KEY)
        await channel.close()
        await wait_for(lambda: _announced(created, name, "again-1"), timeout=30)
    async with await Catalogue.open(settings.catalogue.url) as catalogue:
        for name, cid in ids.items():
            history = {e.type: e.detail or {} for e in await catalogue.queries.history(name)}
            assert history["replica.created"].get("correlation_id") == cid, history
            assert history["file.archived"].get("correlation_id") == cid, history


async def _rules_active(settings: Settings) -> bool:
    from common.catalogue import schema

    async with await Catalogue.open(settings.catalogue.url) as catalogue:
        states = await catalogue.read(
            lambda conn: list(conn.execute(sa.select(schema.rules.c.state)).scalars())
        )
    return bool(states) and set(states) == {"active"}


_seen: dict[str, str | None] = {}


async def _count_archived(queue: Any, ids: dict[str, str]) -> bool:
    for cid, body in await _drain(queue):
        _seen[body["name"]] = cid
        assert body.get("correlation_id") in (None, cid)
    return all(_seen.get(name) == cid for name, cid in ids.items())


async def _announced(queue: Any, name: str, cid: str) -> bool:
    return _copy_correlations(await _drain(queue)).get(name) == cid


async def test_a_bulk_request_of_unknown_names_is_one_dead_letter_and_its_known_files_are_copied(
    tmp_path, tag, broker
):
    settings = load_settings(replication_config(tmp_path, tag, **TO_DISK2))
    files = make_files(settings, 4, size=200)
    async with running([ingest_service, replicator_service], settings):
        failed = await bind(broker, settings, "file.failed")
        created = await bind(broker, settings, "replica.created")
        ids = await _publish_ready_correlated(broker, settings, files)
        known = sorted(ids)
        await wait_for(lambda: _available(settings, "disk2", set(known)), timeout=60)
        await _drain(created)  # ingest's own requests made these; the bulk below finds them made
        unknown = [f"nowhere/{i:04d}.fits" for i in range(1000)]
        names = [*unknown[:500], *known, *unknown[500:]]
        bulk = ReplicaRequest(names=names, destination="disk2", correlation_ids=[ids.get(n) for n in names])
        await publish_raw(
            broker, settings, bulk.ROUTING_KEY, encode(bulk), "application/msgpack", as_spool=True
        )
        await wait_for(lambda: _dead(broker, settings, 1), timeout=60)
        # Nothing else is left to do: no single-file request per unknown name was queued.
        assert await queue_depth(broker, settings.queue("replicator")) == 0
        assert await queue_depth(broker, settings.dead_queue("replicator")) == 1
        failures = [body for _, body in await _drain(failed)]
        copies = _copy_correlations(await _drain(created))
    assert len(failures) == 1 and failures[0]["reason"] == "unknown_file", failures
    assert "1000 of the 1004 files" in failures[0]["error"] and "nowhere/0000.fits" in failures[0]["error"]
    assert len(failures[0]["error"]) < 2000  # a bounded sample, not the 1,000 names
    # The known files of the request were handled (verified and announced, each with its own id).
    assert copies == {name: ids[name] for name in known}
    channel = await broker.channel()
    dead = await (await channel.get_queue(settings.dead_queue("replicator"))).get(fail=False)
    assert dead is not None and dead.headers["x-spool-reason"] == "unknown_file"
    assert msgpack.unpackb(dead.body)["names"] == names  # the whole request, for the operator
    await dead.nack(requeue=True)
    await channel.close()


async def _dead(broker: Any, settings: Settings, n: int) -> bool:
    return await queue_depth(broker, settings.dead_queue("replicator")) >= n


async def test_a_rule_met_after_its_files_were_registered_keeps_each_files_correlation_id(
    tmp_path, tag, broker
):
    """A rule evaluated over files already in the catalogue asks for their copies under each
    file's own correlation id (its file.ready's event id), not the rule's."""
    before = load_settings(replication_config(tmp_path, tag))  # no rule yet: one copy, disk1
    files = make_files(before, 6, size=100)
    ids: dict[str, str] = {}
    async with running([ingest_service], before):
        channel = await broker.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(before.bus.exchange)
        for path, content in files:
            event_id = "ev-" + uuid.uuid4().hex
            ids[name_of(before, path)] = event_id
            data = {"path": str(path), "dataset": DATASET, "size": len(content), "adler32": adler(content)}
            message = aio_pika.Message(
                cloudevent(data, id_=event_id), content_type="application/cloudevents+json"
            )
            await exchange.publish(message, routing_key="file.ready")
        await channel.close()
        await wait_for(lambda: _available(before, "disk1", set(ids)), timeout=60)
    settings = load_settings(replication_config(tmp_path, tag, **TO_DISK2))  # the rule arrives
    created = await bind(broker, settings, "replica.created")
    async with running([replicator_service], settings):
        await wait_for(lambda: _available(settings, "disk2", set(ids)), timeout=60)
    assert _copy_correlations(await _drain(created)) == ids
