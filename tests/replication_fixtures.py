"""Shared set-up of the replication tests: three disk endpoints at three sites, helpers to ingest a
batch of files and to read what the catalogue, the disks and the bus hold; small file systems of
their own for the fault tests (root only)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aio_pika
import msgpack
import pytest

from common.catalogue import Catalogue
from common.config import Settings, load_settings
from tests.conftest import cloudevent, publish_raw, write_config
from tests.storage_fixtures import adler

DATASET = "lst1.20261124.run000042.dl0"

ENDPOINTS = {
    "storage.disk2": 'root = "storage/disk2"\nattributes = { site = "CNAF" }',
    "storage.disk3": 'root = "storage/disk3"\nattributes = { site = "PIC" }',
}


def replication_config(tmp_path: Path, tag: str, **extra: str) -> Path:
    sections = {
        **ENDPOINTS,
        "replication": "poll_interval = 0.2\nreaper_interval = 0.3\nbreaker_failures = 3\n"
        "breaker_cooldown = 0.5\nbreaker_max_cooldown = 2",
        **extra,
    }
    path = write_config(tmp_path / "spool.toml", tmp_path / "state", tag, **sections)
    # disk1's site for the source-ranking tests
    text = path.read_text().replace(
        'root = "storage/disk1"', 'root = "storage/disk1"\nattributes = { site = "LOCAL" }'
    )
    path.write_text(text)
    return path


def replication_settings(tmp_path: Path, tag: str, **extra: str) -> Settings:
    return load_settings(replication_config(tmp_path, tag, **extra))


def make_files(
    settings: Settings, n: int, size: int = 2048, prefix: str = "night"
) -> list[tuple[Path, bytes]]:
    area = settings.landing_areas["lst1"]
    out = []
    for i in range(n):
        content = os.urandom(size)
        path = area / prefix / f"f{i:05d}.fits"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
        out.append((path, content))
    return out


async def publish_ready(
    broker: aio_pika.abc.AbstractRobustConnection,
    settings: Settings,
    files: list[tuple[Path, bytes]],
    dataset: str = DATASET,
    metadata: dict[str, Any] | None = None,
) -> None:
    for path, content in files:
        body = cloudevent(
            {"path": str(path), "dataset": dataset, "size": len(content), "adler32": adler(content),
             "metadata": metadata or {}},
            id_=uuid.uuid4().hex,
        )  # fmt: skip
        await publish_raw(broker, settings, "file.ready", body)


def name_of(settings: Settings, path: Path) -> str:
    return path.relative_to(settings.landing_areas["lst1"]).as_posix()


async def replica_states(settings: Settings) -> dict[tuple[str, str], str]:
    """(file name, endpoint) -> replica state, for every replica in the catalogue."""
    out: dict[tuple[str, str], str] = {}
    async with await Catalogue.open(settings.catalogue.url) as cat:
        for info in await cat.queries.list_files(limit=100_000):
            view = await cat.queries.show_file(info.name)
            assert view is not None
            for rep in view.replicas:
                out[(info.name, rep.storage)] = rep.state
    return out


async def available_on(settings: Settings, storage: str) -> set[str]:
    return {
        n for (n, s), st in (await replica_states(settings)).items() if s == storage and st == "available"
    }


def temp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if ".spool-tmp-" in p.name]


async def count_on(settings: Settings, storage: str, state: str = "available") -> int:
    """Copies in ``state`` on ``storage`` (one query: cheap enough to poll)."""
    async with await Catalogue.open(settings.catalogue.url) as cat:
        usage = {u.name: u.replicas for u in await cat.endpoints.usage()}
    return usage.get(storage, {}).get(state, 0)


async def registered(settings: Settings, n: int) -> bool:
    """The catalogue holds ``n`` files."""
    async with await Catalogue.open(settings.catalogue.url) as c:
        return (await c.queries.counts()).files == n


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A small file system of its own for one endpoint (needs root; skipped otherwise)."""
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def remount(path: Path, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(path)], check=True)


async def events_of(broker, settings: Settings, *keys: str):  # type: ignore[no-untyped-def]
    channel = await broker.channel()
    queue = await channel.declare_queue(exclusive=True)
    for key in keys:
        await queue.bind(settings.bus.exchange, key)
    return queue


async def drain(queue) -> list[tuple[str, dict]]:  # type: ignore[no-untyped-def,type-arg]
    out = []
    while (m := await queue.get(fail=False)) is not None:
        out.append((m.routing_key, msgpack.unpackb(m.body)))
    return out


async def max_attempts(settings: Settings) -> int:
    async with await Catalogue.open(settings.catalogue.url) as c:
        rows = await c.queries.failed_requests(limit=10_000, include_retrying=True)
    return max((r.attempts for r in rows), default=0)
