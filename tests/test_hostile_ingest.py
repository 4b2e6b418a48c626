"""Issue 16, class 3 (validation after the work) and class 11 (a refused file traceable by its
logical name), through the real broker and a real ingest daemon: everything an event can be
refused for is refused before any byte moves (nothing in the storage root, no retry); a failure
after the copy removes that copy; the landing-area publisher rule; and a refused file's history is
found under the logical name it would have had as well as under its absolute path. After each
hostile event the daemon still ingests a good file."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import aio_pika
import pytest

from common.catalogue import Catalogue
from common.config import Settings, load_settings
from daemons.ingest.handlers import service as ingest_service
from tests.broker_users import connect_as, on_vhost, private_vhost
from tests.conftest import (
    cloudevent,
    dead_reasons,
    make_file,
    publish_raw,
    queue_depth,
    running,
    wait_for,
    write_config,
)

pytestmark = pytest.mark.integration
DATASET = "lst1.20261123.run012345.dl0"


def landing(settings: Settings) -> Path:
    return settings.landing_areas["lst1"]


def ready(path: Path | str, **data: Any) -> dict[str, Any]:
    return {"path": str(path), "dataset": DATASET, **data}


def stored_files(settings: Settings) -> list[str]:
    root = settings.storage["disk1"].root
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() or p.is_symlink())


async def depth_is(broker, name: str, n: int) -> bool:
    return await queue_depth(broker, name) == n


async def files_count(settings: Settings) -> int:
    async with await Catalogue.open(settings.catalogue.url) as c:
        return (await c.queries.counts()).files


async def ingest_good_file_after(broker, settings: Settings, n_registered: int = 1) -> None:
    good = make_file(settings, f"run012345/good-{uuid.uuid4().hex[:6]}.fits", b"good")
    await publish_raw(broker, settings, "file.ready", cloudevent(ready(good)))

    async def done() -> bool:
        return await files_count(settings) == n_registered

    await wait_for(done)


# --- refused before any byte moves ---------------------------------------------------------------
LONG = "x" * 256  # one byte over NAME_MAX


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("name_component_256", "name_too_long"),
        ("name_component_256_utf8", "name_too_long"),
        ("path_component_256", "name_too_long"),
        ("derived_name_over_1024", "name_too_long"),
        ("name_with_dotdot", "invalid_name"),
        ("absolute_name", "invalid_name"),
        ("bad_dataset", "bad_dataset_name"),
        ("metadata_value_513", "invalid_message"),
        ("metadata_65_keys", "invalid_message"),
        ("metadata_2_64", "invalid_message"),
        ("metadata_2mb", "invalid_message"),
        ("parents_1001", "invalid_message"),
        ("size_as_text", "invalid_message"),
        ("size_2_64", "invalid_message"),
    ],
)
async def test_a_refusable_event_is_refused_before_the_copy_and_never_retried(
    settings: Settings, broker, topology, case, reason
):
    src = make_file(settings, "run012345/hostile.fits", b"x" * 10_000)
    deep = "/".join(["d" * 200] * 6)  # 1205 characters, every component within NAME_MAX
    bodies = {
        "name_component_256": ready(src, name=f"run012345/{LONG}"),
        "name_component_256_utf8": ready(src, name=f"run012345/{'é' * 128}"),  # 256 bytes
        "path_component_256": ready(f"{landing(settings)}/run012345/{LONG}"),
        "derived_name_over_1024": ready(f"{landing(settings)}/{deep}/f.fits"),
        "name_with_dotdot": ready(src, name="../escape.fits"),
        "absolute_name": ready(src, name="/etc/passwd"),
        "bad_dataset": {"path": str(src), "dataset": "Not A Dataset"},
        "metadata_value_513": ready(src, metadata={"k": "v" * 513}),
        "metadata_65_keys": ready(src, metadata={f"k{i}": i for i in range(65)}),
        "metadata_2_64": ready(src, metadata={"k": 2**64}),
        "metadata_2mb": ready(src, metadata={f"k{i}": "v" * 500 for i in range(4000)}),
        "parents_1001": ready(src, parents=[f"raw/p{i}" for i in range(1001)]),
        "size_as_text": ready(src, size="10000"),
        "size_2_64": ready(src, size=2**64),
    }
    async with running([ingest_service], settings) as process:
        await publish_raw(broker, settings, "file.ready", cloudevent(bodies[case]))
        await wait_for(lambda: depth_is(broker, settings.dead_queue("ingest"), 1))
        assert stored_files(settings) == []  # checked while the daemon runs: nothing was copied
        await ingest_good_file_after(broker, settings)
        assert process.runners[0].stats.retried == 0
    assert await dead_reasons(broker, settings) == [reason]
    assert [f for f in stored_files(settings) if "hostile" in f or "x" * 200 in f] == []


async def test_a_failure_after_the_copy_removes_the_copy_it_made(
    settings: Settings, broker, topology, monkeypatch
):
    """The catalogue refusing the registration (here: every time) leaves no unregistered copy in
    the storage root, whichever attempt ends it."""
    from common.catalogue import ingest as db

    real_register = db.register

    def refuse(conn, records):
        if any("refused" in r.name for r in records):
            raise ValueError("simulated catalogue refusal")
        return real_register(conn, records)

    monkeypatch.setattr(db, "register", refuse)
    src = make_file(settings, "run012345/refused.fits", b"y" * 5000)
    async with running([ingest_service], settings) as process:
        await publish_raw(broker, settings, "file.ready", cloudevent(ready(src)))
        await wait_for(lambda: depth_is(broker, settings.dead_queue("ingest"), 1))
        assert process.runners[0].stats.retried >= 1
        await ingest_good_file_after(broker, settings)
    assert await dead_reasons(broker, settings) == ["unexpected_error"]
    assert [f for f in stored_files(settings) if "refused" in f] == []
    assert len(stored_files(settings)) == 1  # the good file only


async def test_a_name_conflict_found_at_registration_keeps_the_registered_copy(
    settings: Settings, broker, topology
):
    """The copy of a name the catalogue records is not ingest's to remove: a conflicting event
    leaves the first file's copy as it was."""
    src = make_file(settings, "run012345/first.fits", b"first")
    async with running([ingest_service], settings):
        await publish_raw(broker, settings, "file.ready", cloudevent(ready(src)))
        await wait_for(lambda: _count_is(settings, 1))
        src.write_bytes(b"second, longer")
        await publish_raw(broker, settings, "file.ready", cloudevent(ready(src)))
        await wait_for(lambda: depth_is(broker, settings.dead_queue("ingest"), 1))
    assert await dead_reasons(broker, settings) == ["name_conflict"]
    assert (settings.storage["disk1"].root / "run012345/first.fits").read_bytes() == b"first"


