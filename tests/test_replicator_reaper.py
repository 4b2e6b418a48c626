"""The reaper end to end against the real broker: a copy a rule's placement locked while the
reaper was deleting it is made again by the replicator (before, its row went with the bytes and
the rule held a copy missing for good, with nothing requested)."""

from __future__ import annotations

from typing import Any

import pytest

from common.catalogue import Catalogue
from common.catalogue.policy import Rule
from common.config import load_settings
from common.placement import endpoint_table
from daemons.ingest.handlers import service as ingest_service
from daemons.replicator.handlers import service as replicator_service
from tests.conftest import running, wait_for
from tests.replication_fixtures import (
    DATASET,
    available_on,
    make_files,
    name_of,
    publish_ready,
    replication_config,
)

pytestmark = pytest.mark.integration
SERVICES = [ingest_service, replicator_service]


async def test_a_copy_a_rule_locked_while_the_reaper_deleted_it_is_made_again(tmp_path, tag, broker):
    settings = load_settings(
        replication_config(tmp_path, tag, **{"rules.cnaf": 'datasets = ".*"\nendpoints = "disk2"'})
    )
    files = make_files(settings, 3)
    names = sorted(name_of(settings, p) for p, _ in files)
    async with running(SERVICES, settings):
        await publish_ready(broker, settings, files)
        await wait_for(lambda: _available(settings, set(names)), timeout=60)

    # Daemons stopped. The rule goes (its copies become reapable); a reaper claims one copy and is
    # stopped before deleting its bytes; a new rule's placement meets that copy ``deleting``.
    late = Rule("late", endpoints="disk2", datasets=".*")
    async with await Catalogue.open(settings.catalogue.url) as cat:
        assert await cat.replication.remove_rule("cnaf") == 3
        (item, *_) = await cat.replication.reapable()
        assert await cat.replication.begin_delete(item.replica_id)
        await cat.replication.add_rule(late)
        items: list[tuple[str, str, dict[str, Any]]] = [(n, DATASET, {}) for n in names]
        assert await cat.replication.plan_copies(items, [late], endpoint_table(settings)) == [[], [], []]
        await cat.replication.activate_rule("late")
    target = settings.storage["disk2"].root / item.name
    before = target.read_bytes()

    # Started without the config rule: the reaper finishes the claimed copy's deletion, the lock
    # makes it ask for the copy again (outbox), the replicator makes it.
    settings = load_settings(replication_config(tmp_path, tag))
    async with running(SERVICES, settings):
        await wait_for(lambda: _made_again(cat_url=settings.catalogue.url, name=item.name), timeout=60)
    assert await available_on(settings, "disk2") == set(names)
    assert target.read_bytes() == before
    async with await Catalogue.open(settings.catalogue.url) as cat:
        history = [(e.type, e.storage) for e in await cat.queries.history(item.name) if e.storage == "disk2"]
    assert history == [
        ("replica.created", "disk2"),
        ("replica.deleted", "disk2"),
        ("replica.created", "disk2"),
    ]


async def _available(settings, names: set[str]) -> bool:
    return await available_on(settings, "disk2") == names


async def _made_again(cat_url: str, name: str) -> bool:
    async with await Catalogue.open(cat_url) as cat:
        history = [e.type for e in await cat.queries.history(name) if e.storage == "disk2"]
    return history.count("replica.created") == 2 and (await _state(cat_url, name)) == "available"


async def _state(cat_url: str, name: str) -> str | None:
    async with await Catalogue.open(cat_url) as cat:
        view = await cat.queries.show_file(name)
    assert view is not None
    return next((x.state for x in view.replicas if x.storage == "disk2"), None)
