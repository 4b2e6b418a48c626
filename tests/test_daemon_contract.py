"""One contract over every daemon: handlers registered for known message types, queue names
unique, and each starts and stops cleanly in ``once`` mode against the real broker."""

from __future__ import annotations

import asyncio

import pytest

from common.bus.topology import BINDINGS
from common.config import DAEMON_NAMES
from common.messages import MODELS
from common.runtime import Process
from daemons import registry

SERVICES = registry.load_all()


@pytest.mark.parametrize("service", SERVICES, ids=lambda s: s.name)
def test_handlers_are_registered_for_known_message_types_bound_to_the_queue(service):
    # An observer of the whole bus (the monitor, bound to "#") has one handler for every type.
    assert service.routes or service.fallback, f"{service.name} registers no handler"
    for key, route in service.routes.items():
        assert MODELS[key] is route.model
        bound = BINDINGS[service.name]
        assert key in bound or "#" in bound, f"{key} is not bound to {service.name}'s queue"


def test_queue_names_are_unique(settings):
    names = [settings.queue(d) for d in BINDINGS] + [settings.dead_queue(d) for d in BINDINGS]
    names += [settings.retry_queue(d, t) for d in BINDINGS for t in range(len(settings.bus.retry_tiers))]
    assert len(names) == len(set(names))


@pytest.mark.integration
@pytest.mark.parametrize("service", SERVICES, ids=lambda s: s.name)
async def test_starts_and_stops_cleanly_in_once_mode(service, settings, broker):
    code = await asyncio.wait_for(Process([service], settings, once=True).run(), timeout=60)
    assert code == 0


def test_every_daemon_of_the_design_is_registered_and_unknown_names_are_refused():
    assert set(registry.SERVICES) == set(DAEMON_NAMES)
    assert [s.name for s in registry.load_all()] == list(registry.SERVICES)
    with pytest.raises(KeyError, match="unknown daemon 'archiver'"):
        registry.load("archiver")
