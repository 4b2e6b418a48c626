"""Turning replication rules into requests on the bus; shared by ingest and the replicator.

``RuleBook`` keeps the catalogue's rules in memory, reloaded every ``replication.poll_interval``
seconds, so a rule added with ``spool rule add`` applies to files ingested a few seconds later;
the replicator evaluates files that existed before (see ``daemons.replicator.rules``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from typing import Any

from common.bus.publisher import Publisher
from common.catalogue import Catalogue, Wanted
from common.catalogue.policy import PolicyError, Rule, check_rule, endpoint_attributes
from common.config import Settings
from common.errors import ConfigError
from common.messages import ReplicaRequest, TapeArchive


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
                    loaded = await self.catalogue.load_rules()
                    self._rules = [r for r in loaded if r.expression.select(self.endpoints)]
                    self._loaded = time.monotonic()
        return self._rules

    async def plan(self, items: Sequence[tuple[str, str, Mapping[str, Any]]]) -> list[list[Wanted]]:
        rules = await self.rules()
        if not rules:
            return [[] for _ in items]
        return await self.catalogue.plan_copies(items, rules, self.endpoints)


def request_for(wanted: Wanted, *, correlation_id: str | None = None) -> ReplicaRequest | TapeArchive:
    model = TapeArchive if wanted.kind == "tape" else ReplicaRequest
    return model(
        name=wanted.name,
        destination=wanted.storage,
        rule_id=wanted.rule_id,
        priority=wanted.priority,
        correlation_id=correlation_id,
    )


async def publish_wanted(
    publisher: Publisher, wanted: Sequence[Wanted], *, correlation_id: str | None = None, window: int = 256
) -> None:
    """Publish one request per wanted copy, ``window`` confirms in flight at a time."""
    for i in range(0, len(wanted), window):
        await asyncio.gather(
            *(
                publisher.publish(
                    request_for(w, correlation_id=correlation_id), correlation_id=correlation_id
                )
                for w in wanted[i : i + window]
            )
        )
