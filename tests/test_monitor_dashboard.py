"""The dashboard page: served at ``/``, and its script renders a real ``/api/status`` document
(run under Node with a stand-in DOM when Node is installed; no browser needed)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import aiohttp
import pytest

from common.messages import FileFailed
from daemons.monitor.dashboard import PAGE
from daemons.monitor.handlers import service as monitor_service
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
        async with aiohttp.ClientSession() as session, session.get(base + "/") as response:
            assert response.status == 200 and response.content_type == "text/html"
            assert "api/status" in await response.text()
        doc = await get_json(base + "/api/status")
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed: the page's script was not run")
    script = tmp_path / "page.js"
    script.write_text(PAGE.split("<script>")[1].split("</script>")[0])
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


async def _is(value: bool) -> bool:
    return value
