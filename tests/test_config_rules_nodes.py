"""Config rules of several nodes on one catalogue, as the daemons apply them at start-up
(``common.placement.sync_config_rules``): each node's file declares its rules, none removes what
another node's file declares, and none replaces a rule added by hand — which is logged."""

from __future__ import annotations

from pathlib import Path

from structlog.testing import capture_logs

from common.catalogue import Catalogue
from common.catalogue.policy import Rule
from common.config import Settings
from common.placement import sync_config_rules
from tests.replication_fixtures import replication_settings

RULES = {
    "rules.offsite": 'datasets = "lst1\\\\..*"\nendpoints = "disk2"',
    "rules.archive": 'datasets = ".*"\nendpoints = "disk3"\npriority = 5',
}


def node(settings: Settings, name: str, *rule_ids: str) -> Settings:
    """``settings`` as node ``name`` reads it: its file holds only ``rule_ids``."""
    rules = {k: v for k, v in settings.rules.items() if k in rule_ids}
    return settings.model_copy(update={"node": name, "rules": rules})


async def test_two_nodes_files_and_a_rule_added_by_hand_share_one_catalogue(tmp_path: Path, tag: str) -> None:
    base = replication_settings(tmp_path, tag, **RULES)
    a, b = node(base, "node-a", "offsite", "archive"), node(base, "node-b", "offsite")
    async with await Catalogue.open(base.catalogue.url) as catalogue:
        await catalogue.endpoints.sync(base.storage)
        await catalogue.replication.add_rule(Rule("archive", endpoints="disk2", datasets="raw\\..*"))
        with capture_logs() as logs:
            await sync_config_rules(catalogue, a)
            await sync_config_rules(catalogue, b)
        refused = [e for e in logs if e["event"] == "config_rule_refused"]
        assert [(e["node"], e["rule_id"]) for e in refused] == [("node-a", "archive")]
        assert "spool rule add" in refused[0]["reason"]
        views = {v.rule.id: v for v in await catalogue.replication.rule_views()}
        assert (views["archive"].rule.origin, views["archive"].rule.endpoints) == ("cli", "disk2")
        assert views["offsite"].declared_by == ["node-a", "node-b"]

        await sync_config_rules(catalogue, node(base, "node-a"))  # node-a's file now declares nothing
        assert sorted(v.rule.id for v in await catalogue.replication.rule_views()) == ["archive", "offsite"]
        await sync_config_rules(catalogue, node(base, "node-b"))
        assert [v.rule.id for v in await catalogue.replication.rule_views()] == ["archive"]
