"""``spool instances``: every daemon instance registered with the catalogue, alive or dead, and the
work held past the limit, as an operator reads them (the real command, a real catalogue)."""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta
from pathlib import Path

from sqlalchemy import update

from common.catalogue import Catalogue
from common.catalogue.instances import InstanceInfo
from common.catalogue.schema import recall_files, recalls
from common.catalogue.sql import utcnow
from common.config import load_settings
from tests.cli_fixtures import spool
from tests.conftest import write_config

WIDE = {"COLUMNS": "300"}


def test_instances_alive_and_dead_and_a_stalled_read_are_listed(tmp_path: Path, tag: str) -> None:
    config = write_config(tmp_path / "spool.toml", tmp_path / "var", tag)
    settings = load_settings(config)
    now = utcnow()

    async def lay() -> None:
        async with await Catalogue.open(settings.catalogue.url) as c:
            await c.instances.register(
                InstanceInfo("tape@node-a:11:aa", "tape", "node-a", 11, now, now, now + timedelta(seconds=30))
            )
            old = now - timedelta(hours=2)
            await c.instances.register(
                InstanceInfo("recall@node-b:22:bb", "recall", "node-b", 22, old, old, old)
            )

            def staging(conn):  # type: ignore[no-untyped-def]
                conn.execute(recalls.insert().values(
                    id="r1", state="active", destination="disk1", priority=3, files=1, done=0, failed=0,
                    created=old, updated=old, announced=False,
                ))  # fmt: skip
                conn.execute(recall_files.insert().values(
                    recall_id="r1", name="lst1/a.fits", state="staging", cartridge="V00001", fseq=3,
                    updated=old, holder="recall@node-b:22:bb", announced=False,
                ))  # fmt: skip
                conn.execute(update(recalls).values(updated=old))

            await c.write(staging)

    asyncio.run(lay())
    shown = spool(config, "instances", env=WIDE)
    assert shown.returncode == 0, shown.stderr
    out = shown.stdout
    assert "tape@node-a:11:aa" in out and "renewed" in out
    assert ("recall@node-b:22:bb" in out and "ran out 2h00m ago" in out) or "ran out 1h59m ago" in out
    assert "stalled tape_read: 1 held by recall@node-b:22:bb" in out and "lst1/a.fits from V00001" in out
    assert "stalled recall: 1 held by nobody" in out

    data = json.loads(spool(config, "instances", "--json", "--daemon", "tape").stdout)
    assert [(i["id"], i["alive"]) for i in data["instances"]] == [("tape@node-a:11:aa", True)]
    # Within the limit given, nothing is stalled.
    calm = json.loads(spool(config, "instances", "--json", "--stall", "36000").stdout)
    assert calm["stalled"] == [] and len(calm["instances"]) == 2
