"""Issue 16, class 8 on the consumer side: Spool's headers, internal commands and replies are
Spool's own (``common.bus.admission``), tested against the real broker with a second user.

Each test runs on a vhost of its own, with ``guest`` as Spool's user and an ``outsider`` user who
may write to the exchange anything (a broker whose topic permissions are loose: the worst case the
runner must hold against). Both are removed afterwards.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aio_pika
import aiormq
import pytest
from pamqp.commands import Basic

from common.bus import headers as H
from common.bus.admission import EXTERNAL_ROUTING_KEYS, is_reply_queue
from common.bus.service import Context, Service
from common.errors import Retryable
from common.messages import MODELS, FileReady
from tests.broker_users import connect_as, on_vhost, private_vhost
from tests.conftest import cloudevent, queue_depth, running, wait_for, write_config

pytestmark = pytest.mark.integration

CLOUDEVENTS = "application/cloudevents+json"
INTERNAL_ROUTING_KEYS = sorted(set(MODELS) - EXTERNAL_ROUTING_KEYS)


@pytest.fixture
async def vhost(tag: str) -> AsyncIterator[dict[str, str]]:
    """A vhost of the test's own, and an outsider user allowed to publish anything on it."""
    async with private_vhost(tag) as made:
        yield made


@pytest.fixture
def config_file(tmp_path: Path, tag: str, vhost: dict[str, str]) -> Path:
    """conftest's configuration, on the test's vhost (overrides conftest's ``config_file``)."""
    state = tmp_path / "state"
    (state / "landing").mkdir(parents=True)
    return on_vhost(write_config(tmp_path / "spool.toml", state, tag), vhost["name"])


@pytest.fixture
async def outsider(settings, vhost) -> AsyncIterator[aio_pika.abc.AbstractConnection]:
    connection = await connect_as(settings.bus.url, vhost["outsider"], vhost["password"])
    try:
        yield connection
    finally:
        await connection.close()


async def send(
    connection: aio_pika.abc.AbstractConnection,
    exchange: str,
    routing_key: str,
    body: bytes,
    **properties: Any,
) -> None:
    """Publish with exactly these AMQP properties, an empty ``reply_to`` included (pamqp leaves
    empty strings out; other clients send them)."""
    channel = await connection.channel(publisher_confirms=True)
    try:
        underlay = await channel.get_underlay_channel()
        props = ExactProperties(content_type="application/cloudevents+json", **properties)
        await underlay.basic_publish(body, exchange=exchange, routing_key=routing_key, properties=props)
    finally:
        if not channel.is_closed:
            await channel.close()


class ExactProperties(Basic.Properties):
    """``Basic.Properties`` whose empty ``reply_to`` is sent as an empty string, not left out."""

    def marshal(self) -> bytes:
        if self.reply_to != "":
            return super().marshal()
        self.reply_to = "\x00"  # placeholder of one byte, replaced by an empty short string below
        try:
            data = super().marshal()
        finally:
            self.reply_to = ""
        # Properties are written in order: flags, content_type, ..., reply_to (the placeholder).
        start = 2 + 1 + len(self.content_type or "")
        at = data.index(b"\x01\x00", start)
        return data[:at] + b"\x00" + data[at + 2 :]


class Recorder:
    """A stand-in daemon named ``ingest``: records what reached its handlers, fails on request."""

    def __init__(self, keys: list[str] | None = None, *, fail: bool = False) -> None:
        self.seen: list[tuple[str, int, str | None, str | None]] = []  # key, attempt, sender, reply_to
        self.service = Service("ingest")
        for key in keys or [FileReady.ROUTING_KEY]:
            self.service.routes[key] = _route(MODELS[key], self._handle(key, fail))

    def _handle(self, key: str, fail: bool) -> Any:
        async def handle(msg: Any, ctx: Context[Any]) -> None:
            self.seen.append((key, ctx.attempt, ctx.user_id, ctx.reply_to))
            if ctx.reply_to:  # as recall answers a request
                reply = aio_pika.Message(b'{"done": true}', content_type="application/json")
                await ctx.publisher.publish_raw(ctx.reply_to, reply)  # type: ignore[attr-defined]
            if fail:
                raise Retryable("endpoint_down", "no write pools online")

        return handle


def _route(model: Any, handler: Any) -> Any:
    from common.bus.service import Route

    return Route(model, handler)


async def dead_letters(connection, settings) -> list[aio_pika.abc.AbstractIncomingMessage]:
    channel = await connection.channel()
    queue = await channel.get_queue(settings.dead_queue("ingest"))
    out = []
    while (m := await queue.get(no_ack=True, fail=False)) is not None:
        out.append(m)
    await channel.close()
    return out


async def _depth_is(broker, name: str, n: int) -> bool:
    return await queue_depth(broker, name) == n


