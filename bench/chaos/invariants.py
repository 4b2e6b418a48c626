"""What must hold after a chaos run, checked at the source: the catalogue by SQL, the bytes on
disk and in the simulated library's cartridges, the witness queue's events, the daemons' exits.

Each check returns a ``Check`` (name, ok, a one-line figure, up to a few examples of what is
wrong); the harness prints them all and fails when one fails.
"""

from __future__ import annotations

import contextlib
import json
import zlib
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from common.config import Settings
from common.storage import is_temp_name

from .events import Seen
from .fleet import DAEMONS, Exit, Fleet
from .workload import Night, Recall

PENDING = ("queued", "waiting", "archiving", "copying", "staging")


@dataclass
class Check:
    name: str
    ok: bool
    figure: str
    problems: list[str] = field(default_factory=list)

    def line(self) -> str:
        head = f"{'PASS' if self.ok else 'FAIL'}  {self.name}: {self.figure}"
        return "\n".join([head, *(f"        {p}" for p in self.problems[:5])])


def check(name: str, figure: str, problems: Iterable[str]) -> Check:
    found = list(problems)
    more = [f"... and {len(found) - 5} more"] if len(found) > 5 else []
    return Check(name, not found, figure, found[:5] + more)


def adler(path: Path, offset: int = 0, size: int | None = None) -> str:
    """Of the file, or of ``size`` bytes from ``offset`` (a member of a tape aggregate)."""
    value = 1
    left = size if size is not None else -1
    with path.open("rb") as f:
        f.seek(offset)
        while left and (chunk := f.read(1 << 20 if left < 0 else min(left, 1 << 20))):
            value = zlib.adler32(chunk, value)
            left -= len(chunk) if left > 0 else 0
    return f"{value:08x}"


@dataclass
class Snapshot:
    """What the catalogue says, read in one go."""

    files: list[tuple[str, int, str, str]]  # name, size, adler32, dataset
    # name, storage, state, pfn, vid, fseq, member offset (a member of a tape aggregate; else None)
    replicas: list[tuple[str, str, str, str, str | None, int | None, int | None]]
    recalls: dict[str, tuple[str, int, int, int]]  # id -> state, files, done, failed
    recall_files: dict[str, dict[str, str]]  # id -> name -> state
    failed_requests: list[tuple[str, str | None, str | None]]  # kind, name, reason


async def snapshot(url: str) -> Snapshot:
    engine = create_async_engine(url)
    try:
        async with engine.connect() as c:

            async def rows(sql: str) -> list[Any]:
                return list((await c.execute(text(sql))).all())

            files = await rows(
                "SELECT f.name, f.size, f.adler32, d.name FROM files f JOIN datasets d ON d.id = f.dataset_id"
            )
            replicas = await rows(
                "SELECT f.name, e.name, r.state, r.pfn, r.cartridge, r.fseq, r.member_offset FROM replicas r "
                "JOIN files f ON f.id = r.file_id JOIN storage_endpoints e ON e.id = r.storage_id"
            )
            recall_rows = await rows("SELECT id, state, files, done, failed FROM recalls")
            recalls = {r[0]: tuple(r[1:]) for r in recall_rows}
            recall_files: dict[str, dict[str, str]] = defaultdict(dict)
            for rid, name, state in await rows("SELECT recall_id, name, state FROM recall_files"):
                recall_files[rid][name] = state
            failed = await rows("SELECT kind, name, reason FROM requests WHERE state = 'failed'")
    finally:
        await engine.dispose()
    return Snapshot(
        [tuple(r) for r in files], [tuple(r) for r in replicas], recalls, dict(recall_files),
        [tuple(r) for r in failed],
    )  # fmt: skip


def wanted(night: Night, recalls: list[Recall]) -> set[tuple[str, str]]:
    """(name, storage) of every copy that must be available at the end."""
    out = set()
    for f in night.files:
        out |= {(f.name, "disk1"), (f.name, "tape1")}  # ingest's copy (recalled back where evicted)
        if f.dataset.endswith(".dl0"):
            out.add((f.name, "disk2"))
    for r in recalls:
        out |= {(n, r.destination) for n in r.names}
    return out


def settled(snap: Snapshot, night: Night, recalls: list[Recall]) -> bool:
    """The run's work is done as far as the catalogue tells (what the harness waits for)."""
    available = {(n, s) for n, s, st, *_ in snap.replicas if st == "available"}
    pending = any(st in PENDING for _, _, st, *_ in snap.replicas)
    active = any(snap.recalls.get(r.id, ("active",))[0] == "active" for r in recalls)
    registered = len(snap.files) >= len(night.files)
    return registered and wanted(night, recalls) <= available and not pending and not active


