"""Turning replication rules into requests on the bus; shared by ingest and the replicator.

``RuleBook`` keeps the catalogue's rules in memory, reloaded every ``replication.poll_interval``
seconds, so a rule added with ``spool rule add`` applies to files ingested a few seconds later;
the replicator evaluates files that existed before (see ``daemons.replicator.rules``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from common.bus.publisher import Publisher
from common.catalogue import Catalogue, Wanted
from common.catalogue.policy import PolicyError, Rule, check_rule, endpoint_attributes
from common.config import Settings
from common.errors import ConfigError
from common.logging import get_logger
from common.messages import ReplicaRequest, TapeArchive

log = get_logger(__name__)


def endpoint_table(settings: Settings) -> dict[str, dict[str, str]]:
    """Endpoint name -> its attributes (configured ones plus ``name`` and ``kind``)."""
    return {n: endpoint_attributes(n, ep.kind, ep.attributes) for n, ep in settings.storage.items()}


def config_rules(settings: Settings) -> list[Rule]:
    """The ``[rules.*]`` of the configuration, checked against the endpoints (``ConfigError``)."""
    table = endpoint_table(settings)
    out = []
    for rule_id, r in settings.rules.items():
        try:
            rule = Rule(
                id=rule_id, endpoints=r.endpoints, copies=r.copies, datasets=r.datasets,
                metadata=tuple(r.metadata), lifetime=r.lifetime, priority=r.priority, origin="config",
            )  # fmt: skip
            check_rule(rule, table)
        except PolicyError as exc:
            raise ConfigError(f"rules.{rule_id}: {exc}") from None
        out.append(rule)
    return out


async def sync_config_rules(catalogue: Catalogue, settings: Settings) -> None:
    """Apply this node's ``[rules.*]`` to the catalogue (``settings.node`` declares them) and say
    what changed and what was refused: a file never replaces a ``spool rule add`` rule."""
    result = await catalogue.replication.sync_config_rules(config_rules(settings), settings.node)
    if result.changed:
        log.info("config_rules_applied", node=settings.node, changed=result.changed)
    for rule_id in result.refused:
        log.error(
            "config_rule_refused", node=settings.node, rule_id=rule_id,
            reason=f"rules.{rule_id} names a rule added with `spool rule add`; it is left as it is "
            f"(remove it, or rename the config rule)",
        )  # fmt: skip


class RuleBook:
    def __init__(self, catalogue: Catalogue, settings: Settings) -> None:
        self.catalogue = catalogue
        self.endpoints = endpoint_table(settings)
        self.max_age = settings.replication.poll_interval
        self._rules: list[Rule] = []
        self._loaded = float("-inf")
        self._reload = asyncio.Lock()  # one reload at a time, however many handlers ask

    async def rules(self) -> list[Rule]:
        if time.monotonic() - self._loaded >= self.max_age:
            async with self._reload:
                if time.monotonic() - self._loaded >= self.max_age:
                    # Rules naming endpoints this node does not know cannot be placed here.
                    loaded = await self.catalogue.replication.load_rules()
                    self._rules = [r for r in loaded if r.expression.select(self.endpoints)]
                    self._loaded = time.monotonic()
        return self._rules

    async def plan(
        self,
        items: Sequence[tuple[str, str, Mapping[str, Any]]],
        *,
        correlation_ids: Sequence[str | None] | None = None,
    ) -> list[list[Wanted]]:
        """The copies each of ``items`` (name, dataset, metadata) still needs; each carries the
        file's correlation id from ``correlation_ids`` (same order), so the requests keep it."""
        rules = await self.rules()
        if not rules:
            return [[] for _ in items]
        wanted = await self.catalogue.replication.plan_copies(items, rules, self.endpoints)
        if correlation_ids is None:
            return wanted
        return [
            [replace(w, correlation_id=cid) for w in ws]
            for ws, cid in zip(wanted, correlation_ids, strict=True)
        ]


BULK = 256  # files per bulk replica.request


def request_for(wanted: Wanted, *, correlation_id: str | None = None) -> ReplicaRequest | TapeArchive:
    model = TapeArchive if wanted.kind == "tape" else ReplicaRequest
    return model(
        name=wanted.name,
        destination=wanted.storage,
        rule_id=wanted.rule_id or None,
        priority=wanted.priority,
        correlation_id=wanted.correlation_id or correlation_id,
    )


def requests_for(
    wanted: Sequence[Wanted], *, correlation_id: str | None = None, bulk: int = BULK
) -> list[ReplicaRequest | TapeArchive]:
    """Messages for many wanted copies, grouped per destination into bulk ``replica.request``s
    (disk) and ``tape.archive``s (tape) of up to ``bulk`` files (highest priority first, the
    message carrying the highest priority of its files).

    Each request carries the correlation id of its file (``Wanted.correlation_id``, else
    ``correlation_id``); a bulk one lists them per file (``correlation_ids``) when they differ
    from the message's own, which is then ``correlation_id`` or, if all its files share one, that."""
    out: list[ReplicaRequest | TapeArchive] = []
    by_destination: dict[tuple[str, str], list[Wanted]] = {}
    for w in wanted:
        if bulk <= 1:
            out.append(request_for(w, correlation_id=correlation_id))
        else:
            by_destination.setdefault((w.kind, w.storage), []).append(w)
    for (kind, destination), items in by_destination.items():
        model = TapeArchive if kind == "tape" else ReplicaRequest
        items.sort(key=lambda w: -w.priority)
        for i in range(0, len(items), bulk):
            part = items[i : i + bulk]
            if len(part) == 1:
                out.append(request_for(part[0], correlation_id=correlation_id))
                continue
            ids = [w.correlation_id or correlation_id for w in part]
            shared = ids[0] if len(set(ids)) == 1 else correlation_id
            out.append(
                model(
                    names=[w.name for w in part],
                    correlation_ids=[] if len(set(ids)) == 1 else ids,
                    destination=destination,
                    priority=part[0].priority,
                    correlation_id=shared,
                )
            )
    return out


async def publish_wanted(
    publisher: Publisher,
    wanted: Sequence[Wanted],
    *,
    correlation_id: str | None = None,
    window: int = 256,
    bulk: int = 1,
) -> None:
    """Publish the requests for ``wanted`` (bulk ones when ``bulk`` > 1), ``window`` confirms
    in flight at a time."""
    messages = requests_for(wanted, correlation_id=correlation_id, bulk=bulk)
    for i in range(0, len(messages), window):
        await asyncio.gather(
            *(publisher.publish(m, correlation_id=m.correlation_id) for m in messages[i : i + window])
        )
