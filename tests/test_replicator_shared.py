"""The replicator's limits per endpoint shared by its instances, at the catalogue
(``common.catalogue.transfers``), on SQLite and PostgreSQL: transfer slots never held beyond
``max_transfers`` whoever claims them at once, a dead instance's slots free after its lease, and
the breaker opened by one instance for all, probed by exactly one, a dead prober replaced; then
the same breaker as two instances' ``EndpointHealth`` use it."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select, text

from common.bus.publisher import RecordingPublisher
from common.catalogue import Catalogue
from common.catalogue.schema import outbox
from common.catalogue.sql import utcnow
from common.errors import Retryable
from common.instance import InstanceLease
from common.messages import EndpointPaused, EndpointResumed
from daemons.replicator.health import EndpointHealth
from daemons.replicator.slots import EndpointSlots
from tests.catalogue_fixtures import ENDPOINTS, catalogue, catalogue_url
from tests.conftest import wait_for
from tests.replication_fixtures import replication_settings

FIXTURES = (catalogue, catalogue_url)  # every test runs on SQLite and on PostgreSQL


@pytest.fixture
async def instances(catalogue_url: str) -> AsyncIterator[list[tuple[Catalogue, InstanceLease]]]:
    """Four replicator instances, each with a catalogue connection of its own and a lease."""
    async with AsyncExitStack() as stack:
        out = []
        for i in range(4):
            cat = await Catalogue.open(catalogue_url)
            stack.push_async_callback(cat.close)
            if i == 0:
                await cat.endpoints.sync(ENDPOINTS)
            lease = InstanceLease(cat, "replicator", f"node-{i}", 30.0, on_lost=lambda: None)
            await lease.start()
            stack.push_async_callback(lease.stop)
            out.append((cat, lease))
        yield out


async def _expire(cat: Catalogue, lease: InstanceLease) -> None:
    """The instance's lease runs out (killed, or paused past it): it is dead to the others."""
    now = utcnow()
    assert await cat.instances.renew(lease.id, now, now - timedelta(seconds=1))


async def test_slots_are_never_held_beyond_max_transfers_whoever_claims_at_once(instances) -> None:
    cat = instances[0][0]
    await cat.transfers.sync_slots({"disk1": 3})
    await cat.transfers.sync_slots({"disk1": 3})  # every instance syncs at start: no duplicates
    held: dict[str, int] = {lease.id: 0 for _, lease in instances}
    rng = random.Random(7)
    granted = 0
    for _ in range(6):
        # Many claims at once from every instance (some wanting several), then some released.
        claims = [(c, lease, rng.randint(1, 3)) for c, lease in instances for _ in range(4)]
        got = await asyncio.gather(
            *(c.transfers.claim_slots("disk1", 3, lease.id, n, utcnow()) for c, lease, n in claims)
        )
        for (_, lease, n), g in zip(claims, got, strict=True):
            assert 0 <= g <= n
            held[lease.id] += g
        granted += sum(got)
        # What the claimants were told they got is what the rows say: no slot taken twice.
        assert await cat.transfers.slot_holders("disk1", utcnow()) == {h: n for h, n in held.items() if n}
        assert sum(held.values()) <= 3
        for c, lease in instances:
            if held[lease.id] and rng.random() < 0.7:
                n = rng.randint(1, held[lease.id])
                assert await c.transfers.release_slots("disk1", lease.id, n, False) == n
                held[lease.id] -= n
    assert granted >= 4  # claims did succeed: all three slots at first, released ones again later


async def test_waiting_instances_get_their_share_and_alone_one_takes_all(instances) -> None:
    (a_cat, a), (b_cat, b) = instances[0], instances[1]
    await a_cat.transfers.sync_slots({"disk1": 2})
    assert await a_cat.transfers.claim_slots("disk1", 2, a.id, 5, utcnow()) == 2  # alone: all
    assert await b_cat.transfers.claim_slots("disk1", 2, b.id, 1, utcnow()) == 0  # b now waits
    assert await a_cat.transfers.release_slots("disk1", a.id, 1, True) == 1
    # While b waits, a keeps to its share (1 of 2): the slot it gave back is b's to take.
    assert await a_cat.transfers.claim_slots("disk1", 2, a.id, 1, utcnow()) == 0
    assert await b_cat.transfers.claim_slots("disk1", 2, b.id, 1, utcnow()) == 1
    assert await a_cat.transfers.slot_holders("disk1", utcnow()) == {a.id: 1, b.id: 1}
    # b's copies done and it no longer waits: a may use both again.
    await b_cat.transfers.release_slots("disk1", b.id, 1, False)
    assert await a_cat.transfers.claim_slots("disk1", 2, a.id, 1, utcnow()) == 1


