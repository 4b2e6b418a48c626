"""The monitor's state through the catalogue (``daemons.monitor.snapshot``,
``common.catalogue.monitor_state``) and the role deciding who saves it (``daemons.monitor.role``),
on SQLite and on PostgreSQL: what a successor restores is what the active monitor counted, and a
cause already alerted is not alerted again."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from common.catalogue import Catalogue
from common.catalogue.repositories.monitor_state import MonitorStateRepository
from common.catalogue.sql import utcnow
from common.config import load_settings
from common.messages import AlertRaised, DaemonHeartbeat, EndpointPaused, FileFailed, FileIngested
from daemons.monitor.role import ROLE, STATE_NAME, RoleKeeper
from daemons.monitor.snapshot import UnreadableSnapshot, dump, restore
from daemons.monitor.steps import MonitorState, Thresholds
from tests.catalogue_fixtures import catalogue, catalogue_url
from tests.conftest import write_config

FIXTURES = (catalogue, catalogue_url)  # every test runs on SQLite and on PostgreSQL
T0 = datetime(2026, 12, 7, 2, 0, tzinfo=UTC)


def _state() -> MonitorState:
    return MonitorState(Thresholds(interval=15.0))


def _failed(reason: str, name: str, daemon: str = "ingest", endpoint: str | None = None) -> FileFailed:
    return FileFailed(
        daemon=daemon, reason=reason, error=f"{reason}: {name} went wrong", attempts=3, name=name,
        endpoint=endpoint, time=T0,
    )  # fmt: skip


def _ingested(name: str, size: int) -> FileIngested:
    return FileIngested(name=name, dataset="d", size=size, adler32="1", storage="disk1", pfn="/p")


def _paused(error: str) -> EndpointPaused:
    return EndpointPaused(storage="disk2", reason="breaker_open", error=error, failures=5, cooldown=60)


def _busy_state() -> tuple[MonitorState, list[AlertRaised]]:
    """A state with everything the monitor keeps: heartbeats, events, bytes, failure groups (one
    of them ten times), an endpoint paused, a malformed and a refused message."""
    state = _state()
    alerts: list[AlertRaised] = []
    details = {"retried": 2, "queue": "spool.ingest", "retried_by_reason": {"x": 2}}
    beat = DaemonHeartbeat(
        daemon="ingest", instance="i1", host="node1", pid=42, version="0.1.0", started=T0,
        processed=7, details=details,
    )  # fmt: skip
    state.observe(beat)
    for n in range(5):
        state.observe(_ingested(f"f{n}", 100))
    for n in range(10):
        alerts += state.observe(_failed("checksum_mismatch", f"bad{n}"))
    alerts += state.observe(_failed("endpoint_unavailable", "rare", daemon="replicator", endpoint="disk2"))
    alerts += state.observe(_paused("5 failures"))
    state.observe_malformed("file.ready", "invalid_message", "size: not an integer")
    state.observe(_ingested("x", 1), trusted=False)
    return state, alerts


def test_a_snapshot_restores_every_count_group_alert_and_instance() -> None:
    state, alerts = _busy_state()
    assert len(alerts) == 3 and len(state.failures) == 3
    pending = alerts[-1:]
    doc = json.loads(json.dumps(dump(state, pending)))  # what a JSON column gives back
    again = _state()
    assert restore(again, doc) == pending
    assert again.failure_groups() == state.failure_groups()
    assert [g.count for g in again.failure_groups()] == [10, 1, 1]
    assert again.events == state.events and again.messages == state.messages == 20
    assert again.moved_bytes == state.moved_bytes and again.processed == state.processed
    assert again.malformed == state.malformed and again.last_malformed == state.last_malformed
    assert again.refused == state.refused and again.last_refused == state.last_refused
    assert again.alerts_raised == state.alerts_raised and list(again.alerts) == list(state.alerts)
    assert again.instances == state.instances and again.started == state.started


def test_a_restored_state_does_not_alert_again_for_a_cause_already_alerted() -> None:
    state, _alerts = _busy_state()
    again = _state()
    restore(again, json.loads(json.dumps(dump(state))))
    assert again.observe(_failed("checksum_mismatch", "bad-after")) == []
    assert again.observe(_paused("again")) == []
    assert again.failures[("ingest", "checksum_mismatch", None)].count == 11
    [alert] = again.observe(_failed("disk_full", "new"))  # a new cause still alerts, once
    assert alert.reason == "disk_full" and again.observe(_failed("disk_full", "new2")) == []


def test_an_unreadable_snapshot_is_refused_and_leaves_the_state_alone() -> None:
    state, _alerts = _busy_state()
    doc = dump(state)
    target, _ = _busy_state()
    before = dump(target)
    for broken in ({**doc, "version": 99}, {**doc, "failures": [{"daemon": "x"}]}, {"version": 1}):
        with pytest.raises(UnreadableSnapshot):
            restore(target, broken)
        assert dump(target) == before


async def _claim(cat: Catalogue, holder: str, seconds: float = 30) -> bool:
    now = utcnow()
    return await cat.instances.claim_role(ROLE, holder, now, now + timedelta(seconds=seconds))


async def test_the_state_round_trips_through_the_catalogue_written_only_by_the_roles_holder(
    catalogue: Catalogue,
) -> None:
    repo = MonitorStateRepository(catalogue)
    state, alerts = _busy_state()
    assert await repo.load(STATE_NAME) is None
    assert await _claim(catalogue, "monitor@a")
    assert await repo.save(STATE_NAME, ROLE, "monitor@a", dump(state, alerts[-1:]), utcnow())
    # Twice: the second save replaces the first.
    state.observe(_failed("checksum_mismatch", "one-more"))
    assert await repo.save(STATE_NAME, ROLE, "monitor@a", dump(state, alerts[-1:]), utcnow())
    # Another instance does not hold the role: its save is refused, the holder's stays.
    assert not await repo.save(STATE_NAME, ROLE, "monitor@b", dump(_state()), utcnow())
    saved = await repo.load(STATE_NAME)
    assert saved is not None and saved.saved_by == "monitor@a"
    again = _state()
    assert [a.id for a in restore(again, saved.doc)] == [alerts[-1].id]
    assert again.failure_groups() == state.failure_groups()
    assert again.failures[("ingest", "checksum_mismatch", None)].count == 11
    assert again.events == state.events and again.alerts_raised == state.alerts_raised
    assert again.observe(_failed("checksum_mismatch", "after")) == []
    # The holder's lease ran out and b took over: a's late save is refused.
    assert await _claim(catalogue, "monitor@a", seconds=-1)
    assert await _claim(catalogue, "monitor@b")
    assert not await repo.save(STATE_NAME, ROLE, "monitor@a", dump(_state()), utcnow())
    assert await repo.save(STATE_NAME, ROLE, "monitor@b", dump(again), utcnow())
    latest = await repo.load(STATE_NAME)
    assert latest is not None and latest.saved_by == "monitor@b" and latest.doc["messages"] == 22


class Side:
    """One monitor's side of the role, as ``MonitorResources`` wires it: its own state."""

    def __init__(self, url: str, tmp_path: Path, name: str) -> None:
        config = write_config(
            tmp_path / f"{name}.toml", tmp_path / name, name, catalogue=f'url = "{url}"\nlease_seconds = 3'
        )
        self.state = _state()
        self.events: list[str] = []
        self.role = RoleKeeper(
            load_settings(config), restore=self.restore, on_active=self.active, on_standby=self.standby
        )

    async def restore(self) -> None:
        saved = await self.role.load()
        if saved is not None:
            restore(self.state, saved.doc)
        self.events.append("restored")

    async def active(self) -> None:
        self.events.append("active")

    async def standby(self, why: str) -> None:
        self.events.append("standby")