async def _count_is(settings: Settings, n: int) -> bool:
    return await files_count(settings) == n


# --- landing-area publishers ---------------------------------------------------------------------
# The daemon runs as guest (a Spool user, as it must be to start); the announcements come from a
# real second broker user ("outsider"), from guest, or with no user_id at all.
def publisher_settings(tmp_path: Path, tag: str, vhost: str, publishers: str) -> Settings:
    state = tmp_path / "state"
    (state / "landing").mkdir(parents=True, exist_ok=True)
    (state / "open").mkdir(parents=True, exist_ok=True)
    path = on_vhost(write_config(tmp_path / "spool.toml", state, tag), vhost)
    text = path.read_text().replace('lst1 = "landing"\n', 'lst1 = "landing"\nopen = "open"\n', 1)
    # A top-level key: it goes before every table.
    path.write_text(f"landing_publishers = {{ {publishers} }}\n" + text)
    return load_settings(path)


async def publish_as(
    connection: aio_pika.abc.AbstractConnection, settings: Settings, body: bytes, user_id: str | None
) -> None:
    channel = await connection.channel(publisher_confirms=True)
    exchange = await channel.get_exchange(settings.bus.exchange)
    await exchange.publish(
        aio_pika.Message(body, content_type="application/cloudevents+json", user_id=user_id),
        routing_key="file.ready",
    )
    await channel.close()


