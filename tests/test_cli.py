"""The ``spool`` command as an operator uses it: real broker, real catalogue, real processes."""

from __future__ import annotations

import json
import os

import pytest

from common.catalogue import Catalogue
from common.config import Settings
from daemons.ingest.handlers import service as ingest_service
from tests.cli_fixtures import spool
from tests.conftest import cloudevent, publish_raw, queue_depth, running, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]
DATASET = "lst1.20261123.run012345.dl0"


async def test_ingest_command_publishes_events_that_the_daemon_registers(
    settings, config_file, broker, topology
):
    folder = settings.landing_areas["lst1"] / "run012345"
    folder.mkdir(parents=True)
    for i in range(5):
        (folder / f"f{i}.fits.fz").write_bytes(os.urandom(100 + i))
    result = spool(
        config_file,
        "ingest",
        str(folder),
        "--dataset",
        DATASET,
        "--meta",
        "run=12345",
        "--meta",
        "telescope=LST1",
        "--json",
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["published"] == 5
    async with running([ingest_service], settings):
        await wait_for(lambda: _registered(settings, 5))
    ls = json.loads(spool(config_file, "ls", "--dataset", DATASET, "--json").stdout)
    assert sorted(f["name"] for f in ls) == [f"run012345/f{i}.fits.fz" for i in range(5)]
    found = json.loads(spool(config_file, "find", "run>=12000", "telescope=LST1,LST2", "--json").stdout)
    assert len(found) == 5
    assert json.loads(spool(config_file, "find", "run<100", "--json").stdout) == []
    shown = json.loads(spool(config_file, "show", "run012345/f0.fits.fz", "--json").stdout)
    assert shown["metadata"] == {"run": 12345, "telescope": "LST1"}
    assert [r["state"] for r in shown["replicas"]] == ["available"]
    trace = json.loads(spool(config_file, "trace", "run012345/f0.fits.fz", "--json").stdout)
    assert [e["type"] for e in trace] == ["file.ingested"]
    prefix = json.loads(spool(config_file, "ls", "run012345/f1", "--json").stdout)
    assert [f["name"] for f in prefix] == ["run012345/f1.fits.fz"]


async def test_dead_letters_listed_by_reason_retried_and_purged(settings, config_file, broker, topology):
    src = settings.landing_areas["lst1"] / "run012345/x.fits.fz"
    src.parent.mkdir(parents=True)
    src.write_bytes(b"abc")
    await publish_raw(
        broker,
        settings,
        "file.ready",
        cloudevent({"path": str(src), "dataset": DATASET, "adler32": "00000001"}),
        message_id="bad-sum",
    )
    await publish_raw(broker, settings, "file.ready", b"{oops", message_id="bad-json")
    await publish_raw(broker, settings, "file.ready", b"{oops again", message_id="bad-json-2")
    async with running([ingest_service], settings):
        await wait_for(lambda: _depth(broker, settings.dead_queue("ingest"), 3))
    by_reason = json.loads(spool(config_file, "dead", "list", "--by-reason", "--json").stdout)
    assert {(r["reason"], r["count"]) for r in by_reason} == {("undecodable", 2), ("checksum_mismatch", 1)}
    listed = json.loads(spool(config_file, "dead", "list", "--reason", "checksum_mismatch", "--json").stdout)
    assert [d["message_id"] for d in listed] == ["bad-sum"]
    shown = json.loads(spool(config_file, "dead", "show", "bad-sum", "--json").stdout)
    assert shown["reason"] == "checksum_mismatch" and "00000001" in shown["body"]

    # The operator fixes the cause (here: the file was wrong), then retries that reason only.
    src.write_bytes(b"\x00" * 0)  # adler32 of empty content is 00000001
    retried = spool(config_file, "dead", "retry", "--reason", "checksum_mismatch", "--json")
    assert json.loads(retried.stdout) == {"retried": 1}
    assert await queue_depth(broker, settings.dead_queue("ingest")) == 2
    async with running([ingest_service], settings):
        await wait_for(lambda: _registered(settings, 1))

    refused = spool(config_file, "dead", "purge", "--reason", "undecodable", input_="n\n")
    assert refused.returncode != 0 and await queue_depth(broker, settings.dead_queue("ingest")) == 2
    purged = spool(config_file, "dead", "purge", "--reason", "undecodable", "--yes", "--json")
    assert json.loads(purged.stdout) == {"purged": 2}
    assert await queue_depth(broker, settings.dead_queue("ingest")) == 0


def test_user_mistakes_are_one_line_errors_without_traceback(config_file, tmp_path):
    unknown = spool(config_file, "show", "no/such/file")
    assert unknown.returncode == 1 and "no file named" in unknown.stderr and "Traceback" not in unknown.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text("[bus]\nmax_attempts = 'many'\n")
    cfg = spool(bad, "ls")
    assert cfg.returncode == 2 and "bus.max_attempts" in cfg.stderr and "Traceback" not in cfg.stderr
    down = spool(config_file, "dead", "list", env={"SPOOL_BUS__URL": "amqp://guest:guest@127.0.0.1:1/"})
    assert down.returncode == 3 and "broker_unreachable" in down.stderr and "Traceback" not in down.stderr
    assert len(down.stderr.strip().splitlines()) == 1
    unknown_daemon = spool(config_file, "run", "teleporter")
    assert unknown_daemon.returncode == 1 and "unknown daemon" in unknown_daemon.stderr
    missing = spool(config_file, "ingest", str(tmp_path / "nope"), "--dataset", DATASET)
    assert missing.returncode == 1 and "does not exist" in missing.stderr


async def _registered(settings: Settings, n: int) -> bool:
    """Read in this process: a ``spool ls`` per poll started an interpreter each time (seconds on a
    loaded machine); what the command lists is checked once the files are there."""
    async with await Catalogue.open(settings.catalogue.url) as catalogue:
        return (await catalogue.queries.counts()).files == n


async def _depth(broker, name: str, n: int) -> bool:
    return await queue_depth(broker, name) == n
