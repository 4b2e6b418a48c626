"""Spool on a real three-node RabbitMQ cluster (``.ci/rabbitmq-cluster.sh``, started once per session):
the work queues are quorum queues with a member on each node, and a daemon given the three nodes'
URLs goes on consuming on a surviving node when the node it was connected to is SIGKILLed, losing
no confirmed message; the killed node, started again, rejoins.

The failover of the connection alone (which URL is tried after which) is also tested without the
cluster, against the main broker behind two proxies."""

# ruff: noqa: F811

from __future__ import annotations

import asyncio
import json
import random
import signal
import zlib
from pathlib import Path
from typing import Any

import aio_pika
import pytest

from common.bus.connection import ClusterConnection, connect
from common.bus.topology import declare_topology, delete_topology
from common.catalogue import Catalogue
from common.config import BusSettings, Settings, load_settings
from common.errors import ConfigError, Retryable
from tests.cluster_fixtures import Cluster, rabbit_cluster  # noqa: F401
from tests.conftest import AMQP_URL, cloudevent, start_daemon, wait_for, write_config
from tests.tcp_proxy import TcpProxy

pytestmark = pytest.mark.integration
DATASET = "lst1.20261123.run012345.dl0"


def cluster_config(tmp_path: Path, tag: str, cluster: Cluster, **bus: str) -> Path:
    """The suite's usual isolated config, with the three nodes in ``bus.urls`` instead of ``url``."""
    state = tmp_path / "state"
    (state / "landing").mkdir(parents=True, exist_ok=True)
    path = write_config(tmp_path / "spool.toml", state, tag)
    urls = "urls = [" + ", ".join(json.dumps(u) for u in cluster.urls) + "]"
    extra = "".join(f"\n{key} = {value}" for key, value in bus.items())
    path.write_text(path.read_text().replace(f'url = "{AMQP_URL}"', urls + extra))
    return path


async def drop_topology(settings: Settings) -> None:
    connection = await connect(settings.bus, name="spool-test-cleanup")
    try:
        channel = await connection.channel()
        await delete_topology(channel, settings)
    finally:
        await connection.close()


def announce(settings: Settings, first: int, n: int) -> list[bytes]:
    """``n`` small files written to the landing area, and their ``file.ready`` events."""
    rng = random.Random(first)
    events = []
    for i in range(first, first + n):
        path = settings.landing_areas["lst1"] / f"run012345/subrun{i:05d}.fits.fz"
        path.parent.mkdir(parents=True, exist_ok=True)
        data = rng.randbytes(512)
        path.write_bytes(data)
        data_ = {"path": str(path), "dataset": DATASET, "size": 512, "adler32": f"{zlib.adler32(data):08x}"}
        events.append(cloudevent(data_, id_=f"ev-{i}"))
    return events


async def publish_confirmed(exchange: aio_pika.abc.AbstractExchange, bodies: list[bytes]) -> int:
    """Publish each body until the broker confirms it (a publish the node's death interrupted is
    sent again: a duplicate is allowed, a loss is not). Returns how many publishes failed."""
    failed = 0
    for body in bodies:
        for _ in range(120):
            try:
                message = aio_pika.Message(body, content_type="application/cloudevents+json", delivery_mode=2)
                await asyncio.wait_for(exchange.publish(message, routing_key="file.ready"), timeout=10)
                break
            except (aio_pika.exceptions.AMQPError, ConnectionError, RuntimeError, TimeoutError):
                failed += 1
                await asyncio.sleep(0.5)
        else:
            raise AssertionError("a message was never confirmed")
    return failed


async def registered(settings: Settings) -> int:
    async with await Catalogue.open(settings.catalogue.url) as catalogue:
        return (await catalogue.queries.counts()).files


async def test_quorum_queues_have_a_member_on_each_node(
    rabbit_cluster: Cluster, tmp_path: Path, tag: str
) -> None:
    settings = load_settings(cluster_config(tmp_path, tag, rabbit_cluster, side_queues='"quorum"'))
    connection = await connect(settings.bus, name="spool-test-members")
    try:
        channel = await connection.channel()
        await declare_topology(channel, settings)
        three = {rabbit_cluster.node(n) for n in (1, 2, 3)}
        for daemon in ("ingest", "replicator", "tape", "recall", "monitor"):
            # The work queue, and with bus.side_queues = "quorum" its retry and dead-letter queues.
            names = [settings.queue(daemon), settings.dead_queue(daemon)]
            names += [settings.retry_queue(daemon, t) for t in range(len(settings.bus.retry_tiers))]
            for name in names:
                queue = rabbit_cluster.queue(name)
                assert queue["type"] == "quorum", name
                assert set(queue["members"]) == three, (name, queue["members"])
        await wait_for(lambda: _all_online(rabbit_cluster, settings), timeout=30, interval=0.5)
    finally:
        await connection.close()
        await drop_topology(settings)