@pytest.mark.parametrize(
    ("publishers", "sender", "area", "outcome"),
    [
        # The outsider is not listed for lst1: refused; with no user_id at all, too.
        ('lst1 = ["daq-lst1"]', "outsider", "lst1", "area_not_permitted"),
        ('lst1 = ["daq-lst1"]', "anonymous", "lst1", "area_not_permitted"),
        # An area listed with nobody: only Spool's users.
        ("lst1 = []", "outsider", "lst1", "area_not_permitted"),
        # Listed: accepted.
        ('lst1 = ["{outsider}"]', "outsider", "lst1", "ingested"),
        # A Spool user may announce in every area.
        ('lst1 = ["daq-lst1"]', "spool", "lst1", "ingested"),
        # An area not listed takes anyone.
        ('lst1 = ["daq-lst1"]', "outsider", "open", "ingested"),
        ('lst1 = ["daq-lst1"]', "anonymous", "open", "ingested"),
    ],
)
async def test_a_landing_area_takes_announcements_only_from_its_publishers(
    tmp_path, tag, publishers, sender, area, outcome
):
    async with private_vhost(tag, "spool-areas") as vhost:
        listed = publishers.replace("{outsider}", vhost["outsider"])
        settings = publisher_settings(tmp_path, tag, vhost["name"], listed)
        src = settings.landing_areas[area] / "run012345/f.fits"
        src.parent.mkdir(parents=True)
        src.write_bytes(b"announced")
        spool = await aio_pika.connect(settings.bus.url)
        outsider = await connect_as(settings.bus.url, vhost["outsider"], vhost["password"])
        connection, user_id = {
            "outsider": (outsider, vhost["outsider"]),
            "anonymous": (outsider, None),
            "spool": (spool, "guest"),
        }[sender]
        try:
            async with running([ingest_service], settings):
                await publish_as(connection, settings, cloudevent(ready(src)), user_id)
                if outcome == "ingested":
                    await wait_for(lambda: _count_is(settings, 1))
                else:
                    await wait_for(lambda: depth_is(spool, settings.dead_queue("ingest"), 1))
                    assert stored_files(settings) == []
                    # The daemon goes on: a file in the open area is still ingested.
                    good = settings.landing_areas["open"] / "good.fits"
                    good.write_bytes(b"good")
                    await publish_as(connection, settings, cloudevent(ready(good)), user_id)
                    await wait_for(lambda: _count_is(settings, 1))
            reasons = await dead_reasons(spool, settings)
            assert reasons == ([] if outcome == "ingested" else [outcome])
        finally:
            await outsider.close()
            await spool.close()


# --- traceable by the logical name it would have had ---------------------------------------------
@pytest.mark.parametrize(
    ("case", "reason", "logical"),
    [
        ("missing", "file_missing", "run012345/missing.fits"),
        ("missing_named", "file_missing", "custom/name.fits"),
        ("checksum", "checksum_mismatch", "run012345/corrupt.fits"),
        ("component", "name_too_long", f"run012345/{LONG}"),
    ],
)
async def test_a_refused_file_is_traced_by_its_logical_name_and_its_path(
    settings: Settings, broker, topology, case, reason, logical
):
    base = landing(settings)
    corrupt = make_file(settings, "run012345/corrupt.fits", b"abc")
    events = {
        "missing": ready(base / "run012345/missing.fits"),
        "missing_named": ready(base / "run012345/missing.fits", name="custom/name.fits"),
        "checksum": ready(corrupt, adler32="00000001"),
        "component": ready(f"{base}/run012345/{LONG}"),
    }
    data = events[case]
    async with running([ingest_service], settings):
        await publish_raw(broker, settings, "file.ready", cloudevent(data))
        await wait_for(lambda: depth_is(broker, settings.dead_queue("ingest"), 1))
        await ingest_good_file_after(broker, settings)
    async with await Catalogue.open(settings.catalogue.url) as c:
        by_name = await c.queries.history(logical)
        by_path = await c.queries.history(data["path"])
    for rows in (by_name, by_path):
        assert [(e.type, e.detail["reason"]) for e in rows] == [("file.failed", reason)]
    assert stored_files(settings) == [f for f in stored_files(settings) if f.startswith("run012345/good-")]


async def test_spool_trace_finds_a_refused_file_by_its_logical_name(
    settings: Settings, config_file: Path, broker, topology
):
    import asyncio
    import sys

    path = landing(settings) / "run012345/never-written.fits"
    async with running([ingest_service], settings):
        await publish_raw(broker, settings, "file.ready", cloudevent(ready(path)))
        await wait_for(lambda: depth_is(broker, settings.dead_queue("ingest"), 1))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "daemons", "--config", str(config_file), "trace",
        "run012345/never-written.fits", "--json",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        cwd=Path(__file__).resolve().parent.parent,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), timeout=120)
    assert proc.returncode == 0, err.decode()
    assert "file_missing" in out.decode()


# --- the file system's own verdict ---------------------------------------------------------------
@pytest.mark.parametrize("side", ["source", "destination"])
def test_enametoolong_from_the_file_system_is_permanent(side):
    import errno

    from common.errors import Permanent
    from common.storage import reasons

    exc = OSError(errno.ENAMETOOLONG, "File name too long")
    err = (reasons._source_error if side == "source" else reasons._destination_error)(exc, "/x/" + "y" * 5000)
    assert isinstance(err, Permanent) and err.reason == "name_too_long"
    assert len(err.message) < 500
