from pathlib import Path

import pytest

from common.config import DatasetSettings
from common.errors import Permanent
from daemons.ingest import steps


@pytest.fixture
def areas(tmp_path: Path) -> dict[str, Path]:
    a, b = tmp_path / "a", tmp_path / "b"
    (a / "run1").mkdir(parents=True)
    b.mkdir()
    (a / "run1" / "f.fits").write_bytes(b"1")
    (b / "g.fits").write_bytes(b"2")
    return {"a": a, "b": b}


def test_file_is_located_in_its_landing_area_with_relative_name(areas):
    located = steps.locate(str(areas["b"] / "g.fits"), areas)
    assert (located.area, located.relpath) == ("b", "g.fits")
    assert steps.logical_name(None, located) == "g.fits"


def test_path_escaping_every_area_is_path_outside_area(areas):
    with pytest.raises(Permanent) as info:
        steps.locate(f"{areas['a']}/../../etc/passwd", areas)
    assert info.value.reason == "path_outside_area"


def test_given_logical_name_is_used_but_must_be_clean(areas):
    located = steps.locate(str(areas["a"] / "run1" / "f.fits"), areas)
    assert steps.logical_name("lst1/run1/f.fits", located) == "lst1/run1/f.fits"
    for bad in ("/abs/name", "../up", "a/./b"):
        with pytest.raises(Permanent) as info:
            steps.logical_name(bad, located)
        assert info.value.reason == "invalid_name"


def test_dataset_must_match_a_naming_pattern():
    rules = DatasetSettings(patterns=[r"lst1\.\d{8}\.run\d{6}\.dl0"])
    steps.check_dataset("lst1.20261123.run012345.dl0", rules)
    with pytest.raises(Permanent) as info:
        steps.check_dataset("lst1.today.dl0", rules)
    assert info.value.reason == "bad_dataset_name"


@pytest.mark.parametrize(
    ("size", "adler", "verdict"),
    [
        (10, "0000000a", "duplicate"),
        (None, "0000000a", "duplicate"),
        (11, "0000000a", "conflict"),
        (10, "0000000b", "conflict"),
        (None, None, "duplicate"),
    ],
)
def test_existing_name_is_duplicate_only_with_the_same_content(size, adler, verdict):
    assert steps.compare_existing(size, adler, 10, "0000000a") == verdict


def test_is_within_compares_whole_components_and_accepts_the_filesystem_root():
    from common.storage.paths import is_within, relative_to

    assert is_within("/data/landing/run1/f.fits", "/data/landing")
    assert is_within("/data/landing", "/data/landing")
    assert not is_within("/data/landing2/f.fits", "/data/landing")  # shares the prefix only
    assert not is_within("/data", "/data/landing")
    assert is_within("/etc/passwd", "/")  # an area at "/" holds everything
    assert relative_to("/data/landing/run1/f.fits", "/data/landing") == "run1/f.fits"
    assert relative_to("/data/landing", "/data/landing") == "."
    assert relative_to("/etc/passwd", "/") == "etc/passwd"
