"""``bench/recall.py`` at a toy size, as ``make`` would run it at the issue's: one request for all
the recalled files, without the first-come-first-served comparison."""

from __future__ import annotations

import argparse
from pathlib import Path

from bench.recall import main


async def test_one_request_for_every_recalled_file_mounts_each_cartridge_once(tmp_path: Path) -> None:
    args = argparse.Namespace(
        files=60, cartridges=3, recall=30, drives=2, seed=5, dir=str(tmp_path), per_request=30, no_fcfs=True
    )
    r = await main(args)
    assert (r["recalled"], r["requests"], r["requests_done"]) == (30, 1, 1)
    assert r["spool"]["mounts"] == r["lower_bound_mounts"] and r["mounts_ratio"] == 1.0
    assert r["fcfs"] is None and r["time_ratio"] is None
    assert list(tmp_path.iterdir()) == []  # its work directory removed
