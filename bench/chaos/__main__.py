"""``python -m bench.chaos [--short] [--files N] [--seed S] [--catalogue sqlite|postgresql|both]``:
one chaos run per catalogue; exit 1 when an invariant fails (docs/chaos.md). ``--cluster``: the
several-node run (the three-node RabbitMQ cluster, every daemon ``--instances`` times, 5,000 files
on PostgreSQL; ``make chaos-cluster``)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from .broker import available
from .run import Options, run_chaos
from .workload import PG_ADMIN_URL


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.chaos", description=__doc__)
    p.add_argument("--short", action="store_true", help="the slow test's size (600 files, ~2 min)")
    p.add_argument("--files", type=int)
    p.add_argument("--datasets", type=int)
    p.add_argument("--rate", type=float, help="file.ready events a second")
    p.add_argument("--seed", type=int, help="replay a run's schedule of faults and files")
    p.add_argument(
        "--catalogue",
        choices=["sqlite", "postgresql", "both"],
        help="default: sqlite; postgresql with --cluster",
    )
    p.add_argument(
        "--cluster", action="store_true", help="on the three-node cluster of .ci/services.sh rabbitmq-cluster"
    )
    p.add_argument(
        "--instances", type=int, default=2, help="with --cluster: of each daemon, one per node (default 2)"
    )
    p.add_argument("--pg-url", default=PG_ADMIN_URL, help="where a fresh database is created (and dropped)")
    p.add_argument("--settle-timeout", type=float)
    p.add_argument("--workdir", type=Path, help="parent of the run's directory (default: the system's tmp)")
    p.add_argument("--keep", action="store_true", help="keep the run's directory (logs, storage, library)")
    a = p.parse_args()
    if (why := available()) is not None:
        sys.exit(f"chaos: {why}")
    given = {k: v for k, v in {"files": a.files, "datasets": a.datasets, "rate": a.rate,
                                "settle_timeout": a.settle_timeout}.items() if v is not None}  # fmt: skip
    failed = []
    chosen = a.catalogue or ("postgresql" if a.cluster else "sqlite")
    for catalogue in ["sqlite", "postgresql"] if chosen == "both" else [chosen]:
        common = dict(seed=a.seed, catalogue=catalogue, pg_admin_url=a.pg_url, workdir=a.workdir, keep=a.keep)
        if a.cluster:
            opts = Options.several_nodes(short=a.short, instances=a.instances, **common, **given)
        else:
            opts = Options.short(**common, **given) if a.short else Options(**common, **given)  # type: ignore[arg-type]
        report = asyncio.run(run_chaos(opts))
        if not report.ok:
            failed.append(f"{catalogue} (seed {report.seed})")
    if failed:
        sys.exit(f"chaos: invariants failed on {', '.join(failed)}")


if __name__ == "__main__":
    main()
