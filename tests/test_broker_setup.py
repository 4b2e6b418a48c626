"""``spool broker setup`` against the real broker: least-privilege users in a fresh vhost, a daemon
working as its own user, an external publisher limited to the external contract, and ``spool
ingest`` / ``spool recall`` working as that publisher. Users and vhost are removed afterwards."""

from __future__ import annotations

import asyncio
import os
import stat
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import aiormq
import pytest

from common.bus import permissions
from common.bus.management import ManagementClient, ManagementUnreachable, endpoint_for
from common.bus.topology import declare_topology
from common.catalogue import Catalogue
from common.config import DAEMON_NAMES, Settings, load_settings
from daemons.ingest.handlers import service as ingest_service
from tests.conftest import AMQP_URL, cloudevent, running, wait_for, write_config

REPO = Path(__file__).resolve().parent.parent
DATASET = "lst1.20261123.run012345.dl0"
API = os.environ.get("SPOOL_TEST_MANAGEMENT_URL", "http://127.0.0.1:15672/api")
ADMIN = {"Authorization": aiohttp.encode_basic_auth("guest", "guest")}

pytestmark = pytest.mark.integration


def spool(config: Path, *args: str, env_file: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ}
    if env_file is not None:  # what a systemd EnvironmentFile= or `set -a; . file` would give
        key, _, value = env_file.read_text().strip().partition("=")
        env[key] = value.strip("'")
    return subprocess.run(
        [sys.executable, "-m", "daemons", "--config", str(config), *args],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=120,
    )  # fmt: skip


async def _api(method: str, path: str) -> int:
    async with aiohttp.ClientSession(headers=ADMIN) as s, s.request(method, f"{API}/{path}") as r:
        return r.status


@pytest.fixture
def vhost_config(tmp_path: Path, tag: str) -> Iterator[Path]:
    """A config on a vhost of its own (created by the setup under test), two landing areas."""
    state = tmp_path / "state"
    for area in ("landing", "landing2"):
        (state / area).mkdir(parents=True)
    vhost = f"spool-test-{tag}"
    config = write_config(tmp_path / "spool.toml", state, tag)
    text = config.read_text().replace(AMQP_URL, AMQP_URL.rstrip("/") + f"/{vhost}")
    config.write_text(text.replace('lst1 = "landing"', 'lst1 = "landing"\nlst2 = "landing2"'))
    yield config
    settings = load_settings(config)
    users = [g.user for g in permissions.plan(settings, ["alice", "bob"])]

    async def cleanup() -> None:
        for user in users:
            await _api("DELETE", f"users/{user}")
        await _api("DELETE", f"vhosts/{vhost}")

    asyncio.run(cleanup())


def _trusting(config: Path, secrets: Path) -> Path:
    """The config with the snippet setup wrote merged in (spool_users, landing_publishers)."""
    snippet = (secrets / "spool-broker.toml").read_text()
    users = next(line for line in snippet.splitlines() if line.startswith("spool_users"))
    bound = snippet.split("[landing_publishers]", 1)[1] if "[landing_publishers]" in snippet else ""
    text = config.read_text().replace("[bus]\n", f"[bus]\n{users}\n", 1)
    merged = config.with_name("trusting.toml")
    merged.write_text(text + ("[landing_publishers]\n" + bound if bound else ""))
    return merged


def _url(secrets: Path, user: str) -> str:
    return (secrets / f"{user}.env").read_text().strip().partition("=")[2].strip("'")


async def _refused(url: str, action: Any) -> str:
    """Run ``action(channel)`` as ``url``'s user; the broker's refusal text ('' when it allowed)."""
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        await action(channel)
        return ""
    except (aiormq.exceptions.ChannelAccessRefused, aiormq.exceptions.ChannelPreconditionFailed) as exc:
        return str(exc)
    finally:
        await connection.close()


def _publish(exchange: str, key: str, **properties: Any) -> Any:
    async def action(channel: aio_pika.abc.AbstractChannel) -> None:
        target = await channel.get_exchange(exchange, ensure=False) if exchange else channel.default_exchange
        body = cloudevent({"name": "x"}, type_=key or "file.ready")
        await target.publish(aio_pika.Message(body, **properties), routing_key=key, mandatory=True)

    return action


