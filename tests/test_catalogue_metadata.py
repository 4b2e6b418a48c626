"""Metadata after ingest in the catalogue (issue 20, part 3), on SQLite and PostgreSQL: dataset
metadata stored when ingest creates a dataset, changes set / unset on files and datasets with
their history, the refusals (unknown target, id used for another request, too much metadata),
the fields in use, and ``find`` over file and dataset metadata together with ``--json``'s details."""

# Fixtures imported from catalogue_fixtures (not conftest) reappear as test parameters:
# ruff: noqa: F811

from __future__ import annotations

import pytest

from common.catalogue import Catalogue, find, parse_filter
from common.catalogue.metadata import IdConflict, MetadataChange, TooMuchMetadata, UnknownTarget
from tests.catalogue_fixtures import catalogue, catalogue_url, rec  # noqa: F401

pytestmark = pytest.mark.integration
DS = "lst1.20261123.run012345.dl0"
DS2 = "lst2.20261124.run012346.dl1"
NOMEN = {"telescope": "lst1", "date": "2026-11-23", "run": 12345, "level": "dl0"}


def change(target: str, *, id_: str, dataset: bool = False, set_=None, unset=()) -> MetadataChange:
    return MetadataChange(
        id=id_, scope="dataset" if dataset else "file", target=target, set=set_ or {}, unset=list(unset),
        daemon="cli",
    )  # fmt: skip


async def test_dataset_metadata_is_stored_when_ingest_creates_the_dataset(catalogue: Catalogue) -> None:
    await catalogue.ingest.register([rec("a", dataset=DS, dataset_metadata=NOMEN)])
    # A later record naming other fields does not rewrite an existing dataset's metadata.
    await catalogue.ingest.register([rec("b", dataset=DS, dataset_metadata={"telescope": "other"})])
    assert await catalogue.metadata.of_dataset(DS) == NOMEN
    assert await catalogue.metadata.of_dataset("nope") is None


async def test_every_value_type_reads_back_as_it_was_set(catalogue: Catalogue) -> None:
    await catalogue.ingest.register([rec("a", dataset=DS)])
    values = {"i": 7, "big": 2**62 + 1, "f": 1.5, "whole": 3.0, "s": "LST1", "digits": "0042",
              "yes": True, "no": False, "t": "true", "one": "1", "none": None}  # fmt: skip
    assert await catalogue.metadata.apply(change(DS, id_="c1", dataset=True, set_=values)) == "changed"
    got = await catalogue.metadata.of_dataset(DS)
    assert got == values
    assert {k: type(v) for k, v in got.items()} == {k: type(v) for k, v in values.items()}  # type: ignore[union-attr]


async def test_set_and_unset_on_a_file_rewrite_its_metadata_and_its_history(catalogue: Catalogue) -> None:
    await catalogue.ingest.register([rec("f1", metadata={"run": 1, "quality": "bad"})])
    await catalogue.metadata.apply(change("f1", id_="c1", set_={"quality": "good", "zenith": 20.5}))
    await catalogue.metadata.apply(change("f1", id_="c2", unset=["run", "never-there"]))
    view = await catalogue.queries.show_file("f1")
    assert view is not None and view.metadata == {"quality": "good", "zenith": 20.5}
    assert [f.name for f in await catalogue.queries.find_files(["quality=good", "zenith<30"])] == ["f1"]
    assert await catalogue.queries.find_files(["run=1"]) == []
    history = await catalogue.queries.history("f1")
    assert [(e.type, e.daemon) for e in history] == [
        ("file.ingested", "ingest"), ("metadata.set", "cli"), ("metadata.set", "cli"),
    ]  # fmt: skip
    assert history[1].detail == {"request_id": "c1", "set": {"quality": "good", "zenith": 20.5}, "unset": []}
    assert history[2].detail == {"request_id": "c2", "set": {}, "unset": ["run", "never-there"]}


async def test_a_change_on_a_dataset_is_in_the_datasets_history_not_a_files(catalogue: Catalogue) -> None:
    # A file named like the dataset: each keeps its own history.
    await catalogue.ingest.register([rec(DS, dataset=DS)])
    await catalogue.metadata.apply(change(DS, id_="c1", dataset=True, set_={"quality": "good"}))
    hist = await catalogue.queries.dataset_history(DS)
    assert [(e["type"], e["daemon"], e["detail"]["set"]) for e in hist] == [
        ("metadata.set", "cli", {"quality": "good"})
    ]
    assert [e.type for e in await catalogue.queries.history(DS)] == ["file.ingested"]


