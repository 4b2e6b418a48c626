"""``bench/scale.py`` at a tiny size: one instance against two of ingest and the replicator on
PostgreSQL, SQLite ingest; every phase does every file, and two instances consuming when the work
arrives both get some of it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.scale import PHASES

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
FILES = 600  # three bulk replica.requests (256 + 256 + 88 files): one at least for each replicator


def test_a_tiny_scale_run_has_every_phase_and_shares_the_work(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "bench/scale.py", "--files", str(FILES), "--rounds", "1", "--json",
         "--state-dir", str(tmp_path / "state")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    figures = json.loads(next(ln for ln in done.stdout.splitlines() if ln.startswith("{")))

    assert set(figures["phases"]) == {p.name for p in PHASES}
    for phase in PHASES:
        f = figures["phases"][phase.name]
        assert f["files_done"] == FILES, phase.name
        if phase.queued:  # timed once every instance consumes: at this size all may be done by then
            assert f["rate"] >= 0 and f["seconds"] >= 0, phase.name
        else:
            assert f["rate"] > 0 and f["seconds"] > 0, phase.name
        assert len(f["messages"]) == phase.instances, phase.name
        assert all(cpu >= 0 for cpu in f["cpu_seconds"].values()), phase.name
        handled = sum(f["messages"].values())
        if phase.daemon == "ingest":  # every file.ready handled once
            assert handled == FILES, phase.name
        else:  # bulk requests of up to 256 files
            assert handled >= 3, phase.name
        if phase.instances == 2 and not (phase.backlog or phase.queued):
            assert all(share > 0 for share in f["shares"].values()), (phase.name, f["messages"])
        if phase.backlog:  # what the first instance left in the queue for the second is reported
            assert f["left_for_second"] is not None and f["left_for_second"] >= 0, phase.name
    ratios = figures["ratios"]
    for key in ("ingest_two_of_one", "replicator_two_of_one", "ingest_postgresql_of_sqlite"):
        assert ratios[key] > 0, key
    assert "ingest_two_of_one_queued" in ratios and "replicator_two_of_one_queued" in ratios
    assert figures["cpus"] >= 1
