"""``spool status`` and ``spool queues`` as an operator runs them, with and without the monitor."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from common.catalogue import Catalogue
from common.messages import FileFailed
from daemons.monitor.handlers import service as monitor_service
from tests.conftest import cloudevent, publish_raw, running, wait_for
from tests.monitor_fixtures import monitor_config, publish_many, resources_of

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def config_file(tmp_path: Path, tag: str) -> Path:
    return monitor_config(tmp_path, tag)


async def spool(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The CLI in a subprocess, awaited: the monitor under test runs on this event loop and must
    keep answering meanwhile."""
    proc = await asyncio.create_subprocess_exec(
        *_argv(config, *args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=120)
    assert proc.returncode is not None
    return subprocess.CompletedProcess(args, proc.returncode, out.decode(), err.decode())


def _argv(config: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "daemons", "--config", str(config), *args]


async def test_status_json_comes_from_the_monitor_when_it_runs(settings, config_file, broker, topology):
    async with running([monitor_service], settings) as process:
        res = resources_of(process)
        await publish_many(
            broker,
            settings,
            [FileFailed(daemon="ingest", reason="disk_full", error="ENOSPC", attempts=8, name="a")],
        )
        await wait_for(lambda: _is(res.state.events["file.failed"] == 1 and bool(res.state.instances)))
        await wait_for(lambda: _is(res.observed.queues is not None and len(res.state.history) >= 2))
        result = await spool(config_file, "status", "--json")
        screen = await spool(config_file, "status")
    assert screen.returncode == 0, screen.stderr
    assert "disk_full" in screen.stdout and "throughput over the last" in screen.stdout
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["source"] == "monitor" and doc["monitor"]["reachable"] is True
    assert [(d["daemon"], d["state"]) for d in doc["daemons"]] == [("monitor", "alive")]
    assert [(f["reason"], f["count"], f["example"]) for f in doc["failures"]] == [("disk_full", 1, "a")]
    assert {q["daemon"] for q in doc["queues"]["queues"]} >= {"ingest", "monitor"}
    assert doc["alerts"][0]["reason"] == "disk_full"
    assert doc["throughput"] and doc["throughput"][-1]["processed"].keys() <= {"monitor"}


async def test_status_without_the_monitor_says_so_and_shows_queues_and_catalogue_failures(
    settings, config_file, broker, topology
):
    await publish_raw(broker, settings, "file.ready", cloudevent({"path": "/l/1", "dataset": "d"}))
    async with await Catalogue.open(settings.catalogue.url) as catalogue:
        await catalogue.endpoints.sync(settings.storage)
        for i in range(3):
            await catalogue.history.record_failure(
                request_id=f"r{i}", kind="ingest", daemon="ingest", reason="checksum_mismatch",
                error=f"adler32 differs ({i})", attempts=1, final=True, name=f"f{i}",
            )  # fmt: skip
        await catalogue.history.record_failure(
            request_id="r9", kind="ingest", daemon="ingest", reason="destination_not_writable",
            error="no write pools online", attempts=2, final=False, name="f9",
        )  # fmt: skip
    result = await spool(config_file, "status", "--json")
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["source"] == "direct" and doc["monitor"]["reachable"] is False
    assert doc["daemons"] is None
    assert any("monitor not running" in m for m in doc["missing"])
    [ingest] = [q for q in doc["queues"]["queues"] if q["daemon"] == "ingest"]
    assert ingest["ready"] == 1
    groups = {(f["reason"], f["state"]): f["count"] for f in doc["failures"]}
    assert groups == {("checksum_mismatch", "failed"): 3, ("destination_not_writable", "retrying"): 1}
    newest = {f["reason"]: (f["example"], f["error"]) for f in doc["failures"]}
    assert newest["checksum_mismatch"] == ("f2", "adler32 differs (2)")  # each group's latest failure
    assert [e["name"] for e in doc["endpoints"]] == ["disk1"]

    screen = await spool(config_file, "status")
    assert screen.returncode == 0, screen.stderr
    assert "monitor not running" in screen.stdout and "checksum_mismatch" in screen.stdout


async def test_queues_json_lists_every_daemon_queue_with_its_counts(settings, config_file, broker, topology):
    for i in range(2):
        await publish_raw(broker, settings, "file.ready", cloudevent({"path": f"/l/{i}", "dataset": "d"}))
    result = await spool(config_file, "queues", "--json")
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    by_daemon = {q["daemon"]: q for q in doc["queues"]}
    assert set(by_daemon) == {"ingest", "replicator", "tape", "recall", "monitor"}
    ingest = by_daemon["ingest"]
    assert ingest["queue"] == settings.queue("ingest") and ingest["ready"] == 2 and ingest["dead"] == 0
    assert [t["queue"] for t in ingest["retry"]] == [settings.retry_queue("ingest", t) for t in range(3)]
    assert ingest["retrying"] == 0
    assert doc["amqp"]["reachable"] is True


async def test_queues_watch_prints_a_document_per_refresh_until_interrupted(config_file, broker, topology):
    watcher = subprocess.Popen(
        _argv(config_file, "queues", "--json", "--watch", "0.5"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
    )  # fmt: skip
    try:
        assert watcher.stdout is not None
        first, second = watcher.stdout.readline(), watcher.stdout.readline()
        watcher.send_signal(signal.SIGINT)
        assert watcher.wait(timeout=60) == 0
    finally:
        if watcher.poll() is None:
            watcher.kill()
    assert {q["daemon"] for q in json.loads(first)["queues"]} == {
        q["daemon"] for q in json.loads(second)["queues"]
    }


async def _is(value: bool) -> bool:
    return value
