"""A file placed by the rules again after its metadata changed (``metadata.changed``).

A rule may select files by metadata (``[rules.X] metadata = ["run>=500"]``). Ingest places a file
by the metadata it arrives with; when a ``metadata.set`` event or ``spool meta set|unset`` changes
it later, the change's transaction queues ``metadata.changed`` in the outbox, and this handler
places the file again with the rules as they are now: copies a rule selects it for now are locked
and requested (``plan_copies``, idempotent: a redelivery requests again only what is missing).

Decisions, written down:
- Only a **file's** metadata places it: rules' filters read the file's own keys (as at ingest),
  so a change of a dataset's metadata places nothing.
- A change that makes a rule **stop** selecting a file removes no copy: copies are held by their
  rule's locks until the rule is removed or expires (as a Rucio rule holds its locks whatever the
  metadata becomes). Removing copies because a key changed would let one metadata event delete
  data; an operator removes the rule, or deletes the dataset, instead.
- A file unknown by now, or in a deleted dataset, is placed nowhere (logged, acked).
"""

from __future__ import annotations

from dataclasses import replace

from common.bus.publisher import Publisher
from common.catalogue import Catalogue
from common.logging import get_logger
from common.messages import MetadataChanged
from common.placement import BULK, RuleBook, publish_wanted

log = get_logger("spool.replicator")


async def place_again(
    msg: MetadataChanged, catalogue: Catalogue, rulebook: RuleBook, publisher: Publisher
) -> int:
    """Place the changed file by the rules now; returns how many copies were requested."""
    if msg.file is None:
        return 0  # a dataset's metadata: rules select by the file's own (module docstring)
    rules = await rulebook.rules()
    if not any(r.filters for r in rules):
        return 0  # no rule reads metadata: nothing it selects can have changed
    item = await catalogue.replication.placement_item(msg.file)
    if item is None:
        log.info("metadata_change_placed_nothing", file=msg.file, why="unknown file or deleted dataset")
        return 0
    [wanted] = await rulebook.plan([item])
    if wanted:
        # Each request keeps the file's own correlation id (its file.ready's), as a rule's walk does.
        known = await catalogue.tape.ingest_correlations([msg.file])
        wanted = [replace(w, correlation_id=w.correlation_id or known.get(w.name)) for w in wanted]
        await publish_wanted(publisher, wanted, correlation_id=msg.correlation_id, bulk=BULK)
        log.info("metadata_change_placed", file=msg.file, keys=msg.keys, requested=len(wanted))
    return len(wanted)
