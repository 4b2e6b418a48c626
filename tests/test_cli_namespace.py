"""``spool ls --dirs``, ``spool du``, ``spool lfn`` and ``spool rse dump`` as an operator runs them,
on a catalogue on SQLite and on PostgreSQL."""

# Fixtures imported from the fixtures modules reappear as test parameters:
# ruff: noqa: F811

from __future__ import annotations

import json
from pathlib import Path

from common.catalogue import Catalogue
from tests.catalogue_fixtures import catalogue, catalogue_url  # noqa: F401
from tests.cli_fixtures import spool
from tests.conftest import write_config
from tests.namespace_fixtures import TREE, planted  # noqa: F401


def config_for(tmp_path: Path, tag: str, url: str) -> Path:
    return write_config(tmp_path / "spool.toml", tmp_path / "state", tag, catalogue=f'url = "{url}"')


async def test_ls_dirs_lists_a_directory(
    planted: Catalogue, catalogue_url: str, tmp_path: Path, tag: str
) -> None:
    config = config_for(tmp_path, tag, catalogue_url)
    shown = spool(config, "ls", "--dirs", "lst1", "--json")
    assert shown.returncode == 0, shown.stderr
    assert [(e["name"], e["kind"], e["files"], e["bytes"]) for e in json.loads(shown.stdout)] == [
        ("run%", "directory", 1, 60),
        ("run1", "directory", 3, 60),
        ("run10", "directory", 1, 40),
        ("run1x", "file", 1, 50),
        ("runXY", "directory", 1, 80),
        ("run_", "directory", 1, 70),
    ]
    text = spool(config, "ls", "--dirs", "--limit", "2")
    assert text.returncode == 0, text.stderr
    assert "lst1/" in text.stdout and "lst2 " in text.stdout and "the first 2" in text.stdout
    refused = spool(config, "ls", "--dirs", "lst1", "--dataset", "ds.a")
    assert refused.returncode != 0 and "--dirs" in refused.stderr


async def test_du_and_lfn(planted: Catalogue, catalogue_url: str, tmp_path: Path, tag: str) -> None:
    config = config_for(tmp_path, tag, catalogue_url)
    du = spool(config, "du", "lst1/run1", "--json")
    assert du.returncode == 0, du.stderr
    size = json.loads(du.stdout)
    assert (size["files"], size["bytes"], len(size["replicas"])) == (3, 60, 3)
    lfn = spool(config, "lfn", "disk2", "/srv/disk2/spool/lst1/run1/sub/c.fits")
    assert (lfn.returncode, lfn.stdout) == (0, "lst1/run1/sub/c.fits\n"), lfn.stderr
    missing = spool(config, "lfn", "disk2", "/srv/disk2/nothing")
    assert missing.returncode != 0 and "no replica" in missing.stderr
    unknown = spool(config, "lfn", "disk9", "/x")
    assert unknown.returncode != 0 and "no endpoint named 'disk9'" in unknown.stderr


async def test_rse_dump_streams_every_replica(
    planted: Catalogue, catalogue_url: str, tmp_path: Path, tag: str
) -> None:
    config = config_for(tmp_path, tag, catalogue_url)
    lines = spool(config, "rse", "dump", "disk1")
    assert lines.returncode == 0, lines.stderr
    rows = [line.split("\t") for line in lines.stdout.splitlines()]
    assert sorted(r[0] for r in rows) == sorted(TREE)
    assert ["lst1/run_/f.fits", "lst1/run_/f.fits", "70", "0badcafe", "available"] in rows
    as_json = spool(config, "rse", "dump", "tape1", "--json")
    assert as_json.returncode == 0, as_json.stderr
    assert [json.loads(x) for x in as_json.stdout.splitlines()] == [
        {"name": "lst1/run1/a.fits", "pfn": "T0001/1", "size": 10, "adler32": "0badcafe", "state": "copying"}
    ]
    unknown = spool(config, "rse", "dump", "nowhere")
    assert unknown.returncode != 0 and "no endpoint named 'nowhere'" in unknown.stderr
