"""Issue 16, classes 10 and 11: what the operator sees.

Operator mistakes (a bad catalogue URL, a closed PostgreSQL port, a missing or unusable
``state_dir``, a broker that is down, queues that do not exist yet, a config that is not TOML or
has a key of the wrong type) end every command - and ``spool run <daemon>`` - with one line on
stderr and a non-zero exit code, never a traceback. Text from data is never read as Rich markup.
``spool dead show`` finds a dead letter by its AMQP message id or by its CloudEvent id.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from common.catalogue import Catalogue
from common.config import Settings, load_settings
from daemons.ingest.handlers import service as ingest_service
from tests.conftest import AMQP_URL, cloudevent, publish_raw, queue_depth, running, wait_for, write_config

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parent.parent
DATASET = "lst1.20261123.run012345.dl0"


def _env() -> dict[str, str]:
    # Wide output: a table cell holding hostile text is checked whole, not wrapped over lines.
    return {**{k: v for k, v in os.environ.items() if k != "SPOOL_DEBUG"}, "COLUMNS": "400"}


def spool(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "daemons", "--config", str(config), *args],
        capture_output=True, text=True, cwd=REPO, timeout=120, env=_env(),
    )  # fmt: skip


async def aspool(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``spool`` awaited: daemons under test run on this event loop and must keep working."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "daemons", "--config", str(config), *args,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO, env=_env(),
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), timeout=120)
    return subprocess.CompletedProcess(args, proc.returncode or 0, out.decode(), err.decode())


def assert_one_line_failure(result: subprocess.CompletedProcess[str], *expected: str) -> str:
    """The contract: non-zero exit, exactly one line on stderr, no traceback; returns the line."""
    assert result.returncode != 0, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


# --- mistakes in the configuration or the environment ---------------------------------------------
def _config(tmp_path: Path, tag: str, state: Path | None = None, **extra: str) -> Path:
    state = state or tmp_path / "state"
    if state.is_relative_to(tmp_path):
        (state / "landing").mkdir(parents=True, exist_ok=True)
    return write_config(tmp_path / "spool.toml", state, tag, **extra)


def _replace(path: Path, old: str, new: str) -> Path:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))
    return path


MISTAKES: dict[str, tuple[Callable[[Path, str], Path], str]] = {
    # name: (config maker, text the one line must contain)
    "unknown_driver": (lambda p, t: _config(p, t, catalogue='url = "oracle+cx://db/spool"'), "catalogue.url"),
    "malformed_url": (lambda p, t: _config(p, t, catalogue='url = "::not a url::"'), "catalogue.url"),
    "closed_pg_port": (
        lambda p, t: _config(p, t, catalogue='url = "postgresql://postgres@127.0.0.1:1/spool"'),
        "catalogue_unavailable",
    ),
    "state_dir_missing_parent": (
        lambda p, t: _config(p, t, state=Path("/proc/no-such/state")),
        "/proc/no-such",
    ),
    "state_dir_under_a_file": (
        lambda p, t: _config(p, t, state=Path("/etc/hostname/state")),
        "/etc/hostname",
    ),
    "not_toml": (lambda p, t: _replace(_config(p, t), "[bus]", "[bus"), "spool.toml"),
    "wrong_type": (
        lambda p, t: _replace(_config(p, t), "max_attempts = 4", 'max_attempts = "four"'),
        "max_attempts",
    ),
    "wrong_type_path": (
        lambda p, t: _replace(_config(p, t), '[log]\nlevel = "info"', "[log]\nlevel = 7"),
        "log.level",
    ),
}
CATALOGUE_COMMANDS = [["ls"], ["show", "a/b"], ["rule", "list"], ["rse", "list"]]
CONFIG_MISTAKES = ["not_toml", "wrong_type", "wrong_type_path"]
CONFIG_COMMANDS = [
    ["status"],
    ["queues"],
    ["dead", "list"],
    ["ls"],
    ["rule", "list"],
    ["run", "ingest", "--once"],
]


@pytest.mark.parametrize("mistake", [m for m in MISTAKES if m not in CONFIG_MISTAKES])
@pytest.mark.parametrize("command", [*CATALOGUE_COMMANDS, ["run", "ingest", "--once"]], ids=" ".join)
def test_catalogue_and_state_dir_mistakes_are_one_line(tmp_path, tag, mistake, command) -> None:
    make, expected = MISTAKES[mistake]
    line = assert_one_line_failure(spool(make(tmp_path, tag), *command))
    assert expected in line  # for ``spool run`` inside its one JSON log line
    if command[0] == "run":
        assert json.loads(line)["event"] == "daemon_failed"


@pytest.mark.parametrize("mistake", CONFIG_MISTAKES)
@pytest.mark.parametrize("command", CONFIG_COMMANDS, ids=" ".join)
def test_config_file_mistakes_are_one_line(tmp_path, tag, mistake, command) -> None:
    make, expected = MISTAKES[mistake]
    result = spool(make(tmp_path, tag), *command)
    assert_one_line_failure(result, expected)
    assert result.returncode == 2


@pytest.mark.parametrize(
    "command",
    [["dead", "list"], ["dead", "show", "x"], ["dead", "retry"], ["run", "ingest", "--once"]],
    ids=" ".join,
)
def test_a_broker_that_is_down_is_one_line(tmp_path, tag, command) -> None:
    config = _replace(_config(tmp_path, tag), AMQP_URL, AMQP_URL.replace(":5672", ":1"))
    line = assert_one_line_failure(spool(config, *command))
    assert "broker_unreachable" in line


@pytest.mark.parametrize(
    "command",
    [["dead", "list"], ["dead", "show", "x"], ["dead", "list", "--by-reason"], ["status"], ["queues"]],
    ids=" ".join,
)
def test_commands_before_the_queues_exist_are_one_line(tmp_path, tag, command) -> None:
    result = spool(_config(tmp_path, tag), *command)  # a fresh prefix: no daemon ever declared it
    line = assert_one_line_failure(result, "queue_missing")
    assert f"t{tag}." in line


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        (["rule", "add", "--nope"], "No such option: --nope"),
        (["rule", "add", "--datasets", "x"], "Missing option '--endpoints'"),
        (["nosuch"], "No such command 'nosuch'"),
        (["dead", "show"], "Missing argument"),
        (["rule", "add", "--endpoints", "disk1", "--copies", "many"], "Invalid value for '--copies'"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else "",
)
def test_command_line_mistakes_are_one_line(tmp_path, tag, command, expected) -> None:
    result = spool(_config(tmp_path, tag), *command)
    line = assert_one_line_failure(result, expected, "--help)")
    assert result.returncode == 2 and line.startswith("error: ")


def test_an_unexpected_error_is_one_line_too_and_debug_shows_the_traceback(tmp_path, tag) -> None:
    """A bug (no known class) still ends in one line; SPOOL_DEBUG=1 gives the traceback."""
    config = _config(tmp_path, tag)
    bug = ["-c", "import sys; from common.cli import main; import common.cli.query as q;"
           " q.with_catalogue = lambda *a: 1 / 0; main(sys.argv[1:])"]  # fmt: skip
    args = ["--config", str(config), "ls"]
    result = subprocess.run(
        [sys.executable, *bug, *args], capture_output=True, text=True, cwd=REPO, timeout=60
    )
    assert_one_line_failure(result, "internal_error", "ZeroDivisionError")
    assert result.returncode == 70
    debug = subprocess.run(
        [sys.executable, *bug, *args], capture_output=True, text=True, cwd=REPO, timeout=60,
        env={**os.environ, "SPOOL_DEBUG": "1"},
    )  # fmt: skip
    assert "Traceback" in debug.stderr


# --- data is never markup ------------------------------------------------------------------------
MARKUP = "[bold]B[/bold] [/] [link=http://evil.example]L[/link] [red]"


async def test_every_command_prints_bracketed_data_literally(tmp_path, tag, broker) -> None:
    """Error texts, names, reasons and patterns with Rich markup in them appear as they are."""
    config = _config(tmp_path, tag)
    settings = load_settings(config)
    landing = settings.landing_areas["lst1"]
    (landing / "run1").mkdir()
    name = "run1/[bold]x[red]y.fits"
    (landing / name).write_bytes(b"content")
    async with running([ingest_service], settings):
        await publish_raw(
            broker, settings, "file.ready", cloudevent({"path": str(landing / name), "dataset": DATASET})
        )
        # A dataset name with markup: dead-lettered, its error (quoting the name) in the headers.
        bad = cloudevent({"path": str(landing / name), "dataset": MARKUP}, id_="ce-" + uuid.uuid4().hex)
        await publish_raw(broker, settings, "file.ready", bad)
        await wait_for(lambda: _registered(settings, name), timeout=60)
        await wait_for(lambda: _dead(broker, settings, 1), timeout=60)
    async with await Catalogue.open(settings.catalogue.url) as catalogue:
        await catalogue.history.record_failure(
            request_id="req-markup", kind="replica", daemon="replicator", reason="disk_full",
            error=f"disk2: {MARKUP}", attempts=3, final=False, name=name,
        )  # fmt: skip
    added = spool(
        config, "rule", "add", "--id", "brackets", "--datasets", "[/]x[a-z]+", "--endpoints", "disk1"
    )
    assert added.returncode == 0, added.stderr
    for command in (["ls"], ["show", name], ["trace", name], ["status"], ["dead", "list"], ["rule", "list"]):
        result = spool(config, *command)
        assert "Traceback" not in result.stderr and "MarkupError" not in result.stderr, (
            command,
            result.stderr,
        )
        flat = "".join(result.stdout.split())  # tables may wrap a cell over lines
        if command[0] in ("ls", "show", "trace"):
            assert "[bold]x[red]y.fits" in flat, (command, result.stdout)
        if command[0] in ("show", "status"):
            assert "[bold]B[/bold][/][link=http://evil.example]L[/link][red]" in flat, (
                command,
                result.stdout,
            )
        if command[0] == "dead":
            assert "[bold]B[/bold]" in flat, result.stdout
        if command[0] == "rule":
            assert "[/]x[a-z]+" in flat, result.stdout
    shown = spool(config, "dead", "show", (await _dead_ids(config))[0][0])
    assert shown.returncode == 0 and MARKUP in shown.stdout, shown.stdout


def test_an_error_line_with_markup_is_printed_literally(tmp_path, tag) -> None:
    result = spool(_config(tmp_path, tag), "show", MARKUP)
    line = assert_one_line_failure(result)
    assert MARKUP in line and result.returncode == 1


# --- spool dead show by either id ----------------------------------------------------------------
async def test_dead_show_finds_a_dead_letter_by_message_id_or_cloudevent_id(tmp_path, tag, broker) -> None:
    config = _config(tmp_path, tag)
    settings = load_settings(config)
    event_id, message_id = "ce-" + uuid.uuid4().hex, "amqp-" + uuid.uuid4().hex
    body = cloudevent({"path": "/nowhere/x", "dataset": "not a dataset"}, id_=event_id)
    async with running([ingest_service], settings):
        channel = await broker.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(settings.bus.exchange)
        import aio_pika

        await exchange.publish(
            aio_pika.Message(body, content_type="application/cloudevents+json", message_id=message_id),
            routing_key="file.ready",
        )
        await channel.close()
        await wait_for(lambda: _dead(broker, settings, 1), timeout=60)
    for wanted in (message_id, event_id):
        shown = spool(config, "dead", "show", wanted, "--json")
        assert shown.returncode == 0, shown.stderr
        doc = json.loads(shown.stdout)
        assert doc["message_id"] == message_id and doc["event_id"] == event_id
        assert doc["reason"] == "path_outside_area"  # checked first: ingest's order of refusals
    assert_one_line_failure(spool(config, "dead", "show", "no-such-id"), "no dead letter")
    # retry / purge --id take the CloudEvent id too.
    assert json.loads(spool(config, "dead", "purge", "--id", "no-such-id", "--yes", "--json").stdout) == {
        "purged": 0
    }
    purged = spool(config, "dead", "purge", "--id", event_id, "--yes", "--json")
    assert json.loads(purged.stdout) == {"purged": 1}, purged.stderr
    assert json.loads(spool(config, "dead", "list", "--json").stdout) == []


# The waits read the catalogue and the broker in this process: a ``spool`` command per poll started
# an interpreter each time (seconds on a loaded machine); the commands' output is checked after.
async def _registered(settings: Settings, name: str) -> bool:
    async with await Catalogue.open(settings.catalogue.url) as catalogue:
        return await catalogue.queries.show_file(name) is not None


async def _dead(broker: Any, settings: Settings, n: int) -> bool:
    return await queue_depth(broker, settings.dead_queue("ingest")) >= n


async def _dead_ids(config: Path) -> list[tuple[str, str]]:
    result = await aspool(config, "dead", "list", "--json")
    if result.returncode != 0:
        return []
    return [(d["message_id"], d["reason"]) for d in json.loads(result.stdout)]


# --- values a message may not carry, given on the command line --------------------------------------
@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ([arg for i in range(70) for arg in ("--meta", f"k{i}=1")], "metadata"),
        (["--meta", "k=" + "v" * 600], "metadata"),
        (["--dataset", "d" * 300], "dataset"),
    ],
    ids=["70-metadata-keys", "long-metadata-value", "long-dataset"],
)
def test_spool_ingest_refuses_values_beyond_the_message_bounds_in_one_line(
    tmp_path: Path, tag: str, extra: list[str], field: str
) -> None:
    config = _config(tmp_path, tag)
    landed = tmp_path / "state" / "landing" / "f.dat"
    landed.write_bytes(b"x")
    args = ["ingest", str(landed), *(["--dataset", DATASET] if "--dataset" not in extra else []), *extra]
    line = assert_one_line_failure(spool(config, *args), field)
    assert "nothing" in line or "invalid_message" in line
