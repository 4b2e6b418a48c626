"""The questions operators ask the catalogue (SQLite and PostgreSQL)."""

# Fixtures imported from catalogue_fixtures (not conftest) reappear as test parameters:
# ruff: noqa: F811

from __future__ import annotations

import pytest

from common.catalogue import Catalogue, parse_filter
from tests.catalogue_fixtures import ENDPOINTS, catalogue, catalogue_url, rec  # noqa: F401


async def names(found: list) -> list[str]:  # type: ignore[type-arg]
    return [f.name for f in found]


async def test_show_file_gathers_metadata_parents_children_replicas_and_last_error(
    catalogue: Catalogue,
) -> None:
    await catalogue.ingest.register(
        [
            rec("raw.bin", metadata={"run": 7}),
            rec("dl1.h5", metadata={"run": 7, "ok": True}, parents=["raw.bin", "calib.bin"]),
        ]
    )
    await catalogue.replication.set_replica(name="raw.bin", storage="tape1", pfn="T0001/3", state="available",
                                cartridge="T0001", fseq=3)  # fmt: skip
    await catalogue.history.record_failure(
        request_id="rep-1", kind="replica", daemon="replicator", reason="destination_down",
        error="disk2 unreachable", attempts=3, final=False, name="raw.bin",
    )  # fmt: skip

    raw = await catalogue.queries.show_file("raw.bin")
    assert raw is not None
    assert raw.children == ["dl1.h5"] and raw.parents == []
    assert [(r.storage, r.kind, r.cartridge, r.fseq) for r in raw.replicas] == [
        ("disk1", "disk", None, None),
        ("tape1", "tape", "T0001", 3),
    ]
    assert raw.last_error is not None
    assert (raw.last_error.reason, raw.last_error.state, raw.last_error.attempts) == (
        "destination_down", "retrying", 3,
    )  # fmt: skip
    dl1 = await catalogue.queries.show_file("dl1.h5")
    assert dl1 is not None
    assert dl1.parents == ["calib.bin", "raw.bin"] and dl1.metadata == {"run": 7, "ok": True}
    assert dl1.created.tzinfo is not None


async def test_show_unknown_file_is_none(catalogue: Catalogue) -> None:
    assert await catalogue.queries.show_file("nope") is None


async def test_list_files_by_dataset_and_case_sensitive_prefix(catalogue: Catalogue) -> None:
    await catalogue.ingest.register(
        [rec(n, dataset="ds1") for n in ("run1/a", "run1/b", "run1_x", "Run1/c", "run10/d")]
        + [rec("run1/z", dataset="ds2")]
    )
    assert await names(await catalogue.queries.list_files(prefix="run1/")) == ["run1/a", "run1/b", "run1/z"]
    assert await names(await catalogue.queries.list_files(prefix="run1_")) == [
        "run1_x"
    ]  # "_" is not a wildcard
    assert await names(await catalogue.queries.list_files(dataset="ds2")) == ["run1/z"]
    page = await catalogue.queries.list_files(dataset="ds1", limit=2, offset=1)
    assert await names(page) == ["run1/a", "run1/b"]  # ordered by name: Run1/c, run1/a, run1/b ...
    assert await catalogue.queries.list_files(dataset="nope") == []


async def test_list_datasets_counts_files_and_bytes(catalogue: Catalogue) -> None:
    await catalogue.ingest.register(
        [rec("a", dataset="ds1", size=10), rec("b", dataset="ds1", size=5), rec("c", dataset="ds2", size=1)]
    )
    got = [(d.name, d.files, d.bytes) for d in await catalogue.queries.list_datasets()]
    assert got == [("ds1", 2, 15), ("ds2", 1, 1)]


