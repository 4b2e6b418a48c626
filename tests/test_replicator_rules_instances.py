"""A new rule walked by one replicator instance of several (``daemons.replicator.rules``): two
instances evaluating together request each copy once, and a rule whose walker died is walked
again once the walker's lease has run out (SQLite and PostgreSQL)."""

# ruff: noqa: F811

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

from common.bus.publisher import RecordingPublisher
from common.catalogue import Catalogue
from common.catalogue.policy import Rule
from common.config import Settings
from common.messages import ReplicaRequest
from daemons.replicator.rules import evaluate_new_rules, rule_role
from tests.catalogue_fixtures import ENDPOINTS, catalogue, catalogue_url, rec  # noqa: F401

FILES = 1_100  # two pages of the walk


def requested(*publishers: RecordingPublisher) -> list[str]:
    return [name for p in publishers for m in p.of_type(ReplicaRequest) for name in m.names]


async def test_two_instances_walk_a_new_rule_once_and_a_dead_walkers_rule_again(catalogue: Catalogue) -> None:
    # The endpoints as data: Settings resolves a tape endpoint's root in the object it is given,
    # and ENDPOINTS is shared with every other catalogue test.
    storage = {name: e.model_dump() for name, e in ENDPOINTS.items()}
    settings = Settings.model_validate(
        {"storage": storage, "replication": {"poll_interval": 0.01}, "catalogue": {"lease_seconds": 3}}
    )
    await catalogue.ingest.register([rec(f"f{i:05d}") for i in range(FILES)])
    await catalogue.replication.add_rule(Rule("to-pic", endpoints="site=PIC", datasets=".*"))
    await asyncio.sleep(0.1)  # past the rule's settle time (three poll intervals)
    a, b = RecordingPublisher(), RecordingPublisher()
    counts = await asyncio.gather(
        evaluate_new_rules(catalogue, a, settings, "replicator@node-a:1:aaaa"),
        evaluate_new_rules(catalogue, b, settings, "replicator@node-b:2:bbbb"),
    )
    assert sorted(counts) == [0, FILES]
    names = requested(a, b)
    assert len(names) == FILES and len(set(names)) == FILES  # each copy asked for once

    # A walker killed midway: its role lease stands until it runs out, and the rule stays new.
    await catalogue.replication.add_rule(Rule("to-pic-again", endpoints="disk2", datasets=".*", copies=1))
    now = datetime.now(UTC)
    dead = "replicator@node-c:3:cccc"
    role = rule_role("to-pic-again")
    assert await catalogue.instances.claim_role(role, dead, now, now + timedelta(seconds=1))
    await asyncio.sleep(0.1)
    later = RecordingPublisher()
    assert await evaluate_new_rules(catalogue, later, settings, "replicator@node-b:2:bbbb") == 0
    await asyncio.sleep(1.0)  # the dead walker's lease runs out
    await evaluate_new_rules(catalogue, later, settings, "replicator@node-b:2:bbbb")
    assert [r.id for r in await catalogue.replication.new_rules(datetime.now(UTC))] == []
    assert await catalogue.instances.role_holder(role, datetime.now(UTC)) is None
