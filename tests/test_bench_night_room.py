"""``bench/night.py`` refuses a night its file system (or RAM, on a tmpfs) cannot hold, before it
writes a byte: a night that fills /dev/shm brings the OOM killer down on the broker."""

from __future__ import annotations

import random
import shutil
from collections import namedtuple
from pathlib import Path

import pytest

from bench.ingest import BenchError
from bench.night import check_room

Usage = namedtuple("Usage", "total used free")


def test_a_night_that_fits_is_let_through(tmp_path: Path) -> None:
    check_room(tmp_path, 100, 4000, random.Random(1))  # ~0.1 GB of a few hundred files' pages


def test_a_night_larger_than_its_disk_is_refused_with_the_figures(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(shutil, "disk_usage", lambda _p: Usage(10**12, 10**12 - 10**9, 10**9))
    with pytest.raises(BenchError) as caught:
        check_room(tmp_path, 500_000, 40_000, random.Random(1))
    message = str(caught.value)
    assert "GB is free" in message and "--scale" in message and str(tmp_path) in message
