"""The DIRAC-style namespace questions (``catalogue.namespace``) on SQLite and PostgreSQL."""

# Fixtures imported from catalogue_fixtures (not conftest) reappear as test parameters:
# ruff: noqa: F811

from __future__ import annotations

import pytest

from common.catalogue import Catalogue, parse_filter
from common.catalogue.namespace import UnknownEndpoint, directory_of
from tests.catalogue_fixtures import catalogue, catalogue_url  # noqa: F401
from tests.namespace_fixtures import TREE, plant_tree


def entries(rows: list) -> list[tuple[str, str, int, int]]:  # type: ignore[type-arg]
    return [(e.name, e.kind, e.files, e.bytes) for e in rows]


async def test_directory_lists_subdirectories_with_counts_and_files(catalogue: Catalogue) -> None:
    await plant_tree(catalogue)
    assert entries(await catalogue.namespace.list_directory("")) == [
        ("lst1", "directory", 8, 360),
        ("lst2", "file", 1, 5),
        ("lst2", "directory", 1, 90),
    ]
    assert entries(await catalogue.namespace.list_directory("/lst1/")) == [
        ("run%", "directory", 1, 60),
        ("run1", "directory", 3, 60),
        ("run10", "directory", 1, 40),
        ("run1x", "file", 1, 50),
        ("runXY", "directory", 1, 80),
        ("run_", "directory", 1, 70),
    ]
    run1 = await catalogue.namespace.list_directory("lst1/run1")
    assert entries(run1) == [
        ("a.fits", "file", 1, 10),
        ("b.fits", "file", 1, 20),
        ("sub", "directory", 1, 30),
    ]
    assert [e.path for e in run1] == ["lst1/run1/a.fits", "lst1/run1/b.fits", "lst1/run1/sub"]


async def test_like_wildcards_in_a_directory_name_match_only_themselves(catalogue: Catalogue) -> None:
    await plant_tree(catalogue)
    assert entries(await catalogue.namespace.list_directory("lst1/run%")) == [("e.fits", "file", 1, 60)]
    assert entries(await catalogue.namespace.list_directory("lst1/run_")) == [("f.fits", "file", 1, 70)]
    assert (await catalogue.namespace.directory_size("lst1/run_")).files == 1
    assert await catalogue.namespace.list_directory("lst1/run") == []  # a prefix of names, not a directory


async def test_directory_pages_follow_each_other_without_gap_or_repeat(catalogue: Catalogue) -> None:
    await plant_tree(catalogue)
    whole = await catalogue.namespace.list_directory("lst1")
    seen, after = [], None
    while True:
        page = await catalogue.namespace.list_directory("lst1", after=after, limit=2)
        seen += page
        if len(page) < 2:
            break
        after = (page[-1].name, 1 if page[-1].kind == "directory" else 0)
    assert seen == whole and len(whole) == 6
    # A file and a directory of one name are two keys: the page boundary between them holds.
    top = await catalogue.namespace.list_directory("", after=("lst2", 0), limit=5)
    assert entries(top) == [("lst2", "directory", 1, 90)]


async def test_directory_size_counts_copies_per_endpoint_and_state(catalogue: Catalogue) -> None:
    await plant_tree(catalogue)
    size = await catalogue.namespace.directory_size("lst1/run1/")
    assert (size.path, size.files, size.bytes) == ("lst1/run1", 3, 60)
    assert [(x.endpoint, x.state, x.files, x.bytes) for x in size.replicas] == [
        ("disk1", "available", 3, 60),
        ("disk2", "available", 3, 60),
        ("tape1", "copying", 1, 10),
    ]
    top = await catalogue.namespace.directory_size("")
    assert (top.files, top.bytes) == (len(TREE), sum(v[1] for v in TREE.values()))
    nothing = await catalogue.namespace.directory_size("nowhere")
    assert (nothing.files, nothing.bytes, nothing.replicas) == (0, 0, [])


async def test_exists_tells_files_from_directories(catalogue: Catalogue) -> None:
    await plant_tree(catalogue)
    found = await catalogue.namespace.exists(["lst2", "lst1/run1", "lst1/run1x", "lst1/run", "nope", ""])
    assert [(x.name, x.file, x.directory) for x in found] == [
        ("lst2", True, True),
        ("lst1/run1", False, True),
        ("lst1/run1x", True, False),
        ("lst1/run", False, False),
        ("nope", False, False),
        ("", False, False),
    ]


