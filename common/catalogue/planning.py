"""What a batch of files' rules mean for their copies: pure decisions, no SQL.

``replication.plan_copies`` reads the rows (file ids, copy states, locks), asks ``plan_batch``, and
writes the answer. Per file, the rules are placed (``policy.plan_ranked``) and each placement's
copy, by its state (endpoint -> replica state, as read):

    no copy row                 a new ``queued`` row, and a request for it
    ``bad`` or ``failed``       back to ``queued``, and a request for it
    ``queued``                  a request (again: a redelivered event asks for what is missing)
    ``available``, ``waiting``, ``deleting``   nothing (present, parked, or the reaper's)

Every placement holds a lock, whatever its copy's state; a copy is requested once per endpoint.
A name twice in a batch is planned the second time against the states the first one left.

The loop is the one per-file loop of rule placement (ingest's batches, rule evaluation): it builds
the rows as the SQL writes them, with no second pass over the placements.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence, Set
from dataclasses import dataclass
from typing import Any

from common.catalogue.policy import Rule, plan_ranked
from common.messages import MetaValue

# Replica states a new placement does not need to ask for again. ``deleting`` among them: the
# reaper owns such a copy until its bytes are gone (a copy asked for now could be written and then
# deleted by the reaper); ``finish_delete`` asks for it again if a live lock holds it by then.
PRESENT = ("available", "queued", "waiting", "deleting")
# Copies that failed: a rule placing the file there again asks for them again.
RETRIED = ("bad", "failed")


@dataclass(frozen=True, slots=True)
class Wanted:
    """A copy that should exist and does not yet: publish a request for it."""

    name: str
    storage: str
    kind: str
    priority: int
    rule_id: str
    # The file's correlation id (its file.ready's), carried onto the request (see placement).
    correlation_id: str | None = None


@dataclass(frozen=True, slots=True)
class BatchPlan:
    locks: list[tuple[str, int, int, Any]]  # (rule, file, storage, expires): every placement
    create: list[tuple[int, int, str, int]]  # (file, storage, name, priority): new queued rows
    requeue: list[tuple[int, int, int]]  # (file, storage, priority): bad or failed, back to queued
    wanted: list[list[Wanted]]  # per item, in order: the copies to ask for


def plan_batch(
    items: Sequence[tuple[str, str, Mapping[str, MetaValue]]],
    ranked: Sequence[tuple[Rule, Sequence[str]]],
    *,
    file_ids: Mapping[str, int],
    states: dict[int, dict[str, str]],
    locked: Mapping[int, Set[str]],
    storage_ids: Mapping[str, int],
    kinds: Mapping[str, str],
    expires: Callable[[float], Any],
) -> BatchPlan:
    """The locks, new and re-queued copies and requests that the rules ``ranked``
    (``rank_rules``) make for each (name, dataset, metadata) of ``items``.

    ``file_ids`` by name (a name without one plans nothing), ``states`` the copy states by file id
    (updated as the batch is planned), ``locked`` the endpoints a lock holds by file id,
    ``storage_ids`` and ``kinds`` by endpoint name. ``expires(lifetime)`` is a lock's expiry as
    stored, asked once per distinct rule lifetime."""
    locks: list[tuple[str, int, int, Any]] = []
    create: list[tuple[int, int, str, int]] = []
    requeue: list[tuple[int, int, int]] = []
    out: list[list[Wanted]] = []
    expires_at: dict[float, Any] = {}  # a rule's lifetime -> its locks' expiry
    for name, dataset, metadata in items:
        fid = file_ids.get(name)
        if fid is None:
            out.append([])
            continue
        current = states.get(fid, {})
        have = {st for st, state in current.items() if state in PRESENT} | locked.get(fid, set())
        wanted: list[Wanted] = []
        for p in plan_ranked(ranked, file_name=name, dataset=dataset, metadata=metadata, have=have):
            sid = storage_ids[p.storage]
            if p.expires_in is None:
                expiry = None
            elif (expiry := expires_at.get(p.expires_in)) is None:
                expiry = expires_at[p.expires_in] = expires(p.expires_in)
            locks.append((p.rule_id, fid, sid, expiry))
            state = current.get(p.storage)
            if state is None:
                create.append((fid, sid, name, p.priority))
                current = {**current, p.storage: "queued"}
            elif state in RETRIED:
                requeue.append((fid, sid, p.priority))
                current = {**current, p.storage: "queued"}
            if current.get(p.storage) == "queued" and not any(w.storage == p.storage for w in wanted):
                wanted.append(Wanted(name, p.storage, kinds[p.storage], p.priority, p.rule_id))
        states[fid] = current
        out.append(wanted)
    return BatchPlan(locks, create, requeue, out)
