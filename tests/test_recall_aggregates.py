"""Recall of files that sit in tape aggregates: the next file of a mounted cartridge is each
queued member of the aggregate at the head (lowest offset first) before the files beyond it, and
the recall daemon reads only the members asked for (the library's counters say so), verified
against the catalogue (a damaged member fails alone)."""

# Fixtures imported from catalogue_fixtures (not conftest) reappear as test parameters:
# ruff: noqa: F811

from __future__ import annotations

from pathlib import Path

import pytest

from common.catalogue import Catalogue
from common.catalogue import recall as db
from common.config import Settings, StorageEndpoint
from common.tape import SimulatedLibrary, TapeMember, aggregate
from daemons.recall.handlers import service as recall_service
from tests.catalogue_fixtures import ENDPOINTS, catalogue, catalogue_url, rec  # noqa: F401
from tests.conftest import running
from tests.recall_fixtures import Events, contents, recall_settings, register, request
from tests.storage_fixtures import adler


async def test_members_at_the_head_come_one_by_one_before_the_next_tape_file(catalogue: Catalogue) -> None:
    await catalogue.endpoints.sync({**ENDPOINTS, "tape2": StorageEndpoint(kind="tape", root=Path("/t2"))})
    names = ["a", "m1", "m2", "m3", "z"]
    await catalogue.ingest.register([rec(n) for n in names])
    where = {"a": (1, None), "m3": (2, 512), "m1": (2, 2048), "m2": (2, 4096), "z": (3, None)}
    for name, (fseq, offset) in where.items():
        await catalogue.replication.set_replica(
            name=name, storage="tape1", pfn=f"A00001/{fseq}", state="available", cartridge="A00001",
            fseq=fseq, member_offset=offset,
        )  # fmt: skip
        await catalogue.replication.set_replica(name=name, storage="disk1", pfn=name, state="deleted")
    spec = db.RecallSpec(id="r1", destination="disk2", priority=3, names=tuple(names), dataset=None,
                         reply_to=None, correlation_id=None)  # fmt: skip
    await catalogue.recall.create_recall(spec)
    files = await catalogue.recall.pending(100)
    await catalogue.recall.assign([(p.recall_id, p.name, p.tape[0]) for p in files])

    read: list[tuple[str, int, int | None]] = []
    head = 0
    while items := await catalogue.recall.next_on_cartridge(["tape1"], "A00001", head):
        [item] = items
        read.append((item.name, item.copy.fseq, item.member_offset))
        await catalogue.recall.set_state([item.key], "staging")  # as the mount loop does
        head = item.copy.fseq
    assert read == [("a", 1, None), ("m3", 2, 512), ("m1", 2, 2048), ("m2", 2, 4096), ("z", 3, None)]


# --- the recall daemon -------------------------------------------------------------------------
async def _archive_aggregate(
    settings: Settings, files: dict[str, bytes], members: list[str], plain: list[str]
) -> tuple[int, dict[str, TapeMember]]:
    """Write ``plain`` as tape files, then ``members`` as one aggregate, on A00001 (pool tape1),
    recorded as the tape daemon records them; returns the aggregate's fseq and its index."""
    source = settings.state_dir / "tape-source"
    lib = await SimulatedLibrary.open(settings.tape_libraries["default"])
    try:
        async with await Catalogue.open(settings.catalogue.url) as cat:
            await cat.endpoints.sync(settings.storage)
            await lib.mount("DR01", "A00001")
            for name in plain:
                source.write_bytes(files[name])
                fseq = await lib.write("DR01", source, name, len(files[name]), adler(files[name]))
                await cat.replication.set_replica(
                    name=name, storage="tape1", pfn=f"A00001/{fseq}", state="available", cartridge="A00001",
                    fseq=fseq,
                )  # fmt: skip
            b = aggregate.Builder(settings.state_dir / "agg.tar")
            for i, name in enumerate(members):
                source.write_bytes(files[name])
                b.add(None, source, name, str(i), len(files[name]), adler(files[name]))
            size, adler32 = b.seal()
            fseq = await lib.write("DR01", b.path, "agg.tar", size, adler32, members=b.members)
            for m in b.members:
                await cat.replication.set_replica(
                    name=m.name, storage="tape1", pfn=f"A00001/{fseq}", state="available",
                    cartridge="A00001", fseq=fseq, member_offset=m.offset,
                )  # fmt: skip
            await lib.unmount("DR01")
    finally:
        await lib.close()
    return fseq, {m.name: m for m in b.members}


async def _usage(settings: Settings) -> tuple[int, int, int]:
    lib = await SimulatedLibrary.open(settings.tape_libraries["default"])
    try:
        total = (await lib.usage()).total
        return total.mounts, total.files_read, total.bytes_read
    finally:
        await lib.close()


@pytest.mark.integration
async def test_recall_reads_only_the_members_asked_for_in_one_mount(tmp_path, tag, broker):
    settings = recall_settings(tmp_path, tag)
    files = contents(6, size=20_000)
    names = sorted(files)
    members, plain = names[:5], names[5:]
    await register(settings, files)
    fseq, index = await _archive_aggregate(settings, files, members, plain)
    wanted = [members[3], members[1], plain[0], members[4]]
    before = await _usage(settings)
    async with running([recall_service], settings):
        events = await Events.watch(broker, settings)
        rid = await request(broker, settings, names=wanted)
        done = await events.completion(rid)
    assert (done["files"], done["failed"]) == (4, [])
    root = settings.storage["disk2"].root
    for name in wanted:
        assert (root / name).read_bytes() == files[name]
    mounts, files_read, bytes_read = (a - b for a, b in zip(await _usage(settings), before, strict=True))
    assert (mounts, files_read) == (1, 4)
    assert bytes_read == sum(len(files[n]) for n in wanted)  # the members' bytes, not the aggregate's
    # Members in the order they sit in the aggregate.
    order = [n for n in events.recalled(rid) if n in index]
    assert order == sorted(order, key=lambda n: index[n].offset)
    assert fseq == 2


@pytest.mark.integration
async def test_a_damaged_member_fails_alone(tmp_path, tag, broker):
    settings = recall_settings(tmp_path, tag)
    files = contents(3, size=5000)
    names = sorted(files)
    await register(settings, files)
    fseq, index = await _archive_aggregate(settings, files, names, [])
    lib = await SimulatedLibrary.open(settings.tape_libraries["default"])
    try:
        data = lib.data_path("A00001", fseq)
        raw = bytearray(data.read_bytes())
        raw[index[names[1]].offset + 10] ^= 0xFF
        data.write_bytes(bytes(raw))
    finally:
        await lib.close()
    async with running([recall_service], settings):
        events = await Events.watch(broker, settings)
        rid = await request(broker, settings, names=names)
        done = await events.completion(rid)
    assert done["failed"] == [names[1]]
    assert sorted(events.recalled(rid)) == [names[0], names[2]]
    root = settings.storage["disk2"].root
    assert not (root / names[1]).exists()
    async with await Catalogue.open(settings.catalogue.url) as cat:
        view = await cat.recall.status(rid)
        assert view is not None
        [bad] = [f for f in view.file_states if f.name == names[1]]
        assert bad.reason == "checksum_mismatch"
        shown = await cat.queries.show_file(names[1])
        assert shown is not None and {r.storage: r.state for r in shown.replicas}["tape1"] == "bad"