async def test_a_redelivered_change_changes_nothing_and_adds_no_history(catalogue: Catalogue) -> None:
    await catalogue.ingest.register([rec("f1")])
    assert await catalogue.metadata.apply(change("f1", id_="c1", set_={"a": 1})) == "changed"
    await catalogue.metadata.apply(change("f1", id_="c2", set_={"a": 2}))
    assert await catalogue.metadata.apply(change("f1", id_="c1", set_={"a": 1})) == "duplicate"
    view = await catalogue.queries.show_file("f1")
    assert view is not None and view.metadata == {"a": 2}
    assert [e.type for e in await catalogue.queries.history("f1")].count("metadata.set") == 2


@pytest.mark.parametrize(
    ("bad", "error"),
    [
        (change("missing", id_="x1", set_={"a": 1}), UnknownTarget),
        (change("missing-ds", id_="x2", dataset=True, set_={"a": 1}), UnknownTarget),
        (change("f1", id_="ev-f1", set_={"a": 1}), IdConflict),  # the id of f1's file.ready
        (change("f1", id_="x3", set_={f"k{i}": i for i in range(64)}), TooMuchMetadata),  # 65 keys
        (change("f1", id_="x4", set_={f"k{i}": "v" * 400 for i in range(41)}), TooMuchMetadata),  # > 16 KiB
    ],
)
async def test_a_refused_change_writes_nothing(
    catalogue: Catalogue, bad: MetadataChange, error: type
) -> None:
    await catalogue.ingest.register([rec("f1", metadata={"k": 1})])
    with pytest.raises(error):
        await catalogue.metadata.apply(bad)
    view = await catalogue.queries.show_file("f1")
    assert view is not None and view.metadata == {"k": 1}
    assert [e.type for e in await catalogue.queries.history("f1")] == ["file.ingested"]
    assert bad.id == "ev-f1" or await catalogue.queries.request_state([bad.id]) == {}


async def test_fields_lists_each_key_with_its_types_and_counts(catalogue: Catalogue) -> None:
    await catalogue.ingest.register([
        rec("a", metadata={"run": 1, "q": "good", "moon": True}, dataset_metadata=NOMEN),
        rec("b", metadata={"run": 2.5, "q": "bad"}),
    ])  # fmt: skip
    got = {(f.scope, f.key, f.type): f.count for f in await catalogue.metadata.fields()}
    assert got == {
        ("file", "run", "int"): 1, ("file", "run", "float"): 1, ("file", "q", "str"): 2,
        ("file", "moon", "bool"): 1, ("dataset", "telescope", "str"): 1, ("dataset", "date", "str"): 1,
        ("dataset", "run", "int"): 1, ("dataset", "level", "str"): 1,
    }  # fmt: skip


async def _two_datasets(catalogue: Catalogue) -> None:
    await catalogue.ingest.register([
        rec("d1/a", dataset=DS, metadata={"zenith": 10}, dataset_metadata=NOMEN),
        rec("d1/b", dataset=DS, metadata={"zenith": 50, "run": 99}),  # overrides the dataset's run
        rec("d2/c", dataset=DS2, metadata={"zenith": 10},
            dataset_metadata={"telescope": "lst2", "date": "2026-11-24", "run": 12346, "level": "dl1"}),
        rec("d2/d", dataset=DS2, metadata={"zenith": 70, "telescope": "lst1"}),
    ])  # fmt: skip


# DRIVE_AT 0: no set drives, so a query with a file or dataset condition streams from one (the
# plain keys here are carried by both, inherited, so a query of those alone walks by name).
@pytest.mark.parametrize("drive_at", [0, 20_000], ids=["streamed-or-walked", "driven-by-a-set"])
@pytest.mark.parametrize(
    ("filters", "names"),
    [
        (["run=12345"], ["d1/a"]),  # inherited from the dataset; d1/b has its own run
        (["run=99"], ["d1/b"]),
        (["run>=12345"], ["d1/a", "d2/c", "d2/d"]),
        (["dataset.run=12345"], ["d1/a", "d1/b"]),  # the dataset's only
        (["file.run=12345"], []),  # the file's only
        (["telescope=lst1"], ["d1/a", "d1/b", "d2/d"]),  # d2/d's own value over its dataset's
        (["dataset.telescope=lst1", "zenith<=10"], ["d1/a"]),
        (["date>=2026-11-24", "zenith>20"], ["d2/d"]),  # ISO dates compare as text
        (["level=dl0,dl1", "file.zenith=10"], ["d1/a", "d2/c"]),
        (["telescope!=lst1"], ["d2/c"]),
        (["nokey=1"], []),
    ],
)  # fmt: skip
async def test_find_over_file_and_dataset_metadata(
    catalogue: Catalogue, monkeypatch: pytest.MonkeyPatch, drive_at: int, filters: list[str], names: list[str]
) -> None:
    monkeypatch.setattr(find, "DRIVE_AT", drive_at)  # both strategies give the same answer
    monkeypatch.setattr(find, "PAGE", 2)  # the walk reads several pages
    await _two_datasets(catalogue)
    assert [f.name for f in await catalogue.queries.find_files(filters)] == names
    assert [f.name for f in await catalogue.queries.find_files(filters, dataset=DS2)] == [
        n for n in names if n.startswith("d2/")
    ]