def catalogue_checks(snap: Snapshot, night: Night, recalls: list[Recall], settings: Settings) -> list[Check]:
    out = []
    expected = {f.name: f for f in night.files}
    names = [n for n, *_ in snap.files]
    dup = [n for n in set(names) if names.count(n) > 1] if len(names) != len(set(names)) else []
    wrong = [n for n, size, a, ds in snap.files if n in expected and (size, a, ds) != (
        expected[n].size, expected[n].adler32, expected[n].dataset)]  # fmt: skip
    missing = sorted(set(expected) - set(names))
    out.append(check(
        "every file registered once, as announced", f"{len(set(names))} of {len(expected)} files",
        [f"missing {n}" for n in missing] + [f"registered twice {n}" for n in dup]
        + [f"size/checksum/dataset differ: {n}" for n in wrong]
        + [f"unknown file {n}" for n in set(names) - set(expected)],
    ))  # fmt: skip
    want = wanted(night, recalls)
    available = {(n, s) for n, s, st, *_ in snap.replicas if st == "available"}
    per: dict[str, int] = defaultdict(int)
    for _, s in want & available:
        per[s] += 1
    out.append(check(
        "every copy the rules (and recalls) want is available",
        f"{len(want & available)} of {len(want)} ({', '.join(f'{s} {n}' for s, n in sorted(per.items()))})",
        [f"missing {n} on {s}" for n, s in sorted(want - available)],
    ))  # fmt: skip
    states: dict[str, int] = defaultdict(int)
    for _, _, st, *_ in snap.replicas:
        states[st] += 1
    out.append(check(
        "no copy pending or failed", ", ".join(f"{st} {n}" for st, n in sorted(states.items())),
        [f"{n} on {s}: {st}" for n, s, st, *_ in snap.replicas if st in (*PENDING, "failed")],
    ))  # fmt: skip
    out.append(check(
        "no request failed", f"{len(snap.failed_requests)} failed",
        [f"{kind} {name}: {reason}" for kind, name, reason in snap.failed_requests],
    ))  # fmt: skip
    problems = []
    for r in recalls:
        state = snap.recalls.get(r.id)
        files = snap.recall_files.get(r.id, {})
        if state is None:
            problems.append(f"{r.kind} recall {r.id} ({r.dataset}) not recorded")
        elif state[0] != "done" or state[3] or state[2] != state[1] or state[1] != len(r.names):
            problems.append(f"{r.kind} recall {r.id} ({r.dataset}): state {state[0]}, files {state[1]}, "
                            f"done {state[2]}, failed {state[3]}, expected {len(r.names)}")  # fmt: skip
        elif any(st != "done" for st in files.values()) or set(files) != set(r.names):
            problems.append(f"{r.kind} recall {r.id}: files not all done")
    kinds = ", ".join(f"{sum(r.kind == k for r in recalls)} {k}" for k in ("tape", "disk"))
    evicted = sum(r.evicted for r in recalls)
    out.append(check(
        "every recall completed", f"{len(recalls)} recalls ({kinds}; {evicted} disk copies evicted first), "
        f"{sum(len(r.names) for r in recalls)} files", problems,
    ))  # fmt: skip
    out.append(disk_bytes(snap, settings))
    return out


def disk_bytes(snap: Snapshot, settings: Settings) -> Check:
    """Every available disk copy is on disk with the catalogue's size and adler32."""
    sums = {n: (size, a) for n, size, a, _ in snap.files}
    problems, checked = [], 0
    for name, storage, state, pfn, *_ in snap.replicas:
        ep = settings.storage[storage]
        if state != "available" or ep.kind != "disk":
            continue
        path = Path(pfn) if Path(pfn).is_absolute() else ep.root / pfn
        checked += 1
        if not path.is_file():
            problems.append(f"{name} on {storage}: {path} missing")
        elif (path.stat().st_size, adler(path)) != sums[name]:
            problems.append(f"{name} on {storage}: bytes differ from the catalogue")
    return check("disk copies byte-identical (adler32 vs catalogue)", f"{checked} copies read", problems)