def ready(path: str = "/land/a") -> bytes:
    return cloudevent({"path": path, "dataset": "d"})


# --- Spool's headers ---------------------------------------------------------------------------
async def test_forged_spool_headers_from_an_outsider_are_ignored_through_every_retry(
    settings, broker, topology, outsider, vhost
):
    """``x-spool-attempt: 999`` does not skip the retries; a forged routing key or sender is not
    read; every retry copy keeps the outsider as the sender."""
    daemon = Recorder(fail=True)
    forged = {H.ATTEMPT: 999, H.ROUTING_KEY: "tape.archive", H.SENDER: "guest", H.QUEUE: "elsewhere"}
    async with running([daemon.service], settings):
        await send(outsider, settings.bus.exchange, "file.ready", ready(), headers=forged)
        await wait_for(lambda: _depth_is(broker, settings.dead_queue("ingest"), 1))
    assert daemon.seen == [("file.ready", n, None, None) for n in range(1, settings.bus.max_attempts + 1)]
    [dead] = await dead_letters(broker, settings)
    h = dead.headers
    assert (h[H.ATTEMPTS], h[H.REASON], h[H.ROUTING_KEY]) == (
        settings.bus.max_attempts,
        "endpoint_down",
        "file.ready",
    )
    assert h[H.SENDER] == "" and h[H.QUEUE] == settings.queue("ingest")  # not the forged ones
    assert dead.user_id == "guest"  # the copy is Spool's, its sender is not


async def test_an_outsiders_user_id_is_its_sender_on_every_attempt(
    settings, broker, topology, outsider, vhost
):
    daemon = Recorder(fail=True)
    async with running([daemon.service], settings):
        await send(outsider, settings.bus.exchange, "file.ready", ready(), user_id=vhost["outsider"])
        await wait_for(lambda: _depth_is(broker, settings.dead_queue("ingest"), 1))
    assert [(a, s) for _k, a, s, _r in daemon.seen] == [
        (n, vhost["outsider"]) for n in range(1, settings.bus.max_attempts + 1)
    ]
    [dead] = await dead_letters(broker, settings)
    assert dead.headers[H.SENDER] == vhost["outsider"]


async def test_spools_own_attempt_header_is_believed(settings, broker, topology):
    """The counterpart: the same header from Spool's user counts (here: the last attempt)."""
    daemon = Recorder(fail=True)
    async with running([daemon.service], settings):
        await send(broker, settings.bus.exchange, "file.ready", ready(), user_id="guest",
                   headers={H.ATTEMPT: settings.bus.max_attempts})  # fmt: skip
        await wait_for(lambda: _depth_is(broker, settings.dead_queue("ingest"), 1))
    assert daemon.seen == [("file.ready", settings.bus.max_attempts, "guest", None)]


async def test_a_user_id_other_than_the_connections_is_refused_by_the_broker(settings, outsider, topology):
    """The ground the trust stands on: RabbitMQ validates ``user_id``."""
    with pytest.raises((aiormq.exceptions.ChannelPreconditionFailed, aiormq.exceptions.ChannelClosed)):
        await send(outsider, settings.bus.exchange, "replica.request", b"{}", user_id="guest")


# --- internal commands ---------------------------------------------------------------------------
@pytest.mark.parametrize("routing_key", INTERNAL_ROUTING_KEYS)
async def test_internal_routing_keys_from_an_outsider_are_not_permitted(
    settings, broker, topology, outsider, vhost, routing_key
):
    daemon = Recorder([FileReady.ROUTING_KEY, routing_key])
    channel = await broker.channel()
    queue = await channel.get_queue(settings.queue("ingest"))
    await queue.bind(settings.bus.exchange, routing_key=routing_key)  # as the daemon that owns it
    await channel.close()
    body = cloudevent({"name": "run1/a.fits"}, type_=routing_key)
    async with running([daemon.service], settings):
        await send(outsider, settings.bus.exchange, routing_key, body, user_id=vhost["outsider"])
        await send(outsider, settings.bus.exchange, routing_key, body)  # no user_id at all
        await wait_for(lambda: _depth_is(broker, settings.dead_queue("ingest"), 2))
        await send(outsider, settings.bus.exchange, "file.ready", ready(), user_id=vhost["outsider"])
        await wait_for(lambda: _handled(daemon, 1))
    dead = await dead_letters(broker, settings)
    assert [(d.headers[H.REASON], d.headers[H.ROUTING_KEY], d.headers[H.ATTEMPTS]) for d in dead] == [
        ("not_permitted", routing_key, 1)
    ] * 2
    # Spool's own messages under that key (heartbeats, file.failed of these dead letters) are
    # handled; the outsider's never, its good work still is.
    assert [seen for seen in daemon.seen if seen[2] != "guest"] == [
        ("file.ready", 1, vhost["outsider"], None)
    ]


