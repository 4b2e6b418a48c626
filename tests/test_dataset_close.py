"""``dataset.close`` end to end through a real ingest daemon on RabbitMQ: an external system closes
a dataset with a CloudEvent; a file announced into it afterwards is one dead letter
(``dataset_closed``) and leaves nothing in the storage root; every class of bad ``dataset.close``
is one dead letter with its reason and the daemon keeps ingesting; the auto-close loop."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import select

from common.catalogue import Catalogue
from common.catalogue import schema as s
from common.config import Settings
from daemons.ingest.handlers import service as ingest_service
from tests.conftest import cloudevent, dead_reasons, make_file, publish_raw, running, wait_for

pytestmark = pytest.mark.integration
DATASET = "lst1.20261123.run012345.dl0"


def stored_files(settings: Settings) -> list[str]:
    root = settings.storage["disk1"].root
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


async def dataset_state(settings: Settings, name: str = DATASET) -> str | None:
    async with await Catalogue.open(settings.catalogue.url) as c:
        return (await c.datasets.states([name])).get(name)


async def files_count(settings: Settings) -> int:
    async with await Catalogue.open(settings.catalogue.url) as c:
        return (await c.queries.counts()).files


async def ingest(
    broker: Any, settings: Settings, rel: str, expected_files: int, dataset: str = DATASET
) -> None:
    path = make_file(settings, rel, uuid.uuid4().bytes)
    await publish_raw(broker, settings, "file.ready", cloudevent({"path": str(path), "dataset": dataset}))

    async def done() -> bool:
        return await files_count(settings) == expected_files

    await wait_for(done)


def _request_state(conn: Any, request_id: str) -> str | None:
    return conn.scalar(select(s.requests.c.state).where(s.requests.c.id == request_id))


async def dead_is(broker: Any, settings: Settings, n: int) -> bool:
    return len(await dead_reasons(broker, settings)) == n


async def test_close_event_from_outside_closes_and_a_later_file_is_a_dead_letter(settings, broker, topology):
    async with running([ingest_service], settings):
        await ingest(broker, settings, "run012345/a.fits", 1)
        close = cloudevent({"dataset": DATASET}, type_="dataset.close")
        await publish_raw(broker, settings, "dataset.close", close)
        await publish_raw(broker, settings, "dataset.close", close)  # a duplicate: harmless

        async def closed() -> bool:
            return await dataset_state(settings) == "closed"

        await wait_for(closed)
        late = make_file(settings, "run012345/late.fits", b"too late")
        await publish_raw(broker, settings, "file.ready", cloudevent({"path": str(late), "dataset": DATASET}))
        await wait_for(lambda: dead_is(broker, settings, 1))
        # A redelivered announcement of a file registered before the close is still fine.
        again = {"path": str(settings.landing_areas["lst1"] / "run012345/a.fits"), "dataset": DATASET}
        await publish_raw(broker, settings, "file.ready", cloudevent(again, id_="re-announced"))

        async def re_announced() -> bool:
            async with await Catalogue.open(settings.catalogue.url) as c:
                return await c.read(_request_state, "re-announced") == "done"

        await wait_for(re_announced)
        # Then a file into another dataset: by its registration, the re-announcement was handled.
        await ingest(broker, settings, "other/b.fits", 2, dataset="lst1.20261123.run012346.dl0")
    assert await dead_reasons(broker, settings) == ["dataset_closed"]
    assert stored_files(settings) == ["other/b.fits", "run012345/a.fits"]  # no byte of the late file moved
    async with await Catalogue.open(settings.catalogue.url) as c:
        view = await c.datasets.show(DATASET, datetime.now(UTC))
        assert view is not None and view.closed_by == "event:test-daq"
        [failure] = await c.queries.history("run012345/late.fits")
        assert (failure.type, (failure.detail or {}).get("reason")) == ("file.failed", "dataset_closed")


# Each class of bad dataset.close: missing field, unknown field, wrong type, over the bound,
# control character, unknown dataset; and a body that is not a CloudEvent at all.
BAD_CLOSES = [
    pytest.param({}, "invalid_message", id="missing-dataset"),
    pytest.param({"dataset": DATASET, "force": True}, "invalid_message", id="unknown-field"),
    pytest.param({"dataset": 12345}, "invalid_message", id="mistyped"),
    pytest.param({"dataset": ["a", "b"]}, "invalid_message", id="list"),
    pytest.param({"dataset": "x" * 256}, "invalid_message", id="oversized"),
    pytest.param({"dataset": ""}, "invalid_message", id="empty"),
    pytest.param({"dataset": "lst1.20261123\nrun012345.dl0"}, "invalid_message", id="control-character"),
    pytest.param({"dataset": "lst1.20261123.run099999.dl0"}, "unknown_dataset", id="unknown-dataset"),
]


@pytest.mark.parametrize(("data", "reason"), BAD_CLOSES)
async def test_each_class_of_bad_close_is_one_dead_letter_and_the_daemon_goes_on(
    settings, broker, topology, data, reason
):
    async with running([ingest_service], settings):
        await ingest(broker, settings, "run012345/a.fits", 1)
        await publish_raw(broker, settings, "dataset.close", cloudevent(data, type_="dataset.close"))
        await wait_for(lambda: dead_is(broker, settings, 1))
        await ingest(broker, settings, "run012345/b.fits", 2)  # still ingesting into the open dataset
    assert await dead_reasons(broker, settings) == [reason]
    assert await dataset_state(settings) == "open"


async def test_undecodable_and_oversized_close_bodies_are_dead_letters(settings, broker, topology):
    async with running([ingest_service], settings):
        await publish_raw(broker, settings, "dataset.close", b"{not json")
        huge = json.dumps(
            {
                "specversion": "1.0",
                "id": "x",
                "source": "s",
                "type": "dataset.close",
                "data": {"dataset": "a" * 5_000_000},
            }
        ).encode()
        await publish_raw(broker, settings, "dataset.close", huge)
        await wait_for(lambda: dead_is(broker, settings, 2))
        await ingest(broker, settings, "run012345/a.fits", 1)
    assert await dead_reasons(broker, settings) == ["undecodable", "undecodable"]


async def test_an_idle_dataset_is_closed_by_the_ingest_daemon(settings, broker, topology):
    settings.datasets.auto_close_after = 0.5
    settings.datasets.auto_close_interval = 0.2
    async with running([ingest_service], settings):
        await ingest(broker, settings, "run012345/a.fits", 1)

        async def closed() -> bool:
            return await dataset_state(settings) == "closed"

        await wait_for(closed, timeout=10)
    async with await Catalogue.open(settings.catalogue.url) as c:
        [info] = await c.queries.list_datasets(state="closed")
        assert info.name == DATASET
        view = await c.datasets.show(DATASET, datetime.now(UTC))
        assert view is not None and view.closed_by == "auto-close"


async def test_the_close_writes_the_signed_release_manifest_where_this_node_has_the_key(
    settings, broker, topology, tmp_path
):
    from common.config import ManifestSettings
    from common.manifest.check import check_directory, check_signature
    from common.manifest.document import parse
    from common.manifest.keys import load_public_key
    from tests.manifest_fixtures import make_key

    (tmp_path / "keys").mkdir()
    private, public, key_id = make_key(tmp_path / "keys")
    settings.manifests = ManifestSettings(signing_key=private, directory=tmp_path / "manifests")
    async with running([ingest_service], settings):
        await ingest(broker, settings, "run012345/a.fits", 1)
        await ingest(broker, settings, "run012345/b.fits", 2)
        close = cloudevent({"dataset": DATASET}, type_="dataset.close")
        await publish_raw(broker, settings, "dataset.close", close)
        written = tmp_path / "manifests" / f"{DATASET}.manifest.json"

        async def manifest_written() -> bool:
            return written.exists()

        await wait_for(manifest_written)
    manifest = parse(written.read_bytes())
    assert manifest.key_id == key_id and [m.name for m in manifest.files] == [
        "run012345/a.fits",
        "run012345/b.fits",
    ]
    assert check_signature(manifest, [load_public_key(str(public))]) is None
    # The copy ingest made verifies against it, offline.
    assert check_directory(settings.storage["disk1"].root, manifest) == []