async def tape_checks(snap: Snapshot, settings: Settings) -> list[Check]:
    """Per file and pool one committed file on tape, where the catalogue says, with its bytes."""
    from common.tape import open_library

    lib = await open_library(settings.tape_libraries["default"])
    try:
        # (pool, name) -> places: (cartridge, fseq, member offset or None for a plain tape file)
        on_tape: dict[tuple[str, str], list[tuple[str, int, int | None]]] = defaultdict(list)
        for cart in await lib.list_cartridges():
            for f in await lib.list_files(cart.vid):
                if f.members is None:
                    on_tape[(cart.pool or "?", f.name)].append((cart.vid, f.fseq, None))
                for m in f.members or ():
                    on_tape[(cart.pool or "?", m.name)].append((cart.vid, f.fseq, m.offset))
        sums = {n: a for n, _, a, _ in snap.files}
        sizes = {n: size for n, size, _, _ in snap.files}
        twice = [f"{n} in pool {pool} at {at}" for (pool, n), at in on_tape.items() if len(at) > 1]
        problems, read = [], 0
        for name, storage, state, _, vid, fseq, offset in snap.replicas:
            if state != "available" or settings.storage[storage].kind != "tape":
                continue
            pool = settings.storage[storage].pool or storage
            at = f"{vid}#{fseq}" + (f"@{offset}" if offset is not None else "")
            if on_tape.get((pool, name), [None])[0] != (vid, fseq, offset):
                problems.append(f"{name}: catalogue says {at}, library {on_tape.get((pool, name))}")
                continue
            read += 1
            data = lib.data_path(vid or "", fseq or 0)
            got = adler(data) if offset is None else adler(data, offset, sizes[name])
            if got != sums[name]:
                problems.append(f"{name}: bytes on {at} differ from the catalogue")
        root = settings.tape_libraries["default"].root
    finally:
        await lib.close()
    files_on_tape = sum(len(p) for p in on_tape.values())
    return [
        check("no file written to tape twice (per file and pool)", f"{files_on_tape} files on tape", twice),
        check("tape copies where the catalogue says, byte-identical", f"{read} read back", problems),
        leftovers(settings, root),
    ]


def leftovers(settings: Settings, library_root: Path) -> Check:
    found = []
    for name, ep in settings.storage.items():
        if ep.kind != "disk" or not ep.root.exists():
            continue
        for p in ep.root.rglob("*"):
            if is_temp_name(p.name) or (".spool-recall" in p.parts and p.is_file()):
                found.append(f"{name}: {p.relative_to(ep.root)}")
    found += [f"library: {p.relative_to(library_root)}" for p in library_root.rglob("*.tmp")]
    return check("no temporary file left in any storage root or the library", f"{len(found)} found", found)


def event_checks(seen: Seen, night: Night, recalls: list[Recall]) -> Check:
    """Every fact announced at least once (keyed by what it states)."""
    rule_copies = {(f.name, "disk2") for f in night.files if f.dataset.endswith(".dl0")}
    want: dict[str, tuple[set[Any], set[Any]]] = {
        "file.ingested": ({f.name for f in night.files}, seen.ingested),
        "replica.created": (rule_copies, seen.created),
        "file.archived": ({(f.name, "tape1") for f in night.files}, seen.archived),
        "file.recalled": ({(r.id, n) for r in recalls for n in r.names}, seen.recalled),
        "recall.completed": ({r.id for r in recalls}, seen.completed),
    }
    figure = ", ".join(f"{k} {len(w & s)}/{len(w)}" for k, (w, s) in want.items())
    problems = [
        f"{k}: {len(w - s)} never published, e.g. {sorted(w - s)[:3]}" for k, (w, s) in want.items() if w - s
    ]
    dups = sum(seen.duplicates.values())
    top = ", ".join(f"{k} {n}" for k, n in seen.duplicates.most_common(4)) or "none"
    return check("every fact published at least once (witness queue on '#')",
                 f"{figure}; {dups} messages seen twice under one id ({top})", problems)  # fmt: skip


Terms = list[tuple[str, int, bool]]  # daemon, exit code, serving when signalled


def exit_check(exits: list[Exit], terms: Terms, final: Terms) -> Check:
    """A serving daemon answers SIGTERM by draining and exiting 0; one still starting (no handler
    yet, nothing consumed) is ended by the signal itself (-15), as systemd expects too."""
    unexpected = [e for e in exits if not e.expected]
    tail = [f"{e.daemon} exited {e.code} at {e.at:.0f} s{' (broker down)' if e.during_outage else ''}: "
            f"{_last_line(e.log_tail)}" for e in unexpected]  # fmt: skip
    bad = [(d, c, s, when) for when, codes in (("a", terms), ("the final", final)) for d, c, s in codes
           if c != 0 and not (c == -15 and not s)]  # fmt: skip
    bad_terms = [f"{d} exited {c} after {w} SIGTERM ({'serving' if s else 'starting'})" for d, c, s, w in bad]
    expected = len(exits) - len(unexpected)
    starting = sum(not s for _, _, s in terms + final)
    return check(
        "daemons exit only when told (3 while the broker is down), 0 after SIGTERM",
        f"{len(unexpected)} unexpected exits, {expected} exits 3 during outages, "
        f"{len(terms) + len(final)} SIGTERMs answered ({starting} while starting)", tail + bad_terms,
    )  # fmt: skip