async def test_a_dead_instances_slots_are_free_once_its_lease_ran_out(instances) -> None:
    (a_cat, a), (b_cat, b) = instances[0], instances[1]
    await a_cat.transfers.sync_slots({"disk2": 2})
    assert await a_cat.transfers.claim_slots("disk2", 2, a.id, 2, utcnow()) == 2
    assert await b_cat.transfers.claim_slots("disk2", 2, b.id, 2, utcnow()) == 0  # a lives: none
    await _expire(a_cat, a)
    assert await b_cat.transfers.claim_slots("disk2", 2, b.id, 2, utcnow()) == 2
    assert await b_cat.transfers.slot_holders("disk2", utcnow()) == {b.id: 2}
    # What a clean stop leaves is free at once too (its row is gone), and release_all tidies.
    assert await b_cat.transfers.release_all(b.id) == 2
    assert await b_cat.transfers.slot_holders("disk2", utcnow()) == {}


def _paused(name: str) -> EndpointPaused:
    return EndpointPaused(storage=name, reason="disk_full", error="no space", failures=3, cooldown=30.0)


def _resumed(name: str):  # type: ignore[no-untyped-def]
    return lambda seconds, waiting: EndpointResumed(storage=name, paused_seconds=seconds, waiting=waiting)


async def test_the_breaker_opened_by_one_instance_is_seen_by_the_others_and_announced_once(
    instances,
) -> None:
    (a_cat, a), (b_cat, _) = instances[0], instances[1]
    now = utcnow()
    opened = await asyncio.gather(
        *(
            c.transfers.pause("disk1", "disk_full: no space", 30.0, now, _paused("disk1"))
            for c, _ in instances
        )
    )
    assert sorted(opened) == [False, False, False, True]
    view = (await b_cat.transfers.views())["disk1"]
    assert view.health == "paused" and view.reason == "disk_full: no space"
    assert view.until is not None and not view.probe_due(utcnow())  # cooling down
    assert await a_cat.outbox.backlog() == 1  # one endpoint.paused, whoever opened it
    # Before the cool-down ends, nobody probes.
    assert not await b_cat.transfers.claim_probe("disk1", a.id, utcnow())


async def test_exactly_one_instance_probes_and_its_outcome_holds_for_all(instances) -> None:
    cat = instances[0][0]
    past = utcnow() - timedelta(seconds=60)
    assert await cat.transfers.pause("disk1", "storage_io_error: EIO", 1.0, past, _paused("disk1"))
    won = await asyncio.gather(
        *(c.transfers.claim_probe("disk1", lease.id, utcnow()) for c, lease in instances)
    )
    assert won.count(True) == 1
    prober_cat, prober = instances[won.index(True)]
    other_cat, other = instances[won.index(False)]
    view = (await other_cat.transfers.views())["disk1"]
    assert view.health == "probing" and view.prober == prober.id
    # Only the prober's outcome counts. A failed probe: paused for twice the cool-down.
    assert await other_cat.transfers.probe_failed("disk1", other.id, "x", 1.0, 8.0, utcnow()) is None
    assert await prober_cat.transfers.probe_failed("disk1", prober.id, "x: y", 1.0, 8.0, utcnow()) == 2.0
    view = (await other_cat.transfers.views())["disk1"]
    assert view.health == "paused" and view.cooldown == 2.0 and not view.probe_due(utcnow())
    # The next probe (the cool-down over) succeeds: resumed for all, announced once.
    assert await cat.transfers.claim_probe("disk1", other.id, utcnow() + timedelta(seconds=3))
    resumed = await asyncio.gather(
        *(c.transfers.resume("disk1", utcnow(), _resumed("disk1")) for c, _ in instances)
    )
    assert resumed.count(True) == 1
    assert (await prober_cat.transfers.views())["disk1"].health == "ok"
    assert await cat.outbox.backlog() == 2  # paused, resumed


async def test_a_probe_that_told_nothing_is_due_again_at_once(instances) -> None:
    (a_cat, a), (b_cat, b) = instances[0], instances[1]
    await a_cat.transfers.pause("disk1", "r", 1.0, utcnow() - timedelta(seconds=5), _paused("disk1"))
    assert await a_cat.transfers.claim_probe("disk1", a.id, utcnow())
    await b_cat.transfers.release_probe("disk1", b.id)  # not b's: nothing changes
    assert not await b_cat.transfers.claim_probe("disk1", b.id, utcnow())
    await a_cat.transfers.release_probe("disk1", a.id)
    assert await b_cat.transfers.claim_probe("disk1", b.id, utcnow())


