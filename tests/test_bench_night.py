"""``bench/night.py`` at a tiny size: every daemon its own process, and every file announced ends
up registered, on the offsite disk and on tape, as its JSON figures say."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.chaos.fleet import DAEMONS

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
FILES = 200


def test_a_tiny_night_reaches_every_stage(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "bench/night.py", "--files", str(FILES), "--announce-seconds", "3",
         "--mount-max-age", "1", "--interval", "5", "--no-limits", "--json",
         "--state-dir", str(tmp_path / "state")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    figures = json.loads(next(ln for ln in done.stdout.splitlines() if ln.startswith("{")))

    assert figures["files"] == FILES
    for stage in ("registered", "offsite", "tape"):
        assert figures["stages"][stage]["files"] == FILES, stage
        assert figures["stages"][stage]["seconds"] > 0, stage
    for daemon in DAEMONS:
        assert figures["processes"][daemon]["peak_rss_mb"] > 0, daemon
    # The bus figures come from the management API: every file announced was delivered to ingest
    # once, and the monitor heard at least its file.ready, file.ingested and file.archived.
    bus = figures["bus"]
    assert bus["queues"]["ingest"]["delivered"] >= FILES
    assert bus["queues"]["monitor"]["delivered"] >= 3 * FILES
    assert bus["published"] >= 3 * FILES
    tape = figures["tape"]  # the drives' time by the timing model; small files in aggregates
    assert 0 < tape["tape_files"] < FILES and tape["seconds"] > 0
    assert tape["real_size_seconds"] > tape["seconds"] and tape["bytes_written"] > tape["data_bytes"]
