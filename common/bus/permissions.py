"""Least privilege on the broker: which RabbitMQ user may do what, derived from the configuration.

``spool broker setup`` (``common.cli.broker``) prints or applies what ``plan`` returns. Three kinds
of user, ``p`` being ``bus.queue_prefix`` and ``X`` ``bus.exchange``:

- **daemon users** (``<user_prefix>-<daemon>``), one per daemon. Configure: the exchange (each daemon
  declares it at start) and its own queues ``p.d``, ``p.d.retry.N``, ``p.d.dead``. Write: the
  exchange, its work queue (``queue.bind`` checks write on the queue) and ``amq.default`` (the
  default exchange: retry tiers, replies to ``reply_to``, and declaring a queue whose dead-letter
  exchange is the default one needs write on it). Read: the exchange (``queue.bind``), its work
  and retry queues (consume; a dead-letter queue's declaration checks read on itself). Topic
  permissions on ``X``: write only the routing keys the daemon publishes (``DAEMON_PUBLISHES``),
  read (binding keys) only those it consumes (``topology.BINDINGS``).
- **the operator user** (``<user_prefix>-operator``): every Spool queue and the exchange, every
  Spool routing key; tag ``monitoring`` so ``spool status`` may read the management API. For the
  CLI (``spool dead retry``, ``spool status``), ``spool run all`` and ``spool broker declare``.
- **external publishers** (names given by the operator): write on ``X`` limited by topic
  permissions to ``file.ready``, ``recall.request`` and ``metadata.set``; configure and read
  only their own reply queues ``p.reply.<user>.<anything>`` (``reply_queue_pattern``); nothing
  else. RabbitMQ's direct
  reply-to (``amq.rabbitmq.reply-to``) needs no permission and is allowed too.

Limits RabbitMQ imposes, so documented rather than hidden: the default exchange has no per-key
permission, so any user with write on ``amq.default`` (every daemon user: retries and replies need
it) can put a message into any queue of the vhost; daemon users are Spool's own and trusted with
that (``bus.spool_users``), external users never get it. Passive declares need no permission, so
anyone may learn whether a queue exists and its depth.

Retry tiers are matched as ``retry.\\d+`` rather than the configured count: adding a tier then does
not need a new setup, and the names are Spool's alone.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from common.bus.topology import BINDINGS
from common.config import DAEMON_NAMES, Settings

# What each daemon publishes on the exchange (routing keys). The outbox relay
# (``daemons.relay``) runs in replicator, tape and recall and sends *any* unsent outbox row,
# whoever wrote it (``common.catalogue.outbox``'s audit table), so those three may send them all.
# The runner publishes ``file.failed`` for a dead letter in every daemon; every daemon beats.
OUTBOX_KEYS = ("file.archived", "file.failed", "tape.mounted", "endpoint.paused", "endpoint.resumed",
               "replica.request", "dataset.completed", "dataset.archived", "dataset.deleted",
               "metadata.changed")  # fmt: skip
_EVERY_DAEMON = ("file.failed", "daemon.heartbeat")
DAEMON_PUBLISHES: Mapping[str, tuple[str, ...]] = {
    "ingest": ("file.ingested", "replica.request", "tape.archive", *_EVERY_DAEMON),
    "replicator": ("replica.created", "replica.request", "tape.archive", *OUTBOX_KEYS, *_EVERY_DAEMON),
    "tape": ("file.archived", *OUTBOX_KEYS, *_EVERY_DAEMON),
    "recall": ("file.recalled", "recall.completed", *OUTBOX_KEYS, *_EVERY_DAEMON),
    "monitor": ("alert.raised", *_EVERY_DAEMON),
}
# The external contract (docs/event-contract.md): all an instrument or a portal may send.
EXTERNAL_PUBLISHES = ("file.ready", "recall.request", "dataset.close", "metadata.set")
DEFAULT_EXCHANGE = "amq.default"  # the name permission checks give the default exchange ""
DIRECT_REPLY_TO = "amq.rabbitmq.reply-to"
# Broker user names Spool creates or accepts: they end up in shell commands, regexes and URLs.
USER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


@dataclass(frozen=True)
class Grant:
    """One broker user and everything it may do in the vhost (regexes as RabbitMQ takes them)."""

    user: str
    role: str  # "daemon:<name>", "operator" or "publisher"
    configure: str
    write: str
    read: str
    topic_write: str  # routing keys it may publish on the exchange
    topic_read: str  # binding keys it may bind a queue with
    tags: str = ""  # RabbitMQ user tags ("monitoring": read-only management API)

    @property
    def spool_user(self) -> bool:
        return self.role != "publisher"


def check_user_name(name: str) -> str:
    if not USER_NAME.fullmatch(name):
        raise ValueError(
            f"broker user name {name!r} must be 1-64 of letters, digits, '_', '.', '-', starting with "
            "a letter or digit"
        )
    return name


def reply_queue_prefix(settings: Settings, user: str) -> str:
    """Reply queues of ``user`` are named ``<prefix>.reply.<user>.<anything>``."""
    return f"{settings.bus.queue_prefix}.reply.{user}."


def _any_of(patterns: Iterable[str]) -> str:
    """One anchored regex matching exactly the given (already escaped) alternatives."""
    return "^(" + "|".join(patterns) + ")$"


def _literal(*names: str) -> list[str]:
    return [re.escape(n) for n in names]


def daemon_queues(settings: Settings, daemon: str, *, dead: bool = True) -> list[str]:
    """Escaped regexes of the queues ``daemon`` declares: work, retry tiers, dead letters."""
    out = [*_literal(settings.queue(daemon)), re.escape(settings.queue(daemon) + ".retry.") + r"\d+"]
    return out + (_literal(settings.dead_queue(daemon)) if dead else [])


def daemon_user(settings: Settings, daemon: str, user_prefix: str | None = None) -> str:
    return check_user_name(f"{user_prefix or settings.bus.queue_prefix}-{daemon}")


def operator_user(settings: Settings, user_prefix: str | None = None) -> str:
    return check_user_name(f"{user_prefix or settings.bus.queue_prefix}-operator")


def daemon_grant(settings: Settings, daemon: str, user_prefix: str | None = None) -> Grant:
    exchange = re.escape(settings.bus.exchange)
    own = daemon_queues(settings, daemon)
    return Grant(
        user=daemon_user(settings, daemon, user_prefix),
        role=f"daemon:{daemon}",
        configure=_any_of([exchange, *own]),
        write=_any_of([exchange, re.escape(DEFAULT_EXCHANGE), *_literal(settings.queue(daemon))]),
        read=_any_of([exchange, *daemon_queues(settings, daemon, dead=False)]),
        topic_write=_any_of(_literal(*sorted(set(DAEMON_PUBLISHES[daemon])))),
        topic_read=_any_of(_literal(*BINDINGS[daemon])),
        # The monitor reads queue figures and their holders from the management API.
        tags="monitoring" if daemon == "monitor" else "",
    )


def operator_grant(settings: Settings, user_prefix: str | None = None) -> Grant:
    exchange = re.escape(settings.bus.exchange)
    queues = [q for d in BINDINGS for q in daemon_queues(settings, d)]
    replies = re.escape(f"{settings.bus.queue_prefix}.reply.") + ".+"
    every_key = sorted({k for keys in DAEMON_PUBLISHES.values() for k in keys} | set(EXTERNAL_PUBLISHES))
    return Grant(
        user=operator_user(settings, user_prefix),
        role="operator",
        configure=_any_of([exchange, *queues, replies]),
        write=_any_of([exchange, re.escape(DEFAULT_EXCHANGE), *queues, replies]),
        read=_any_of([exchange, *queues, replies]),
        topic_write=_any_of(_literal(*every_key)),
        topic_read=".*",
        tags="monitoring",
    )


def publisher_grant(settings: Settings, user: str) -> Grant:
    own_replies = re.escape(reply_queue_prefix(settings, check_user_name(user))) + ".+"
    return Grant(
        user=user,
        role="publisher",
        configure=_any_of([own_replies]),
        write=_any_of(_literal(settings.bus.exchange)),
        read=_any_of([own_replies]),
        topic_write=_any_of(_literal(*EXTERNAL_PUBLISHES)),
        topic_read="^$",
    )


def plan(
    settings: Settings, publishers: Sequence[str] = (), *, user_prefix: str | None = None
) -> list[Grant]:
    """Every user ``spool broker setup`` creates: the daemons', the operator's, the publishers'."""
    grants = [daemon_grant(settings, d, user_prefix) for d in DAEMON_NAMES]
    grants.append(operator_grant(settings, user_prefix))
    spool_names = {g.user for g in grants}
    for name in dict.fromkeys(publishers):
        if name in spool_names:
            raise ValueError(f"publisher {name!r} is also one of Spool's own users; pick another name")
        grants.append(publisher_grant(settings, name))
    return grants