async def test_the_initial_group_size_reaches_the_broker_and_a_change_is_refused_clearly(
    rabbit_cluster: Cluster, tmp_path: Path, tag: str
) -> None:
    settings = load_settings(cluster_config(tmp_path, tag, rabbit_cluster, quorum_initial_group_size="2"))
    connection = await connect(settings.bus, name="spool-test-group-size")
    try:
        channel = await connection.channel()
        await declare_topology(channel, settings, ["ingest"])
        assert len(rabbit_cluster.queue(settings.queue("ingest"))["members"]) == 2
        # The same queue asked for with another size (or none: an older configuration) is refused
        # by RabbitMQ; the operator gets the one-line ConfigError, not a channel error.
        for other in (3, None):
            changed = settings.model_copy(
                update={"bus": settings.bus.model_copy(update={"quorum_initial_group_size": other})}
            )
            channel = await connection.channel()
            with pytest.raises(ConfigError, match="exists with other arguments"):
                await declare_topology(channel, changed, ["ingest"])
    finally:
        await connection.close()
        await drop_topology(settings)


@pytest.mark.slow
async def test_a_daemon_moves_to_a_surviving_node_and_loses_no_confirmed_message(
    rabbit_cluster: Cluster, tmp_path: Path, tag: str
) -> None:
    config = cluster_config(tmp_path, tag, rabbit_cluster)
    settings = load_settings(config)
    log = tmp_path / "ingest.log"
    killed: int | None = None
    proc = start_daemon(config, "ingest", log)
    publisher = await connect(settings.bus, name="spool-test-publisher")
    try:
        await wait_for(lambda: _connected(rabbit_cluster, "spool-ingest", 1), timeout=60)
        [node] = rabbit_cluster.connection_nodes("spool-ingest")
        killed = rabbit_cluster.number(node)
        channel = await publisher.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(settings.bus.exchange)
        first, second = announce(settings, 0, 150), announce(settings, 150, 150)
        await publish_confirmed(exchange, first)
        await wait_for(lambda: _at_least(settings, 1), timeout=60, interval=0.02)

        rabbit_cluster.kill(killed)
        # Published after the kill: only a consumer on a surviving node can take these.
        await publish_confirmed(exchange, second)
        try:
            await wait_for(lambda: _at_least(settings, 300), timeout=180, interval=0.2)
        except AssertionError:
            queue = rabbit_cluster.queue(settings.queue("ingest"))
            shown = {
                k: queue.get(k)
                for k in (
                    "messages",
                    "messages_ready",
                    "messages_unacknowledged",
                    "consumers",
                    "leader",
                    "online",
                    "members",
                )
            }
            raise AssertionError(
                f"{await registered(settings)} of 300 registered; killed {node}; queue {shown}; "
                f"connections {rabbit_cluster.connection_nodes('spool-')}\n{log.read_text()[-4000:]}"
            ) from None
        assert proc.poll() is None, log.read_text()[-3000:]
        # The management API lists a connection a few seconds after it opened (statistics).
        await wait_for(lambda: _connected(rabbit_cluster, "spool-ingest", 1), timeout=30, interval=0.5)
        [moved_to] = rabbit_cluster.connection_nodes("spool-ingest")
        assert moved_to != node
        text = log.read_text()
        assert '"broker_node_lost"' in text and '"broker_reconnected"' in text, text[-3000:]
        # Once reconnected, its publishes are confirmed: a channel opened right after the queues'
        # leader died had every publish nacked for the whole outage (``NODE_LOSS_SETTLE`` in
        # common.bus.connection): every heartbeat (each 0.5 s) refused, and the handlers' retries
        # looping (1,540 ``cannot_park_message`` in one run). Only deliveries in flight at the kill
        # may fail to park their retry: the retry queues are classic queues, on the killed node.
        after = text.split('"broker_reconnected"', 1)[1]
        assert '"heartbeat_not_published"' not in after, after[-3000:]
        assert text.count('"cannot_park_message"') <= 64, text[-3000:]  # prefetch = 64

        rabbit_cluster.start()  # the killed node comes back and rejoins
        assert rabbit_cluster.running_nodes() == {rabbit_cluster.node(n) for n in (1, 2, 3)}
        queue = rabbit_cluster.queue(settings.queue("ingest"))
        assert len(queue["members"]) == 3
        await wait_for(lambda: _all_online(rabbit_cluster, settings), timeout=60, interval=0.5)
        killed = None
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
        await publisher.close()
        if killed is not None:
            rabbit_cluster.start()
    assert code == 0, log.read_text()[-3000:]
    async with await Catalogue.open(settings.catalogue.url) as catalogue:
        counts = await catalogue.queries.counts()
    assert counts.files == 300 and counts.replicas.get("available") == 300
    depth = rabbit_cluster.queue(settings.dead_queue("ingest")).get("messages", 0)
    assert depth == 0
    await drop_topology(settings)


