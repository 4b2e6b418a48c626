"""``catalogue.replication``: rules, locks, wanted and parked copies, reaping.

The states and the locking model are in ``common.catalogue.replication``. Writes that can race a
writer on another node (planning and recording copies, claiming one for deletion) are run again
when they lose (see ``Catalogue.write``); the others run once, as they always have.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from common.catalogue import replication as db
from common.catalogue import writes
from common.catalogue.policy import Rule
from common.catalogue.repositories import Repository


class ReplicationRepository(Repository):
    __slots__ = ()

    # --- rules ---------------------------------------------------------------------------------
    async def load_rules(self) -> list[Rule]:
        return await self._catalogue.read(db.load_rules)

    async def sync_config_rules(self, rules: Sequence[Rule], node: str) -> db.RuleSync:
        """``node``'s configuration file declares ``rules`` (see ``replication.sync_config_rules``)."""
        return await self._catalogue.write(db.sync_config_rules, list(rules), node, retry=False)

    async def add_rule(self, rule: Rule) -> None:
        """Store a new rule (state ``new``: the replicator evaluates existing files against it);
        ``KeyError`` if the id is taken."""
        await self._catalogue.write(db.add_rule, rule, retry=False)

    async def remove_rule(self, rule_id: str) -> int:
        """Delete a rule; returns the number of copies released. ``KeyError`` if unknown."""
        return await self._catalogue.write(db.remove_rule, rule_id, retry=False)

    async def rule_views(self) -> list[db.RuleView]:
        return await self._catalogue.read(db.rule_views)

    async def new_rules(self, created_before: datetime) -> list[Rule]:
        return await self._catalogue.read(db.new_rules, created_before)

    async def activate_rule(self, rule_id: str) -> None:
        await self._catalogue.write(db.activate_rule, rule_id, retry=False)

    async def files_for_rule(
        self, rule: Rule, *, after: tuple[int, int] = (0, 0), limit: int, metadata: bool = True
    ) -> list[db.RuleFile]:
        return await self._catalogue.read(
            lambda c: db.files_for_rule(c, rule, after=after, limit=limit, metadata=metadata)
        )

    async def placement_item(self, name: str) -> tuple[str, str, dict[str, Any]] | None:
        return await self._catalogue.read(lambda c: db.placement_item(c, name))

    # --- wanted copies -------------------------------------------------------------------------
    async def plan_copies(
        self,
        items: Sequence[tuple[str, str, Mapping[str, Any]]],
        rules: Sequence[Rule],
        endpoints: Mapping[str, Mapping[str, str]],
    ) -> list[list[db.Wanted]]:
        return await self._catalogue.write(db.plan_copies, list(items), list(rules), endpoints)

    async def replica_task(self, name: str, storage: str) -> db.ReplicaTask | None:
        return await self._catalogue.read(db.replica_task, name, storage)

    async def replica_tasks(self, items: Sequence[tuple[str, str]]) -> list[db.ReplicaTask | None]:
        return await self._catalogue.read(db.replica_tasks, list(items))

    async def set_replica_state(
        self, name: str, storage: str, state: str, *, only_from: Sequence[str] | None = None
    ) -> bool:
        return await self._catalogue.write(
            lambda c: db.set_replica_state(c, name, storage, state, only_from=only_from), retry=False
        )

    async def set_replica(
        self,
        *,
        name: str,
        storage: str,
        pfn: str,
        state: str,
        cartridge: str | None = None,
        fseq: int | None = None,
        member_offset: int | None = None,
    ) -> None:
        """Create or update the replica of ``name`` on ``storage``; ``KeyError`` if no such file."""
        async with self._catalogue.begin() as conn:
            await writes.set_replica(
                conn, name=name, storage=storage, pfn=pfn, state=state, cartridge=cartridge, fseq=fseq,
                member_offset=member_offset,
            )  # fmt: skip

    async def cancel_copy(self, name: str, storage: str) -> bool:
        return await self._catalogue.write(db.cancel_copy, name, storage, retry=False)

    async def record_copies(self, records: Sequence[db.CopyRecord]) -> None:
        await self._catalogue.write(db.record_copies, list(records))

    # --- parked copies -------------------------------------------------------------------------
    async def park(self, name: str, storage: str, priority: int) -> bool:
        return await self._catalogue.write(db.park, name, storage, priority, retry=False)

    async def waiting(
        self, storage: str, limit: int, *, parked_before: datetime, after: tuple[int, int] | None = None
    ) -> list[tuple[int, int, str]]:
        return await self._catalogue.read(
            lambda c: db.waiting(c, storage, limit, parked_before=parked_before, after=after)
        )

    async def waiting_count(self, storage: str) -> int:
        return await self._catalogue.read(db.waiting_count, storage)

    # --- reaping -------------------------------------------------------------------------------
    async def expire_locks(self) -> int:
        return await self._catalogue.write(db.expire_locks, retry=False)

    async def reapable(self, limit: int = 500) -> list[db.Reapable]:
        return await self._catalogue.read(db.reapable, limit)

    async def begin_delete(self, replica_id: int) -> bool:
        # Retried: on PostgreSQL its row locks (file, then copies) can deadlock with a writer
        # taking them the other way round; the loser runs again (idempotent: it re-reads).
        return await self._catalogue.write(db.begin_delete, replica_id)

    async def begin_evict(self, replica_id: int) -> bool:
        """An operator's claim (``spool rse evict``): whatever the copy's tombstone."""
        return await self._catalogue.write(db.begin_evict, replica_id)

    async def finish_delete(
        self, item: db.Reapable, *, by: str = "replicator", why: str = "no rule needs it"
    ) -> bool:
        """True when a live lock held the copy by then: it was asked for again (outbox)."""
        return await self._catalogue.write(lambda c: db.finish_delete(c, item, by=by, why=why))

    async def copies_on(
        self, storage: str, *, dataset: str | None = None, names: Sequence[str] = ()
    ) -> list[db.Reapable]:
        return await self._catalogue.read(lambda c: db.copies_on(c, storage, dataset=dataset, names=names))