async def test_a_dead_probers_claim_expires_with_its_lease(instances) -> None:
    (a_cat, a), (b_cat, b) = instances[0], instances[1]
    await a_cat.transfers.pause("disk2", "r", 1.0, utcnow() - timedelta(seconds=5), _paused("disk2"))
    assert await a_cat.transfers.claim_probe("disk2", a.id, utcnow())
    assert not await b_cat.transfers.claim_probe("disk2", b.id, utcnow())  # a probes, alive
    await _expire(a_cat, a)  # a killed mid-probe: its lease runs out
    assert await b_cat.transfers.claim_probe("disk2", b.id, utcnow())
    assert (await b_cat.transfers.views())["disk2"].prober == b.id
    # The dead prober's late outcome changes nothing.
    assert await a_cat.transfers.probe_failed("disk2", a.id, "x", 1.0, 8.0, utcnow()) is None


# --- the breaker as two replicator instances use it (``daemons.replicator.health``) -------------
@pytest.fixture
async def two_healths(instances, tmp_path: Path, tag: str) -> AsyncIterator[list[EndpointHealth]]:
    settings = replication_settings(tmp_path, tag)  # breaker: 3 failures, cool-down 0.5 s
    await instances[0][0].endpoints.sync(settings.storage)
    healths = [
        EndpointHealth(settings, c, RecordingPublisher(), instance=lease.id) for c, lease in instances[:2]
    ]
    for health in healths:
        await health.start()
    try:
        yield healths
    finally:
        for health in healths:
            await health.close()


async def _events(cat: Catalogue) -> list[str]:
    return await cat.read(
        lambda conn: list(conn.scalars(select(outbox.c.routing_key).order_by(outbox.c.seq)))
    )


async def test_one_instances_pause_parks_the_others_copies_and_one_probe_resumes_all(
    instances, two_healths
) -> None:
    a, b = two_healths
    err = Retryable("disk_full", "no space left on device")
    assert not await a.failure("disk2", err) and not await a.failure("disk2", err)
    assert await a.failure("disk2", err)  # the third in a row: paused, for every instance
    assert not a.writable("disk2") and await a.admit("disk2") == "wait"
    await b.poll()  # b's next look (or its next failure there)
    assert not b.writable("disk2") and await b.admit("disk2") == "wait"
    assert a.writable("disk1") and b.writable("disk1")  # only that endpoint
    await asyncio.sleep(0.6)  # the cool-down
    admitted = await asyncio.gather(a.admit("disk2"), b.admit("disk2"), a.admit("disk2"), b.admit("disk2"))
    assert sorted(admitted) == ["probe", "wait", "wait", "wait"]
    prober, other = (a, b) if "probe" in admitted[::2] else (b, a)
    await prober.success("disk2")  # the probe copy landed
    assert prober.writable("disk2") and await prober.admit("disk2") == "go"
    await other.poll()
    assert other.writable("disk2")
    assert await _events(instances[0][0]) == ["endpoint.paused", "endpoint.resumed"]


async def test_a_dead_probers_endpoint_is_probed_by_another_instance(instances, two_healths) -> None:
    a, b = two_healths
    err = Retryable("storage_io_error", "EIO")
    for _ in range(3):
        await a.failure("disk2", err)
    await asyncio.sleep(0.6)
    assert await a.admit("disk2") == "probe"
    await b.poll()
    assert await b.admit("disk2") == "wait"  # a probes, alive
    await _expire(*instances[0])  # a is killed mid-probe: its lease runs out
    await b.poll()
    assert await b.admit("disk2") == "probe"
    # b's probe fails: paused again, the cool-down doubled (0.5 -> 1 s), for both.
    assert await b.failure("disk2", err)
    view = (await instances[1][0].transfers.views())["disk2"]
    assert view.health == "paused" and view.cooldown == 1.0 and view.prober is None


async def test_a_probe_outcome_is_reported_when_a_stale_read_lands_after_the_claim(
    instances, two_healths
) -> None:
    """The poll's read of the endpoints may start before this instance's probe claim commits and
    land after it (a loaded machine): the view then shows the endpoint merely paused. The probe's
    failure (or a probe that told nothing) must still reach the catalogue, or the endpoint stays
    ``probing`` by a live instance and nobody ever probes it again (a CI failure of the
    two-instance test, under load)."""
    a, b = two_healths
    err = Retryable("destination_not_writable", "read-only file system")
    for _ in range(3):
        await a.failure("disk2", err)
    stale = await instances[0][0].transfers.views()  # read before the claim...
    await asyncio.sleep(0.6)
    assert await a.admit("disk2") == "probe"
    a.views = stale  # ...landing after it
    assert await a.failure("disk2", err)  # the probe failed
    view = (await instances[1][0].transfers.views())["disk2"]
    assert view.health == "paused" and view.prober is None and view.cooldown == 1.0
    await asyncio.sleep(1.1)
    await b.poll()
    assert await b.admit("disk2") == "probe"  # due again, for anyone
    b.views = await instances[1][0].transfers.views()
    b.views["disk2"] = stale["disk2"]
    await b.release_probe("disk2")  # this probe told nothing: due again at once
    assert (await instances[1][0].transfers.views())["disk2"].health == "paused"
    assert await a.admit("disk2") == "probe"


