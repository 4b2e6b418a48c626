"""The monitor's read-only query API (``/api/v1``) on a real catalogue, SQLite and PostgreSQL:
each question, paging across pages, the token, and each class of hostile parameter."""

# Fixtures imported from the fixtures modules reappear as test parameters:
# ruff: noqa: F811

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from common.config import load_settings
from daemons.monitor.api import PREFIX, QueryApi
from daemons.monitor.api_params import encode_cursor
from daemons.monitor.handlers import make_web
from daemons.monitor.openapi import document
from daemons.monitor.report import Observed
from daemons.monitor.steps import MonitorState, Thresholds
from tests.catalogue_fixtures import catalogue, catalogue_url  # noqa: F401
from tests.monitor_fixtures import monitor_config
from tests.namespace_fixtures import TOKEN, TREE, api, api_server, planted  # noqa: F401

AUTH = {"Authorization": f"Bearer {TOKEN}"}


async def get(base: str, path: str, params: Any = None, headers: Any = AUTH) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as s, s.get(base + PREFIX + path, params=params, headers=headers) as r:
        body = await r.text()
        return r.status, json.loads(body) if r.content_type == "application/json" else body


async def ok(base: str, path: str, params: Any = None) -> Any:
    status, body = await get(base, path, params)
    assert status == 200, body
    return body


async def every_page(base: str, path: str, params: list[tuple[str, str]], limit: int) -> list[Any]:
    items: list[Any] = []
    cursor: str | None = None
    pages = 0
    while True:
        extra = [("limit", str(limit))] + ([("next", cursor)] if cursor else [])
        body = await ok(base, path, params + extra)
        assert len(body["items"]) <= limit
        items += body["items"]
        pages += 1
        cursor = body["next"]
        if cursor is None:
            return items
        assert pages < 100


# --- the token ---------------------------------------------------------------------------------
@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}])
async def test_without_the_token_the_api_answers_401(api: str, headers: dict[str, str]) -> None:
    for path in ("/directory", "/openapi.json", "/endpoints/disk1/dump"):
        status, _ = await get(api, path, headers=headers)
        assert status == 401


async def test_with_basic_auth_as_the_dashboard_takes_it(api: str) -> None:
    basic = base64.b64encode(f"any:{TOKEN}".encode()).decode()
    status, body = await get(api, "/directory", headers={"Authorization": f"Basic {basic}"})
    assert status == 200 and body["items"]


# --- the questions ----------------------------------------------------------------------------
async def test_directory_listing_pages_through_every_entry(api: str) -> None:
    whole = await ok(api, "/directory", {"path": "lst1", "limit": "1000"})
    assert [(e["name"], e["kind"], e["files"]) for e in whole["items"]] == [
        ("run%", "directory", 1),
        ("run1", "directory", 3),
        ("run10", "directory", 1),
        ("run1x", "file", 1),
        ("runXY", "directory", 1),
        ("run_", "directory", 1),
    ]
    assert whole["next"] is None
    assert await every_page(api, "/directory", [("path", "lst1")], 4) == whole["items"]
    assert await every_page(api, "/directory", [("path", "lst1")], 1) == whole["items"]
    top = await every_page(api, "/directory", [], 1)
    assert [(e["name"], e["kind"]) for e in top] == [
        ("lst1", "directory"),
        ("lst2", "file"),
        ("lst2", "directory"),
    ]


async def test_an_empty_directory_is_404_naming_path(api: str) -> None:
    status, body = await get(api, "/directory", {"path": "lst1/run"})
    assert status == 404 and body["error"]["parameter"] == "path"


async def test_directory_size_and_exists(api: str) -> None:
    size = await ok(api, "/directory/size", {"path": "lst1/run1"})
    assert (size["files"], size["bytes"]) == (3, 60)
    assert {(x["endpoint"], x["state"]): x["files"] for x in size["replicas"]} == {
        ("disk1", "available"): 3,
        ("disk2", "available"): 3,
        ("tape1", "copying"): 1,
    }
    found = await ok(api, "/exists", [("name", "lst2"), ("name", "lst1/run_"), ("name", "lst1/run")])
    assert [(x["name"], x["file"], x["directory"]) for x in found["items"]] == [
        ("lst2", True, True),
        ("lst1/run_", False, True),
        ("lst1/run", False, False),
    ]


