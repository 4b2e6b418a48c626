"""Shared fixtures. Integration tests use the real RabbitMQ, isolated per test by a unique exchange
and queue prefix, with retry tiers shortened by configuration."""

from __future__ import annotations

import asyncio
import collections
import functools
import json
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aio_pika
import pytest

from common.bus.topology import delete_topology
from common.config import Settings, load_settings

REPO = Path(__file__).resolve().parent.parent
AMQP_URL = os.environ.get("SPOOL_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")


def write_config(path: Path, state_dir: Path, tag: str, **extra: str) -> Path:
    """A TOML config isolating one test: own exchange, own queue prefix, own directories; when
    ``state_dir`` exists, its SQLite catalogue is there already, migrated."""
    lines = [
        f'state_dir = "{state_dir}"',
        "[bus]",
        f'url = "{AMQP_URL}"',
        f'exchange = "spool-test-{tag}"',
        f'queue_prefix = "t{tag}"',
        "retry_tiers = [0.2, 0.5, 1.0]",
        "max_attempts = 4",
        "delivery_limit = 20",
        "heartbeat_interval = 0.5",
        "stop_grace = 10",
        "[storage.disk1]",
        'root = "storage/disk1"',
        "[landing_areas]",
        'lst1 = "landing"',
        "[daemons.ingest]",
        "prefetch = 64",
        "concurrency = 32",
        "[log]",
        'level = "info"',
        'format = "json"',
    ]
    if "monitor" not in extra:  # any free port: suites and demos running side by side do not collide
        lines += ["[monitor]", "http_port = 0"]
    for section, body in extra.items():
        lines += [f"[{section}]", body]
    path.write_text("\n".join(lines) + "\n")
    catalogue = state_dir / "catalogue.db"  # the default catalogue.url
    if "url" not in extra.get("catalogue", "") and state_dir.is_dir() and not catalogue.exists():
        # Already migrated, as the first daemon or command to open it would leave it: migrating
        # took a good part of a short test (each ``spool`` command run in a process paid it too).
        from tests.catalogue_fixtures import seed_sqlite_catalogue

        seed_sqlite_catalogue(catalogue)
    return path


# Fixtures that start or reach a service (RabbitMQ, a private XRootD or PostgreSQL server): a test
# using one, directly or through another fixture, is an integration test whatever its module says,
# so `make unit` (``-m "not integration"``) never needs a service. The PostgreSQL half of the
# catalogue tests is marked where it is parametrised (tests/catalogue_fixtures.py).
SERVICE_FIXTURES = frozenset({"broker", "xrootd_server", "tls_postgres", "rabbit_cluster"})


@pytest.hookimpl(tryfirst=True)  # before the -m selection looks at the marks
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if SERVICE_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)
    if hasattr(config, "workerinput"):  # a pytest-xdist worker: this order is the schedule's
        _slow_modules_first(items)


