"""``spool dataset close | show | delete`` and ``spool datasets --state`` as an operator runs them
(a subprocess, a config file), on a catalogue the test fills: SQLite, and PostgreSQL through the
config's ``catalogue.url``. Delete asks first unless ``--yes``, and is refused while a rule
without lifetime holds the dataset unless ``--force``."""

# Fixtures imported from catalogue_fixtures (not conftest) reappear as test parameters:
# ruff: noqa: F811

from __future__ import annotations

import json
from pathlib import Path

from common.catalogue import Catalogue
from common.catalogue.policy import Rule, endpoint_attributes
from common.config import Settings, load_settings
from tests.catalogue_fixtures import catalogue_url, rec  # noqa: F401
from tests.cli_fixtures import spool
from tests.conftest import write_config

DS = "lst1.20261123.run012345.dl0"
HOLDER = Rule("keep-at-disk2", endpoints="disk2", datasets=".*")


def make_config(tmp_path: Path, tag: str, url: str) -> Path:
    return write_config(
        tmp_path / "spool.toml", tmp_path / "state", tag,
        catalogue=f'url = "{url}"', **{"storage.disk2": 'root = "storage/disk2"'},
    )  # fmt: skip


async def fill(settings: Settings, url: str, *, rule: bool) -> None:
    async with await Catalogue.open(url) as cat:
        await cat.endpoints.sync(settings.storage)
        await cat.ingest.register([rec("a", pfn="a"), rec("b", pfn="b")])
        if rule:
            await cat.replication.add_rule(HOLDER)
            await cat.replication.activate_rule(HOLDER.id)
            table = {n: endpoint_attributes(n, e.kind, e.attributes) for n, e in settings.storage.items()}
            await cat.replication.plan_copies([("a", DS, {}), ("b", DS, {})], [HOLDER], table)


async def test_close_then_show_and_list_by_state(tmp_path: Path, tag: str, catalogue_url: str) -> None:
    config = make_config(tmp_path, tag, catalogue_url)
    await fill(load_settings(config), catalogue_url, rule=True)

    closed = spool(config, "dataset", "close", DS)
    assert closed.returncode == 0 and "closed" in closed.stdout
    again = spool(config, "dataset", "close", DS, "--json")
    assert json.loads(again.stdout) == {"dataset": DS, "outcome": "already", "manifest": None}
    unknown = spool(config, "dataset", "close", "lst1.20261123.run099999.dl0")
    assert unknown.returncode == 1 and "no dataset named" in unknown.stderr

    shown = json.loads(spool(config, "dataset", "show", DS, "--wanted", "--json").stdout)
    assert (shown["state"], shown["files"], shown["bytes"]) == ("closed", 2, 2000)
    assert shown["closed_by"].startswith("cli")
    assert {(c["storage"], c["state"], c["copies"]) for c in shown["copies"]} == {
        ("disk1", "available", 2), ("disk2", "queued", 2),
    }  # fmt: skip
    assert [(w["storage"], w["missing"]) for w in shown["wanted"]] == [("disk2", 2)]
    assert {m["name"] for m in shown["missing"]} == {"a", "b"}
    text = spool(config, "dataset", "show", DS)
    assert text.returncode == 0 and "missing" in text.stdout and "disk2" in text.stdout

    listed = json.loads(spool(config, "datasets", "--state", "closed", "--json").stdout)
    assert [d["name"] for d in listed] == [DS]
    assert json.loads(spool(config, "datasets", "--state", "open", "--json").stdout) == []
    bad = spool(config, "datasets", "--state", "shut")
    assert bad.returncode == 1 and "--state is one of" in bad.stderr


async def test_delete_asks_first_and_is_refused_while_a_rule_holds_it(
    tmp_path: Path, tag: str, catalogue_url: str
) -> None:
    config = make_config(tmp_path, tag, catalogue_url)
    await fill(load_settings(config), catalogue_url, rule=True)

    declined = spool(config, "dataset", "delete", DS, input_="n\n")
    assert declined.returncode == 1 and "delete dataset" in declined.stdout
    held = spool(config, "dataset", "delete", DS, "--yes")
    assert held.returncode == 1 and "keep-at-disk2" in held.stderr and "--force" in held.stderr
    state = json.loads(spool(config, "dataset", "show", DS, "--json").stdout)["state"]
    assert state == "open"  # neither the refusal nor the declined prompt changed anything

    forced = spool(config, "dataset", "delete", DS, "--force", "--json", input_="y\n")
    assert forced.returncode == 0, forced.stderr
    result = json.loads(forced.stdout[forced.stdout.index("{") :])
    assert (result["outcome"], result["holders"], result["disk_copies"]) == ("deleting", ["keep-at-disk2"], 2)
    shown = json.loads(spool(config, "dataset", "show", DS, "--json").stdout)
    assert shown["state"] == "deleting" and shown["deleted_by"].startswith("cli")
    again = spool(config, "dataset", "delete", DS, "--yes")
    assert again.returncode == 0 and "already" in again.stdout


async def test_delete_without_a_holding_rule_needs_only_yes(
    tmp_path: Path, tag: str, catalogue_url: str
) -> None:
    config = make_config(tmp_path, tag, catalogue_url)
    await fill(load_settings(config), catalogue_url, rule=False)
    deleted = spool(config, "dataset", "delete", DS, "--yes")
    assert deleted.returncode == 0 and "2 disk cop(ies)" in deleted.stdout
    unknown = spool(config, "dataset", "delete", "lst1.20261123.run099999.dl0", "--yes")
    assert unknown.returncode == 1 and "no dataset named" in unknown.stderr