async def test_file_metadata_and_replicas(api: str) -> None:
    view = await ok(api, "/files", {"name": "lst1/run%/e.fits"})
    assert (view["name"], view["dataset"], view["size"], view["metadata"]) == (
        "lst1/run%/e.fits", "ds.b", 60, {"mode": "50%"},
    )  # fmt: skip
    status, body = await get(api, "/files", {"name": "lst1/run_/e.fits"})
    assert status == 404 and body["error"]["parameter"] == "name"
    reps = await ok(api, "/replicas", [("name", "lst1/run1/a.fits"), ("name", "nope")])
    assert [(x["endpoint"], x["state"], x["pfn"]) for x in reps["replicas"]["lst1/run1/a.fits"]] == [
        ("disk1", "available", "lst1/run1/a.fits"),
        ("disk2", "available", "spool/lst1/run1/a.fits"),
        ("tape1", "copying", "T0001/1"),
    ]
    assert reps["replicas"]["nope"] == []


async def test_find_by_metadata_pages(api: str) -> None:
    found = await every_page(api, "/find", [("filter", "run>=1"), ("filter", "run<=10")], 2)
    assert [x["name"] for x in found] == [
        "lst1/run1/a.fits", "lst1/run1/b.fits", "lst1/run1/sub/c.fits", "lst1/run10/d.fits", "lst2/h.fits",
    ]  # fmt: skip
    lst1 = await ok(api, "/find", [("filter", "telescope=LST1"), ("dataset", "ds.a")])
    assert [x["name"] for x in lst1["items"]] == ["lst1/run1/a.fits", "lst1/run1/b.fits", "lst1/run10/d.fits"]


async def test_datasets_endpoints_and_metadata_fields(api: str) -> None:
    ds = await every_page(api, "/datasets", [], 1)
    assert [(x["name"], x["files"], x["bytes"]) for x in ds] == [("ds.a", 4, 100), ("ds.b", 6, 355)]
    eps = await ok(api, "/endpoints")
    assert [(x["name"], x["kind"]) for x in eps["items"]] == [
        ("disk1", "disk"),
        ("disk2", "disk"),
        ("tape1", "tape"),
    ]
    fields = await ok(api, "/metadata/fields")
    assert [x["key"] for x in fields["items"]] == ["mode", "run", "telescope"]


async def test_lfn_for_pfn(api: str) -> None:
    found = await ok(api, "/lfn", {"endpoint": "disk2", "pfn": "/srv/disk2/spool/lst1/run1/b.fits"})
    assert found["name"] == "lst1/run1/b.fits"
    status, body = await get(api, "/lfn", {"endpoint": "disk2", "pfn": "/srv/disk2/lst1/run1/b.fits"})
    assert status == 404 and body["error"]["parameter"] == "pfn"


async def test_endpoint_dump_pages_through_every_replica(api: str) -> None:
    rows = await every_page(api, "/endpoints/disk1/dump", [], 3)
    assert sorted(x["name"] for x in rows) == sorted(TREE)
    assert set(rows[0]) == {"id", "name", "pfn", "size", "adler32", "state"}
    assert len({x["id"] for x in rows}) == len(TREE)


async def test_ancestors_and_descendants_page(planted: Any, catalogue_url: str) -> None:
    from tests.catalogue_fixtures import rec

    await planted.ingest.register(
        [rec("d1", parents=["lst2"]), rec("d2", parents=["lst2", "x"]), rec("e1", parents=["d1", "d2"])]
    )
    async with api_server(catalogue_url) as base:
        down = await every_page(base, "/descendants", [("name", "lst2")], 1)
        assert [(x["name"], x["depth"]) for x in down] == [("d1", 1), ("d2", 1), ("e1", 2)]
        up = await every_page(base, "/ancestors", [("name", "e1")], 2)
        assert [(x["name"], x["depth"], x["registered"]) for x in up] == [
            ("d1", 1, True), ("d2", 1, True), ("lst2", 2, True), ("x", 2, False),
        ]  # fmt: skip
        one = await ok(base, "/ancestors", {"name": "e1", "depth": "1"})
        assert [x["name"] for x in one["items"]] == ["d1", "d2"]