async def _files_with_metadata(catalogue: Catalogue) -> None:
    await catalogue.ingest.register(
        [
            rec("f1", metadata={"run": 11999, "tel": "LST1", "energy": 0.5}),
            rec("f2", metadata={"run": 12000, "tel": "LST2", "energy": 1.5}),
            rec("f3", metadata={"run": 12001.0, "tel": "MAGIC", "energy": 2}),
            rec("f4", metadata={"run": "12002", "tel": "LST1", "flag": True}),  # number sent as string
            rec("f5", metadata={"tel": "lst1", "ts": 1_700_000_000_000_000_001}, dataset="other"),
        ]
    )


async def test_find_by_metadata_range_and_in(catalogue: Catalogue) -> None:
    await _files_with_metadata(catalogue)
    assert await names(await catalogue.queries.find_files(["run>=12000"])) == ["f2", "f3", "f4"]
    assert await names(await catalogue.queries.find_files(["run>=12000", "tel=LST1,LST2"])) == ["f2", "f4"]
    assert await names(await catalogue.queries.find_files(["run<12001", "run>11999"])) == ["f2"]
    assert await names(await catalogue.queries.find_files(["run=11999,12001"])) == ["f1", "f3"]
    assert await names(await catalogue.queries.find_files(["energy<=1.5"])) == ["f1", "f2"]
    assert await names(await catalogue.queries.find_files(["energy>1.5"])) == ["f3"]


async def test_find_by_string_equality_is_case_sensitive_and_exact(catalogue: Catalogue) -> None:
    await _files_with_metadata(catalogue)
    assert await names(await catalogue.queries.find_files(["tel=LST1"])) == ["f1", "f4"]
    assert await names(await catalogue.queries.find_files(["tel=LST%"])) == []
    assert await names(await catalogue.queries.find_files(['run="12002"'])) == ["f4"]
    assert await names(await catalogue.queries.find_files(["flag=true"])) == ["f4"]


async def test_find_by_not_equal_and_not_in_only_matches_files_with_the_key(catalogue: Catalogue) -> None:
    await _files_with_metadata(catalogue)
    assert await names(await catalogue.queries.find_files(["tel!=LST1"])) == ["f2", "f3", "f5"]
    assert await names(await catalogue.queries.find_files(["run!=12000,12001"])) == ["f1", "f4"]


async def test_find_large_integers_exactly(catalogue: Catalogue) -> None:
    await _files_with_metadata(catalogue)
    assert await names(await catalogue.queries.find_files(["ts=1700000000000000001"])) == ["f5"]
    assert await catalogue.queries.find_files(["ts=1700000000000000000"]) == []


async def test_find_within_a_dataset_with_limit(catalogue: Catalogue) -> None:
    await _files_with_metadata(catalogue)
    assert await names(await catalogue.queries.find_files([parse_filter("tel=lst1")], dataset="other")) == [
        "f5"
    ]
    assert await names(await catalogue.queries.find_files(["tel=lst1"], dataset="nope")) == []
    assert len(await catalogue.queries.find_files(["run>0"], limit=2)) == 2
    assert len(await catalogue.queries.find_files([], limit=100)) == 5  # no filter: every file


async def test_ancestors_and_descendants_are_transitive_with_depth(catalogue: Catalogue) -> None:
    # raw -> dl1 -> dl2 -> dl3, and raw -> dl1b -> dl2 (a diamond); raw comes from an unknown "daq"
    await catalogue.ingest.register(
        [
            rec("raw", parents=["daq"]),
            rec("dl1", parents=["raw"]),
            rec("dl1b", parents=["raw"]),
            rec("dl2", parents=["dl1", "dl1b"]),
            rec("dl3", parents=["dl2"]),
        ]
    )
    anc = await catalogue.queries.ancestors("dl3")
    assert [(a.name, a.depth, a.registered) for a in anc] == [
        ("dl2", 1, True), ("dl1", 2, True), ("dl1b", 2, True), ("raw", 3, True), ("daq", 4, False),
    ]  # fmt: skip
    desc = await catalogue.queries.descendants("raw")
    assert [(d.name, d.depth) for d in desc] == [("dl1", 1), ("dl1b", 1), ("dl2", 2), ("dl3", 3)]
    assert [d.name for d in await catalogue.queries.descendants("daq")] == [
        "raw",
        "dl1",
        "dl1b",
        "dl2",
        "dl3",
    ]
    assert await catalogue.queries.ancestors("dl3", max_depth=1) == anc[:1]
    assert await catalogue.queries.ancestors("unknown") == []


