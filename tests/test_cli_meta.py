"""``spool meta set|unset|fields``, ``spool find --json``, ``spool trace --dataset`` and ``spool
dataset name`` as an operator runs them (a ``spool`` process), on SQLite and PostgreSQL."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from common.catalogue import Catalogue
from tests.catalogue_fixtures import ENDPOINTS, catalogue_url, rec  # noqa: F401
from tests.cli_fixtures import spool
from tests.conftest import write_config

pytestmark = pytest.mark.integration
DS = "lst1.20261123.run012345.dl0"
FIELDS = {"telescope": "lst1", "date": "2026-11-23", "run": 12345, "level": "dl0"}
NOMENCLATURE = '["{telescope}.{date:%Y%m%d}.run{run:06d}.{level}", "{site}.calib{n:04d}"]'


@pytest.fixture
def meta_config(tmp_path: Path, tag: str, catalogue_url: str) -> Path:  # noqa: F811
    state = tmp_path / "state"
    (state / "landing").mkdir(parents=True)
    return write_config(
        tmp_path / "spool.toml", state, tag,
        catalogue=f'url = "{catalogue_url}"', datasets=f"nomenclature = {NOMENCLATURE}",
    )  # fmt: skip


def ok(config: Path, *args: str) -> str:
    result = spool(config, *args)
    assert result.returncode == 0, result.stderr
    return result.stdout


def refused(config: Path, *args: str) -> str:
    result = spool(config, *args)
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1
    return result.stderr


async def test_meta_set_unset_fields_find_and_trace(meta_config: Path, catalogue_url: str) -> None:  # noqa: F811
    async with await Catalogue.open(catalogue_url) as c:
        await c.endpoints.sync(ENDPOINTS)
        await c.ingest.register([
            rec("r/a", dataset=DS, metadata={"run": 12345, "zenith": 20}, dataset_metadata=FIELDS),
            rec("r/b", dataset=DS, metadata={"zenith": 60}),
        ])  # fmt: skip
    ok(meta_config, "meta", "set", "r/a", "quality=good", "moon=false", "note='007'", "n=7", "x=1.5")
    ok(meta_config, "meta", "unset", "r/a", "run")
    ok(meta_config, "meta", "set", "--dataset", DS, "quality=science")
    shown = json.loads(ok(meta_config, "show", "r/a", "--json"))
    assert shown["metadata"] == {
        "zenith": 20,
        "quality": "good",
        "moon": False,
        "note": "007",
        "n": 7,
        "x": 1.5,
    }
    trace = json.loads(ok(meta_config, "trace", "r/a", "--json"))
    assert [(e["type"], e["daemon"]) for e in trace] == [
        ("file.ingested", "ingest"), ("metadata.set", "cli"), ("metadata.set", "cli"),
    ]  # fmt: skip
    assert trace[2]["detail"]["unset"] == ["run"]
    ds_trace = json.loads(ok(meta_config, "trace", "--dataset", DS, "--json"))
    assert [(e["type"], e["detail"]["set"]) for e in ds_trace] == [("metadata.set", {"quality": "science"})]
    assert "metadata.set" in ok(meta_config, "trace", "--dataset", DS)

    fields = json.loads(ok(meta_config, "meta", "fields", "--json"))
    got = {(f["scope"], f["key"], f["type"]): f["count"] for f in fields}
    assert got[("file", "zenith", "int")] == 2 and got[("file", "moon", "bool")] == 1
    assert got[("file", "note", "str")] == 1 and got[("file", "x", "float")] == 1
    assert got[("dataset", "run", "int")] == 1 and got[("dataset", "quality", "str")] == 1
    assert ("file", "run", "int") not in got  # unset

    # run: r/a lost its own, so its dataset's counts; r/b never had one.
    found = json.loads(ok(meta_config, "find", "run=12345", "dataset.quality=science", "zenith<30", "--json"))
    assert [f["name"] for f in found] == ["r/a"]
    assert found[0]["metadata"] == shown["metadata"]
    assert found[0]["dataset_metadata"] == {**FIELDS, "quality": "science"}
    assert [(r["storage"], r["state"]) for r in found[0]["replicas"]] == [("disk1", "available")]
    table = ok(meta_config, "find", "telescope=lst1")
    assert "r/a" in table and "r/b" in table and "2 file(s)" in table

    assert "no file named 'r/zz'" in refused(meta_config, "meta", "set", "r/zz", "a=1")
    assert "no dataset named" in refused(meta_config, "meta", "unset", "--dataset", "nope", "a")
    assert "longer than 512" in refused(meta_config, "meta", "set", "r/a", "k=" + "v" * 513)
    assert "expected key=value" in refused(meta_config, "meta", "set", "r/a", "novalue")
    assert "no history for dataset" in refused(meta_config, "trace", "--dataset", "nope")


@pytest.mark.parametrize("catalogue_url", ["sqlite"], indirect=True)
def test_dataset_name_builds_a_name_from_the_nomenclatures_fields(meta_config: Path) -> None:
    args = ("dataset", "name", "--pattern", "1", "--telescope", "lst1", "--date", "2026-11-23", "--run=12345")
    assert ok(meta_config, *args, "--level", "dl0").strip() == DS
    built = json.loads(ok(meta_config, *args, "--level", "dl0", "--json"))
    assert built == {
        "name": DS,
        "pattern": "{telescope}.{date:%Y%m%d}.run{run:06d}.{level}",
        "fields": FIELDS,
    }
    assert (
        ok(meta_config, "dataset", "name", "--pattern", "2", "--site", "pic", "--n", "7").strip()
        == "pic.calib0007"
    )
    assert "missing field(s) level" in refused(meta_config, *args)
    assert "unknown field(s) zenith" in refused(meta_config, *args, "--level", "dl0", "--zenith", "3")
    assert "run:" in refused(meta_config, "dataset", "name", "--pattern", "1", "--telescope", "lst1",
                             "--date", "2026-11-23", "--run", "12a", "--level", "dl0")  # fmt: skip
    assert "pick one with --pattern" in refused(meta_config, "dataset", "name", "--site", "pic", "--n", "7")
    assert "--pattern 3" in refused(meta_config, "dataset", "name", "--pattern", "3", "--site", "pic")
    assert "given twice" in refused(meta_config, *args, "--run", "1", "--level", "dl0")