async def test_find_detailed_has_each_files_metadata_its_datasets_and_its_replicas(
    catalogue: Catalogue,
) -> None:
    await _two_datasets(catalogue)
    await catalogue.replication.set_replica(name="d1/a", storage="tape1", pfn="d1/a", state="archived",
                                            cartridge="V00001", fseq=3)  # fmt: skip
    found = await catalogue.queries.find_detailed(["dataset.telescope=lst1"], limit=10)
    assert [f.name for f in found] == ["d1/a", "d1/b"]
    a = found[0]
    assert a.dataset == DS and a.metadata == {"zenith": 10} and a.dataset_metadata == NOMEN
    assert [(r.storage, r.state, r.pfn, r.cartridge, r.fseq) for r in a.replicas] == [
        ("disk1", "available", "/srv/disk1/d1/a", None, None), ("tape1", "archived", "d1/a", "V00001", 3),
    ]  # fmt: skip
    assert [r.storage for r in found[1].replicas] == ["disk1"]
    assert found[1].metadata == {"zenith": 50, "run": 99}


async def _plan(catalogue: Catalogue, filters: list[str], dataset: str | None = None) -> find.Plan:
    async with catalogue.connect() as conn:
        p = await find.plan(conn, [parse_filter(x) for x in filters], dataset)
        return await find.with_source(conn, p) if p.how == "stream" else p


def _streams_from(p: find.Plan) -> tuple[str, list[object]]:
    """The files column the plan's source joins on, and the values its statement binds."""
    assert p.how == "stream" and p.source is not None
    ids, column = p.source
    return column, list(ids.compile().params.values())


async def test_only_a_file_or_dataset_condition_streams_never_an_inherited_one(
    catalogue: Catalogue, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(find, "DRIVE_AT", 0)
    await _two_datasets(catalogue)
    # ``run`` is carried by files and datasets: its file index misses d1/a, which inherits it.
    assert (await _plan(catalogue, ["run>=12345"])).how == "walk"
    assert _streams_from(await _plan(catalogue, ["run>=12345", "zenith>=10"])) == ("id", ["zenith", 10])
    column, values = _streams_from(await _plan(catalogue, ["run>=1", "dataset.telescope=lst1"]))
    assert column == "dataset_id" and "telescope" in values
    assert _streams_from(await _plan(catalogue, ["run>=1"], dataset=DS2))[0] == "dataset_id"
    monkeypatch.setattr(find, "DRIVE_AT", 20_000)
    assert (await _plan(catalogue, ["run>=12345", "zenith>=10"])).how == "set"


async def _late_matches(catalogue: Catalogue) -> None:
    """60 files in one dataset (run 12345): only those from f040 on match ``zenith>=40``; every
    third overrides the dataset's run with its own, 7."""
    own_run = {i: {"run": 7} if i % 3 == 0 else {} for i in range(60)}
    await catalogue.ingest.register([
        rec(f"f{i:03d}", dataset=DS, dataset_metadata=NOMEN,
            metadata={"zenith": i, "q": "bad" if i % 10 == 0 else "good"} | own_run[i])
        for i in range(60)
    ])  # fmt: skip


@pytest.mark.parametrize("limit", [5, 1000])
async def test_streamed_find_returns_matches_that_come_late_in_name_order(
    catalogue: Catalogue, monkeypatch: pytest.MonkeyPatch, limit: int
) -> None:
    monkeypatch.setattr(find, "DRIVE_AT", 0)
    monkeypatch.setattr(find, "PAGE", 2)
    await _late_matches(catalogue)
    filters = ["run=12345", "zenith>=40", "q=good"]  # run inherited where the file lacks it
    everyone = [f"f{i:03d}" for i in range(40, 60) if i % 3 and i % 10]
    assert (await _plan(catalogue, filters)).how == "stream"
    found = [f.name for f in await catalogue.queries.find_files(filters, limit=limit)]
    # Any ``limit`` of the matches (not the first by name), listed by name, each once.
    assert found == sorted(set(found)) and set(found) <= set(everyone)
    assert len(found) == min(limit, len(everyone))


async def test_the_sample_picks_the_most_selective_condition_to_stream_from(
    catalogue: Catalogue, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(find, "DRIVE_AT", 0)
    await _late_matches(catalogue)
    # zenith>=6 matches 54 of 60 files, q=bad 6: whichever order they come in, q streams.
    assert _streams_from(await _plan(catalogue, ["zenith>=6", "q=bad"]))[1] == ["q", "bad"]
    assert _streams_from(await _plan(catalogue, ["q=bad", "zenith>=6"]))[1] == ["q", "bad"]
    assert _streams_from(await _plan(catalogue, ["q=good", "zenith>=54"]))[1] == ["zenith", 54]
