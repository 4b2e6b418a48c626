"""Pure decisions of the replicator: what a request needs, which source to read, who is at fault.

No I/O here, so each rule is unit-tested directly (tests/test_replicator_steps.py).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

from common.catalogue import ReplicaTask, Source
from common.config import StorageEndpoint
from common.errors import Permanent

Action = Literal["copy", "verify", "cancel", "wait"]

# Reason codes of copy failures (raised by ``PosixStorage.copy_verified``), by who is at fault.
# The source copy is gone or wrong: mark that replica ``bad`` and read another one. (A source pfn
# escaping its endpoint's root is caught when the source path is resolved, before copying.)
SOURCE_BAD = frozenset({"source_missing", "source_corrupt"})
# The source could not be read this time: try another source, else retry later.
SOURCE_TRANSIENT = frozenset({"source_io_error"})
# The destination endpoint failed: counts towards its circuit breaker. The last three come from
# remote endpoints (common/storage/xrootd.py, https.py): the server is unreachable or answers 5xx,
# a transfer passed its deadline (a hung server, a stalled third-party copy), credentials refused.
ENDPOINT_FAILURES = frozenset(
    {
        "destination_not_writable",
        "disk_full",
        "storage_io_error",
        "checksum_mismatch",
        "endpoint_unavailable",
        "transfer_timeout",
        "auth_failed",
    }
)
# Failures no retry can mend: the endpoint is paused at the first one (one alert), instead of
# burning the breaker's count of attempts against it. An operator fixes the token or certificate;
# the breaker's probe finds the endpoint working again.
PAUSE_AT_ONCE = frozenset({"auth_failed"})


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
    ``cancel`` a copy no rule wants any more, ``wait`` while the reaper deletes the copy (a copy
    made now would be recorded available and then lose its bytes to the reaper; the reaper's last
    step asks for the copy again when a rule still wants it), else ``copy``."""
    if task.state == "deleting":
        return "wait"
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
    """Readable sources, best first: a source the destination can copy from server to server
    (third-party copy: no byte crosses this node), then same site as the destination, then the
    least busy (copies this process is reading from it now), then by name so the order is stable.

    An endpoint an operator marked ``down`` is not read; ``readonly`` still is. Sources on
    endpoints no longer configured are skipped (their root is unknown).
    """
    target = storage.get(dest)
    site = target.attributes.get("site") if target is not None else None
    usable = [
        s
        for s in sources
        if s.storage in storage and s.storage != dest and states.get(s.storage, "online") != "down"
    ]
    return sorted(
        usable,
        key=lambda s: (
            target is None or not third_party_possible(storage[s.storage], target),
            site is None or storage[s.storage].attributes.get("site") != site,
            busy.get(s.storage, 0),
            s.storage,
        ),
    )


def third_party_possible(source: StorageEndpoint, dest: StorageEndpoint) -> bool:
    """Can ``dest`` fetch a file of ``source`` server to server?

    XRootD: both ends XRootD and the destination configured ``tpc = true`` (its server runs the
    copy). HTTP: both ends WebDAV and both configured ``tpc = true`` (the destination pulls with
    ``COPY`` + ``Source:``, so the source must serve it to a third party). Mixed protocols go
    through this node. The backends decide the same way (``can_pull_from``); this is the ranking's
    view of it, from configuration alone.
    """
    if source.backend != dest.backend or not dest.tpc:
        return False
    if dest.backend == "xrootd":
        return True
    return dest.backend == "https" and source.tpc
