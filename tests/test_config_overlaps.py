"""Directory mistakes that lose data are refused when the configuration is loaded, naming both keys."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from common.config import load_settings
from common.errors import ConfigError


def write(tmp_path: Path, body: str) -> Path:
    cfg = tmp_path / "spool.toml"
    cfg.write_text(f'state_dir = "{tmp_path / "state"}"\n{body}')
    return cfg


def refused(tmp_path: Path, body: str, *keys: str) -> str:
    with pytest.raises(ConfigError) as caught:
        load_settings(write(tmp_path, body))
    message = str(caught.value)
    assert message.startswith("invalid configuration")
    for key in keys:
        assert re.search(rf"\b{re.escape(key)}\b", message), (key, message)
    return message


LANDING = '[landing_areas]\nlst1 = "landing"\n'


def test_two_disk_endpoints_on_one_root_are_refused(tmp_path: Path) -> None:
    body = '[storage.disk1]\nroot = "st"\n[storage.disk2]\nroot = "st/"\n' + LANDING
    message = refused(tmp_path, body, "storage.disk1.root", "storage.disk2.root")
    assert "same directory" in message


def test_a_disk_root_inside_another_is_refused(tmp_path: Path) -> None:
    body = '[storage.disk1]\nroot = "st"\n[storage.disk2]\nroot = "st/two"\n' + LANDING
    message = refused(tmp_path, body, "storage.disk1.root", "storage.disk2.root")
    assert "storage.disk2.root" in message.split("is inside")[0]


def test_a_disk_root_containing_another_is_refused(tmp_path: Path) -> None:
    body = '[storage.disk1]\nroot = "st/one"\n[storage.disk2]\nroot = "st"\n' + LANDING
    message = refused(tmp_path, body, "storage.disk1.root", "storage.disk2.root")
    assert "contains" in message


def test_a_disk_root_inside_a_landing_area_is_refused(tmp_path: Path) -> None:
    body = '[storage.disk1]\nroot = "landing/archive"\n' + LANDING
    refused(tmp_path, body, "storage.disk1.root", "landing_areas.lst1")


def test_a_landing_area_inside_a_disk_root_is_refused(tmp_path: Path) -> None:
    body = '[storage.disk1]\nroot = "st"\n[landing_areas]\nlst1 = "st/incoming"\n'
    refused(tmp_path, body, "storage.disk1.root", "landing_areas.lst1")


def test_a_landing_area_inside_another_is_refused(tmp_path: Path) -> None:
    body = '[storage.disk1]\nroot = "st"\n[landing_areas]\nlst1 = "landing"\nlst2 = "landing/two"\n'
    refused(tmp_path, body, "landing_areas.lst1", "landing_areas.lst2")


def test_a_tape_library_overlapping_a_disk_root_is_refused(tmp_path: Path) -> None:
    body = (
        '[storage.disk1]\nroot = "st"\n[storage.tape1]\nkind = "tape"\n'
        '[tape_libraries.default]\nroot = "st/tapes"\n' + LANDING
    )
    refused(tmp_path, body, "storage.disk1.root", "tape_libraries.default.root")


def test_a_tape_library_overlapping_a_landing_area_is_refused(tmp_path: Path) -> None:
    body = '[storage.disk1]\nroot = "st"\n[tape_libraries.lib]\nroot = "landing"\n' + LANDING
    refused(tmp_path, body, "landing_areas.lst1", "tape_libraries.lib.root")


def test_a_storage_root_that_is_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "st").write_text("not a directory")
    message = refused(tmp_path, '[storage.disk1]\nroot = "st"\n' + LANDING, "storage.disk1.root")
    assert "not a directory" in message


def test_a_landing_area_that_is_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "landing").write_text("not a directory")
    message = refused(tmp_path, '[storage.disk1]\nroot = "st"\n' + LANDING, "landing_areas.lst1")
    assert "not a directory" in message


def test_a_symlinked_alias_of_another_root_is_refused(tmp_path: Path) -> None:
    (tmp_path / "state" / "real").mkdir(parents=True)
    (tmp_path / "alias").symlink_to(tmp_path / "state")
    body = f'[storage.disk1]\nroot = "real/disk"\n[storage.disk2]\nroot = "{tmp_path / "alias"}/real/disk"\n'
    message = refused(tmp_path, body + LANDING, "storage.disk1.root", "storage.disk2.root")
    assert "same directory" in message and "really" in message


def test_separate_directories_and_remote_endpoints_load(tmp_path: Path) -> None:
    body = (
        '[storage.disk1]\nroot = "st/one"\n[storage.disk2]\nroot = "st/two"\n'
        '[storage.far]\nbackend = "xrootd"\nurl = "root://far.example:1094//data"\n'
        '[storage.web]\nbackend = "https"\nurl = "davs://web.example:2880/data"\n'
        '[storage.tape1]\nkind = "tape"\n[storage.tape2]\nkind = "tape"\n'
        '[landing_areas]\nlst1 = "landing/lst1"\nlst2 = "landing/lst2"\n'
    )
    settings = load_settings(write(tmp_path, body))
    assert set(settings.storage) == {"disk1", "disk2", "far", "web", "tape1", "tape2"}


def test_the_shipped_configuration_loads() -> None:
    settings = load_settings(Path(__file__).parent.parent / "config" / "spool.toml")
    assert "disk1" in settings.storage
