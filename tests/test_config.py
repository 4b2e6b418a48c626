from pathlib import Path

import pytest

from common.config import load_settings
from common.errors import ConfigError


def test_environment_overrides_the_file(tmp_path: Path, monkeypatch):
    cfg = tmp_path / "s.toml"
    cfg.write_text('state_dir = "/srv/spool"\n[bus]\nmax_attempts = 3\n')
    monkeypatch.setenv("SPOOL_BUS__MAX_ATTEMPTS", "7")
    s = load_settings(cfg)
    assert s.bus.max_attempts == 7
    assert s.state_dir == Path("/srv/spool")
    assert s.catalogue.url == "sqlite+aiosqlite:////srv/spool/catalogue.db"


def test_amqp_url_variable_of_the_design_brief_is_honoured(tmp_path, monkeypatch):
    cfg = tmp_path / "s.toml"
    cfg.write_text("")
    monkeypatch.setenv("SPOOL_AMQP_URL", "amqp://u:p@broker:5672/")
    assert load_settings(cfg).bus.url == "amqp://u:p@broker:5672/"


def test_bad_value_error_names_the_key(tmp_path):
    cfg = tmp_path / "s.toml"
    cfg.write_text("[bus]\nretry_tiers = [5, -1]\n")
    with pytest.raises(ConfigError, match=r"bus\.retry_tiers"):
        load_settings(cfg)


def test_unknown_key_is_an_error_naming_it(tmp_path):
    cfg = tmp_path / "s.toml"
    cfg.write_text("[bus]\nmax_attempt = 3\n")
    with pytest.raises(ConfigError, match=r"bus\.max_attempt"):
        load_settings(cfg)


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "nope.toml")


def test_relative_storage_and_landing_paths_live_in_state_dir(tmp_path):
    cfg = tmp_path / "s.toml"
    cfg.write_text(f'state_dir = "{tmp_path}"\n[storage.d]\nroot = "st"\n[landing_areas]\na = "in"\n')
    s = load_settings(cfg)
    assert s.storage["d"].root == tmp_path / "st"
    assert s.landing_areas["a"] == tmp_path / "in"


def test_dataset_patterns_must_compile(tmp_path):
    cfg = tmp_path / "s.toml"
    cfg.write_text("[datasets]\npatterns = ['(unclosed']\n")
    with pytest.raises(ConfigError, match=r"datasets\.patterns"):
        load_settings(cfg)


def test_shipped_example_config_is_valid():
    s = load_settings(Path(__file__).parent.parent / "config" / "spool.toml")
    assert s.datasets.matches("lst1.20261123.run012345.dl0")
    assert not s.datasets.matches("lst1.2026.run1.dl0")


def test_the_node_is_the_host_name_unless_named_and_a_name_is_a_host_names_characters(tmp_path):
    import socket

    (tmp_path / "a.toml").write_text("")
    assert load_settings(tmp_path / "a.toml").node == socket.gethostname()
    (tmp_path / "b.toml").write_text('node = "archive-01.site.org"')
    assert load_settings(tmp_path / "b.toml").node == "archive-01.site.org"
    for bad in ["", "../etc", "a b", "-leading", "x" * 129, "ünï", "a/b", "a\\nb"]:
        (tmp_path / "c.toml").write_text(f"node = {bad!r}".replace("'", '"'))
        with pytest.raises(ConfigError, match="node"):
            load_settings(tmp_path / "c.toml")


def test_the_replicator_holds_fewer_messages_than_ingest_and_a_key_given_overrides_only_itself(tmp_path):
    # A replicator message is a bulk request of up to 256 files: 512 held took whole backlogs.
    path = tmp_path / "spool.toml"
    path.write_text(f'state_dir = "{tmp_path}"\n')
    settings = load_settings(path)
    assert (settings.daemon("replicator").prefetch, settings.daemon("replicator").concurrency) == (32, 32)
    assert (settings.daemon("ingest").prefetch, settings.daemon("ingest").concurrency) == (512, 256)
    assert settings.daemons["replicator"] == settings.daemon("replicator")

    path.write_text(
        f'state_dir = "{tmp_path}"\n[daemons.replicator]\nconcurrency = 8\n[daemons.ingest]\nprefetch = 64\n'
    )
    settings = load_settings(path)
    assert (settings.daemon("replicator").prefetch, settings.daemon("replicator").concurrency) == (32, 8)
    assert (settings.daemon("ingest").prefetch, settings.daemon("ingest").concurrency) == (64, 256)


def test_settings_resolve_copies_of_the_endpoints_given_never_the_callers_own(tmp_path: Path):
    from common.config import Settings, StorageEndpoint
    from common.tape.config import SimulatedLibraryConfig

    disk = StorageEndpoint(root=Path("disk"))
    tape = StorageEndpoint(kind="tape", library="lib")
    lib = SimulatedLibraryConfig(root=Path("library"))
    given = {"storage": {"disk1": disk, "tape1": tape}, "tape_libraries": {"lib": lib}}

    a = Settings(state_dir=tmp_path / "a", **given)
    b = Settings(state_dir=tmp_path / "b", **given)

    assert a.storage["disk1"].root == tmp_path / "a" / "disk"
    assert b.storage["disk1"].root == tmp_path / "b" / "disk"
    assert b.storage["tape1"].root == tmp_path / "b" / "library"
    assert b.tape_libraries["lib"].root == tmp_path / "b" / "library"
    # What the caller holds is as it was given: relative, tape backend and pool unset.
    assert disk.root == Path("disk") and lib.root == Path("library")
    assert tape.backend != "simulated" and tape.pool is None
