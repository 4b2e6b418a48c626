"""Applying a new rule to the files that already exist (like a rule added to an existing dataset).

A rule is stored ``new`` (by ``spool rule add`` or a changed config file). Ingest applies it to
files it registers once its rule cache has reloaded (``replication.poll_interval``); this loop
waits three poll intervals after the rule appeared, so that every file registered before ingest
saw the rule is in the catalogue, then walks the files the rule selects (dataset by dataset, in
id order), locks their copies and publishes the requests, and finally marks the rule ``active``.
A kill midway leaves the rule ``new``: the walk runs again from the start, and locks and requests
are idempotent.
"""

from __future__ import annotations

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


async def evaluate_new_rules(catalogue: Catalogue, publisher: Publisher, settings: Settings) -> int:
    """Evaluate every rule that is due; returns how many copies were requested."""
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
        requested += await _evaluate(catalogue, publisher, rule, every, endpoints)
    return requested


async def _evaluate(
    catalogue: Catalogue,
    publisher: Publisher,
    rule: Rule,
    every: list[Rule],
    endpoints: dict[str, dict[str, str]],
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
    await catalogue.replication.activate_rule(rule.id)
    log.info("rule_evaluated", rule=rule.id, files=files, requested=requested)
    return requested