def _slow_modules_first(items: list[pytest.Item]) -> None:
    """Modules with a ``slow`` test first, then the others, most tests first: a long module handed
    out last runs on alone while the other worker idles (test_chaos.py, two tests, did so for
    minutes when modules were ordered by their number of tests only). Stable: each module's tests
    keep their order, and every worker computes the same one (pytest-xdist checks)."""
    module = {item: item.nodeid.split("::", 1)[0] for item in items}
    count = collections.Counter(module.values())
    slow = {module[item] for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: (module[item] not in slow, -count[module[item]]))


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist (``make test``: ``-n 2``)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """Each test module goes whole to one worker (its module-scoped servers, a private TLS broker
    or PostgreSQL, start once), and the modules of the three-node cluster all go to the same one:
    their tests stop and start its nodes, and a test on another worker would lose them. Everything
    else is isolated per test (own exchange and queue prefix, catalogue, directories, ports)."""
    from xdist.scheduler import LoadFileScheduling

    config.option.loadscopereorder = False  # the workers' order (``_slow_modules_first``) is kept

    class ModuleScheduling(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return "rabbit_cluster" if _uses_the_cluster(module) else module

    return ModuleScheduling(config, log)


@functools.cache
def _uses_the_cluster(module: str) -> bool:
    """The cluster's fixtures come from ``tests/cluster_fixtures.py``: a module using them imports it."""
    path = REPO / module
    return path.suffix == ".py" and path.is_file() and "cluster_fixtures" in path.read_text()


# Every tag handed out this session: its queues and exchange are deleted when the session ends.
_TAGS: set[str] = set()


@pytest.fixture
def tag() -> str:
    value = uuid.uuid4().hex[:10]
    _TAGS.add(value)
    return value


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Leave the shared broker as found: what a test left behind (a daemon run in a subprocess,
    a test failed half-way) would otherwise pile up run after run (``tests/broker_cleanup.py``);
    the same for the migrated catalogue templates (``tests/catalogue_fixtures.py``)."""
    if catalogue_fixtures := sys.modules.get("tests.catalogue_fixtures"):
        try:
            catalogue_fixtures.drop_templates()
        except Exception as exc:  # a clean-up failing must not hide the session's own result
            print(f"\nconftest: could not drop the catalogue templates: {exc}", file=sys.stderr)
    if not _TAGS:
        return
    from tests.broker_cleanup import remove_tags

    try:
        remove_tags(AMQP_URL, _TAGS)
    except (OSError, ValueError) as exc:
        print(f"\nconftest: could not delete this session's queues: {exc}", file=sys.stderr)


@pytest.fixture
def config_file(tmp_path: Path, tag: str) -> Path:
    state = tmp_path / "state"
    (state / "landing").mkdir(parents=True)
    return write_config(tmp_path / "spool.toml", state, tag)


@pytest.fixture
def settings(config_file: Path) -> Settings:
    return load_settings(config_file)


@pytest.fixture
async def broker(settings: Settings) -> AsyncIterator[aio_pika.abc.AbstractRobustConnection]:
    """A connection for the test itself; the test's queues and exchange are deleted afterwards."""
    connection = await aio_pika.connect_robust(settings.bus.url, timeout=60)
    try:
        yield connection
    finally:
        await connection.close()
        # A fresh connection for the clean-up: after a broker-restart test the robust one may
        # still be between reconnection attempts.
        cleanup = await _connect_with_retries(settings.bus.url)
        try:
            channel = await cleanup.channel()
            await delete_topology(channel, settings)
            await channel.close()
        finally:
            await cleanup.close()


async def _connect_with_retries(url: str, seconds: float = 60.0) -> aio_pika.abc.AbstractConnection:
    deadline = asyncio.get_running_loop().time() + seconds
    while True:
        try:
            return await aio_pika.connect(url)
        except (OSError, aio_pika.exceptions.AMQPError):
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.5)


@pytest.fixture
async def topology(settings: Settings, broker: aio_pika.abc.AbstractRobustConnection) -> None:
    """The test's exchange and queues, declared as a daemon would before anything runs."""
    from common.bus.topology import declare_topology

    channel = await broker.channel()
    await declare_topology(channel, settings)
    await channel.close()


async def publish_raw(
    connection: aio_pika.abc.AbstractRobustConnection,
    settings: Settings,
    routing_key: str,
    body: bytes,
    content_type: str | None = "application/cloudevents+json",
    message_id: str | None = None,
    *,
    as_spool: bool = False,
) -> None:
    """Publish as an external publisher would (no ``user_id``), or ``as_spool``: with the
    connection's user as ``user_id``, as Spool's own publishers do (internal commands)."""
    from common.bus.publisher import connection_user

    user_id = connection_user(connection) if as_spool else None
    channel = await connection.channel(publisher_confirms=True)
    exchange = await channel.get_exchange(settings.bus.exchange)
    await exchange.publish(
        aio_pika.Message(body, content_type=content_type, message_id=message_id, user_id=user_id),
        routing_key=routing_key,
    )
    await channel.close()


