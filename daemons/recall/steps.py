"""Pure decisions of recall: which tape copy to read, which cartridge to mount next, whether a
file fits the destination buffer. No I/O, so each rule is unit-tested directly
(tests/test_recall_steps.py) and the benchmark drives the very same code.

Why these rules:

- **Mounts dominate.** An LTO-9 load + unload costs 72 s, a locate up to 180 s; reading a small
  file costs nothing next to them. So the plan minimises mounts first (one per cartridge per
  batch), then locates (reading a cartridge's files in fseq order only ever winds forward).
- **One copy per file, on as few cartridges as possible.** A file with copies on two cartridges
  is read from the one that is mounted anyway, or the one other files need anyway: the choice
  is a greedy set cover, which is exact in the common case (one tape copy per file).
- **Priority orders mounts, age breaks ties**, so a priority-9 request overtakes a backlog but a
  low-priority one is never starved by a stream of equal-priority newcomers.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime

from common.catalogue.recall import PendingFile, TapeCopy
from common.config import StorageEndpoint
from common.errors import Permanent

# A cartridge is named by its library and its VID: two libraries may both label a tape A00001.
CartridgeKey = tuple[str, str]

# Media errors of a tape copy: the copy is bad, another copy (or failure) is the answer.
MEDIA_ERRORS = frozenset({"tape_checksum_mismatch", "tape_read_error", "unknown_fseq"})


@dataclass(frozen=True, slots=True)
class Mount:
    """One cartridge to mount and the files planned on it, in fseq order."""

    library: str
    vid: str
    priority: int  # the highest of its files' requests
    oldest: datetime  # the oldest of its files' requests
    files: tuple[PendingFile, ...]

    @property
    def key(self) -> CartridgeKey:
        return (self.library, self.vid)


def destination(name: str | None, storage: Mapping[str, StorageEndpoint]) -> str:
    """The disk endpoint a request recalls to; the first disk endpoint when it names none."""
    if name is None:
        return next(n for n, ep in storage.items() if ep.kind == "disk")
    endpoint = storage.get(name)
    if endpoint is None or endpoint.kind != "disk":
        what = "not a configured endpoint" if endpoint is None else f"a {endpoint.kind} endpoint"
        disks = ", ".join(n for n, ep in storage.items() if ep.kind == "disk")
        raise Permanent(
            "unknown_storage", f"destination {name!r} is {what}; recall needs a disk one ({disks})"
        )
    return name


def cartridge_of(copy: TapeCopy, libraries: Mapping[str, str]) -> CartridgeKey:
    """``libraries`` maps each tape endpoint to its library."""
    return (libraries[copy.storage], copy.cartridge)


def readable(files: Iterable[PendingFile], libraries: Mapping[str, str]) -> list[PendingFile]:
    """Drop tape copies on endpoints this process does not know (its configuration lost one); a
    file left with none of its tape copies waits (``blocked``) rather than failing: the operator
    may put the endpoint back."""
    out = []
    for p in files:
        known = tuple(c for c in p.tape if c.storage in libraries)
        if len(known) != len(p.tape):
            p = replace(p, tape=known, blocked=p.blocked or not known)
        out.append(p)
    return out


def triage(files: Iterable[PendingFile]) -> tuple[list[PendingFile], list[PendingFile], list[PendingFile]]:
    """Split pending files into (served from disk, read from tape, without any copy).

    A file with no usable copy that is ``blocked`` (archive in progress, tape endpoint down) is in
    none of the three: it waits.
    """
    disk: list[PendingFile] = []
    tape: list[PendingFile] = []
    lost: list[PendingFile] = []
    for p in files:
        if p.disk:
            disk.append(p)
        elif p.tape:
            tape.append(p)
        elif not p.blocked:
            lost.append(p)
    return disk, tape, lost


def choose_copies(
    files: Iterable[PendingFile],
    libraries: Mapping[str, str],
    *,
    heads: Mapping[CartridgeKey, int] | None = None,
    loaded: Iterable[CartridgeKey] = (),
    avoid: Iterable[CartridgeKey] = (),
) -> dict[int, TapeCopy]:
    """One tape copy per file (by file id), using as few cartridges as possible.

    In order of preference: a copy ahead of the head of a cartridge being read now (``heads``:
    the fseq last read; the file joins that mount), a copy on a cartridge sitting in a drive
    (``loaded``: no mount to pay), a copy on a cartridge other files need anyway, then the
    cartridge that serves the most remaining files. Cartridges in ``avoid`` (a failed mount waiting
    to be retried) are used only by files with no other copy, and then not this time.
    """
    heads = heads or {}
    loaded_set, avoided = set(loaded), set(avoid)
    copies: dict[int, list[TapeCopy]] = {}
    for p in files:
        if p.file_id not in copies:
            usable = [c for c in p.tape if cartridge_of(c, libraries) not in avoided]
            if usable:
                copies[p.file_id] = sorted(usable, key=lambda c: (c.cartridge, c.storage, c.fseq))
    chosen: dict[int, TapeCopy] = {}
    open_choice: dict[int, list[TapeCopy]] = {}
    for fid, usable in copies.items():
        pick = _first(usable, lambda c, k: k in heads and c.fseq > heads[k], libraries)
        pick = pick or _first(usable, lambda c, k: k in loaded_set and k not in heads, libraries)
        if pick is None and len(usable) == 1:
            pick = usable[0]
        if pick is not None:
            chosen[fid] = pick
        else:
            open_choice[fid] = usable
    used = {cartridge_of(c, libraries) for c in chosen.values()}

    def behind(c: TapeCopy, k: CartridgeKey) -> bool:  # a running mount has passed it
        return k in heads and c.fseq <= heads[k]

    def reachable(c: TapeCopy, k: CartridgeKey) -> bool:
        return k in used and not behind(c, k)

    def take(test: Callable[[TapeCopy, CartridgeKey], bool]) -> None:
        for fid, usable in list(open_choice.items()):
            pick = _first(usable, test, libraries)
            if pick is not None:
                chosen[fid] = pick
                del open_choice[fid]

    while open_choice:
        take(reachable)
        if not open_choice:
            break
        keyed = [(c, cartridge_of(c, libraries)) for usable in open_choice.values() for c in usable]
        cover = Counter(k for c, k in keyed if not behind(c, k)) or Counter(k for _, k in keyed)
        best = min(cover, key=lambda k: (-cover[k], k))
        used.add(best)
        take(lambda c, k: k == best)  # noqa: B023 (called at once, in this iteration)
    return chosen


def _first(
    usable: Sequence[TapeCopy], test: Callable[[TapeCopy, CartridgeKey], bool], libraries: Mapping[str, str]
) -> TapeCopy | None:
    return next((c for c in usable if test(c, cartridge_of(c, libraries))), None)


def room(free_bytes: int, min_free_bytes: int, in_flight: int) -> int:
    """Bytes a destination may still take: free space, less its reserve and the reads under way."""
    return free_bytes - min_free_bytes - in_flight


def plan_mounts(
    files: Iterable[PendingFile],
    chosen: Mapping[int, TapeCopy],
    libraries: Mapping[str, str],
    *,
    busy: Iterable[CartridgeKey] = (),
    space: Mapping[str, int] | None = None,
) -> list[Mount]:
    """Cartridges to mount, most urgent first: highest priority, then oldest request, then VID.

    ``busy`` cartridges (being read now) are left out: their new files join the running mount or
    wait for the next one. With ``space`` (destination -> room), a cartridge none of whose files
    fits its destination is left out too: mounting it would only hold a drive while waiting.
    """
    busy_set = set(busy)
    groups: dict[CartridgeKey, list[PendingFile]] = defaultdict(list)
    for p in files:
        copy = chosen.get(p.file_id)
        if copy is not None:
            groups[cartridge_of(copy, libraries)].append(p)
    mounts = []
    for key, group in groups.items():
        if key in busy_set:
            continue
        if space is not None and not any(p.size <= space.get(p.destination, 0) for p in group):
            continue
        ordered = sorted(group, key=lambda p: (chosen[p.file_id].fseq, -p.priority, p.requested, p.recall_id))
        mounts.append(
            Mount(
                library=key[0],
                vid=key[1],
                priority=max(p.priority for p in group),
                oldest=min(p.requested for p in group),
                files=tuple(ordered),
            )
        )
    return sorted(mounts, key=lambda m: (-m.priority, m.oldest, m.library, m.vid))


def changed_choices(
    files: Iterable[PendingFile], chosen: Mapping[int, TapeCopy]
) -> list[tuple[str, str, TapeCopy | None]]:
    """(recall, name, copy) of the rows whose recorded choice differs from the new plan."""
    return [(p.recall_id, p.name, chosen.get(p.file_id)) for p in files if chosen.get(p.file_id) != p.chosen]