async def test_an_internal_command_from_spools_user_is_handled(settings, broker, topology):
    daemon = Recorder([FileReady.ROUTING_KEY, "replica.request"])
    channel = await broker.channel()
    queue = await channel.get_queue(settings.queue("ingest"))
    await queue.bind(settings.bus.exchange, routing_key="replica.request")
    await channel.close()
    body = cloudevent({"name": "run1/a.fits", "destination": "disk1"}, type_="replica.request")
    async with running([daemon.service], settings):
        await send(broker, settings.bus.exchange, "replica.request", body, user_id="guest")
        await wait_for(lambda: _handled(daemon, 1))
    assert daemon.seen == [("replica.request", 1, "guest", None)]
    assert await queue_depth(broker, settings.dead_queue("ingest")) == 0


async def test_spools_own_internal_command_stays_trusted_through_its_retries(settings, broker, topology):
    """A retry copy names its Spool sender: each attempt is handled, the retries are counted."""
    daemon = Recorder([FileReady.ROUTING_KEY, "replica.request"], fail=True)
    channel = await broker.channel()
    queue = await channel.get_queue(settings.queue("ingest"))
    await queue.bind(settings.bus.exchange, routing_key="replica.request")
    await channel.close()
    body = cloudevent({"name": "run1/a.fits", "destination": "disk1"}, type_="replica.request")
    async with running([daemon.service], settings):
        await send(broker, settings.bus.exchange, "replica.request", body, user_id="guest")
        await wait_for(lambda: _depth_is(broker, settings.dead_queue("ingest"), 1))
    attempts = range(1, settings.bus.max_attempts + 1)
    assert [s for s in daemon.seen if s[0] == "replica.request"] == [
        ("replica.request", n, "guest", None) for n in attempts
    ]
    [dead] = await dead_letters(broker, settings)
    assert (dead.headers[H.REASON], dead.headers[H.SENDER]) == ("endpoint_down", "guest")


async def _handled(daemon: Recorder, n: int) -> bool:
    return len(daemon.seen) >= n


# --- reply_to --------------------------------------------------------------------------------------
def bad_reply_tos(prefix: str) -> dict[str, str]:
    return {
        "another daemon's work queue": f"{prefix}.replicator",
        "a dead-letter queue": f"{prefix}.ingest.dead",
        "the empty name (the default exchange's nameless queue)": "",
        "a server-named queue": "amq.gen-JzTY20BRgKO-HjmUJj0wLg",
        "the reply prefix with no name": f"{prefix}.reply.",
        "a reply name with a space": f"{prefix}.reply.a b",
        "another prefix's reply queue": "other.reply.x",
        "a look-alike of direct reply-to": "amq.rabbitmq.reply-tox",
        "overly long": f"{prefix}.reply." + "x" * 200,
    }


@pytest.mark.parametrize("case", list(bad_reply_tos("p")))
async def test_a_reply_to_other_than_a_reply_queue_is_refused_before_the_handler(
    settings, broker, topology, outsider, vhost, case
):
    prefix = settings.bus.queue_prefix
    reply_to = bad_reply_tos(prefix)[case]
    daemon = Recorder()
    async with running([daemon.service], settings):
        await send(outsider, settings.bus.exchange, "file.ready", ready(), reply_to=reply_to)
        await wait_for(lambda: _depth_is(broker, settings.dead_queue("ingest"), 1))
        await send(outsider, settings.bus.exchange, "file.ready", ready("/land/good"))
        await wait_for(lambda: _handled(daemon, 1))
    [dead] = await dead_letters(broker, settings)
    assert dead.headers[H.REASON] == "invalid_reply_to"
    assert daemon.seen == [("file.ready", 1, None, None)]  # only the good one reached the handler
    for queue in (settings.queue("replicator"), settings.queue("ingest")):
        assert await queue_depth(broker, queue) == 0  # nothing was sent there


async def test_replies_reach_a_reply_queue_and_direct_reply_to(settings, broker, topology, outsider, vhost):
    named = f"{settings.bus.queue_prefix}.reply.client"
    channel = await broker.channel()
    replies = await channel.declare_queue(named, exclusive=True)
    direct: list[bytes] = []
    out_channel = await outsider.channel()
    underlay = await out_channel.get_underlay_channel()

    async def on_direct(message: Any) -> None:
        direct.append(message.body)

    # Direct reply-to: consume the pseudo-queue (no ack) on the channel that publishes.
    await underlay.basic_consume("amq.rabbitmq.reply-to", on_direct, no_ack=True)
    daemon = Recorder()
    async with running([daemon.service], settings):
        await send(outsider, settings.bus.exchange, "file.ready", ready("/land/1"), reply_to=named)
        props = Basic.Properties(content_type=CLOUDEVENTS, reply_to="amq.rabbitmq.reply-to")
        await underlay.basic_publish(
            ready("/land/2"), exchange=settings.bus.exchange, routing_key="file.ready", properties=props
        )
        await wait_for(lambda: _depth_is(broker, named, 1))
        await wait_for(lambda: _true(bool(direct)))
    assert [json.loads(body) for body in direct] == [{"done": True}]
    replied_to = [reply_to for *_, reply_to in daemon.seen]  # each handled once: no retry
    assert len(replied_to) == 2 and replied_to[0] == named
    assert replied_to[1].startswith("amq.rabbitmq.reply-to.")  # the broker's name for the channel
    assert await queue_depth(broker, settings.dead_queue("ingest")) == 0
    await replies.delete(if_empty=False)
    await out_channel.close()
    await channel.close()