def make_file(settings: Settings, rel: str, content: bytes = b"data") -> Path:
    """A file at ``rel`` in the landing area ``lst1``, as an instrument would leave it."""
    path = settings.landing_areas["lst1"] / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


def cloudevent(data: dict[str, Any], *, type_: str = "file.ready", id_: str | None = None) -> bytes:
    return json.dumps(
        {
            "specversion": "1.0",
            "id": id_ or uuid.uuid4().hex,
            "source": "test-daq",
            "type": type_,
            "data": data,
        }
    ).encode()


async def wait_for(
    predicate: Callable[[], Awaitable[bool]], timeout: float = 30.0, interval: float = 0.1
) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        if await predicate():
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(interval)


async def dead_reasons(
    connection: aio_pika.abc.AbstractRobustConnection, settings: Settings, daemon: str = "ingest"
) -> list[str]:
    """The reason of every letter in ``daemon``'s dead-letter queue, oldest first (left there)."""
    from common.bus import headers as H

    channel = await connection.channel()
    queue = await channel.get_queue(settings.dead_queue(daemon))
    reasons = []
    while (m := await queue.get(no_ack=False, fail=False)) is not None:
        reasons.append(m.headers[H.REASON])
    await channel.close()
    return reasons


async def queue_depth(connection: aio_pika.abc.AbstractRobustConnection, name: str) -> int:
    channel = await connection.channel()
    try:
        q = await channel.declare_queue(name, passive=True)
        return q.declaration_result.message_count or 0
    finally:
        await channel.close()


async def queue_consumers(connection: aio_pika.abc.AbstractRobustConnection, name: str) -> int:
    """Consumers of queue ``name``; 0 while it does not exist yet (its daemon still starting)."""
    channel = await connection.channel()
    try:
        q = await channel.declare_queue(name, passive=True)
        return q.declaration_result.consumer_count or 0
    except aio_pika.exceptions.ChannelClosed:  # a passive declare of a missing queue closes it
        return 0
    finally:
        if not channel.is_closed:
            await channel.close()


@asynccontextmanager
async def running(services: list[Any], settings: Settings) -> AsyncIterator[Any]:
    """Run services in-process (as ``spool run`` would) for the duration of the block."""
    from common.runtime import Process

    process = Process(services, settings)
    task = asyncio.create_task(process.run())
    try:
        await wait_for(lambda: _started(process, len(services), task), timeout=30)
        yield process
    finally:
        process.request_stop()
        await asyncio.wait_for(task, timeout=60)


async def _started(process: Any, n: int, task: asyncio.Task[Any]) -> bool:
    if task.done():
        task.result()  # surface the start-up error
    return len(process.runners) == n


def start_daemon(config: Path, daemon: str, log: Path, *extra: str) -> subprocess.Popen[bytes]:
    """``spool run DAEMON`` as a real process (fault tests kill it), its output appended to ``log``."""
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "daemons", "--config", str(config), "run", daemon, *extra],
            stdout=out, stderr=out, cwd=REPO,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip


@pytest.fixture
def mount_tmpfs(tmp_path: Path) -> Iterator[Callable[..., Path]]:
    """Mount small tmpfs file systems under tmp_path (root only); unmounted afterwards."""
    mounted: list[Path] = []

    def mount(name: str, *options: str) -> Path:
        if os.geteuid() != 0:
            pytest.skip("mounting a tmpfs needs root")
        target = tmp_path / name
        target.mkdir()
        # 64 KiB unless the test gives a size (a later size= would also win, but say it once).
        opts = ",".join(options if any(o.startswith("size=") for o in options) else ("size=64k", *options))
        res = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(target)], capture_output=True)
        if res.returncode != 0:
            pytest.skip(f"mount -t tmpfs not permitted here: {res.stderr.decode().strip()}")
        mounted.append(target)
        return target

    yield mount
    for target in mounted:
        subprocess.run(["umount", "-l", str(target)], check=False)
