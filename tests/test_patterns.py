"""Issue 16, class 7: operator-supplied regular expressions cannot stall a daemon.

Dataset naming patterns and rule dataset filters run on RE2 (linear time): the patterns that made
Python's backtracking engine hold the GIL for a minute answer at once, whatever the name. A pattern
RE2 cannot run is refused when given (config load, ``spool rule add``), in one line naming it.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from common.catalogue.policy import EndpointExpression, PolicyError, Rule
from common.config import DatasetSettings, load_settings
from common.errors import ConfigError
from common.patterns import MAX_NAME_LENGTH, MAX_PATTERN_LENGTH, PatternError, compile_pattern
from tests.conftest import write_config

REPO = Path(__file__).resolve().parent.parent

# Catastrophic for a backtracking engine: each is exponential (or worse) on a non-matching name.
CATASTROPHIC = [
    "(a+)+$",
    "(a|aa)+$",
    "(.*a){20}",
    "(a*)*b",
    "(x+x+)+y",
    "^(([a-z])+.)+[A-Z]([a-z])+$",
    r"(\w+\s?)*$",
]
# Python's ``re`` accepts these, RE2 cannot run them (backreferences, lookaround, possessive).
REFUSED = [r"(a)\1", r"(?P<x>a)(?P=x)", r"(?=a)a", r"(?!b)a", r"(?<=a)b", r"(?<!a)b", "a++", "a{2000}"]
GENEROUS = 2.0  # seconds: RE2 needs milliseconds; a backtracking engine needs minutes


def _timed(fn, *args):  # type: ignore[no-untyped-def]
    start = time.monotonic()
    result = fn(*args)
    return result, time.monotonic() - start


@pytest.mark.parametrize("pattern", CATASTROPHIC)
@pytest.mark.parametrize("length", [30, 255, 10_000])
def test_catastrophic_patterns_answer_at_once(pattern: str, length: int) -> None:
    compiled = compile_pattern(pattern)
    matched, took = _timed(compiled.fullmatch, "a" * length + "!")
    assert matched is False
    assert took < GENEROUS


@pytest.mark.parametrize("pattern", CATASTROPHIC)
def test_catastrophic_rule_and_dataset_patterns_still_match_what_they_should(pattern: str) -> None:
    rule = Rule(id="r", endpoints="disk1", datasets=pattern)
    datasets = DatasetSettings(patterns=[pattern])
    for name in ("a" * 30 + "!", "a" * 200 + "!"):
        assert rule.dataset_matches(name) is datasets.matches(name) is False
    special = {
        "(a*)*b": "aaab",
        "(x+x+)+y": "xxy",
        "^(([a-z])+.)+[A-Z]([a-z])+$": "ab.Cd",
        "(.*a){20}": "a" * 20,
    }
    good = special.get(pattern, "aaaa")
    assert rule.dataset_matches(good) and datasets.matches(good)


def test_names_longer_than_the_bound_match_no_pattern() -> None:
    compiled = compile_pattern(".*")
    assert compiled.fullmatch("x" * MAX_NAME_LENGTH)
    assert not compiled.fullmatch("x" * (MAX_NAME_LENGTH + 1))
    assert not DatasetSettings(patterns=[".*"]).matches("x" * 100_000)


@pytest.mark.parametrize("pattern", REFUSED)
def test_patterns_re2_cannot_run_are_refused_naming_them(pattern: str) -> None:
    with pytest.raises(PatternError) as err:
        compile_pattern(pattern)
    assert repr(pattern) in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(PolicyError, match="rule r: dataset pattern"):
        Rule(id="r", endpoints="disk1", datasets=pattern)
    with pytest.raises(ValueError, match="refused"):
        DatasetSettings(patterns=[pattern])


def test_overlong_and_non_string_patterns_are_refused() -> None:
    with pytest.raises(PatternError, match="characters"):
        compile_pattern("a" * (MAX_PATTERN_LENGTH + 1))
    with pytest.raises(PatternError):
        compile_pattern(None)  # type: ignore[arg-type]


@pytest.mark.parametrize("pattern", [r"(a)\1", "(?=x)x"])
def test_a_config_with_a_pattern_re2_refuses_does_not_load(tmp_path: Path, pattern: str) -> None:
    escaped = pattern.replace("\\", "\\\\")
    config = write_config(
        tmp_path / "spool.toml", tmp_path / "state", "x", datasets=f'patterns = ["{escaped}"]'
    )
    with pytest.raises(ConfigError, match=r"datasets\.patterns"):
        load_settings(config)
    rule = write_config(
        tmp_path / "rule.toml",
        tmp_path / "state",
        "x",
        **{"rules.bad": f'datasets = "{escaped}"\nendpoints = "disk1"'},
    )
    settings = load_settings(rule)  # the rule is checked when daemons build their rule book
    from common.placement import config_rules

    with pytest.raises(ConfigError, match=r"rules\.bad"):
        config_rules(settings)


@pytest.mark.parametrize("pattern", [r"(a)\1", "(?<=a)b"])
def test_spool_rule_add_refuses_the_pattern_in_one_line(config_file: Path, pattern: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "daemons", "--config", str(config_file), "rule", "add", "--id", "r1",
         "--datasets", pattern, "--endpoints", "disk1"],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )  # fmt: skip
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "rule r1: dataset pattern" in lines[0] and repr(pattern) in lines[0]
    listed = subprocess.run(
        [sys.executable, "-m", "daemons", "--config", str(config_file), "rule", "list", "--json"],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )  # fmt: skip
    assert listed.returncode == 0 and "r1" not in listed.stdout


def test_endpoint_expressions_parse_in_linear_time() -> None:
    # The old term pattern backtracked quadratically: 100,000 characters held the GIL for 40 s.
    text = "site=" + "b" + " " * 100_000 + "="
    _, took = _timed(_refused, text)
    assert took < GENEROUS
    expression = EndpointExpression.parse(" site = PIC & kind != tape | name=CNAF ")
    assert expression.groups == ((("site", False, "PIC"), ("kind", True, "tape")), (("name", False, "CNAF"),))


def _refused(text: str) -> bool:
    with pytest.raises(PolicyError):
        EndpointExpression.parse(text)
    return True


def test_metadata_filters_parse_in_linear_time_and_are_bounded() -> None:
    from common.catalogue.filters import MAX_FILTER_LENGTH, parse_filter

    # The old pattern backtracked quadratically on spaces inside a value (30,000: 13 s).
    text = "run=x" + " " * (MAX_FILTER_LENGTH - 10) + "y"
    parsed, took = _timed(parse_filter, text)
    assert took < GENEROUS and parsed.key == "run" and parsed.values[0].startswith("x")
    with pytest.raises(ValueError, match="longer than"):
        parse_filter("run=" + " " * MAX_FILTER_LENGTH + "1")
    assert str(parse_filter("  run >= 12000 ")) == "run>=12000"
    assert parse_filter('name = " a b "').values == (" a b ",)


def test_remembered_verdicts_are_the_engines_and_stay_bounded() -> None:
    from common.patterns import MAX_CACHED_VERDICTS

    pattern = compile_pattern(r"lst1\.\d{8}\.run\d+")
    names = [f"lst1.2026112{i % 10}.run{i}" for i in range(MAX_CACHED_VERDICTS + 10)] + ["x", "lst1.x"]
    first = [pattern.fullmatch(n) for n in names]
    again = [pattern.fullmatch(n) for n in names]  # from memory where remembered
    fresh = compile_pattern(r"lst1\.\d{8}\.run\d+")
    assert first == again == [fresh.fullmatch(n) for n in names]
    assert first[:3] == [True, True, True] and first[-2:] == [False, False]
    assert len(pattern._verdicts) <= MAX_CACHED_VERDICTS