# --- hostile parameters -----------------------------------------------------------------------
def _cursor(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode()


HOSTILE: list[tuple[str, list[tuple[str, str]], str]] = [
    # limits: negative, zero, beyond the bound, huge, not plain digits
    *[
        ("/directory", [("limit", v)], "limit")
        for v in ("-1", "0", "1001", "99999999999999999999", "1e3", " 5", "", "\u0661\u0660", "0x10")
    ],
    ("/directory", [("limit", "5"), ("limit", "6")], "limit"),
    # cursors: garbage, not base64, not JSON, NaN, another listing's, wrong types, too long
    *[
        ("/directory", [("next", v)], "next")
        for v in (
            "garbage!", "%%%", _cursor("not json"), _cursor("[NaN]"), _cursor('{"a":1}'), _cursor("[]"),
            encode_cursor("find", ["lst1"]), encode_cursor("directory", ["lst1", 7]),
            encode_cursor("directory", [1, 1]), "A" * 2100,
        )
    ],
    ("/endpoints/disk1/dump", [("next", encode_cursor("dump", [-1]))], "next"),
    ("/endpoints/disk1/dump", [("next", encode_cursor("dump", [True]))], "next"),
    ("/endpoints/disk1/dump", [("next", encode_cursor("dump", [2**70]))], "next"),
    ("/ancestors", [("name", "e1"), ("next", encode_cursor("ancestors", ["x", 1]))], "next"),
    # filters: no operator, no key, no value, an empty list item, too long, too many
    *[("/find", [("filter", v)], "filter") for v in ("run", "=5", "run>", "run=1,,2", "a\x00=1")],
    ("/find", [("filter", f"k{i}=1") for i in range(33)], "filter"),
    ("/find", [], "filter"),
    # names and paths: missing, empty, too long, NUL, too many
    ("/files", [], "name"),
    ("/files", [("name", "")], "name"),
    ("/files", [("name", "x" * 1025)], "name"),
    ("/files", [("name", "a\x00b")], "name"),
    ("/replicas", [("name", f"n{i}") for i in range(101)], "name"),
    ("/directory", [("path", "p" * 1025)], "path"),
    ("/ancestors", [("name", "e1"), ("depth", "101")], "depth"),
    ("/lfn", [("endpoint", "disk1")], "pfn"),
    ("/lfn", [("endpoint", "disk1"), ("pfn", "")], "pfn"),
    # what nobody asked for
    ("/directory", [("limt", "5")], "limt"),
    ("/metadata/fields", [("x", "1")], "x"),
    ("/endpoints/" + "e" * 65 + "/dump", [], "endpoint"),
]  # fmt: skip


async def test_each_class_of_hostile_parameter_is_a_400_naming_it(api: str) -> None:
    for path, params, named in HOSTILE:
        status, body = await get(api, path, params)
        assert status == 400, (path, params, body)
        assert body["error"]["parameter"] == named, (path, params, body)
        assert body["error"]["message"]


async def test_a_query_string_beyond_the_request_line_bound_is_refused_before_the_api(api: str) -> None:
    status, _ = await get(api, "/find", {"filter": "k=" + "x" * 5000})
    assert status == 400


async def test_an_unknown_endpoint_is_a_404_naming_it(api: str) -> None:
    for path, params in [("/endpoints/nowhere/dump", {}), ("/lfn", {"endpoint": "nowhere", "pfn": "/x"})]:
        status, body = await get(api, path, params)
        assert status == 404 and body["error"]["parameter"] == "endpoint", body


async def test_an_unreachable_catalogue_is_a_503_and_the_server_goes_on() -> None:
    url = "postgresql+asyncpg://postgres@127.0.0.1:1/spool"  # a closed port
    async with api_server(url, token=None) as base:
        for _ in range(2):
            status, body = await get(base, "/directory", headers={})
            assert status == 503 and "catalogue unavailable" in body["error"]["message"]


# --- the description ----------------------------------------------------------------------------
async def test_openapi_describes_exactly_the_routes_served(api: str) -> None:
    served = await ok(api, "/openapi.json")
    assert served == json.loads(json.dumps(document()))
    assert served["openapi"].startswith("3.1")
    assert set(served["paths"]) == set(QueryApi("unused").routes())


async def test_every_described_parameter_is_accepted(api: str) -> None:
    """No documented parameter is refused as unknown (each route refuses what it does not read);
    ``next`` is every listing's, used by the paging tests above."""
    samples = {"limit": "2", "depth": "2", "name": "lst2", "path": "lst1", "filter": "run=1",
               "dataset": "ds.a", "endpoint": "disk1", "pfn": "lst2"}  # fmt: skip
    for path, item in document()["paths"].items():
        params = [
            (p["name"], samples[p["name"]])
            for p in item["get"]["parameters"]
            if p["in"] == "query" and p["name"] != "next"
        ]
        status, body = await get(api, path.replace("{endpoint}", "disk1"), params)
        assert status in (200, 404), (path, body)
        assert "unknown parameter" not in json.dumps(body), (path, body)


# --- every monitor serves it ----------------------------------------------------------------------
async def test_the_monitor_web_server_carries_the_api(tmp_path: Path, tag: str) -> None:
    settings = load_settings(monitor_config(tmp_path, tag))
    web = make_web(settings, MonitorState(Thresholds(interval=1.0)), Observed())
    await web.start("127.0.0.1", 0)
    try:
        status, body = await get(f"http://127.0.0.1:{web.port}", "/datasets", headers={})
        assert status == 200 and body == {"items": [], "next": None}
    finally:
        await web.stop()
