"""Applying a new rule to the files that already exist (like a rule added to an existing dataset).

A rule is stored ``new`` (by ``spool rule add`` or a changed config file). Ingest applies it to
files it registers once its rule cache has reloaded (``replication.poll_interval``); this loop
waits three poll intervals after the rule appeared, so that every file registered before ingest
saw the rule is in the catalogue, then walks the files the rule selects (dataset by dataset, in
id order), locks their copies and publishes the requests, and finally marks the rule ``active``.
A kill midway leaves the rule ``new``: the walk runs again from the start, and locks and requests
are idempotent.

Several replicator instances: each runs this loop, and a rule is walked by one of them at a time.
Before its walk an instance takes the rule's role lease (``role_leases``, ``rule_role``) for
``catalogue.lease_seconds``, extends it at every page and drops it at the end; the others leave
the rule alone meanwhile (without it, each would lock and request every copy of a big rule once
more). A holder killed midway lets its lease run out, and the next instance to look walks the rule
from the start. An instance whose configuration does not know the rule's endpoints takes nothing
(another node's rule), so it never keeps the node that can evaluate it out.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace
from datetime import UTC, datetime, timedelta

from common.bus.publisher import Publisher
from common.catalogue import Catalogue
from common.catalogue.policy import Rule
from common.config import Settings
from common.logging import get_logger
from common.placement import BULK, endpoint_table, publish_wanted

log = get_logger("spool.replicator")

PAGE = 1000


def settle_time(settings: Settings) -> timedelta:
    """How long a new rule waits before it is evaluated: three of ingest's rule-cache reloads."""
    return timedelta(seconds=3 * settings.replication.poll_interval)


def rule_role(rule_id: str) -> str:
    """The role lease of a rule's walk (a digest: a rule id may fill a role's 64 characters)."""
    return "rule:" + hashlib.sha256(rule_id.encode()).hexdigest()[:40]


class _Walk:
    """The role lease of one rule's walk, held by ``holder`` (None: the only walker, no lease)."""

    def __init__(self, catalogue: Catalogue, rule: Rule, holder: str | None, seconds: float) -> None:
        self.catalogue, self.role, self.holder = catalogue, rule_role(rule.id), holder
        self.seconds = seconds

    async def take(self) -> bool:
        """Take or extend the lease; False when another live instance holds it."""
        if self.holder is None:
            return True
        now = datetime.now(UTC)
        expires = now + timedelta(seconds=self.seconds)
        return await self.catalogue.instances.claim_role(self.role, self.holder, now, expires)

    async def drop(self) -> None:
        if self.holder is not None:
            await self.catalogue.instances.release_role(self.role, self.holder)


async def evaluate_new_rules(
    catalogue: Catalogue, publisher: Publisher, settings: Settings, holder: str | None = None
) -> int:
    """Evaluate every rule that is due; returns how many copies were requested. ``holder``: this
    instance's lease id, so that of several instances one walks each rule (None: the only one)."""
    settle = settle_time(settings)
    requested = 0
    endpoints = endpoint_table(settings)
    due = await catalogue.replication.new_rules(datetime.now(UTC) - settle)
    if not due:
        return 0
    # Files are placed against every rule at once, exactly as ingest places them, so overlapping
    # rules share copies whatever order they were added in.
    every = [r for r in await catalogue.replication.load_rules() if r.expression.select(endpoints)]
    for rule in due:
        if not rule.expression.select(endpoints):
            continue  # names endpoints this node does not know: another node's rule
        walk = _Walk(catalogue, rule, holder, settings.catalogue.lease_seconds)
        if not await walk.take():
            continue  # another instance walks it now
        try:
            requested += await _evaluate(catalogue, publisher, rule, every, endpoints, walk)
        finally:
            await walk.drop()
    return requested


async def _evaluate(
    catalogue: Catalogue,
    publisher: Publisher,
    rule: Rule,
    every: list[Rule],
    endpoints: dict[str, dict[str, str]],
    walk: _Walk,
) -> int:
    after, files, requested = (0, 0), 0, 0
    # The files' metadata is read only if some rule places by it.
    metadata = any(r.filters for r in every)
    while True:
        page = await catalogue.replication.files_for_rule(rule, after=after, limit=PAGE, metadata=metadata)
        if not page:
            break
        items = [(x.name, x.dataset, x.metadata) for x in page]
        wanted = await catalogue.replication.plan_copies(items, every, endpoints)
        flat = [w for per_file in wanted for w in per_file]
        # Each copy carries its file's correlation id (its file.ready's event id, what ingest and
        # the tape writer use): the rule's own id only for a file ingest has no record of.
        known = await catalogue.tape.ingest_correlations([w.name for w in flat]) if flat else {}
        flat = [replace(w, correlation_id=w.correlation_id or known.get(w.name)) for w in flat]
        await publish_wanted(publisher, flat, correlation_id=f"rule-{rule.id}", bulk=BULK)
        files += len(page)
        requested += len(flat)
        after = page[-1].cursor
        if not await walk.take():  # the lease ran out and another instance took the rule
            log.warning("rule_walk_taken_over", rule=rule.id, files=files)
            return requested
    await catalogue.replication.activate_rule(rule.id)
    log.info("rule_evaluated", rule=rule.id, files=files, requested=requested)
    return requested
