"""The dashboard end to end in a real browser: ingest and the monitor run, files are published, and
headless Chromium (driven by Selenium through the system ``chromedriver``) must show the work on the
page — the daemon with its counts, the failure with its reason, and throughput drawn over time.

Needs Debian's ``chromium`` and ``chromium-driver`` and the ``selenium`` package (the ``test``
extra). Without them the test is skipped with the reason, except on CI (``CI=true``), where it
fails: ``.ci/services.sh chromium`` installs them there, and a browser test that silently stops
running is worse than none.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import pytest

from daemons.ingest.handlers import service as ingest_service
from daemons.monitor.handlers import service as monitor_service
from tests.browser_fixtures import browser  # noqa: F401  (the fixture)
from tests.conftest import cloudevent, publish_raw, running, wait_for
from tests.monitor_fixtures import monitor_config, resources_of

pytestmark = pytest.mark.integration
DATASET = "lst1.20261123.run012345.dl0"
GOOD_FILES = 5

# What the page shows, read in the browser: table text, one daemon's counts, the chart's series.
READ_PAGE = """
const text = (id) => document.getElementById(id).innerText;
const row = [...document.querySelectorAll("#daemons tr")].find((r) => r.cells[0].innerText === "ingest");
const peak = (name) => {
  const e = document.querySelector('#throughput .legend[data-series="' + name + '"]');
  return e ? Number(e.dataset.peak) : null;
};
return {
  meta: text("meta"), failures: text("failures"), queues: text("queues"),
  ingest: row ? [...row.cells].map((c) => c.innerText) : null,
  lines: document.querySelectorAll("#throughput svg polyline").length,
  bus_peak: peak("bus messages"), ingest_peak: peak("ingest processed"),
};
"""


@pytest.fixture
def config_file(tmp_path: Path, tag: str) -> Path:
    return monitor_config(tmp_path, tag)


async def test_dashboard_in_chromium_shows_published_work_failures_and_throughput(
    settings,
    broker,
    topology,
    browser,  # noqa: F811  (the fixture imported above)
):
    folder = settings.landing_areas["lst1"] / "run012345"
    folder.mkdir(parents=True)
    async with running([ingest_service, monitor_service], settings) as process:
        res = resources_of(process)
        # Selenium blocks: every call runs in a thread while this loop keeps the daemons going.
        await asyncio.to_thread(browser.get, f"http://127.0.0.1:{res.web.port}/")
        for i in range(GOOD_FILES):
            (folder / f"f{i}.fits.fz").write_bytes(os.urandom(1000 + i))
            body = cloudevent({"path": str(folder / f"f{i}.fits.fz"), "dataset": DATASET})
            await publish_raw(broker, settings, "file.ready", body)
        missing = cloudevent({"path": str(folder / "never-written.fits.fz"), "dataset": DATASET})
        await publish_raw(broker, settings, "file.ready", missing)

        page: dict[str, Any] = {}

        async def shows_the_work() -> bool:
            page.update(await asyncio.to_thread(browser.execute_script, READ_PAGE))
            ingest = page["ingest"]
            return (
                ingest is not None
                and ingest[7] == str(GOOD_FILES)  # processed
                and ingest[9] == "1"  # dead-lettered
                and "file_missing" in page["failures"]
                and (page["ingest_peak"] or 0) > 0
                and (page["bus_peak"] or 0) > 0
            )

        try:
            await wait_for(shows_the_work, timeout=90, interval=0.5)
        except AssertionError:
            raise AssertionError(f"the page did not show the work; it shows {page}") from None
    assert page["ingest"][1] == "alive"
    assert "never-written.fits.fz" in page["failures"]  # the example file of the failure group
    assert "ingest" in page["queues"] and "monitor" in page["queues"]
    assert page["lines"] >= 2  # bus messages and ingest processed, over time
    assert "as of" in page["meta"]
