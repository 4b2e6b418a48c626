"""A tape batch whose instance lease runs low (renewals failing: the catalogue unreachable, the
process paused) stops before others may count it dead: it writes and flushes nothing more, what it
had not flushed is dropped from the cartridge, its copies go back to the queue."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Connection, select

from common.catalogue import Catalogue
from common.catalogue import schema as s
from common.catalogue.sql import utcnow
from common.config import Settings, load_settings
from common.errors import Retryable
from common.instance import InstanceLease
from common.tape import SimulatedLibrary, TapeLibrary
from daemons.tape import steps, writer
from daemons.tape.writer import Env
from tests.tape_fixtures import POLICY, queue_for_tape, tape_config, writer_harness


class _LeaseRunsLow:
    """The library; after ``writes`` writes the instance's lease is left with less than its
    margin (as if two renewals had failed)."""

    def __init__(self, library: TapeLibrary, lease: InstanceLease, writes: int) -> None:
        self._library = library
        self._lease = lease
        self.writes = writes

    def __getattr__(self, name: str) -> Any:
        return getattr(self._library, name)

    async def write(self, *args: Any, **kwargs: Any) -> int:
        fseq = await self._library.write(*args, **kwargs)
        self.writes -= 1
        if self.writes == 0:
            self._lease.expires = utcnow() + self._lease.lease * (writer.LEASE_MARGIN / 2)
        return fseq


@pytest.fixture
async def setting(tmp_path: Path) -> AsyncIterator[tuple[Settings, Catalogue, Env, SimulatedLibrary]]:
    settings = load_settings(tape_config(tmp_path, "lease", policy=POLICY + "\nflush_files = 3"))
    async with writer_harness(settings, tmp_path / "st", on_lost=lambda: None) as (catalogue, env, library):
        yield settings, catalogue, env, library


def _copies(conn: Connection) -> dict[str, tuple[str, str | None]]:
    f, r, ep = s.files, s.replicas, s.storage_endpoints
    stmt = (
        select(f.c.name, r.c.state, r.c.holder)
        .join(r, r.c.file_id == f.c.id)
        .join(ep, ep.c.id == r.c.storage_id)
        .where(ep.c.name == "tape1")
    )
    return {name: (state, holder) for name, state, holder in conn.execute(stmt)}


async def test_a_batch_whose_lease_runs_low_stops_drops_its_unflushed_files_and_requeues(setting) -> None:  # type: ignore[no-untyped-def]
    settings, catalogue, env, library = setting
    files = await queue_for_tape(settings, catalogue, [3000] * 6)
    target = steps.targets(settings.storage)["tape1"]
    # Flushes every 3 files: the first three are made durable and recorded; the lease runs low
    # after the fifth write, so the fifth and fourth are never flushed and the sixth never written.
    low = _LeaseRunsLow(library, env.lease, writes=5)
    with pytest.raises(Retryable) as raised:
        await writer.run_batch(env, target, low, "test")  # type: ignore[arg-type]
    assert raised.value.reason == "instance_lease_lost"
    copies = await catalogue.read(_copies)
    assert sorted(st for st, _ in copies.values()) == ["available"] * 3 + ["queued"] * 3
    assert {holder for _, holder in copies.values()} == {None}
    on_tape = [f.name for c in await library.list_cartridges() for f in await library.list_files(c.vid)]
    assert sorted(on_tape) == sorted(n for n, (st, _) in copies.items() if st == "available")
    assert not [d for d in await library.list_drives() if d.claim is not None]  # the drive given back
    # A lease that stands again (renewed in time): the next batch writes the rest, once.
    now = utcnow()
    env.lease.expires = now + timedelta(seconds=30)
    assert await writer.run_batch(env, target, library, "test") == 3
    on_tape = [f.name for c in await library.list_cartridges() for f in await library.list_files(c.vid)]
    assert sorted(on_tape) == sorted(files)