def _last_line(log: str) -> str:
    lines = [ln for ln in log.strip().splitlines() if ln.strip()]
    for ln in reversed(lines):
        if "Error" in ln or "error" in ln:
            return ln[:240]
    return lines[-1][:240] if lines else "(empty log)"


# Every place the catalogue names an instance as the holder of work (``instances.id``:
# ``daemon@node:pid:random``); the role lease is the active monitor's.
HOLDERS = {
    "ingest claims": "SELECT holder FROM ingest_claims",
    "tape copies archiving": "SELECT holder FROM replicas WHERE holder IS NOT NULL",
    "recall files staging": "SELECT holder FROM recall_files WHERE holder IS NOT NULL",
    "recall cartridges": "SELECT holder FROM recall_cartridges",
    "transfer slots": "SELECT holder FROM transfer_slots WHERE holder IS NOT NULL",
    "endpoint probes": "SELECT prober FROM storage_endpoints WHERE prober IS NOT NULL",
    "role leases": "SELECT holder FROM role_leases",
}


def holder_pid(holder: str) -> int | None:
    parts = holder.rsplit(":", 2)
    return int(parts[1]) if len(parts) == 3 and parts[1].isdigit() else None


async def held_work(url: str, live: set[int]) -> Check:
    """Once the run settled (daemons still running): nothing held by an instance whose process is
    gone. A SIGKILLed instance's claims must have been taken over, not left behind."""
    engine = create_async_engine(url)
    held: dict[str, list[str]] = {}
    try:
        async with engine.connect() as c:
            for what, sql in HOLDERS.items():
                held[what] = [str(r[0]) for r in (await c.execute(text(sql))).all()]
    finally:
        await engine.dispose()
    dead = [
        f"{what}: held by {h} (process gone)"
        for what, hs in held.items()
        for h in hs
        if holder_pid(h) not in live
    ]
    figure = ", ".join(f"{what} {len(hs)}" for what, hs in held.items() if hs) or "nothing"
    return check("nothing held by a dead instance once settled", f"held: {figure}", dead)


def shares(seen: Seen, fleet: Fleet) -> dict[str, dict[str, int]]:
    """Per daemon, messages each instance processed (its processes' last heartbeats, summed: what
    a process did after its last heartbeat before a SIGKILL is not counted)."""
    out: dict[str, dict[str, int]] = {d: dict.fromkeys(fleet.instances(d), 0) for d in DAEMONS}
    for (pid, _), (daemon, processed) in seen.processed.items():
        key = fleet.key_of_pid(pid)
        if key is not None and daemon in out:
            out[daemon][key] += processed
    return out


def tape_files_written(fleet: Fleet) -> dict[str, int]:
    """Per tape instance, files it wrote (its logs' ``archive_batch_done``): the tape daemon's work
    is taken from the catalogue, its messages are few."""
    out = {}
    for key in fleet.instances("tape"):
        written = 0
        for line in fleet.log_path(key).read_text(errors="replace").splitlines():
            if '"archive_batch_done"' in line:
                with contextlib.suppress(ValueError):
                    written += int(json.loads(line).get("written") or 0)
        out[key] = written
    return out


def shares_check(seen: Seen, fleet: Fleet) -> Check:
    """Both instances of a daemon serve (every work queue has a consumer per instance at the end:
    the consuming check); here, who did the work. Ingest's instances share a queue of thousands
    of messages, so each must have taken some. The others' shares are reported, not required: the
    replicator and the tape daemon take their work from the catalogue in batches (one instance
    may take every batch of a short run), the recall daemon gets a handful of requests, and the
    monitor consumes on its active instance only (the standby takes over when that one dies)."""
    per = shares(seen, fleet)
    parts = [f"{d} " + "/".join(str(n) for n in by.values()) for d, by in per.items()]
    parts.append("tape files written " + "/".join(str(n) for n in tape_files_written(fleet).values()))
    idle = [f"{k} processed nothing" for k, n in per["ingest"].items() if not n]
    return check(
        "each ingest instance took a share (messages per instance, from heartbeats)", "; ".join(parts), idle
    )


def every_daemon_killed(kills: dict[str, int]) -> Check:
    spared = [f"no instance of {d} was SIGKILLed" for d in DAEMONS if not kills.get(d)]
    figure = ", ".join(f"{d} {n}" for d, n in kills.items())
    return check("one instance of every daemon SIGKILLed at least once", figure, spared)
