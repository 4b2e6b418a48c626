"""ingest's part of a dataset's lifecycle: ``dataset.close`` events and the auto-close loop.

Ingest owns registration, so it owns the one state change that registration depends on: a
closed dataset takes no new file (``common.catalogue.datasets``).

``dataset.close`` (from outside, or Spool's own): the dataset is closed in one conditional update;
a duplicate event, or a close of a dataset already closed (complete, archived, deleted), is a
success that changes nothing. An unknown dataset is ``Permanent("unknown_dataset")``: a dead
letter, since the event names nothing Spool has (a dataset exists from its first file on). A kill
before the ack redelivers the event, which then finds the dataset closed: nothing is lost.

Auto-close (``[datasets] auto_close_after`` seconds since a dataset's last file): every instance
runs the loop; the update is conditional (``state = 'open'`` and idle), so two instances at once
close each dataset once, and a registration racing it keeps the dataset open (see ``auto_close``).
"""

from __future__ import annotations

from datetime import timedelta

from common.catalogue import Catalogue
from common.catalogue.sql import utcnow
from common.config import Settings
from common.errors import Permanent
from common.logging import get_logger
from common.manifest.release import manifest_on_close
from common.messages import DatasetClose

log = get_logger("spool.ingest")


async def close_dataset(
    msg: DatasetClose, catalogue: Catalogue, user_id: str | None, settings: Settings
) -> str:
    """Close the dataset an event names; returns what happened (closed, already, deleted). The
    close that changed the state writes the release manifest (``manifest_on_close``)."""
    by = f"event:{msg.source}" + (f" ({user_id})" if user_id else "")
    outcome = await catalogue.datasets.close(msg.dataset, by[:255], utcnow())
    if outcome == "unknown":
        raise Permanent("unknown_dataset", f"no dataset named {msg.dataset!r} in the catalogue")
    if outcome == "closed":
        await manifest_on_close(catalogue, msg.dataset, settings)
    return outcome


async def auto_close(catalogue: Catalogue, settings: Settings) -> list[str]:
    """One round: close the datasets idle for ``auto_close_after`` seconds (none when it is off)."""
    after = settings.datasets.auto_close_after
    if not after:
        return []
    now = utcnow()
    closed = await catalogue.datasets.auto_close(now - timedelta(seconds=after), now)
    for name in closed:
        log.info("dataset_auto_closed", dataset=name, idle_seconds=after)
        await manifest_on_close(catalogue, name, settings)
    return closed
