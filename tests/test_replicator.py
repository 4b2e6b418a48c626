"""The replicator end to end against the real broker: rules from config and from the CLI, copies
placed and verified, overlapping rules, removal and lifetime, corrupt and vanished copies."""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

import msgpack
import pytest

from common.bus.dead import browse
from common.catalogue import Catalogue
from common.codec import encode
from common.config import Settings, load_settings
from common.messages import ReplicaRequest
from daemons.ingest.handlers import service as ingest_service
from daemons.replicator.handlers import service as replicator_service
from tests.cli_fixtures import spool
from tests.conftest import publish_raw, queue_depth, running, wait_for
from tests.replication_fixtures import (
    DATASET,
    available_on,
    make_files,
    name_of,
    publish_ready,
    replica_states,
    replication_config,
    replication_settings,
    temp_files,
)
from tests.storage_fixtures import adler

pytestmark = pytest.mark.integration
SERVICES = [ingest_service, replicator_service]


def copies_outside_disk1(states: dict[tuple[str, str], str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for (name, storage), state in states.items():
        if storage != "disk1" and state == "available":
            out.setdefault(name, []).append(storage)
    return out


def on_disk(settings: Settings, storage: str, name: str) -> bytes:
    return (settings.storage[storage].root / name).read_bytes()


async def test_config_rule_places_one_verified_copy_per_file_spread_over_matching_endpoints(
    tmp_path, tag, broker
):
    path = replication_config(
        tmp_path, tag, **{"rules.offsite": 'datasets = "lst1\\\\..*"\nendpoints = "site=PIC|site=CNAF"'}
    )
    settings = load_settings(path)
    files = make_files(settings, 40)
    channel = await broker.channel()
    created = await channel.declare_queue(exclusive=True)
    async with running(SERVICES, settings):
        await created.bind(settings.bus.exchange, "replica.created")
        await publish_ready(broker, settings, files)
        await wait_for(lambda: _copies(settings, 40), timeout=60)
    placed = copies_outside_disk1(await replica_states(settings))
    assert all(len(v) == 1 for v in placed.values())
    by_endpoint = [v[0] for v in placed.values()]
    assert 5 < by_endpoint.count("disk2") < 35  # spread, not all on one
    for src, content in files:
        name = name_of(settings, src)
        assert on_disk(settings, placed[name][0], name) == content
    announced = []  # (storage, copy) of every replica.created; a bulk request's copies in one
    while (m := await created.get(fail=False)) is not None:
        event = msgpack.unpackb(m.body)
        announced += [(event["storage"], c) for c in event["copies"]]
    # At least one announcement per copy (a request repeated while the rule was first evaluated
    # is answered by verifying the copy and announcing it again), each naming where it is.
    assert {c["name"] for _, c in announced} == set(placed)
    assert all(storage == placed[c["name"]][0] for storage, c in announced)
    assert {c["adler32"] for _, c in announced} == {adler(c) for _, c in files}
    assert temp_files(settings.storage["disk2"].root) == []
    assert await queue_depth(broker, settings.dead_queue("replicator")) == 0
    # `spool show` lists the replicas with their states; `spool rse list` counts them.
    shown = json.loads(spool(path, "show", name_of(settings, files[0][0]), "--json").stdout)
    assert sorted(r["storage"] for r in shown["replicas"]) == sorted(["disk1", placed[shown["name"]][0]])
    rses = {r["name"]: r for r in json.loads(spool(path, "rse", "list", "--json").stdout)}
    assert rses["disk2"]["replicas"]["available"] + rses["disk3"]["replicas"]["available"] == 40


async def test_the_copy_processes_start_with_the_daemons_before_any_copy(tmp_path, tag, broker):
    """Ingest's endpoint and every disk endpoint of the replicator have their copy process
    running once the daemons started, with nothing copied yet (its imports are not paid by the
    first copies)."""
    settings = replication_settings(tmp_path, tag)

    def running_copiers(process: Any) -> dict[str, bool]:
        out = {}
        for runner in process.runners:
            res = runner.resources
            stores = res.storages.items() if hasattr(res, "storages") else [(res.storage_name, res.storage)]
            for name, storage in stores:
                pid = storage._copiers[0].pid if storage._copiers else None
                out[f"{runner.service.name}:{name}"] = pid is not None and os.path.exists(f"/proc/{pid}")
        return out

    async with running(SERVICES, settings) as process:
        await wait_for(lambda: _all_true(running_copiers(process)), timeout=30)
        assert set(running_copiers(process)) == {
            "ingest:disk1", "replicator:disk1", "replicator:disk2", "replicator:disk3",
        }  # fmt: skip
    assert not any(temp_files(settings.storage[n].root) for n in ("disk1", "disk2", "disk3"))


async def _all_true(flags: dict[str, bool]) -> bool:
    return bool(flags) and all(flags.values())


async def _copies(settings: Settings, n: int, storage: str | None = None) -> bool:
    placed = copies_outside_disk1(await replica_states(settings))
    if storage is not None:
        return sum(storage in v for v in placed.values()) == n
    return len(placed) == n


async def test_overlapping_rules_make_no_duplicate_copies(tmp_path, tag, broker):
    settings = load_settings(
        replication_config(
            tmp_path,
            tag,
            **{
                "rules.any-offsite": 'datasets = ".*"\nendpoints = "site=PIC|site=CNAF"',
                "rules.pic-disk": 'datasets = ".*"\nendpoints = "site=PIC&kind=disk"',
                "rules.run-filter": 'metadata = ["run>=10"]\nendpoints = "disk3"',
            },
        )
    )
    files = make_files(settings, 20)
    async with running(SERVICES, settings):
        await publish_ready(broker, settings, files, metadata={"run": 12})
        await wait_for(lambda: _copies(settings, 20, "disk3"), timeout=60)
        await asyncio.sleep(0.5)  # a duplicate copy, if any were requested, would land now
    placed = copies_outside_disk1(await replica_states(settings))
    assert all(v == ["disk3"] for v in placed.values()), placed


async def test_rule_added_at_run_time_copies_existing_files_and_removal_reaps_them(tmp_path, tag, broker):
    path = replication_config(tmp_path, tag)
    settings = load_settings(path)
    files = make_files(settings, 15)
    async with running(SERVICES, settings):
        await publish_ready(broker, settings, files)
        await wait_for(lambda: _registered(settings, 15), timeout=60)
        bad = spool(path, "rule", "add", "--datasets", ".*", "--endpoints", "site=MARS")
        assert bad.returncode == 1 and "matches no endpoint" in bad.stderr and "Traceback" not in bad.stderr
        added = spool(
            path, "rule", "add", "--id", "late", "--datasets", ".*", "--endpoints", "disk2", "--json"
        )
        assert added.returncode == 0, added.stderr
        await wait_for(lambda: _copies(settings, 15, "disk2"), timeout=60)
        rules = json.loads(spool(path, "rule", "list", "--json").stdout)
        assert [(r["id"], r["state"], r["replicas"]) for r in rules] == [
            ("late", "active", {"available": 15})
        ]
        removed = spool(path, "rule", "remove", "late", "--yes")
        assert removed.returncode == 0 and "15 copies released" in removed.stdout
        await wait_for(lambda: _copies(settings, 0, "disk2"), timeout=60)
    assert [p for p in settings.storage["disk2"].root.rglob("*") if p.is_file()] == []
    # the last copies (ingest's) stay
    assert len(await available_on(settings, "disk1")) == 15


async def _registered(settings: Settings, n: int) -> bool:
    async with await Catalogue.open(settings.catalogue.url) as c:
        return (await c.queries.counts()).files == n


async def test_copies_expire_with_their_rule_lifetime(tmp_path, tag, broker):
    settings = load_settings(
        replication_config(
            tmp_path, tag, **{"rules.scratch": 'datasets = ".*"\nendpoints = "disk2"\nlifetime = 1.5'}
        )
    )
    files = make_files(settings, 5)
    async with running(SERVICES, settings):
        await publish_ready(broker, settings, files)
        await wait_for(lambda: _copies(settings, 5, "disk2"), timeout=60)
        await wait_for(lambda: _copies(settings, 0, "disk2"), timeout=30)
    async with await Catalogue.open(settings.catalogue.url) as c:
        history = [e.type for e in await c.queries.history(name_of(settings, files[0][0]))]
    assert history.index("replica.created") < history.index("replica.deleted")


async def test_vanished_source_is_marked_bad_and_another_source_is_used(tmp_path, tag, broker):
    # One copy at a time to disk3 (none batched), so no source is ever "busy" and disk1 is always
    # tried first.
    disk3 = 'root = "storage/disk3"\nattributes = { site = "PIC" }\nmax_transfers = 1\nbatch_copy_bytes = 0'
    path = replication_config(
        tmp_path, tag, **{"rules.cnaf": 'datasets = ".*"\nendpoints = "disk2"', "storage.disk3": disk3}
    )
    settings = load_settings(path)
    files = make_files(settings, 6)
    names = [name_of(settings, p) for p, _ in files]
    async with running(SERVICES, settings):
        await publish_ready(broker, settings, files)
        await wait_for(lambda: _copies(settings, 6, "disk2"), timeout=60)
        # Behind Spool's back: the ingest copies of half the files disappear.
        for name in names[:3]:
            (settings.storage["disk1"].root / name).unlink()
        # disk3 (PIC) ranks disk1 first (neither source is at PIC; by name), finds it gone.
        assert spool(path, "rule", "add", "--datasets", ".*", "--endpoints", "disk3").returncode == 0
        await wait_for(lambda: _copies(settings, 6, "disk3"), timeout=60)
    states = await replica_states(settings)
    assert [states[(n, "disk1")] for n in names] == ["bad"] * 3 + ["available"] * 3
    for (_src, content), name in zip(files, names, strict=True):
        assert on_disk(settings, "disk3", name) == content
    async with await Catalogue.open(settings.catalogue.url) as c:
        history = await c.queries.history(names[0])
    bad = [e for e in history if e.type == "replica.bad"]
    assert bad and bad[0].storage == "disk1" and bad[0].detail["reason"] == "source_missing"


async def test_no_source_left_fails_with_reason_and_the_daemon_keeps_going(tmp_path, tag, broker):
    settings = load_settings(
        replication_config(tmp_path, tag, **{"rules.cnaf": 'datasets = ".*"\nendpoints = "disk2"'})
    )
    files = make_files(settings, 3)
    async with running([ingest_service], settings):
        await publish_ready(broker, settings, files)
        await wait_for(lambda: _registered(settings, 3), timeout=60)
    lost = name_of(settings, files[0][0])
    (settings.storage["disk1"].root / lost).unlink()
    async with running([replicator_service], settings):
        await wait_for(lambda: _copies(settings, 2, "disk2"), timeout=60)
        # Ingest's request and the rule's start-up sweep may both ask for the lost file's copy;
        # each that finds no source is dead-lettered (one or two, never another file's).
        await wait_for(lambda: _dead_at_least(broker, settings, 1), timeout=30)
        letters = await browse(broker, [settings.dead_queue("replicator")])
    assert 1 <= len(letters) <= 2
    assert {(d.reason, msgpack.unpackb(d.body)["name"]) for d in letters} == {("no_source", lost)}
    async with await Catalogue.open(settings.catalogue.url) as c:
        view = await c.queries.show_file(lost)
    assert view is not None and view.last_error is not None
    assert view.last_error.reason == "no_source" and view.last_error.state == "failed"
    assert {r.storage: r.state for r in view.replicas} == {"disk1": "bad", "disk2": "failed"}


async def _dead_at_least(broker, settings: Settings, n: int) -> bool:
    return await queue_depth(broker, settings.dead_queue("replicator")) >= n


async def _dead(broker, settings: Settings, n: int) -> bool:
    return await queue_depth(broker, settings.dead_queue("replicator")) == n


async def test_corrupted_copy_is_detected_on_a_repeated_request_and_replaced(tmp_path, tag, broker):
    settings = load_settings(
        replication_config(tmp_path, tag, **{"rules.cnaf": 'datasets = ".*"\nendpoints = "disk2"'})
    )
    files = make_files(settings, 2)
    name = name_of(settings, files[0][0])
    async with running(SERVICES, settings):
        await publish_ready(broker, settings, files)
        await wait_for(lambda: _copies(settings, 2, "disk2"), timeout=60)
        copy = settings.storage["disk2"].root / name
        data = bytearray(copy.read_bytes())
        data[100] ^= 0xFF  # bit rot after the transfer, same size
        copy.write_bytes(bytes(data))
        request = ReplicaRequest(name=name, destination="disk2")
        await publish_raw(
            broker, settings, request.ROUTING_KEY, encode(request), "application/msgpack", as_spool=True
        )
        await wait_for(lambda: _content_is(copy, files[0][1]), timeout=30)
    async with await Catalogue.open(settings.catalogue.url) as c:
        types = [(e.type, e.storage) for e in await c.queries.history(name)]
    assert ("replica.bad", "disk2") in types
    assert types.count(("replica.created", "disk2")) == 2


async def _content_is(path: Path, content: bytes) -> bool:
    return path.exists() and path.read_bytes() == content


async def test_tape_copies_are_requested_and_wait_in_the_tape_queue(tmp_path, tag, broker):
    tape = 'kind = "tape"\nroot = "storage/tape1"\nattributes = { site = "PIC" }'
    settings = load_settings(
        replication_config(
            tmp_path,
            tag,
            **{"storage.tape1": tape, "rules.archive": 'datasets = ".*"\nendpoints = "kind=tape"'},
        )
    )
    files = make_files(settings, 4)
    names = {name_of(settings, path) for path, _ in files}
    async with running(SERVICES, settings):
        await publish_ready(broker, settings, files)
        # Ingest requests each tape copy, and so may the rule's start-up sweep when it runs before
        # ingest locked the copies (requests for a queued copy are idempotent, and re-sent by
        # design so a kill loses none): every file's request is there, some perhaps twice.
        await wait_for(lambda: _tape_requests_name(broker, settings, names), timeout=60)
    states = await replica_states(settings)
    assert sorted(st for (n, s), st in states.items() if s == "tape1") == ["queued"] * 4
    assert await queue_depth(broker, settings.dead_queue("replicator")) == 0
    assert await queue_depth(broker, settings.dead_queue("ingest")) == 0


async def _tape_requests_name(broker, settings: Settings, names: set[str]) -> bool:  # type: ignore[no-untyped-def]
    waiting = [msgpack.unpackb(m.body) for m in await browse(broker, [settings.queue("tape")])]
    return {n for body in waiting for n in (body["names"] or [body["name"]])} == names


@pytest.mark.parametrize("batched", [False, True], ids=["one_copy_a_stream", "small_copies_batched"])
async def test_copies_to_one_endpoint_never_exceed_its_max_transfers(
    tmp_path, tag, broker, monkeypatch, batched
):
    """Counted where the bytes move (the worker threads), so a batch of small copies made one after
    another counts as the one stream it is."""
    import threading

    from common.storage.copy_engine import CopyEngine

    disk2 = 'root = "storage/disk2"\nattributes = { site = "CNAF" }\nmax_transfers = 2'
    if not batched:
        disk2 += "\nbatch_copy_bytes = 0"
    else:  # where the counting patch reaches them (the copy process runs one batch at a time too)
        disk2 += '\nsmall_copies = "thread"'
    settings = load_settings(
        replication_config(
            tmp_path, tag, **{"storage.disk2": disk2, "rules.cnaf": 'datasets = ".*"\nendpoints = "disk2"'}
        )
    )
    active, peak, copies = 0, 0, 0
    lock = threading.Lock()

    def counted(real):  # type: ignore[no-untyped-def]
        def slow_copy(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            nonlocal active, peak, copies
            if self.name != "disk2":
                return real(self, *args, **kwargs)
            with lock:
                active += 1
                copies += 1
                peak = max(peak, active)
            try:
                time.sleep(0.05)
                return real(self, *args, **kwargs)
            finally:
                with lock:
                    active -= 1

        return slow_copy

    # The two operations a replication copy enters by: alone, or as part of a bulk request.
    for op in ("replicate_sync", "replicate_from_sync"):
        monkeypatch.setattr(CopyEngine, op, counted(getattr(CopyEngine, op)))
    files = make_files(settings, 20)
    async with running(SERVICES, settings):
        await publish_ready(broker, settings, files)
        await wait_for(lambda: _copies(settings, 20, "disk2"), timeout=60)
    assert copies >= 20
    assert peak == (1 if batched else 2)


async def test_evict_frees_redundant_copies_but_never_a_last_or_held_one(tmp_path, tag, broker):
    path = replication_config(tmp_path, tag, **{"rules.cnaf": 'datasets = ".*"\nendpoints = "disk2"'})
    settings = load_settings(path)
    files = make_files(settings, 4)
    async with running(SERVICES, settings):
        await publish_ready(broker, settings, files)
        await wait_for(lambda: _copies(settings, 4, "disk2"), timeout=60)
    names = [name_of(settings, p) for p, _ in files]
    held = json.loads(spool(path, "rse", "evict", "disk2", "--dataset", DATASET, "--yes", "--json").stdout)
    assert held == {"evicted": [], "kept": sorted(names)}  # the rule holds them
    done = spool(path, "rse", "evict", "disk1", *names[:3], "--yes", "--json")
    assert json.loads(done.stdout) == {"evicted": sorted(names[:3]), "kept": []}
    assert not (settings.storage["disk1"].root / names[0]).exists()
    again = json.loads(spool(path, "rse", "evict", "disk2", names[0], "--yes", "--json").stdout)
    assert again == {"evicted": [], "kept": [names[0]]}  # now the last copy
    bad = spool(path, "rse", "evict", "nosuch", "--dataset", DATASET, "--yes")
    assert bad.returncode == 1 and "not a configured disk endpoint" in bad.stderr


async def test_bulk_request_copies_together_and_a_bad_file_continues_alone(tmp_path, tag, broker):
    settings = load_settings(
        replication_config(tmp_path, tag, **{"rules.cnaf": 'datasets = ".*"\nendpoints = "disk2"'})
    )
    files = make_files(settings, 5)
    names = [name_of(settings, p) for p, _ in files]
    async with running(SERVICES, settings):
        await publish_ready(broker, settings, files)
        await wait_for(lambda: _copies(settings, 5, "disk2"), timeout=60)
        channel = await broker.channel()
        created_events = await channel.declare_queue(exclusive=True)
        await created_events.bind(settings.bus.exchange, "replica.created")
        bulk = ReplicaRequest(names=[*names[:2], "no/such/file"], destination="disk2")
        await publish_raw(
            broker, settings, bulk.ROUTING_KEY, encode(bulk), "application/msgpack", as_spool=True
        )
        await wait_for(lambda: _dead(broker, settings, 1), timeout=30)
    # The bulk request's two copies are announced in one event; the bad file is not in any.
    events = []
    while (m := await created_events.get(fail=False)) is not None:
        events.append(msgpack.unpackb(m.body))
    listed = [sorted(c["name"] for c in e["copies"]) for e in events]
    assert listed.count(sorted(names[:2])) == 1, listed
    assert not any("no/such/file" in names_ for names_ in listed)
    assert all(e["storage"] == "disk2" for e in events)
    dead = await (await channel.get_queue(settings.dead_queue("replicator"))).get(fail=False)
    assert dead is not None
    body = msgpack.unpackb(dead.body)
    # Unknown names are one outcome of the bulk request (issue 16): its one dead letter names them.
    assert dead.headers["x-spool-reason"] == "unknown_file" and "no/such/file" in body["names"]
    assert "1 of the 3 files" in dead.headers["x-spool-error"]
    await dead.nack(requeue=True)
    await channel.close()
    async with await Catalogue.open(settings.catalogue.url) as c:
        created = [e for e in await c.queries.history(names[0]) if e.type == "replica.created"]
    assert len(created) == 1  # the bulk request found the copy made and only re-announced it