async def test_one_monitor_holds_the_role_the_other_takes_over_with_its_saved_state(
    catalogue_url: str, tmp_path: Path
) -> None:
    a, b = Side(catalogue_url, tmp_path, "a"), Side(catalogue_url, tmp_path, "b")
    try:
        await a.role.step()
        await b.role.step()
        assert a.role.active and not b.role.active and b.role.holder == a.role.instance
        assert a.events == ["restored", "active"] and b.events == []
        for n in range(4):
            a.state.observe(_failed("checksum_mismatch", f"bad{n}"))
        assert await a.role.save(dump(a.state))
        assert not await b.role.save(dump(b.state))  # a standby never saves
        # a stops cleanly: the role is released at once and b takes it with a's counts.
        await a.role.close()
        await b.role.step()
        assert b.role.active and b.events == ["restored", "active"]
        assert b.state.failures[("ingest", "checksum_mismatch", None)].count == 4
        assert b.state.observe(_failed("checksum_mismatch", "again")) == []
        # b's role runs out unrenewed (its catalogue "unreachable" past the lease): it stands by.
        b.role.expires = utcnow() - timedelta(seconds=1)
        assert not await b.role.save(dump(b.state)) and not b.role.valid()
        await b.role.lose("the role's lease ran out")
        assert not b.role.active and b.events[-1] == "standby"
    finally:
        await a.role.close()
        await b.role.close()


async def test_a_standby_takes_over_once_the_active_ones_lease_runs_out(
    catalogue_url: str, tmp_path: Path
) -> None:
    a, b = Side(catalogue_url, tmp_path, "a"), Side(catalogue_url, tmp_path, "b")
    try:
        await a.role.step()
        a.state.observe(_failed("checksum_mismatch", "bad"))
        assert await a.role.save(dump(a.state))
        # a is killed: nothing renews its role; b claims every third of the lease until it runs out.
        assert a.role._task is None
        b.role.start()
        deadline = asyncio.get_running_loop().time() + 15
        while not b.role.active and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.2)
        assert b.role.active and b.state.failures[("ingest", "checksum_mismatch", None)].count == 1
        # a comes back (its process paused, not dead): its claim finds b's role, a stands by.
        await a.role.step()
        assert not a.role.active and a.events[-1] == "standby" and a.role.holder == b.role.instance
    finally:
        await a.role.close()
        await b.role.close()
