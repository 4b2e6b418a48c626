"""``metadata.set`` through the real broker and a real ingest daemon (issue 20, part 3): an
external publisher sets and removes metadata of a file and of a dataset after ingest; each change
is in the target's history once, however often the event is delivered; every class of hostile
event is one dead letter with its reason, never retried, nothing written, and the daemon goes on.
Also: a dataset named by the nomenclature gets the fields of its name as metadata at ingest."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest

from common.catalogue import Catalogue
from common.config import Settings
from daemons.ingest.handlers import service as ingest_service
from tests.conftest import cloudevent, dead_reasons, publish_raw, queue_depth, running, wait_for, write_config

pytestmark = pytest.mark.integration
DATASET = "lst1.20261123.run012345.dl0"
NOMENCLATURE = "{telescope}.{date:%Y%m%d}.run{run:06d}.{level}"


@pytest.fixture
def config_file(tmp_path: Path, tag: str) -> Path:
    """The default test config, dataset names by the nomenclature only."""
    state = tmp_path / "state"
    (state / "landing").mkdir(parents=True)
    return write_config(
        tmp_path / "spool.toml", state, tag, datasets=f'patterns = []\nnomenclature = ["{NOMENCLATURE}"]'
    )


async def _catalogue_answer(settings: Settings, question: Any) -> Any:
    async with await Catalogue.open(settings.catalogue.url) as c:
        return await question(c)


async def ingest_one(broker, settings: Settings, name: str, metadata: dict[str, Any]) -> None:
    path = settings.landing_areas["lst1"] / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"data" + name.encode())
    body = {"path": str(path), "dataset": DATASET, "metadata": metadata}
    await publish_raw(broker, settings, "file.ready", cloudevent(body))

    async def registered() -> bool:
        return await _catalogue_answer(settings, lambda c: c.queries.show_file(name)) is not None

    await wait_for(registered)


async def metadata_set(broker, settings: Settings, data: dict[str, Any], id_: str | None = None) -> None:
    await publish_raw(broker, settings, "metadata.set", cloudevent(data, type_="metadata.set", id_=id_))


async def file_history(settings: Settings, name: str) -> list[str]:
    return [e.type for e in await _catalogue_answer(settings, lambda c: c.queries.history(name))]


async def test_metadata_of_a_file_and_its_dataset_set_after_ingest(settings: Settings, broker, topology):
    async with running([ingest_service], settings) as process:
        await ingest_one(broker, settings, "run012345/a.fits", {"zenith": 20, "quality": "bad"})
        # The fields of the dataset's name became its metadata when ingest created it.
        fields = {"telescope": "lst1", "date": "2026-11-23", "run": 12345, "level": "dl0"}
        assert await _catalogue_answer(settings, lambda c: c.metadata.of_dataset(DATASET)) == fields

        event_id = uuid.uuid4().hex
        change = {"file": "run012345/a.fits", "set": {"quality": "good", "moon": False}, "unset": ["zenith"]}
        for _ in range(2):  # a duplicate delivery (same id) changes nothing more
            await metadata_set(broker, settings, change, id_=event_id)
        await metadata_set(broker, settings, {"dataset": DATASET, "set": {"quality": "science"}})

        async def both_applied() -> bool:
            history = await _catalogue_answer(settings, lambda c: c.queries.dataset_history(DATASET))
            return len(history) == 1 and await queue_depth(broker, settings.queue("ingest")) == 0

        await wait_for(both_applied)
        assert process.runners[0].stats.retried == 0
    view = await _catalogue_answer(settings, lambda c: c.queries.show_file("run012345/a.fits"))
    assert view.metadata == {"quality": "good", "moon": False}
    assert await file_history(settings, "run012345/a.fits") == ["file.ingested", "metadata.set"]
    fields["quality"] = "science"
    assert await _catalogue_answer(settings, lambda c: c.metadata.of_dataset(DATASET)) == fields
    found = await _catalogue_answer(
        settings,
        lambda c: c.queries.find_files(["telescope=lst1", "quality=good", "dataset.quality=science"]),
    )
    assert [f.name for f in found] == ["run012345/a.fits"]
    assert await dead_reasons(broker, settings) == []


FILE = "run012345/a.fits"


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        ({"file": "run012345/nope.fits", "set": {"a": 1}}, "unknown_file"),
        ({"dataset": "lst9.20261123.run000001.dl0", "set": {"a": 1}}, "unknown_dataset"),
        ({"file": FILE, "set": {f"n{i}": i for i in range(64)}}, "metadata_too_large"),  # 65 keys with "k"
        ({"file": FILE, "dataset": DATASET, "set": {"a": 1}}, "invalid_message"),  # two targets
        ({"set": {"a": 1}}, "invalid_message"),  # no target
        ({"file": FILE}, "invalid_message"),  # nothing to change
        ({"file": FILE, "set": {"a": 1}, "unset": ["a"]}, "invalid_message"),  # set and unset
        ({"file": FILE, "set": {f"k{i}": i for i in range(65)}}, "invalid_message"),
        ({"file": FILE, "set": {"k": "v" * 513}}, "invalid_message"),
        ({"file": FILE, "set": {"k" * 129: 1}}, "invalid_message"),
        ({"file": FILE, "set": {"": 1}}, "invalid_message"),
        ({"file": FILE, "set": {"k": 2**64}}, "invalid_message"),
        ({"file": FILE, "set": {"k": {"nested": 1}}}, "invalid_message"),
        ({"file": FILE, "set": {"k": [1, 2]}}, "invalid_message"),
        ({"file": FILE, "set": ["k"]}, "invalid_message"),
        ({"file": FILE, "unset": "k"}, "invalid_message"),  # a string for a list
        ({"file": FILE, "unset": [f"k{i}" for i in range(65)]}, "invalid_message"),
        ({"file": FILE, "unset": [7]}, "invalid_message"),
        ({"file": 7, "set": {"a": 1}}, "invalid_message"),
        ({"file": "x" * 1025, "set": {"a": 1}}, "invalid_message"),
        ({"file": "a\nb", "set": {"a": 1}}, "invalid_message"),
        ({"file": FILE, "sett": {"a": 1}}, "invalid_message"),  # unknown field
    ],
)
async def test_a_hostile_metadata_set_is_one_dead_letter_and_the_daemon_goes_on(
    settings: Settings, broker, topology, data: dict[str, Any], reason: str
):
    async with running([ingest_service], settings) as process:
        await ingest_one(broker, settings, FILE, {"k": 1})
        await metadata_set(broker, settings, data)
        await wait_for(lambda: _depth_is(broker, settings.dead_queue("ingest"), 1))
        await metadata_set(broker, settings, {"file": FILE, "set": {"after": True}})

        async def good_applied() -> bool:
            return (await file_history(settings, FILE))[-1:] == ["metadata.set"]

        await wait_for(good_applied)
        assert process.runners[0].stats.retried == 0
    assert await dead_reasons(broker, settings) == [reason]
    view = await _catalogue_answer(settings, lambda c: c.queries.show_file(FILE))
    assert view.metadata == {"k": 1, "after": True}  # the refused event wrote nothing
    assert await file_history(settings, FILE) == ["file.ingested", "metadata.set"]


async def test_an_event_id_already_used_by_another_request_is_refused(settings: Settings, broker, topology):
    async with running([ingest_service], settings):
        await ingest_one(broker, settings, FILE, {})
        used = await _catalogue_answer(settings, lambda c: c.queries.failed_requests(include_retrying=True))
        assert used == []
        ids = await _catalogue_answer(settings, lambda c: c.queries.history(FILE))
        ready_id = ids[0].detail["event_id"]
        await metadata_set(broker, settings, {"file": FILE, "set": {"a": 1}}, id_=ready_id)
        await wait_for(lambda: _depth_is(broker, settings.dead_queue("ingest"), 1))
    assert await dead_reasons(broker, settings) == ["id_conflict"]
    assert await file_history(settings, FILE) == ["file.ingested"]


async def _depth_is(broker, name: str, n: int) -> bool:
    return await queue_depth(broker, name) == n
