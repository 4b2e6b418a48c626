"""Pure decisions of the replicator: what a request needs, which source to read, who is at fault.

No I/O here, so each rule is unit-tested directly (tests/test_replicator_steps.py).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

from common.catalogue import ReplicaTask, Source
from common.config import StorageEndpoint
from common.errors import Permanent

Action = Literal["copy", "verify", "cancel"]

# Reason codes of copy failures (raised by ``PosixStorage.copy_verified``), by who is at fault.
# The source copy is gone or wrong: mark that replica ``bad`` and read another one. (A source pfn
# escaping its endpoint's root is caught when the source path is resolved, before copying.)
SOURCE_BAD = frozenset({"source_missing", "source_corrupt"})
# The source could not be read this time: try another source, else retry later.
SOURCE_TRANSIENT = frozenset({"source_io_error"})
# The destination endpoint failed: counts towards its circuit breaker.
ENDPOINT_FAILURES = frozenset(
    {"destination_not_writable", "disk_full", "storage_io_error", "checksum_mismatch"}
)


def destination(name: str, storage: Mapping[str, StorageEndpoint]) -> StorageEndpoint:
    endpoint = storage.get(name)
    if endpoint is None:
        raise Permanent(
            "unknown_storage", f"destination {name!r} is not a configured endpoint ({', '.join(storage)})"
        )
    if endpoint.kind != "disk":
        raise Permanent(
            "wrong_endpoint_kind",
            f"destination {name!r} is a {endpoint.kind} endpoint; the tape daemon writes there",
        )
    return endpoint


def action(task: ReplicaTask) -> Action:
    """``verify`` an existing copy (a redelivery, or a repeated request after corruption),
    ``cancel`` a copy no rule wants any more, else ``copy``."""
    if task.state == "available":
        return "verify"
    if not task.needed:
        return "cancel"
    return "copy"


def rank_sources(
    sources: Sequence[Source],
    dest: str,
    storage: Mapping[str, StorageEndpoint],
    states: Mapping[str, str],
    busy: Mapping[str, int],
) -> list[Source]:
    """Readable sources, best first: same site as the destination, then the least busy (copies
    this process is reading from it now), then by name so the order is stable.

    An endpoint an operator marked ``down`` is not read; ``readonly`` still is. Sources on
    endpoints no longer configured are skipped (their root is unknown).
    """
    site = storage[dest].attributes.get("site") if dest in storage else None
    usable = [
        s
        for s in sources
        if s.storage in storage and s.storage != dest and states.get(s.storage, "online") != "down"
    ]
    return sorted(
        usable,
        key=lambda s: (
            site is None or storage[s.storage].attributes.get("site") != site,
            busy.get(s.storage, 0),
            s.storage,
        ),
    )
