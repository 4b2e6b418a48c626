"""Undoing what a crashed process left half done, so the library state matches the "tape".

The rule is that **an operation interrupted by a crash did not happen**, except that tapes stay
where a real library would leave them:

- a drive that was *mounting* is empty again (the robot puts the cartridge back in its slot);
- a drive that was *locating, reading, writing or unmounting* keeps its cartridge mounted: a real
  drive does not eject a tape because a host died, and the next user saves a mount;
- a file still *writing* is dropped, whether or not its bytes were complete: ``write`` never
  returned its fseq, so nobody recorded it and the caller will write it again. So is a file
  *written* behind a buffered tape mark but never flushed: no caller records a file before the
  flush that commits it. Their fseqs are
  **reused** by the next write, as on a real tape, where appending resumes after the last
  complete file mark and overwrites the partial file;
- temp data of dead sessions and data files no journal entry claims are removed;
- cartridge headers (used bytes, next fseq, file count) are recomputed from the journal, the
  source of truth for what is on a cartridge.

Claims and operations of a session that is still alive are left alone, so one process opening
the library never disturbs another one's work. Everything here runs under the library lock.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from common.tape.store import LibraryState, Store

Alive = Callable[[str], bool]


def settle_drive(state: LibraryState, drive_id: str, alive: Alive) -> list[str]:
    """Release the claim and finish the operation of dead sessions on one drive."""
    d = state.drives[drive_id]
    notes: list[str] = []
    if d.op is not None and (d.op_session is None or not alive(d.op_session)):
        if d.status == "mounting" and d.vid is not None:
            cart = state.cartridges.get(d.vid)
            if cart is not None and cart.drive == drive_id:
                cart.drive = None
            notes.append(f"{drive_id}: interrupted mount of {d.vid} undone")
            d.vid, d.head = None, 0
        else:
            notes.append(f"{drive_id}: interrupted {d.status} ended, {d.vid} stays mounted")
        d.op = d.op_session = None
        d.status = "broken" if d.broken else "idle"
        d.since = time.time()
    if d.claim is not None and not alive(d.claim):
        notes.append(f"{drive_id}: claim of a dead session released")
        d.claim = None
    if d.claim is None and d.op is None and d.vid is None:
        d.request = None
    return notes


def drop_files(state: LibraryState, store: Store, vid: str, fseqs: list[int]) -> None:
    """Remove unfinished files from a cartridge: journal first, then their data, then the header."""
    if not fseqs:
        return
    store.append(vid, *({"op": "drop", "fseq": n} for n in fseqs))
    for n in fseqs:
        store.data_path(vid, n).unlink(missing_ok=True)
        for tmp in store.cartridge_dir(vid).glob(f".{n:08d}.*"):
            tmp.unlink(missing_ok=True)
    refresh_header(state, store, vid)


def refresh_header(state: LibraryState, store: Store, vid: str) -> None:
    cart = state.cartridges[vid]
    cf = store.journal(vid)
    cart.used_bytes = cf.end_of_data()
    cart.next_fseq = cf.next_fseq()
    cart.files = cf.committed_count()
    if cart.state == "scratch" and not cf.empty():
        cart.state = "filling"


def settle_cartridge(state: LibraryState, store: Store, vid: str, alive: Alive) -> list[str]:
    """Drop files dead sessions were writing and remove their temp data."""
    cf = store.journal(vid)
    dead = sorted(n for n, session in cf.writers.items() if not alive(session))
    drop_files(state, store, vid, dead)
    notes = [f"{vid}: dropped unfinished fseq {n}" for n in dead]
    for p in store.cartridge_dir(vid).iterdir():
        owner = store.temp_owner(p.name)
        if owner is not None and not alive(owner):
            p.unlink(missing_ok=True)
            notes.append(f"{vid}: removed stale temp data {p.name}")
        elif p.name.isdigit() and not cf.holds(int(p.name)):
            p.unlink(missing_ok=True)
            notes.append(f"{vid}: removed data {p.name} that no journal entry claims")
    refresh_header(state, store, vid)
    return notes


def reconcile(state: LibraryState, store: Store, alive: Alive) -> list[str]:
    """Whole-library repair at open: drives, then every cartridge, then drive/slot consistency."""
    notes: list[str] = []
    if store.remove_stale_state_temps():
        notes.append("removed temp files of an interrupted state save")
    for drive_id in state.drives:
        notes += settle_drive(state, drive_id, alive)
    for vid in state.cartridges:
        notes += settle_cartridge(state, store, vid, alive)
    holders = {d.vid: d.drive_id for d in state.drives.values() if d.vid is not None}
    for vid, cart in state.cartridges.items():
        if cart.drive != holders.get(vid):
            notes.append(f"{vid}: location corrected from {cart.drive} to {holders.get(vid)}")
            cart.drive = holders.get(vid)
    return notes
