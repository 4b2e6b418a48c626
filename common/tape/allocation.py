"""Who gets which drive and which cartridge: the library's share of scheduling.

Each function runs inside one transaction (``Txn``), so two sessions never receive the same drive
or turn the same scratch cartridge into two pools. What to mount *when* (batching, priorities)
stays with the daemons; these only answer "which one, now".
"""

from __future__ import annotations

import time

from common.errors import Permanent, Retryable
from common.tape.library import Cartridge, CartridgeState
from common.tape.transitions import Txn


def claim_drive(t: Txn, request: str, vid: str | None) -> str | None:
    """A drive for ``request``, reserved for this session until ``release_drive`` (or its death).

    For a given cartridge, only the drive holding it will do while it is there: handing out
    another drive would only end in ``cartridge_in_use``, and waiting for the holder saves a mount.
    """
    free = [
        d
        for d in t.state.drives.values()
        if not d.broken and d.op is None and d.claim is None and (vid is None or d.vid == vid)
    ]
    if vid is not None:
        holder = t.cartridge(vid).drive
        if holder is not None:
            if t.state.drives[holder].broken:
                raise Retryable("drive_broken", f"{vid} is stuck in broken drive {holder}")
            if not free:
                return None  # it is busy in its drive: wait for it rather than fight over it
        else:
            free = [d for d in t.state.drives.values() if not d.broken and d.op is None and d.claim is None]
    if not free:
        return None
    # An empty drive first (no unload needed), then the one idle for longest.
    best = min(free, key=lambda d: (d.vid is not None, d.since, d.drive_id))
    best.claim, best.request = t.session, request
    t.dirty = True
    return best.drive_id


def release_all(t: Txn) -> None:
    """Drop every claim of this session (closing the library)."""
    for d in t.state.drives.values():
        if d.claim == t.session:
            release_drive(t, d.drive_id)


def release_drive(t: Txn, drive_id: str) -> None:
    d = t.drive(drive_id)
    if d.claim is None:
        return
    if d.claim != t.session:
        raise Permanent("not_claimed", f"drive {drive_id} is claimed by another session, not this one")
    t.discard_unflushed(d)
    d.claim = None
    if d.op is None:
        d.request = None
    t.dirty = True


def _available_to(t: Txn, cart: Cartridge) -> bool:
    if cart.drive is None:
        return True
    d = t.state.drives[cart.drive]
    return not d.broken and d.claim in (None, t.session) and d.op_session in (None, t.session)


def allocate_cartridge(t: Txn, pool: str, needed: int, exclude: frozenset[str] | set[str]) -> Cartridge:
    """The pool's filling cartridge with room, else a scratch one that joins the pool.

    Nothing is reserved: two writers given the same cartridge are kept apart by the mount itself
    (``cartridge_in_use``). ``exclude`` keeps a file's copies on different cartridges. A filling
    cartridge busy in a drive of another session is skipped rather than waited for.
    """
    carts = [c for c in t.state.cartridges.values() if c.vid not in exclude]
    filling = [
        c
        for c in carts
        if c.pool == pool and c.state == "filling" and c.free_bytes >= needed and _available_to(t, c)
    ]
    if filling:
        # Already in a drive first (saves a mount), then the fullest (finish tapes one by one).
        return min(filling, key=lambda c: (c.drive is None, -c.used_bytes, c.vid)).model_copy()
    scratch = [
        c
        for c in carts
        if c.state == "scratch" and c.pool in (pool, None) and c.capacity >= needed and c.drive is None
    ]
    if not scratch:
        raise Retryable(
            "no_cartridge", f"pool {pool!r}: no cartridge with {needed} bytes free and no scratch left"
        )
    # The pool's own scratch tapes before the shared ones.
    chosen = min(scratch, key=lambda c: (c.pool is None, c.vid))
    chosen.pool, chosen.state = pool, "filling"
    t.dirty = True
    return chosen.model_copy()


def set_cartridge_state(t: Txn, vid: str, state: CartridgeState) -> None:
    cart = t.cartridge(vid)
    if state == "scratch" and cart.used_bytes:
        raise Permanent("invalid_state", f"{vid} holds data; it cannot become scratch")
    cart.state = state
    t.dirty = True


def set_drive_broken(t: Txn, drive_id: str, broken: bool) -> None:
    d = t.drive(drive_id)
    d.broken = broken
    if d.op is None:
        d.status, d.since = ("broken" if broken else "idle"), time.time()
    t.dirty = True


def fail_next_mounts(t: Txn, vid: str, count: int) -> None:
    t.cartridge(vid).fail_mounts = count
    t.dirty = True
