"""``bench/find.py`` at a tiny size on both catalogues: the bulk load gives the catalogue the
files, metadata and replicas it says, and each query prints its plan and the rows ``spool find``
returns (the same as the catalogue's answer to the query)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from bench.find import FILES_PER_DATASET, QUERIES
from common.catalogue import Catalogue
from tests.catalogue_fixtures import catalogue_url  # noqa: F401

pytestmark = [pytest.mark.integration, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[1]
FILES = 3 * FILES_PER_DATASET


async def test_a_tiny_find_bench_loads_the_catalogue_and_times_each_query(catalogue_url: str) -> None:  # noqa: F811
    done = subprocess.run(
        [sys.executable, "-P", "bench/find.py", "--url", catalogue_url, "--files", str(FILES),
         "--repeat", "1"],
        cwd=REPO, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    async with await Catalogue.open(catalogue_url) as c:
        counts = await c.queries.counts()
        assert (counts.files, counts.datasets, counts.replicas) == (FILES, 3, {"available": FILES})
        fields = {(f.scope, f.key): f.count for f in await c.metadata.fields()}
        assert sum(n for (scope, _), n in fields.items() if scope == "file") == 10 * FILES
        assert fields[("dataset", "telescope")] == 3
        expected = [len(await c.queries.find_files(list(q), limit=1000)) for q in QUERIES]
    printed = [int(n) for n in re.findall(r"^find: (\d+) files", done.stdout, re.M)]
    assert printed == expected and sum(expected) > 0
    assert done.stdout.count("EXPLAIN") == 0 and done.stdout.count("=== spool find") == len(QUERIES)
