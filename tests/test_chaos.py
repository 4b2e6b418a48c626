"""The chaos run's short version (bench/chaos, docs/chaos.md): 600 files through random SIGKILLs,
SIGTERMs and broker outages on a private RabbitMQ node, on SQLite and on a fresh PostgreSQL
database; afterwards every invariant must hold. ``make chaos`` runs the long version."""

from __future__ import annotations

import os

import pytest

from bench.chaos.broker import available
from bench.chaos.run import Options, run_chaos
from tests.catalogue_fixtures import PG_REQUIRED, PG_URL, pg_unreachable

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _seed() -> int | None:
    """``SPOOL_CHAOS_SEED`` replays a failed run's schedule (its seed is printed first)."""
    seed = os.environ.get("SPOOL_CHAOS_SEED")
    return int(seed) if seed else None


@pytest.mark.parametrize("catalogue", ["sqlite", "postgresql"])
async def test_faults_lose_nothing_duplicate_nothing_and_announce_every_fact(catalogue, tmp_path, capsys):
    if (why := available()) is not None:
        pytest.skip(why)
    if catalogue == "postgresql" and (why := await pg_unreachable()) is not None:
        if PG_REQUIRED:
            pytest.fail(why)
        pytest.skip(why)
    report = await run_chaos(
        Options.short(catalogue=catalogue, seed=_seed(), workdir=tmp_path, pg_admin_url=PG_URL)
    )
    failed = [c.line() for c in report.checks if not c.ok]
    assert not failed, f"seed {report.seed} ({catalogue}): " + "\n".join(failed + report.notes)
    assert sum(report.faults.kills.values()) >= 3 and sum(report.faults.terms.values()) >= 1
    assert len(report.faults.outages) >= 2