@pytest.mark.parametrize(
    ("endpoint", "physical", "expected"),
    [
        ("disk1", "/srv/disk1/lst1/run1/a.fits", "lst1/run1/a.fits"),
        ("disk1", "file:///srv/disk1//lst1/./run%/e.fits", "lst1/run%/e.fits"),
        ("disk1", "lst1/run_/f.fits", "lst1/run_/f.fits"),  # the catalogue's own relative pfn
        ("disk2", "/srv/disk2/spool/lst1/run1/sub/c.fits", "lst1/run1/sub/c.fits"),  # another layout
        ("disk2", "/srv/disk2/lst1/run1/a.fits", None),  # disk2 holds it elsewhere
        ("disk1", "/srv/disk10/lst1/run1/a.fits", None),  # a root that only starts alike
        ("disk1", "/srv/disk1/../disk1/lst1/run1/a.fits", None),
        ("disk1", "/srv/disk1", None),
        ("disk1", "root://host//srv/disk1/lst1/run1/a.fits", None),  # a posix endpoint has no server
        ("tape1", "/srv/tape1/T0001/1", "lst1/run1/a.fits"),
    ],
)
async def test_lfn_for_pfn(catalogue: Catalogue, endpoint: str, physical: str, expected: str | None) -> None:
    await plant_tree(catalogue)
    assert await catalogue.namespace.lfn_for_pfn(endpoint, physical) == expected


async def test_lfn_for_pfn_of_an_unknown_endpoint_raises(catalogue: Catalogue) -> None:
    with pytest.raises(UnknownEndpoint):
        await catalogue.namespace.lfn_for_pfn("disk9", "/x")


async def test_dump_pages_through_every_replica_of_an_endpoint(catalogue: Catalogue) -> None:
    await plant_tree(catalogue)
    first = await catalogue.namespace.dump_page("disk1", limit=4)
    rest = await catalogue.namespace.dump_page("disk1", after=first[-1].id, limit=100)
    streamed = [row async for row in catalogue.namespace.dump("disk1", page=3)]
    assert first + rest == streamed
    assert sorted(x.name for x in streamed) == sorted(TREE)
    row = next(x for x in streamed if x.name == "lst1/run%/e.fits")
    assert (row.pfn, row.size, row.adler32, row.state) == ("lst1/run%/e.fits", 60, "0badcafe", "available")
    tape = [(x.name, x.pfn, x.state) async for x in catalogue.namespace.dump("tape1")]
    assert tape == [("lst1/run1/a.fits", "T0001/1", "copying")]
    with pytest.raises(UnknownEndpoint):
        await catalogue.namespace.dump_page("nowhere")


async def test_replicas_of_several_files(catalogue: Catalogue) -> None:
    await plant_tree(catalogue)
    rows = await catalogue.namespace.replicas(["lst1/run1/a.fits", "lst2", "unknown"])
    assert [(x.name, x.endpoint, x.kind, x.state, x.pfn) for x in rows] == [
        ("lst1/run1/a.fits", "disk1", "disk", "available", "lst1/run1/a.fits"),
        ("lst1/run1/a.fits", "disk2", "disk", "available", "spool/lst1/run1/a.fits"),
        ("lst1/run1/a.fits", "tape1", "tape", "copying", "T0001/1"),
        ("lst2", "disk1", "disk", "available", "lst2"),
    ]


async def test_find_pages_by_name(catalogue: Catalogue) -> None:
    await plant_tree(catalogue)
    run1 = [parse_filter("run<=10")]
    page1 = await catalogue.namespace.find_page(run1, limit=2)
    page2 = await catalogue.namespace.find_page(run1, after=page1[-1].name, limit=2)
    page3 = await catalogue.namespace.find_page(run1, after=page2[-1].name, limit=2)
    assert [x.name for x in page1 + page2 + page3] == [
        "lst1/run1/a.fits", "lst1/run1/b.fits", "lst1/run1/sub/c.fits", "lst1/run10/d.fits", "lst2/h.fits",
    ]  # fmt: skip
    only_b = await catalogue.namespace.find_page([parse_filter("mode=a_b")], dataset="ds.b")
    assert [x.name for x in only_b] == ["lst1/run_/f.fits"]
    assert [x.name for x in await catalogue.namespace.find_page(run1, dataset="ds.b")] == ["lst2/h.fits"]


async def test_datasets_page_counts_each_dataset(catalogue: Catalogue) -> None:
    await plant_tree(catalogue)
    first = await catalogue.namespace.datasets_page(limit=1)
    second = await catalogue.namespace.datasets_page(after=first[-1].name, limit=5)
    assert [(x.name, x.files, x.bytes) for x in first + second] == [("ds.a", 4, 100), ("ds.b", 6, 355)]


async def test_metadata_fields_name_each_key_and_how_it_compares(catalogue: Catalogue) -> None:
    await plant_tree(catalogue)
    fields = await catalogue.namespace.metadata_fields()
    assert [(x.key, x.numeric, x.text) for x in fields] == [
        ("mode", False, True),
        ("run", True, False),
        ("telescope", False, True),
    ]


@pytest.mark.parametrize(
    ("path", "prefix"),
    [("", ""), ("/", ""), ("a", "a/"), ("/a//b/", "a/b/"), ("a/b/c", "a/b/c/")],
)
def test_directory_of(path: str, prefix: str) -> None:
    assert directory_of(path) == prefix