async def test_ancestors_of_a_cycle_terminate(catalogue: Catalogue) -> None:
    # a <- b <- c <- a: bad input, but a query must not hang on it
    await catalogue.ingest.register(
        [rec("a", parents=["c"]), rec("b", parents=["a"]), rec("c", parents=["b"]), rec("s", parents=["s"])]
    )
    assert [(x.name, x.depth) for x in await catalogue.queries.ancestors("a")] == [("c", 1), ("b", 2)]
    assert [(x.name, x.depth) for x in await catalogue.queries.descendants("a")] == [("b", 1), ("c", 2)]
    assert await catalogue.queries.ancestors("s") == []


async def test_parent_registered_after_child_is_linked(catalogue: Catalogue) -> None:
    await catalogue.ingest.register([rec("child", parents=["parent"])])
    assert [a.registered for a in await catalogue.queries.ancestors("child")] == [False]
    await catalogue.ingest.register([rec("parent")])
    assert [a.registered for a in await catalogue.queries.ancestors("child")] == [True]
    view = await catalogue.queries.show_file("parent")
    assert view is not None and view.children == ["child"]


async def test_failure_is_last_error_of_file(catalogue: Catalogue) -> None:
    await catalogue.ingest.register([rec("a")])
    await catalogue.history.record_failure(
        request_id="r1", kind="replica", daemon="replicator", reason="destination_down",
        error="first", attempts=1, final=False, name="a",
    )  # fmt: skip
    await catalogue.history.record_failure(
        request_id="r2", kind="archive", daemon="tape", reason="no_drive", error="second",
        attempts=8, final=True, name="a",
    )  # fmt: skip
    view = await catalogue.queries.show_file("a")
    assert view is not None and view.last_error is not None
    assert (view.last_error.id, view.last_error.state, view.last_error.error) == ("r2", "failed", "second")
    await catalogue.history.record_done(request_id="r2", kind="archive", attempts=9, name="a")
    view = await catalogue.queries.show_file("a")
    assert view is not None and view.last_error is not None and view.last_error.id == "r1"
    assert [(e.type, e.outcome) for e in await catalogue.queries.history("a")] == [
        ("file.ingested", "ok"), ("file.retry", "retrying"), ("file.failed", "failed"),
    ]  # fmt: skip


async def test_repeated_failure_updates_one_request_row(catalogue: Catalogue) -> None:
    for attempt in (1, 2, 3):
        await catalogue.history.record_failure(
            request_id="r", kind="ingest", daemon="ingest", reason="source_missing",
            error=f"try {attempt}", attempts=attempt, final=attempt == 3, path="/landing/x",
            dataset="ds",
        )  # fmt: skip
    req = (await catalogue.queries.request_state(["r"]))["r"]
    assert (req.state, req.attempts, req.error, req.path, req.dataset) == (
        "failed", 3, "try 3", "/landing/x", "ds",
    )  # fmt: skip
    assert req.updated >= req.created
    # A failure without a name is traced by its source path.
    assert [e.attempt for e in await catalogue.queries.history("/landing/x")] == [1, 2, 3]


async def test_failure_with_less_context_keeps_what_was_known(catalogue: Catalogue) -> None:
    await catalogue.history.record_failure(request_id="r", kind="ingest", daemon="ingest", reason="x",
                                   error="e", attempts=1, final=False, name="a", path="/p")  # fmt: skip
    await catalogue.history.record_failure(request_id="r", kind="ingest", daemon="ingest", reason="y",
                                   error="e2", attempts=2, final=True)  # fmt: skip
    req = (await catalogue.queries.request_state(["r"]))["r"]
    assert (req.name, req.path, req.reason, req.state) == ("a", "/p", "y", "failed")


