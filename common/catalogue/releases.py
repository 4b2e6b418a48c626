"""What a release manifest of a dataset lists, read from the catalogue in one transaction."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection

from common.catalogue import schema as s

f, d = s.files, s.datasets


@dataclass(frozen=True, slots=True)
class ReleaseFile:
    name: str
    size: int
    sha256: str | None  # None: registered before sha256 was recorded (migration 0016)


@dataclass(frozen=True, slots=True)
class ReleaseContents:
    dataset: str
    state: str  # datasets.state: "open" | "closed" (and what a lifecycle adds)
    files: list[ReleaseFile]  # by name


async def release_contents(conn: AsyncConnection, dataset: str) -> ReleaseContents | None:
    """The dataset's state and files (name, size, sha256) by name; None when there is no such
    dataset."""
    state = (await conn.execute(select(d.c.id, d.c.state).where(d.c.name == dataset))).first()
    if state is None:
        return None
    rows = await conn.execute(
        select(f.c.name, f.c.size, f.c.sha256).where(f.c.dataset_id == state.id).order_by(f.c.name)
    )
    return ReleaseContents(dataset, state.state, [ReleaseFile(r.name, int(r.size), r.sha256) for r in rows])
