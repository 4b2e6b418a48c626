"""A stop always ends (issue 16, class 2): a daemon process whose handler thread is blocked where
no cancellation reaches it (``open()`` of a FIFO nobody writes) still exits within
``bus.stop_grace`` + ``STOP_BOUND`` of SIGTERM, says what was still running, and its message goes
back to the queue."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from common.runtime import EXIT_STOP_OVERRAN, STOP_BOUND
from tests.conftest import cloudevent, publish_raw, queue_depth, wait_for, write_config

pytestmark = pytest.mark.integration

GRACE = 1.0

# A daemon of its own, as ``spool run`` runs one, whose handler blocks a worker thread for ever.
BLOCKED_DAEMON = """
import asyncio, sys
from pathlib import Path

from common.bus.service import Service
from common.config import load_settings
from common.logging import configure_logging
from common.messages import FileReady
from common.runtime import run_loop, run_services

config, fifo, started = sys.argv[1:4]
service = Service("ingest")


@service.handler(FileReady)
async def handle(msg, ctx):
    Path(started).touch()
    await asyncio.to_thread(open, fifo)  # no writer: blocks in the kernel, uncancellable


settings = load_settings(config)
configure_logging(settings.log, daemon="ingest")
sys.exit(run_loop(run_services([service], settings)))
"""


@pytest.fixture
def config_file(tmp_path: Path, tag: str) -> Path:
    state = tmp_path / "state"
    (state / "landing").mkdir(parents=True)
    path = write_config(tmp_path / "spool.toml", state, tag)
    path.write_text(path.read_text().replace("stop_grace = 10", f"stop_grace = {GRACE}"))
    return path


async def test_sigterm_ends_a_daemon_with_a_thread_blocked_in_open_of_a_fifo(
    tmp_path, config_file, settings, broker, topology
):
    assert settings.bus.stop_grace == GRACE
    fifo, started, script = tmp_path / "fifo", tmp_path / "started", tmp_path / "blocked_daemon.py"
    os.mkfifo(fifo)
    script.write_text(BLOCKED_DAEMON)
    root = Path(__file__).resolve().parent.parent
    log = tmp_path / "daemon.log"
    with log.open("wb") as out:
        daemon = subprocess.Popen(
            [sys.executable, str(script), str(config_file), str(fifo), str(started)],
            stdout=out, stderr=out, cwd=root, env={**os.environ, "PYTHONPATH": str(root)},
        )  # fmt: skip
    try:
        body = cloudevent({"path": "/l/a", "dataset": "d"}, id_="blocked-1")
        await publish_raw(broker, settings, "file.ready", body, message_id="blocked-1")
        await wait_for(lambda: _exists(started), timeout=30)
        signalled = time.monotonic()
        daemon.send_signal(signal.SIGTERM)
        code = daemon.wait(timeout=GRACE + STOP_BOUND + 10)
        took = time.monotonic() - signalled
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
    assert code == EXIT_STOP_OVERRAN, log.read_text()[-3000:]
    assert GRACE + STOP_BOUND - 0.5 <= took <= GRACE + STOP_BOUND + 3  # the bound, not sooner
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    [overran] = [line for line in lines if line["event"] == "stop_overran"]
    assert overran["exit_code"] == EXIT_STOP_OVERRAN
    assert overran["in_flight"] == {"ingest": ["blocked-1"]}  # the message whose thread hung
    assert any(not t.startswith(("MainThread", "spool-stop-watchdog")) for t in overran["threads"])
    # The broker requeued the unacked message: nothing lost, nothing dead-lettered.
    await wait_for(lambda: _depth_is(broker, settings.queue("ingest"), 1))
    assert await queue_depth(broker, settings.dead_queue("ingest")) == 0


async def _exists(path: Path) -> bool:
    return path.exists()


async def _depth_is(broker, name: str, n: int) -> bool:
    return await queue_depth(broker, name) == n
