"""Dataset naming nomenclatures (issue 20, part 2): patterns with named, typed fields parsed from
names and built from fields; each class of malformed pattern refused at config load; each class
of bad field value refused with the field named. No database, no broker."""

from __future__ import annotations

import re

import pytest

from common.config import ConfigError, DatasetSettings, load_settings
from common.nomenclature import FieldError, compile_nomenclature
from common.patterns import PatternError

LST = "{telescope}.{date:%Y%m%d}.run{run:06d}.{level}"


def test_a_name_is_parsed_into_typed_fields() -> None:
    n = compile_nomenclature(LST)
    assert n.parse("lst1.20261123.run012345.dl0") == {
        "telescope": "lst1", "date": "2026-11-23", "run": 12345, "level": "dl0",
    }  # fmt: skip
    assert n.parse("lst1.20261123.run1234567.dl0")["run"] == 1234567  # type: ignore[index]


def test_time_fields_and_literal_braces() -> None:
    n = compile_nomenclature("{{raw}}-{site}-{t:%Y-%m-%dT%H%M%S}-{n:d}")
    assert n.parse("{raw}-pic-2026-01-02T030405-7") == {"site": "pic", "t": "2026-01-02T03:04:05", "n": 7}


@pytest.mark.parametrize(
    "name",
    [
        "lst1.20261123.run12345.dl0",  # fewer digits than the width
        "lst1.20261123.run0012345.dl0",  # not the canonical spelling of run 12345
        "lst1.20261131.run012345.dl0",  # digits in place, but no such date
        "lst1.2026112.run012345.dl0",
        "lst.1.20261123.run012345.dl0",  # a separator inside a string field
        "lst1.20261123.run012345.dl0.extra",
        "x" * 300,
        "",
    ],
)
def test_names_that_are_not_of_the_pattern_parse_to_none(name: str) -> None:
    assert compile_nomenclature(LST).parse(name) is None


def test_building_a_name_reads_back_as_its_fields() -> None:
    n = compile_nomenclature(LST)
    built = n.name_from({"telescope": "lst1", "date": "2026-11-23", "run": "12345", "level": "dl0"})
    assert built == "lst1.20261123.run012345.dl0"
    # The pattern's own date form is taken too.
    assert n.name_from({"telescope": "lst1", "date": "20261123", "run": "12345", "level": "dl0"}) == built


@pytest.mark.parametrize(
    ("given", "named"),
    [
        ({"telescope": "lst1", "date": "2026-11-23", "level": "dl0"}, "missing field(s) run"),
        (
            {"telescope": "lst1", "date": "2026-11-23", "run": "1", "level": "dl0", "zenith": "3"},
            "unknown field(s) zenith",
        ),
        ({"telescope": "lst1", "date": "2026-11-23", "run": "-5", "level": "dl0"}, "run:"),
        ({"telescope": "lst1", "date": "2026-11-23", "run": "12a", "level": "dl0"}, "run:"),
        ({"telescope": "lst1", "date": "2026-11-23", "run": "1" * 19, "level": "dl0"}, "run:"),
        ({"telescope": "lst1", "date": "2026-11-23", "run": "١٢", "level": "dl0"}, "run:"),  # Arabic digits
        ({"telescope": "lst1", "date": "2026-02-30", "run": "1", "level": "dl0"}, "date:"),
        ({"telescope": "lst1", "date": "yesterday", "run": "1", "level": "dl0"}, "date:"),
        ({"telescope": "lst.1", "date": "2026-11-23", "run": "1", "level": "dl0"}, "telescope:"),
        ({"telescope": "", "date": "2026-11-23", "run": "1", "level": "dl0"}, "telescope:"),
        ({"telescope": "x" * 65, "date": "2026-11-23", "run": "1", "level": "dl0"}, "telescope:"),
        ({"telescope": "lst 1", "date": "2026-11-23", "run": "1", "level": "dl0"}, "telescope:"),
    ],
)  # fmt: skip
def test_a_bad_field_value_is_refused_naming_the_field(given: dict[str, str], named: str) -> None:
    with pytest.raises(FieldError, match=re.escape(named)):
        compile_nomenclature(LST).name_from(given)


def test_a_name_that_would_not_read_back_is_refused() -> None:
    # Two string fields side by side: "x" + "yz" would read back as "xy" + "z".
    with pytest.raises(FieldError, match="read back"):
        compile_nomenclature("{a}{b}").name_from({"a": "x", "b": "yz"})


@pytest.mark.parametrize(
    ("pattern", "why"),
    [
        ("{telescope", "expected '}'"),  # unbalanced
        ("telescope}", "Single '}'"),
        ("{}.{level}", "needs a name"),  # positional
        ("{0}", "must be a name"),
        ("{a.b}", "must be a name"),  # attribute access
        ("{a[0]}", "must be a name"),  # indexing
        ("{a!r}", "conversions"),
        ("{a:{b}}", "nested"),
        ("{a:x}", "has format 'x'"),  # unknown spec
        ("{a:>6}", "has format"),
        ("{a:%Y%Q}", "%Q is not one of"),  # unknown date directive
        ("{a:%Y%}", "is not one of"),  # dangling %
        ("{a}.{a}", "appears twice"),
        ("plain.regex.name", "has no {field}"),
        (".".join(f"{{a{i}}}" for i in range(33)), "at most 32"),
        ("{a}" + "x" * 1100, "longer than"),
    ],
)
def test_a_malformed_pattern_is_refused_with_one_line_naming_it(pattern: str, why: str) -> None:
    with pytest.raises(PatternError, match=why) as info:
        compile_nomenclature(pattern)
    assert "\n" not in str(info.value)


def test_a_malformed_pattern_fails_the_config_load(tmp_path) -> None:
    config = tmp_path / "spool.toml"
    config.write_text(f'state_dir = "{tmp_path}"\n[datasets]\nnomenclature = ["{{telescope}}.{{run:x}}"]\n')
    with pytest.raises(ConfigError, match="nomenclature"):
        load_settings(config)


def test_names_match_a_regex_pattern_or_a_nomenclature() -> None:
    rules = DatasetSettings(patterns=[r"calib\.\d+"], nomenclature=[LST])
    assert rules.matches("calib.7") and rules.fields_of("calib.7") is None
    assert rules.matches("lst1.20261123.run012345.dl0")
    assert rules.fields_of("lst1.20261123.run012345.dl0") == {
        "telescope": "lst1", "date": "2026-11-23", "run": 12345, "level": "dl0",
    }  # fmt: skip
    assert not rules.matches("lst1.20261131.run012345.dl0")


def test_the_first_nomenclature_that_parses_a_name_gives_its_fields() -> None:
    rules = DatasetSettings(patterns=[], nomenclature=["{site}.{n:d}", "{tel}.{run:d}"])
    assert rules.fields_of("pic.7") == {"site": "pic", "n": 7}