async def test_failed_requests_lists_final_failures_newest_first(catalogue: Catalogue) -> None:
    for i, final in enumerate([True, False, True]):
        await catalogue.history.record_failure(request_id=f"r{i}", kind="ingest", daemon="ingest", reason="x",
                                       error="e", attempts=1, final=final, name=f"n{i}")  # fmt: skip
    assert [r.id for r in await catalogue.queries.failed_requests()] == ["r2", "r0"]
    assert [r.id for r in await catalogue.queries.failed_requests(include_retrying=True)] == [
        "r2",
        "r1",
        "r0",
    ]
    assert [r.id for r in await catalogue.queries.failed_requests(limit=1)] == ["r2"]


async def test_counts_summarise_files_replicas_and_requests(catalogue: Catalogue) -> None:
    await catalogue.ingest.register([rec("a", size=3), rec("b", size=4)])
    await catalogue.replication.set_replica(name="a", storage="disk2", pfn="/srv/disk2/a", state="copying")
    await catalogue.history.record_failure(request_id="x", kind="ingest", daemon="ingest", reason="r",
                                   error="e", attempts=1, final=True, path="/landing/c")  # fmt: skip
    c = await catalogue.queries.counts()
    assert (c.files, c.bytes, c.datasets) == (2, 7, 1)
    assert c.replicas == {"available": 2, "copying": 1}
    assert c.requests == {"done": 2, "failed": 1}


async def test_sync_endpoints_keeps_the_operator_state(catalogue: Catalogue) -> None:
    await catalogue.endpoints.set_state("disk2", "down")
    changed = dict(ENDPOINTS)
    changed["disk2"] = changed["disk2"].model_copy(update={"attributes": {"site": "DESY"}})
    await catalogue.endpoints.sync(changed)
    eps = {e.name: e for e in await catalogue.endpoints.all()}
    assert (eps["disk2"].state, eps["disk2"].attributes) == ("down", {"site": "DESY"})
    assert (eps["tape1"].kind, eps["tape1"].state, eps["tape1"].root) == ("tape", "online", "/srv/tape1")
    with pytest.raises(KeyError):
        await catalogue.endpoints.set_state("nope", "down")


async def test_set_replica_updates_the_existing_copy(catalogue: Catalogue) -> None:
    await catalogue.ingest.register([rec("a")])
    await catalogue.replication.set_replica(name="a", storage="disk1", pfn="/srv/disk1/a", state="bad")
    view = await catalogue.queries.show_file("a")
    assert view is not None and [(r.storage, r.state) for r in view.replicas] == [("disk1", "bad")]
    with pytest.raises(KeyError):
        await catalogue.replication.set_replica(name="missing", storage="disk1", pfn="x", state="available")


async def test_history_is_in_time_order(catalogue: Catalogue) -> None:
    await catalogue.ingest.register([rec("a")])
    await catalogue.history.record_event(name="a", daemon="replicator", type="replica.created",
                                         storage="disk2", detail={"pfn": "/srv/disk2/a"})  # fmt: skip
    await catalogue.history.record_event(name="a", daemon="tape", type="file.archived", storage="tape1")
    hist = await catalogue.queries.history("a")
    assert [e.type for e in hist] == ["file.ingested", "replica.created", "file.archived"]
    assert [e.time for e in hist] == sorted(e.time for e in hist)
    assert hist[1].detail == {"pfn": "/srv/disk2/a"}


async def test_too_long_values_are_refused_the_same_way_on_every_backend(catalogue: Catalogue) -> None:
    with pytest.raises(ValueError, match=r"requests\.reason"):
        await catalogue.history.record_failure(request_id="r", kind="ingest", daemon="ingest",
                                               reason="x" * 65, error="e", attempts=1,
                                               final=True)  # fmt: skip
    with pytest.raises(ValueError, match="endpoint state"):
        await catalogue.endpoints.set_state("disk1", "broken")  # type: ignore[arg-type]
    assert await catalogue.queries.request_state(["r"]) == {}