def bind_publishers(
    settings: Settings, publishers: Sequence[str], areas: Sequence[str]
) -> dict[str, list[str]]:
    """``landing_publishers`` after binding ``publishers`` to ``areas`` (``--publisher``/``--area``).

    Paired by position; one publisher with several areas gets them all; no area leaves the
    publishers unbound (an area not listed in ``landing_publishers`` accepts any user). Existing
    bindings of the configuration are kept.
    """
    bound = {area: list(users) for area, users in settings.landing_publishers.items()}
    if not areas:
        return bound
    if len(publishers) == 1:
        pairs = [(publishers[0], area) for area in areas]
    elif len(publishers) == len(areas):
        pairs = list(zip(publishers, areas, strict=True))
    else:
        raise ValueError(
            f"{len(publishers)} --publisher and {len(areas)} --area: give one --area per --publisher "
            "(paired in order), or one --publisher with any number of --area"
        )
    for user, area in pairs:
        if area not in settings.landing_areas:
            known = ", ".join(sorted(settings.landing_areas)) or "none"
            raise ValueError(f"--area {area!r} is not a landing area (configured: {known})")
        users = bound.setdefault(area, [])
        if user not in users:
            users.append(user)
    return bound


def config_snippet(grants: Sequence[Grant], landing_publishers: Mapping[str, Sequence[str]]) -> str:
    """The TOML to merge into Spool's configuration so it trusts exactly its own users."""
    spool = ", ".join(f'"{g.user}"' for g in grants if g.spool_user)
    lines = [
        "# Merge into the configuration every Spool process reads (spool broker setup).",
        "[bus]",
        "# Spool's own broker users: only their internal commands, x-spool-* headers and heartbeats",
        "# are believed (RabbitMQ validates the AMQP user_id property of each message).",
        f"spool_users = [{spool}]",
    ]
    if landing_publishers:
        lines += [
            "",
            "# External users allowed to announce files in each landing area.",
            "[landing_publishers]",
        ]
        for area, users in sorted(landing_publishers.items()):
            listed = ", ".join(f'"{u}"' for u in users)
            lines.append(f"{_toml_key(area)} = [{listed}]")
    return "\n".join(lines) + "\n"


def _toml_key(key: str) -> str:
    return (
        key
        if re.fullmatch(r"[A-Za-z0-9_-]+", key)
        else '"' + key.replace("\\", "\\\\").replace('"', '\\"') + '"'
    )