async def _connected(cluster: Cluster, prefix: str, n: int) -> bool:
    try:
        return len(cluster.connection_nodes(prefix)) == n
    except OSError:
        return False


async def _at_least(settings: Settings, n: int) -> bool:
    return await registered(settings) >= n


async def _all_online(cluster: Cluster, settings: Settings) -> bool:
    return len(cluster.queue(settings.queue("ingest")).get("online", [])) == 3


# --- the connection's failover, without the cluster: two proxies in front of the main broker ------


async def test_the_connection_moves_to_the_other_url_when_its_node_goes() -> None:
    async with TcpProxy() as a, TcpProxy() as b:
        bus = BusSettings(urls=[a.url(AMQP_URL), b.url(AMQP_URL)], connect_timeout=5)
        connection = await connect(bus, name="spool-test-failover")
        try:
            assert isinstance(connection, ClusterConnection)
            first = connection.url.port
            gone, other = (a, b) if first == a.port else (b, a)
            channel = await connection.channel()
            queue = await channel.declare_queue(exclusive=False, auto_delete=False, durable=False)
            got: list[bytes] = []

            async def take(message: aio_pika.abc.AbstractIncomingMessage) -> None:
                got.append(message.body)
                await message.ack()

            await queue.consume(take)
            reconnected = asyncio.Event()
            connection.reconnect_callbacks.add(lambda _c: reconnected.set())
            await gone.refuse()
            assert gone.cut() == 1
            await asyncio.wait_for(reconnected.wait(), timeout=20)
            assert connection.url.port == other.port
            # The consumer was restored on the other URL: a message published now reaches it.
            await channel.default_exchange.publish(aio_pika.Message(b"after"), routing_key=queue.name)
            await wait_for(lambda: _true(got == [b"after"]), timeout=10)
            await queue.delete(if_unused=False, if_empty=False)
        finally:
            await connection.close()


async def test_a_dead_first_url_is_skipped_and_all_dead_is_one_retryable_naming_each() -> None:
    async with TcpProxy() as dead, TcpProxy() as alive:
        await dead.refuse()
        bus = BusSettings(urls=[dead.url(AMQP_URL), alive.url(AMQP_URL)], connect_timeout=5)
        for _ in range(4):  # whatever the shuffle picks first, the live one is where it lands
            connection = await connect(bus)
            assert isinstance(connection, ClusterConnection) and connection.url.port == alive.port
            await connection.close()
        await alive.refuse()
        with pytest.raises(Retryable) as refused:
            await connect(bus)
    assert refused.value.reason == "broker_unreachable"
    assert f":{dead.port}/" in refused.value.message and f":{alive.port}/" in refused.value.message
    assert "guest:***@" in refused.value.message and "guest:guest" not in refused.value.message


async def _true(value: Any) -> bool:
    return bool(value)


async def test_broker_declare_on_a_cluster_connects_to_its_nodes_as_the_operator(settings: Settings) -> None:
    from common.cli.broker import _declare

    async with TcpProxy() as a, TcpProxy() as b:
        await a.refuse()  # one node down: the other declares
        urls = [a.url(AMQP_URL), b.url(AMQP_URL)]
        bus = settings.bus.model_copy(update={"urls": urls, "url": urls[0]})
        cluster_settings = settings.model_copy(update={"bus": bus})
        await _declare(cluster_settings, urls[0])
        assert b.connections == 1
    connection = await aio_pika.connect(AMQP_URL)
    try:
        channel = await connection.channel()
        await channel.declare_queue(settings.queue("ingest"), passive=True)  # it exists
        await delete_topology(channel, settings)
    finally:
        await connection.close()