@pytest.fixture
async def setup_done(vhost_config: Path, tmp_path: Path) -> AsyncIterator[tuple[Settings, Path, Path]]:
    secrets = tmp_path / "secrets"
    done = await asyncio.to_thread(
        spool, vhost_config, "broker", "setup", "--apply", "--secrets-dir", str(secrets),
        "--publisher", "alice", "--area", "lst1", "--publisher", "bob", "--area", "lst2",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    yield load_settings(_trusting(vhost_config, secrets)), _trusting(vhost_config, secrets), secrets


async def test_setup_applies_least_privilege_users_and_spool_works_with_them(setup_done, tmp_path):
    settings, config, secrets = setup_done
    p, x = settings.bus.queue_prefix, settings.bus.exchange
    ingest_user, operator = f"{p}-ingest", f"{p}-operator"
    # Files: passwords and env files 0600 in a 0700 directory; the snippet names Spool's own users.
    assert stat.S_IMODE(secrets.stat().st_mode) == 0o700
    for user in [*(f"{p}-{d}" for d in DAEMON_NAMES), operator, "alice", "bob"]:
        for suffix in (".password", ".env"):
            assert stat.S_IMODE((secrets / f"{user}{suffix}").stat().st_mode) == 0o600
    assert settings.bus.trusted_users() == {*(f"{p}-{d}" for d in DAEMON_NAMES), operator}
    assert settings.landing_publishers == {"lst1": ["alice"], "lst2": ["bob"]}
    password = (secrets / "alice.password").read_text()
    printed = await asyncio.to_thread(
        spool, config, "broker", "setup", "--print", "--secrets-dir", str(secrets)
    )
    assert printed.returncode == 0 and "set_topic_permissions" in printed.stdout
    assert password not in printed.stdout  # read from the files, never printed
    assert (secrets / "alice.password").read_text() == password  # kept, not regenerated

    # Every queue exists (declared by setup as the operator user) before any daemon ran.
    admin = await aio_pika.connect(settings.bus.url)
    try:
        channel = await admin.channel()
        for daemon in DAEMON_NAMES:
            await channel.declare_queue(settings.queue(daemon), passive=True)
    finally:
        await admin.close()

    alice = _url(secrets, "alice")
    # The external publisher: file.ready accepted; internal commands, other queues, forged
    # identities, the default exchange and declaring anything but its reply queues refused.
    assert await _refused(alice, _publish(x, "file.ready")) == ""
    assert "tape.archive" in await _refused(alice, _publish(x, "tape.archive"))
    assert "replica.request" in await _refused(alice, _publish(x, "replica.request"))
    assert "daemon.heartbeat" in await _refused(alice, _publish(x, "daemon.heartbeat"))
    assert "amq.default" in await _refused(alice, _publish("", settings.queue("ingest")))
    assert "user_id" in await _refused(alice, _publish(x, "file.ready", user_id=ingest_user))
    assert "ACCESS_REFUSED" in await _refused(
        alice, lambda ch: ch.declare_queue(settings.queue("ingest"), durable=True)
    )

    async def consume_other(ch: aio_pika.abc.AbstractChannel) -> None:
        queue = await ch.get_queue(settings.queue("ingest"), ensure=False)
        await queue.consume(_ignore)

    assert "ACCESS_REFUSED" in await _refused(alice, consume_other)
    assert "ACCESS_REFUSED" in await _refused(alice, lambda ch: ch.declare_queue(f"{p}.reply.bob.x"))
    assert await _refused(alice, lambda ch: ch.declare_queue(f"{p}.reply.alice.x", exclusive=True)) == ""
    # A daemon user publishes only its own routing keys and consumes only its own queue.
    ingest_url = _url(secrets, ingest_user)
    assert "recall.completed" in await _refused(ingest_url, _publish(x, "recall.completed"))
    assert "ACCESS_REFUSED" in await _refused(
        ingest_url, lambda ch: ch.declare_queue(settings.queue("tape"), durable=True)
    )

    # Each daemon user declares its own queues exactly as its daemon does, and publishes each
    # routing key it needs (the monitor's queue, bound to "#", takes them all).
    for daemon in DAEMON_NAMES:
        user = f"{p}-{daemon}"

        async def work(ch: aio_pika.abc.AbstractChannel, d: str = daemon, u: str = user) -> None:
            await declare_topology(ch, settings, [d])
            for key in permissions.DAEMON_PUBLISHES[d]:
                await _publish(x, key, user_id=u)(ch)

        assert await _refused(_url(secrets, user), work) == "", daemon

    # The monitor's user reads queue figures from the management API (tag monitoring); alice not.
    monitor_bus = settings.bus.model_copy(update={"url": _url(secrets, f"{p}-monitor")})
    async with ManagementClient(endpoint_for(monitor_bus)) as api:
        assert settings.queue("ingest") in (await api.snapshot([settings.queue("ingest")])).queues
    alice_bus = settings.bus.model_copy(update={"url": alice})
    async with ManagementClient(endpoint_for(alice_bus)) as api:
        with pytest.raises(ManagementUnreachable, match="401"):
            await api.snapshot([settings.queue("ingest")])

    # The ingest daemon as its own user; alice announces a file with `spool ingest` in her area.
    daemon_settings = settings.model_copy(update={"bus": settings.bus.model_copy(update={"url": ingest_url})})
    landing = settings.landing_areas["lst1"]
    (landing / "a.dat").write_bytes(b"hello")
    (settings.landing_areas["lst2"] / "b.dat").write_bytes(b"other area")
    async with running([ingest_service], daemon_settings):
        announced = await asyncio.to_thread(
            spool, config, "ingest", str(landing / "a.dat"), "-d", DATASET, env_file=secrets / "alice.env"
        )
        assert announced.returncode == 0, announced.stderr
        catalogue = await Catalogue.open(settings.catalogue.url)
        try:
            await wait_for(lambda: _registered(catalogue, 1))
        finally:
            await catalogue.close()
    # Bound to lst1: alice may not announce in bob's area; nothing is published.
    elsewhere = await asyncio.to_thread(
        spool,
        config,
        "ingest",
        str(settings.landing_areas["lst2"]),
        "-d",
        DATASET,
        env_file=secrets / "alice.env",
    )
    assert elsewhere.returncode == 1 and "lst2" in elsewhere.stderr and "Traceback" not in elsewhere.stderr
    # `spool recall request` as alice: published (no declare it may not make).
    recalled = await asyncio.to_thread(
        spool, config, "recall", "request", f"{DATASET}/a.dat", "--json", env_file=secrets / "alice.env"
    )
    assert recalled.returncode == 0, recalled.stderr


async def _ignore(message: aio_pika.abc.AbstractIncomingMessage) -> None:
    pass


async def _registered(catalogue: Catalogue, n: int) -> bool:
    return len(await catalogue.queries.list_files()) == n


async def test_recall_wait_uses_a_reply_queue_an_external_user_may_read(setup_done):
    """``--wait`` declares ``<prefix>.reply.<user>.<id>``; the reply reaches it."""
    from common.cli.recall import _reply_queue

    settings, _config, secrets = setup_done
    bus = settings.bus.model_copy(update={"url": _url(secrets, "alice")})
    from common.bus.connection import connect

    connection = await connect(bus, name="test")
    try:
        channel = await connection.channel()
        queue = await _reply_queue(connection, channel, settings.model_copy(update={"bus": bus}))
        assert queue.name.startswith(f"{settings.bus.queue_prefix}.reply.alice.")
        # As the recall daemon would answer: its user publishes to the queue by name.
        recall = await aio_pika.connect(_url(secrets, f"{settings.bus.queue_prefix}-recall"))
        try:
            ch = await recall.channel()
            await ch.default_exchange.publish(aio_pika.Message(b"{}"), routing_key=queue.name)
        finally:
            await recall.close()
        got = None
        for _ in range(50):
            got = await queue.get(no_ack=True, fail=False)
            if got is not None:
                break
            await asyncio.sleep(0.05)
        assert got is not None and got.body == b"{}"
    finally:
        await connection.close()


async def test_a_daemon_run_with_another_daemons_user_stops_with_one_line(setup_done, tmp_path):
    settings, config, secrets = setup_done
    env_file = secrets / f"{settings.bus.queue_prefix}-tape.env"
    done = await asyncio.to_thread(spool, config, "run", "ingest", "--once", env_file=env_file)
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert "refused" in done.stderr and "broker setup" in done.stderr


def test_setup_refuses_bad_names_and_unknown_areas_in_one_line(vhost_config, tmp_path):
    secrets = tmp_path / "s"
    bad = spool(
        vhost_config, "broker", "setup", "--print", "--secrets-dir", str(secrets), "--publisher", "a;rm -rf"
    )
    assert bad.returncode == 1 and "broker user name" in bad.stderr and "Traceback" not in bad.stderr
    area = spool(
        vhost_config, "broker", "setup", "--print", "--secrets-dir", str(secrets),
        "--publisher", "alice", "--area", "nowhere",
    )  # fmt: skip
    assert area.returncode == 1 and "nowhere" in area.stderr
    both = spool(vhost_config, "broker", "setup", "--secrets-dir", str(secrets))
    assert both.returncode == 1 and "--print" in both.stderr
    # A password file others may read is refused, not used.
    secrets.mkdir(mode=0o700, exist_ok=True)
    loose = secrets / f"{load_settings(vhost_config).bus.queue_prefix}-ingest.password"
    loose.write_text("hunter2")
    loose.chmod(0o644)
    refused = spool(vhost_config, "broker", "setup", "--print", "--secrets-dir", str(secrets))
    assert refused.returncode == 1 and "chmod 600" in refused.stderr and "hunter2" not in refused.stdout


@pytest.mark.parametrize("outside", ["/etc", "../outside.dat", "sub/../../outside.dat", "link", "dirlink"])
def test_spool_ingest_refuses_paths_outside_every_landing_area_before_publishing(
    outside: str, vhost_config: Path, tmp_path: Path
) -> None:
    settings = load_settings(vhost_config)
    state, landing = settings.state_dir, settings.landing_areas["lst1"]
    (state / "outside.dat").write_bytes(b"secret")
    (landing / "ok.dat").write_bytes(b"fine")
    (landing / "sub").mkdir()
    os.symlink(state / "outside.dat", landing / "link")  # a file inside pointing outside
    os.symlink(state, landing / "dirlink")  # a directory inside that is really outside
    target = outside if outside.startswith("/") else str(landing / outside)
    # Together with a good file: one bad path refuses the whole command, before any publish
    # (the vhost does not even exist yet: a publish attempt would fail differently).
    done = spool(vhost_config, "ingest", str(state / "landing" / "ok.dat"), target, "-d", DATASET)
    assert done.returncode == 1, done.stderr
    assert "outside every landing area" in done.stderr and "nothing was published" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_setup_print_emits_exact_regexes_for_each_user(vhost_config, tmp_path):
    settings = load_settings(vhost_config)
    grants = {g.user: g for g in permissions.plan(settings, ["alice"])}
    p = settings.bus.queue_prefix
    ingest = grants[f"{p}-ingest"]
    import re

    # Anchored, own names only: no prefix match lets "p.ingestX" or "p.ingest.retry.x" through.
    for name in (settings.queue("ingest"), settings.retry_queue("ingest", 3), settings.dead_queue("ingest")):
        assert re.fullmatch(ingest.configure, name)
    for name in (
        settings.queue("tape"),
        settings.queue("ingest") + "x",
        settings.queue("ingest") + ".retry.x",
    ):
        assert not re.fullmatch(ingest.configure, name)
    alice = grants["alice"]
    assert re.fullmatch(alice.configure, f"{p}.reply.alice.{uuid.uuid4().hex}")
    assert not re.fullmatch(alice.configure, f"{p}.reply.alicex.1")
    assert not re.fullmatch(alice.write, "amq.default")
    assert re.fullmatch(alice.topic_write, "file.ready") and not re.fullmatch(
        alice.topic_write, "tape.archive"
    )


def test_every_routing_key_has_a_publisher_user() -> None:
    """A message type added without a user allowed to publish it would be refused by the broker
    under least privilege: every key is a daemon's or the external contract's."""
    from common.messages import MODELS

    published = {k for keys in permissions.DAEMON_PUBLISHES.values() for k in keys}
    assert set(MODELS) <= published | set(permissions.EXTERNAL_PUBLISHES)
    assert set(permissions.EXTERNAL_PUBLISHES) <= set(MODELS)
