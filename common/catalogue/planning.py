"""What a file's rules mean for its copies: pure decisions, no SQL (``replication.plan_copies``
reads the rows, asks here, and writes the answer).

Given the states of a file's copies (endpoint -> replica state) and the endpoints a lock already
holds, ``plan_file`` places the file's rules (``policy.plan_ranked``) and says, per placement:

    no copy row               create one, ``queued``, and request it
    ``bad`` or ``failed``     put it back to ``queued`` and request it
    ``queued``                request it (again: a redelivered event asks for what is missing)
    ``available``, ``waiting``, ``deleting``   nothing (present, parked, or the reaper's)

Every placement holds a lock, whatever its copy's state; a copy is requested once per endpoint.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence, Set
from dataclasses import dataclass

from common.catalogue.policy import Placement, Rule, plan_ranked
from common.messages import MetaValue

# Replica states a new placement does not need to ask for again. ``deleting`` among them: the
# reaper owns such a copy until its bytes are gone (a copy asked for now could be written and then
# deleted by the reaper); ``finish_delete`` asks for it again if a live lock holds it by then.
PRESENT = ("available", "queued", "waiting", "deleting")
# Copies that failed: a rule placing the file there again asks for them again.
RETRIED = ("bad", "failed")


@dataclass(frozen=True, slots=True)
class FilePlan:
    locks: list[Placement]  # every placement: the lock it holds
    create: list[Placement]  # no copy row yet: a new ``queued`` row
    requeue: list[Placement]  # ``bad`` or ``failed``: back to ``queued``
    request: list[Placement]  # the ``queued`` copies to ask for, one per endpoint
    states: dict[str, str]  # the file's copy states once the plan is written (a new dict if changed)


def plan_file(
    ranked: Sequence[tuple[Rule, Sequence[str]]],
    *,
    name: str,
    dataset: str,
    metadata: Mapping[str, MetaValue],
    states: dict[str, str],
    locked: Set[str],
) -> FilePlan:
    """The locks, new and re-queued copies and requests the rules ``ranked`` (``rank_rules``)
    make for one file, whose copies are in ``states`` and held by locks on ``locked``."""
    have = {st for st, state in states.items() if state in PRESENT} | locked
    placements = plan_ranked(ranked, file_name=name, dataset=dataset, metadata=metadata, have=have)
    create: list[Placement] = []
    requeue: list[Placement] = []
    request: list[Placement] = []
    for p in placements:
        state = states.get(p.storage)
        if state is None:
            create.append(p)
            states = {**states, p.storage: "queued"}
        elif state in RETRIED:
            requeue.append(p)
            states = {**states, p.storage: "queued"}
        if states.get(p.storage) == "queued" and not any(w.storage == p.storage for w in request):
            request.append(p)
    return FilePlan(placements, create, requeue, request, states)