async def _true(value: bool) -> bool:
    return value


def test_reply_queue_names():
    assert is_reply_queue("spool.reply.recall-0f3c", "spool")
    assert is_reply_queue("amq.rabbitmq.reply-to", "spool")
    assert is_reply_queue("amq.rabbitmq.reply-to.g1h2AA5yZXBseQ==.wVa7B8hTP6u3mHPZK3x8tA==", "spool")
    for bad in bad_reply_tos("spool").values():
        assert not is_reply_queue(bad, "spool"), bad
    assert not is_reply_queue("spool.reply.é", "spool")


# --- spool dead retry ------------------------------------------------------------------------------
async def test_reviving_an_outsiders_dead_letter_does_not_make_it_trusted(
    settings, broker, topology, outsider, vhost
):
    from common.bus.dead import dead_queues, take

    daemon = Recorder([FileReady.ROUTING_KEY, "replica.request"])
    channel = await broker.channel()
    queue = await channel.get_queue(settings.queue("ingest"))
    await queue.bind(settings.bus.exchange, routing_key="replica.request")
    await channel.close()
    body = cloudevent({"name": "run1/a.fits", "destination": "disk1"}, type_="replica.request")
    async with running([daemon.service], settings):
        await send(outsider, settings.bus.exchange, "replica.request", body, user_id=vhost["outsider"])
        await wait_for(lambda: _depth_is(broker, settings.dead_queue("ingest"), 1))
        # The operator (a Spool user) revives it: it comes back as the outsider's, refused again.
        assert await take(broker, settings, dead_queues(settings, "ingest"), requeue_to_work=True) == 1
        await wait_for(lambda: _depth_is(broker, settings.dead_queue("ingest"), 1))
    [dead] = await dead_letters(broker, settings)
    assert (dead.headers[H.REASON], dead.headers[H.SENDER]) == ("not_permitted", vhost["outsider"])
    assert [seen for seen in daemon.seen if seen[2] != "guest"] == []


async def test_spool_headers_forged_on_a_message_in_a_dead_queue_are_not_believed_on_revival(
    settings, broker, topology, outsider, vhost
):
    """A message that reached a dead-letter queue as its sender sent it (as the broker's delivery
    limit dead-letters it) names another work queue, routing key and sender: all ignored."""
    from common.bus.dead import dead_queues, take

    daemon = Recorder([FileReady.ROUTING_KEY, "tape.archive"])
    forged = {H.QUEUE: settings.queue("tape"), H.ROUTING_KEY: "tape.archive", H.SENDER: "guest"}
    body = cloudevent({"name": "run1/a.fits", "pool": "p"}, type_="tape.archive")
    await send(outsider, "", settings.dead_queue("ingest"), body, user_id=vhost["outsider"], headers=forged)
    async with running([daemon.service], settings):
        assert await take(broker, settings, dead_queues(settings, "ingest"), requeue_to_work=True) == 1
        await wait_for(lambda: _depth_is(broker, settings.dead_queue("ingest"), 1))
    assert await queue_depth(broker, settings.queue("tape")) == 0  # not sent to the forged queue
    [dead] = await dead_letters(broker, settings)
    assert dead.headers[H.SENDER] == vhost["outsider"] and dead.headers[H.REASON] == "not_permitted"
    assert [seen for seen in daemon.seen if seen[0] == "tape.archive"] == []


def test_a_daemon_whose_broker_user_is_not_a_spool_user_refuses_to_start(tmp_path, tag):
    """Its retry copies would be untrusted and its commands refused: one line, exit code 2."""
    import subprocess
    import sys

    state = tmp_path / "state"
    (state / "landing").mkdir(parents=True)
    config = write_config(tmp_path / "spool.toml", state, tag)
    config.write_text(config.read_text().replace("[bus]\n", '[bus]\nspool_users = ["spool-daemons"]\n'))
    done = subprocess.run(
        [sys.executable, "-m", "daemons", "--config", str(config), "run", "ingest"],
        capture_output=True, text=True, timeout=60, cwd=Path(__file__).resolve().parent.parent,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "bus.spool_users" in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
