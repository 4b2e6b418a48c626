"""The dashboard page: served at ``/``, and its script renders a real ``/api/status`` document
(run under Node with a stand-in DOM when Node is installed; no browser needed); fifty viewers at
once neither fail nor stop the monitor counting. The real browser test is
``test_monitor_browser.py``."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from pathlib import Path

import aiohttp
import pytest

from common.messages import FileFailed, FileIngested, Message
from daemons.monitor.dashboard import SCRIPT
from daemons.monitor.handlers import service as monitor_service
from daemons.monitor.web import STATUS_MAX_AGE
from tests.conftest import running, wait_for
from tests.monitor_fixtures import get_json, monitor_config, publish_many, resources_of

pytestmark = pytest.mark.integration

HARNESS = """
const fs = require("fs");
const els = {};
global.document = { getElementById: (id) => (els[id] = els[id] || { textContent: "", innerHTML: "" }) };
global.setInterval = () => 0;
global.fetch = async () => ({ json: async () => JSON.parse(fs.readFileSync(process.argv[3], "utf8")) });
// the page is strict code: its functions live inside the eval unless handed out
eval(fs.readFileSync(process.argv[2], "utf8") + ";globalThis.tick = tick;");
globalThis.tick().then(() => process.stdout.write(JSON.stringify(els)));
"""


@pytest.fixture
def config_file(tmp_path: Path, tag: str) -> Path:
    return monitor_config(tmp_path, tag)


async def test_dashboard_is_served_and_renders_the_status_document(settings, broker, topology, tmp_path):
    async with running([monitor_service], settings) as process:
        res = resources_of(process)
        base = f"http://127.0.0.1:{res.web.port}"
        await publish_many(
            broker, settings, [FileFailed(daemon="ingest", reason="disk_full", error="<ENOSPC>", attempts=1)]
        )
        await wait_for(lambda: _is(res.state.events["file.failed"] == 1))
        await wait_for(
            lambda: _is(res.observed.queues is not None)
        )  # the poller's first look, on a busy machine
        async with aiohttp.ClientSession() as session, session.get(base + "/") as response:
            assert response.status == 200 and response.content_type == "text/html"
            assert 'src="dashboard.js"' in await response.text()
        async with aiohttp.ClientSession() as session, session.get(base + "/dashboard.js") as response:
            assert response.status == 200 and "api/status" in await response.text()
        doc = await get_json(base + "/api/status")
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed: the page's script was not run")
    script = tmp_path / "page.js"
    script.write_text(SCRIPT)
    (tmp_path / "status.json").write_text(json.dumps(doc))
    (tmp_path / "harness.js").write_text(HARNESS)
    out = subprocess.run(
        [node, str(tmp_path / "harness.js"), str(script), str(tmp_path / "status.json")],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    shown = json.loads(out.stdout)
    assert "disk_full" in shown["failures"]["innerHTML"]
    assert "&lt;ENOSPC&gt;" in shown["failures"]["innerHTML"]  # error text escaped, not injected
    assert "monitor" in shown["daemons"]["innerHTML"]
    assert "ingest" in shown["queues"]["innerHTML"]


async def test_fifty_viewers_all_get_answers_while_the_monitor_keeps_counting(settings, broker, topology):
    viewers, seconds = 50, 4.0
    async with running([monitor_service], settings) as process:
        res = resources_of(process)
        [runner] = process.runners
        base = f"http://127.0.0.1:{res.web.port}"
        stop = asyncio.Event()
        answers: list[tuple[str, int]] = []
        published = 0

        async def viewer(session: aiohttp.ClientSession) -> None:
            """What an open dashboard does, only much more often: the data, and the page now and then."""
            while not stop.is_set():
                for path in ("/api/status", "/api/status", "/"):
                    async with session.get(base + path) as response:
                        body = await response.read()
                        answers.append((path, response.status))
                        if path == "/api/status":
                            assert json.loads(body)["source"] == "monitor"
                await asyncio.sleep(0.05)

        async def events() -> None:
            nonlocal published
            while not stop.is_set():
                await publish_many(broker, settings, _night(published, 200))
                published += 200

        await wait_for(lambda: _is(runner.stats.processed > 0))  # its own heartbeat: consuming
        before, computed_before = runner.stats.processed, res.web.status_computations
        connector = aiohttp.TCPConnector(limit=0)
        timeout = aiohttp.ClientTimeout(total=60)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            started = asyncio.get_running_loop().time()
            tasks = [asyncio.create_task(viewer(session)) for _ in range(viewers)]
            tasks.append(asyncio.create_task(events()))
            await asyncio.sleep(seconds)
            stop.set()
            await asyncio.gather(*tasks)
            elapsed = asyncio.get_running_loop().time() - started
        during = runner.stats.processed - before
        computed = res.web.status_computations - computed_before
        await wait_for(
            lambda: _is(res.state.events["file.ingested"] + res.state.events["file.failed"] == published)
        )
    assert published > 0 and during > 0  # it kept consuming while being watched
    assert len(answers) >= 3 * viewers and all(status == 200 for _path, status in answers)
    # One document built per interval, shared by every viewer, not one per request.
    requests = sum(1 for path, _ in answers if path == "/api/status")
    assert computed <= elapsed / STATUS_MAX_AGE + 2 < requests


def _night(start: int, n: int) -> list[Message]:
    """File facts as ingest publishes them, one in twenty a failure."""
    out: list[Message] = []
    for i in range(start, start + n):
        name = f"run1/f{i}"
        if i % 20 == 0:
            out.append(
                FileFailed(daemon="ingest", reason="file_missing", error="gone", attempts=1, name=name)
            )
        else:
            out.append(
                FileIngested(name=name, dataset="d", size=1, adler32="00000001", storage="d1", pfn=name)
            )
    return out


async def _is(value: bool) -> bool:
    return value
