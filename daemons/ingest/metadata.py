"""ingest's ``metadata.set``: metadata of a file or a dataset set and removed after ingest.

Order of work for one event:

1. the message model bounded and typed every field (target, keys, values, counts) -> invalid_message
2. one catalogue transaction (``common.catalogue.metadata.apply``): the change, its history row
   and its id recorded done                                      -> unknown target: unknown_file,
                                                                    unknown_dataset
                                                                 -> id used for another request:
                                                                    id_conflict
                                                                 -> the target's metadata would
                                                                    pass its bounds: metadata_too_large
3. the runner acks.

A kill before 2's commit redelivers the event, which applies it; after it, the redelivery finds its
id done and changes nothing (no second history row). Each refusal is one dead letter with its
reason; nothing was written.
"""

from __future__ import annotations

from common.catalogue import Catalogue
from common.catalogue.metadata import IdConflict, MetadataChange, Scope, TooMuchMetadata, UnknownTarget
from common.errors import Permanent
from common.messages import MetadataSet


def change_of(msg: MetadataSet) -> MetadataChange:
    scope: Scope = "file" if msg.file is not None else "dataset"
    target = msg.file if msg.file is not None else msg.dataset
    assert target is not None  # the model holds exactly one target
    return MetadataChange(
        id=msg.id, scope=scope, target=target, set=dict(msg.set), unset=list(msg.unset),
        daemon="ingest", source=msg.source,
    )  # fmt: skip


async def apply_metadata(msg: MetadataSet, catalogue: Catalogue) -> str:
    """Apply the event's change: ``changed`` or ``duplicate``; ``Permanent`` when refused."""
    try:
        return await catalogue.metadata.apply(change_of(msg))
    except UnknownTarget as exc:
        if msg.file is not None:
            raise Permanent("unknown_file", str(exc.args[0])) from None
        raise Permanent("unknown_dataset", str(exc.args[0])) from None
    except IdConflict as exc:
        raise Permanent("id_conflict", str(exc)) from None
    except TooMuchMetadata as exc:
        raise Permanent("metadata_too_large", str(exc)) from None
