"""The several-node chaos run's short version (bench/chaos, docs/chaos.md#several-nodes): every
daemon twice (two nodes' config files), the three-node RabbitMQ cluster (the run in a vhost of its
own), PostgreSQL, a few hundred files; one broker node SIGKILLed and started again, one instance of
each daemon SIGKILLed; afterwards every invariant must hold. ``make chaos-cluster`` runs 5,000 files.
"""

# ruff: noqa: F811 (pytest passes the imported fixture as the argument of the same name)
from __future__ import annotations

import os

import pytest

from bench.chaos.run import Options, run_chaos
from tests.catalogue_fixtures import PG_REQUIRED, PG_URL, pg_unreachable
from tests.cluster_fixtures import Cluster, rabbit_cluster  # noqa: F401

pytestmark = [pytest.mark.integration, pytest.mark.slow]


async def test_two_of_each_daemon_through_a_broker_node_kill_lose_nothing(rabbit_cluster: Cluster, tmp_path):
    if (why := await pg_unreachable()) is not None:
        if PG_REQUIRED or os.environ.get("CI") == "true":
            pytest.fail(why)
        pytest.skip(why)
    seed = os.environ.get("SPOOL_CHAOS_SEED")  # replays a failed run's schedule (printed first)
    opts = Options.several_nodes(
        short=True, seed=int(seed) if seed else None, workdir=tmp_path, pg_admin_url=PG_URL
    )
    report = await run_chaos(opts)
    failed = [c.line() for c in report.checks if not c.ok]
    assert not failed, f"seed {report.seed}: " + "\n".join(failed + report.notes)
    assert len(report.faults.nodes_killed) >= 1
    assert all(report.faults.kills.values()), report.faults.kills
    assert len(rabbit_cluster.running_nodes()) == 3  # the killed node is back in the cluster