# --- the slots as two replicator instances use them (``daemons.replicator.slots``) --------------
async def test_two_instances_slots_hold_the_limit_together_and_leave_nothing_held(instances) -> None:
    (a_cat, a), (b_cat, b) = instances[0], instances[1]
    await a_cat.transfers.sync_slots({"disk1": 2})
    slots = {"a": EndpointSlots(a_cat, "disk1", 2, a.id), "b": EndpointSlots(b_cat, "disk1", 2, b.id)}
    running, most, done = 0, 0, Counter[str]()

    async def transfer(who: str) -> None:
        nonlocal running, most
        async with slots[who]:
            running += 1
            most = max(most, running)
            await asyncio.sleep(0.01)
            running -= 1
            done[who] += 1

    # Both slots held (one by each instance): a third transfer waits, and giving up takes nothing.
    release = asyncio.Event()

    async def hold(who: str) -> None:
        async with slots[who]:
            await release.wait()

    holders = [asyncio.create_task(hold(who)) for who in "ab"]
    await wait_for(lambda: _held(a_cat, 2), timeout=10, interval=0.01)
    waiting = asyncio.create_task(transfer("a"))
    await asyncio.sleep(0.2)
    assert not waiting.done()
    waiting.cancel()
    release.set()
    await asyncio.gather(*holders, waiting, return_exceptions=True)
    # Many at once from both, then.
    await asyncio.gather(*(transfer(who) for who in "ab" * 15))
    assert most == 2 and done == {"a": 15, "b": 15}
    for s in slots.values():
        await s.close()
    assert await a_cat.transfers.slot_holders("disk1", utcnow()) == {}


async def test_an_instance_alone_keeps_its_slots_between_transfers_and_yields_when_another_waits(
    instances,
) -> None:
    (a_cat, a), (b_cat, b) = instances[0], instances[1]
    await a_cat.transfers.sync_slots({"disk1": 2})
    a_slots, b_slots = EndpointSlots(a_cat, "disk1", 2, a.id), EndpointSlots(b_cat, "disk1", 2, b.id)
    # Alone: transfers one after the other take the slot back instead of a release and a claim each.
    for _ in range(40):
        async with a_slots:
            await asyncio.sleep(0.002)
    assert a_slots.claims == 1
    # Busy on both slots without a pause, a still lets b in: b waits, a learns it and releases.
    stop = asyncio.Event()
    most = Counter[str]()

    async def busy() -> None:
        while not stop.is_set():
            async with a_slots:
                most["held"] = max(
                    most["held"], sum((await a_cat.transfers.slot_holders("disk1", utcnow())).values())
                )
                await asyncio.sleep(0.005)

    workers = [asyncio.create_task(busy()) for _ in range(2)]
    await wait_for(lambda: _held(a_cat, 2), timeout=10, interval=0.01)
    async with b_slots:
        assert (await a_cat.transfers.slot_holders("disk1", utcnow())).get(b.id) == 1
    stop.set()
    await asyncio.gather(*workers)
    assert most["held"] <= 2  # never more than the endpoint's rows, kept ones included
    for s in (a_slots, b_slots):
        await s.close()
    assert await a_cat.transfers.slot_holders("disk1", utcnow()) == {}


async def _held(cat: Catalogue, n: int) -> bool:
    return sum((await cat.transfers.slot_holders("disk1", utcnow())).values()) == n


async def test_a_claim_the_catalogue_refuses_fails_the_waiting_transfer_as_retryable(catalogue) -> None:
    slots = EndpointSlots(catalogue, "disk1", 2, "replicator@node-a:1:cafe")
    await catalogue.write(lambda conn: conn.execute(text("DROP TABLE transfer_slots")))  # a broken catalogue
    with pytest.raises(Retryable) as failed:
        async with slots:
            raise AssertionError("copied without a slot")
    assert failed.value.reason == "catalogue_unavailable"
    assert slots.in_use == 0
    await slots.close()  # logged, not raised: the lease's end frees what it held
