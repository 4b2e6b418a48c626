"""The tape daemon's decisions, free of I/O: which endpoint a request names, when a pool's queue
deserves a mount, which pools get the free drives, how much goes into one batch, what to make of
copies a killed process left half done.

Why a mount policy at all: a mount costs minutes of drive time (load, thread, locate; unload) whatever
is written, so a tape system waits until a queue holds enough bytes or files to be worth it, and
caps the wait by the age of the oldest request so a trickle is still archived in bounded time.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from common.config import StorageEndpoint, TapeSettings
from common.errors import ConfigError, Permanent
from common.tape import TapeFile

Why = Literal["bytes", "files", "age"]

# Source errors that condemn one disk copy (try the next one, mark it bad) ...
SOURCE_BAD = frozenset(
    {"file_missing", "size_mismatch", "checksum_mismatch", "not_a_file", "path_outside_area"}
)
# ... and those that may pass (keep the copy queued for a later batch).
SOURCE_TRANSIENT = frozenset({"source_io_error"})
# Errors fetching a disk copy (resolving a mounted one, downloading a remote one: ``staging``)
# that condemn that copy; any other one (the endpoint down, a timeout, refused credentials, a
# download that did not match while the server's checksum does) leaves it for a later batch.
DOWNLOAD_BAD = frozenset(
    {"source_missing", "source_corrupt", "not_a_file", "path_outside_area", "unknown_storage"}
)
# The mounted cartridge takes no more: close it / leave it, and continue on another one.
CARTRIDGE_DONE = frozenset({"cartridge_full", "cartridge_not_writable"})


@dataclass(frozen=True, slots=True)
class TapeTarget:
    """A tape endpoint: its library and its pool (one pool per endpoint, see ``targets``)."""

    storage: str
    library: str
    pool: str


@dataclass(frozen=True, slots=True)
class PoolQueue:
    """What the policy knows of one endpoint's queue."""

    storage: str
    library: str
    files: int
    bytes: int
    oldest: datetime | None
    priority: int


def targets(storage: Mapping[str, StorageEndpoint]) -> dict[str, TapeTarget]:
    """The configured tape endpoints. Two endpoints sharing one pool of one library are refused:
    copies of a file to both could land on one cartridge, and one bad tape would lose both."""
    out: dict[str, TapeTarget] = {}
    seen: dict[tuple[str, str], str] = {}
    for name, ep in storage.items():
        if ep.kind != "tape":
            continue
        pool = ep.pool or name
        other = seen.setdefault((ep.library, pool), name)
        if other != name:
            raise ConfigError(
                f"storage.{name}: tape pool {pool!r} of library {ep.library!r} is already the pool of "
                f"storage.{other}; give each tape endpoint its own pool so copies never share a cartridge"
            )
        out[name] = TapeTarget(name, ep.library, pool)
    return out


def destination(
    name: str, tapes: Mapping[str, TapeTarget], storage: Mapping[str, StorageEndpoint]
) -> TapeTarget:
    """The tape endpoint a ``tape.archive`` names; ``Permanent`` when it is not one."""
    if name in tapes:
        return tapes[name]
    if name in storage:
        raise Permanent("not_a_tape_endpoint", f"{name!r} is a {storage[name].kind} endpoint, not tape")
    raise Permanent("unknown_storage", f"no storage endpoint named {name!r} is configured")


def due(q: PoolQueue, policy: TapeSettings, now: datetime) -> Why | None:
    """Why this queue deserves a mount now, or None while it should keep filling up."""
    if q.files <= 0:
        return None
    if q.bytes >= policy.mount_min_bytes:
        return "bytes"
    if q.files >= policy.mount_min_files:
        return "files"
    if q.oldest is not None and (now - q.oldest).total_seconds() >= policy.mount_max_age:
        return "age"
    return None


def plan_mounts(
    queues: Sequence[PoolQueue],
    policy: TapeSettings,
    now: datetime,
    free_drives: Mapping[str, int],
    last_served: Mapping[str, float],
) -> list[tuple[PoolQueue, Why]]:
    """The queues to start a write batch for now, in order, at most one per free drive.

    Order: higher priority first; among equals the pool served least recently (never served
    first), so pools that all qualify take turns when drives are scarce, and a pool with a
    steady backlog cannot keep every drive; then the oldest request.
    """
    ready = [(q, why) for q in queues if (why := due(q, policy, now)) is not None]
    ready.sort(
        key=lambda item: (
            -item[0].priority,
            last_served.get(item[0].storage, float("-inf")),
            item[0].oldest or now,
            item[0].storage,
        )
    )
    left = dict(free_drives)
    out: list[tuple[PoolQueue, Why]] = []
    for q, why in ready:
        if left.get(q.library, 0) > 0:
            left[q.library] -= 1
            out.append((q, why))
    return out


def batch_size(sizes: Sequence[int], max_files: int, max_bytes: int) -> int:
    """How many of the queue's head (sizes in write order) go into one batch: up to ``max_files``
    and ``max_bytes``, but always the first file, however large (it must be written some day)."""
    total = 0
    n = 0
    for size in sizes[:max_files]:
        if n and total + size > max_bytes:
            break
        total += size
        n += 1
    return n


def should_suspect(failures: int, limit: int) -> bool:
    """A cartridge that failed to load ``limit`` times (drives changed in between) is the culprit."""
    return failures >= limit


Position = tuple[int, int | None]  # fseq, and the offset within it of an aggregate's member


def tape_positions(files: Iterable[TapeFile]) -> dict[str, Position]:
    """Where each name is on a cartridge: a plain file at its fseq, an aggregate's members (its
    index) at the aggregate's fseq and their offsets. The last one wins when a name is there
    twice (written again after a copy was lost)."""
    out: dict[str, Position] = {}
    for tf in files:
        if tf.members is None:
            out[tf.name] = (tf.fseq, None)
        else:
            out.update((m.name, (tf.fseq, m.offset)) for m in tf.members)
    return out


def split_in_flight(
    names: Sequence[str], on_tape: Mapping[str, Position]
) -> tuple[dict[str, Position], list[str]]:
    """Copies a killed writer left ``archiving`` on one cartridge: those committed there (name ->
    position: record them, never write them twice) and the rest (back to the queue). The library
    drops half-written files when it reopens, so "committed there" means wholly written and
    verified."""
    found = {n: on_tape[n] for n in names if n in on_tape}
    return found, [n for n in names if n not in on_tape]


def label(storage: str, pool: str, files: int) -> str:
    """What ``spool drive list`` shows as the drive's request."""
    return f"archive {storage} (pool {pool}): {files} file{'' if files == 1 else 's'}"
