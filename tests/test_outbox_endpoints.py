"""The replicator's endpoint events through the outbox, against the real RabbitMQ (SQLite and
PostgreSQL): a pause while the broker is away is recorded and announced once it is back; a pause
a dead process left ends with ``endpoint.resumed`` at the next start."""

# Fixtures imported from other modules (not conftest) reappear as test parameters:
# ruff: noqa: F811

from __future__ import annotations

import pytest

from common.errors import Retryable
from daemons.replicator.health import EndpointHealth
from tests.catalogue_fixtures import catalogue_url  # noqa: F401
from tests.outbox_fixtures import cat, dead, listener, live, nothing_more, received  # noqa: F401

pytestmark = pytest.mark.integration


async def _health(cat, name: str) -> str:  # type: ignore[no-untyped-def]
    return {e.name: e.health for e in await cat.endpoints.all()}[name]


async def test_a_pause_while_the_broker_is_away_is_recorded_and_announced_once_it_is_back(
    cat, settings, dead, live, listener
):
    await cat.endpoints.sync(settings.storage)
    health = EndpointHealth(settings, cat, dead)
    await health.start()
    try:
        err = Retryable("destination_not_writable", "read-only file system")
        paused = False
        for _ in range(50):
            if paused := await health.failure("disk1", err):  # never raises: the broker is away
                break
        assert paused and await _health(cat, "disk1") == "paused"
        assert await cat.outbox.backlog() == 1
        health.relay.publisher = live  # the broker is back
        assert await health.relay.flush() == 1
        [(key, _)] = await received(listener, 1)
        assert key == "endpoint.paused"
    finally:
        await health.close()
    assert await nothing_more(listener)


async def test_a_pause_left_by_a_dead_process_ends_with_endpoint_resumed_at_start(
    cat, settings, live, listener
):
    await cat.endpoints.sync(settings.storage)
    await cat.endpoints.set_health("disk1", "paused", "disk_full: no space left")
    health = EndpointHealth(settings, cat, live)
    await health.start()
    try:
        [(key, _)] = await received(listener, 1)
    finally:
        await health.close()
    assert key == "endpoint.resumed" and await _health(cat, "disk1") == "ok"
    assert await nothing_more(listener)
