"""The monitor's door: which facts it believes, and the bounds on everything it keeps.

The monitor turns facts from the bus into ``/metrics``, ``/api/status`` and the dashboard. Every
fact passes here first, so that whatever a message holds those three keep answering, stay small,
and say only what Spool's own daemons said. A fact is believed whole or not at all: a refused fact
changes nothing but the refusal counter (``spool_refused_facts_total{reason}``, ``refused`` in
``/api/status``) and a log line folded per reason (``fact_refused``).

Decisions (reason codes are stable):

- ``untrusted_sender``: Spool's facts (heartbeats, ``file.ingested``, ``file.failed``,
  ``endpoint.paused``, ``alert.raised``... every type but the external contract ``file.ready`` and
  ``recall.request``) are believed only when the delivery's AMQP ``user_id`` is one of Spool's users
  (``common.bus.trust.is_spool_user``; RabbitMQ refuses a ``user_id`` other than the publishing
  connection's user). Anyone else could otherwise show a stopped daemon alive, inflate the bytes
  moved or raise alerts.
- ``number_out_of_range``: every number a fact carries (sizes, counts, pids, seconds, the numbers
  of a heartbeat's details) must be finite, not negative and below 2**63. Spool never sends
  another; a fact that does is a bug or a forgery, and believing the rest of it would make the
  totals lie. Refused rather than clamped. (Totals the monitor adds up itself are clamped to the
  finite range when exported.)
- ``naive_timestamp``: a time without a UTC offset. Off the bus this cannot reach the monitor:
  ``common.messages`` reads such a time as UTC when it decodes (one rule for every consumer), so
  a naive ``time`` is believed as UTC. Kept for facts built in code: comparing it with aware
  times would raise a TypeError.
- ``invalid_text``: a text field that is not valid Unicode (a lone surrogate, ``"\\ud800"`` in
  JSON): it could not be written into ``/metrics`` or a log line.
- ``unknown_daemon``: a heartbeat for a daemon Spool does not have (``config.DAEMON_NAMES``).
- ``field_too_long``: a heartbeat whose instance or version is longer than 64 characters, host
  longer than 253 (a DNS name) or queue longer than 255 (an AMQP name): they become label values.
- ``invalid_details``: a heartbeat whose details (retries and dead letters by reason, handling
  histogram) have the wrong shape or types.
- ``too_many_instances``: a heartbeat of a new instance when ``MAX_INSTANCES`` are listed and none
  of them is dead (dead ones make room).

Label values are bounded, not refused (``Labels``): reason codes, storage / endpoint names and
daemon names of failure facts are kept if known (configured) or among the first few unknown ones
seen, and counted under ``other`` beyond that (``spool_folded_label_values_total{label}``). A
heartbeat's maps by reason keep their ``MAX_REASON_KEYS`` largest entries; the rest is summed
under ``other``. Free texts (errors, example names) are cut to a bounded length.
"""

from __future__ import annotations

import heapq
import itertools
import math
import re
import types
import typing
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pydantic import BaseModel

from common.config import DAEMON_NAMES
from common.messages import DaemonHeartbeat, Message

# Reason codes of refused facts.
UNTRUSTED_SENDER = "untrusted_sender"
NUMBER_OUT_OF_RANGE = "number_out_of_range"
NAIVE_TIMESTAMP = "naive_timestamp"
UNKNOWN_DAEMON = "unknown_daemon"
FIELD_TOO_LONG = "field_too_long"
INVALID_DETAILS = "invalid_details"
TOO_MANY_INSTANCES = "too_many_instances"
INVALID_TEXT = "invalid_text"

# The external contract: types anyone allowed on the exchange may publish (counted, not trusted).
EXTERNAL_TYPES = frozenset({"file.ready", "recall.request", "dataset.close", "metadata.set"})
# Every number in a fact lies in [0, MAX_NUMBER]: what a signed 64-bit counter holds.
MAX_NUMBER = 2**63 - 1
# Longest heartbeat identity strings (label values); Spool's own are far shorter.
MAX_LENGTHS = {"instance": 64, "version": 64, "host": 253}
MAX_QUEUE_NAME = 255
# Free text kept per fact (an example file name); error texts have their own bound in steps.
MAX_TEXT = 1024
# Entries kept from one heartbeat map by reason; the rest are summed under OTHER.
MAX_REASON_KEYS = 16
# Buckets of a heartbeat's handling histogram (Spool's runner sends about 15).
MAX_HISTOGRAM_BUCKETS = 64
# Instances listed at once; an ordinary site runs tens. Worst case of /metrics per instance (two
# full maps by reason, longest labels): about 17 kB; typically 2 kB.
MAX_INSTANCES = 128
# Distinct values of a label kept beyond the known ones.
SPARE_REASONS = 200
SPARE_STORAGES = 32
OTHER = "other"

REASON_RE = re.compile(r"[a-z][a-z0-9_]{0,63}")
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@+-]{0,127}")


class Refused(Exception):
    """A fact the monitor does not believe: ``reason`` (a code above) and what was wrong."""

    def __init__(self, reason: str, detail: str) -> None:
        detail = detail.encode("utf-8", "backslashreplace").decode()  # printable whatever it quotes
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


class Labels:
    """The values one label may take: the known ones always, then up to ``spare`` others in order
    of arrival, then ``OTHER``. A value not shaped like one (``pattern``) is ``OTHER`` at once.

    The set of values, hence the series of ``/metrics`` and the keys of the monitor's tables,
    stays bounded whatever arrives."""

    def __init__(self, name: str, known: Iterable[str] = (), *, spare: int, pattern: re.Pattern[str]) -> None:
        self.name = name
        self.known = frozenset(known)
        self.spare = spare
        self.pattern = pattern
        self._admitted: set[str] = set()
        self.folded = 0  # values counted under OTHER

    def __call__(self, value: str) -> str:
        if value in self.known or value in self._admitted:
            return value
        if len(self._admitted) < self.spare and self.pattern.fullmatch(value):
            self._admitted.add(value)
            return value
        self.folded += 1
        return OTHER


@dataclass
class MonitorLabels:
    """The bounded labels of the monitor's state (see ``Labels``)."""

    reasons: Labels
    storages: Labels
    daemons: Labels
    malformed: Labels

    @classmethod
    def create(cls, storages: Iterable[str] = ()) -> MonitorLabels:
        return cls(
            reasons=Labels("reason", spare=SPARE_REASONS, pattern=REASON_RE),
            storages=Labels("storage", storages, spare=SPARE_STORAGES, pattern=NAME_RE),
            daemons=Labels("daemon", DAEMON_NAMES, spare=0, pattern=NAME_RE),
            malformed=Labels("malformed_reason", spare=32, pattern=REASON_RE),
        )

    def all(self) -> list[Labels]:
        return [self.reasons, self.storages, self.daemons, self.malformed]


# --- facts ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Plan:
    """Which fields of a message class hold numbers, times, or lists of models (checked in turn)."""

    numbers: tuple[str, ...]
    times: tuple[str, ...]
    nested: tuple[str, ...]
    texts: tuple[str, ...]


_PLANS: dict[type[BaseModel], _Plan] = {}


def _plan(cls: type[BaseModel]) -> _Plan:
    plan = _PLANS.get(cls)
    if plan is None:
        numbers, times, nested, texts = [], [], [], []
        for name, info in cls.model_fields.items():
            kinds = _kinds(info.annotation)
            if kinds & {int, float}:
                numbers.append(name)
            if str in kinds:
                texts.append(name)
            if datetime in kinds:
                times.append(name)
            if typing.get_origin(info.annotation) is list:
                [item] = typing.get_args(info.annotation) or (None,)
                if isinstance(item, type) and issubclass(item, BaseModel):
                    nested.append(name)
        plan = _PLANS[cls] = _Plan(tuple(numbers), tuple(times), tuple(nested), tuple(texts))
    return plan


def _kinds(annotation: Any) -> set[Any]:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return set(typing.get_args(annotation))
    return {annotation}


def check_number(value: object, where: str) -> None:
    """``Refused`` unless ``value`` (a number) is finite, not negative and at most ``MAX_NUMBER``."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise Refused(NUMBER_OUT_OF_RANGE, f"{where} is {value!r}")
    if value < 0 or value > MAX_NUMBER:
        raise Refused(NUMBER_OUT_OF_RANGE, f"{where} is {_short_number(value)}, outside [0, 2**63)")


def _short_number(value: int | float) -> str:
    if isinstance(value, int) and abs(value) > 10**30:
        return f"a {len(str(abs(value)))}-digit number"  # never a 400-digit log line
    return repr(value)


def check_fields(model: BaseModel, where: str = "") -> None:
    """Every number and time of ``model`` (and of the models it lists) within bounds."""
    plan = _plan(type(model))
    for name in plan.numbers:
        check_number(getattr(model, name), where + name)
    for name in plan.times:
        value = getattr(model, name)
        if isinstance(value, datetime) and value.utcoffset() is None:
            raise Refused(NAIVE_TIMESTAMP, f"{where}{name} {value.isoformat()} has no UTC offset")
    for name in plan.texts:
        value = getattr(model, name)
        if isinstance(value, str) and not value.isascii():
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise Refused(INVALID_TEXT, f"{where}{name} is not valid Unicode") from None
    for name in plan.nested:
        for i, item in enumerate(getattr(model, name)):
            check_fields(item, f"{where}{name}[{i}].")


def check_fact(msg: Message, *, trusted: bool) -> None:
    """``Refused`` unless the monitor may believe ``msg``; ``trusted``: sent by one of Spool's users."""
    if not trusted and msg.ROUTING_KEY not in EXTERNAL_TYPES:
        raise Refused(UNTRUSTED_SENDER, f"{msg.ROUTING_KEY} not sent by one of Spool's broker users")
    check_fields(msg)
    if isinstance(msg, DaemonHeartbeat):
        _check_heartbeat(msg)


def _check_heartbeat(beat: DaemonHeartbeat) -> None:
    if beat.daemon not in DAEMON_NAMES:
        raise Refused(UNKNOWN_DAEMON, f"heartbeat of an unknown daemon {_cut(beat.daemon, 60)!r}")
    for name, limit in MAX_LENGTHS.items():
        value = getattr(beat, name)
        if len(value) > limit:
            raise Refused(FIELD_TOO_LONG, f"heartbeat {name} is {len(value)} characters")


# --- heartbeat details ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Details:
    """What the monitor takes from a heartbeat's ``details`` (Spool's runner counts)."""

    retried: int = 0
    queue: str | None = None
    retried_by_reason: dict[str, int] | None = None
    dead_by_reason: dict[str, int] | None = None
    handling: dict[str, Any] | None = None
    oldest_delivery: tuple[float, str] | None = None  # (seconds held, what): ``runtime._oldest``


def read_details(details: dict[str, Any], reasons: Labels) -> Details:
    """The known entries of ``details``, checked; unknown entries are ignored. ``Refused`` when a
    known entry has the wrong shape or a number out of range."""
    queue = details.get("queue")
    if queue is not None and not isinstance(queue, str):
        raise Refused(INVALID_DETAILS, f"details.queue is a {type(queue).__name__}")
    if queue is not None and len(queue) > MAX_QUEUE_NAME:
        raise Refused(FIELD_TOO_LONG, f"details.queue is {len(queue)} characters")
    if queue is not None and not queue.isascii():
        try:
            queue.encode("utf-8")
        except UnicodeEncodeError:
            raise Refused(INVALID_TEXT, "details.queue is not valid Unicode") from None
    return Details(
        retried=_count(details.get("retried", 0), "details.retried"),
        queue=queue,
        retried_by_reason=_by_reason(details.get("retried_by_reason"), "details.retried_by_reason", reasons),
        dead_by_reason=_by_reason(details.get("dead_by_reason"), "details.dead_by_reason", reasons),
        handling=_histogram(details.get("handling")),
        oldest_delivery=_oldest(details.get("oldest_delivery")),
    )


MAX_WHAT = 300  # characters of a held delivery's description (the runner sends at most 300)


def _oldest(value: object) -> tuple[float, str] | None:
    """``{"seconds": s, "what": text}``: the delivery a handler has held longest."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise Refused(INVALID_DETAILS, f"details.oldest_delivery is a {type(value).__name__}, not a map")
    seconds, what = value.get("seconds"), value.get("what")
    if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not 0 <= seconds <= MAX_NUMBER:
        raise Refused(INVALID_DETAILS, "details.oldest_delivery.seconds is not a number of seconds")
    if not isinstance(what, str):
        raise Refused(INVALID_DETAILS, f"details.oldest_delivery.what is a {type(what).__name__}")
    if len(what) > MAX_WHAT:
        raise Refused(FIELD_TOO_LONG, f"details.oldest_delivery.what is {len(what)} characters")
    try:
        what.encode("utf-8")
    except UnicodeEncodeError:
        raise Refused(INVALID_TEXT, "details.oldest_delivery.what is not valid Unicode") from None
    return float(seconds), what


def _count(value: object, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise Refused(INVALID_DETAILS, f"{where} is a {type(value).__name__}, not a count")
    check_number(value, where)
    return value


def _by_reason(value: object, where: str, reasons: Labels) -> dict[str, int]:
    """A map reason -> count: its ``MAX_REASON_KEYS`` largest entries whose key is a known (or
    admitted) reason code, everything else summed under ``OTHER``."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise Refused(INVALID_DETAILS, f"{where} is a {type(value).__name__}, not a map")
    counts: dict[str, int] = {}
    for key, n in value.items():
        if isinstance(n, bool) or not isinstance(n, int) or n < 0 or n > MAX_NUMBER:
            _count(n, f"{where}[{_cut(str(key), 60)!r}]")  # raises, naming the entry
        counts[key] = n
    if len(counts) > MAX_REASON_KEYS:
        kept = heapq.nlargest(MAX_REASON_KEYS, counts.items(), key=lambda kv: (kv[1], str(kv[0])))
    else:
        kept = list(counts.items())
    out: dict[str, int] = {}
    for key, n in kept:
        label = reasons(key) if isinstance(key, str) else OTHER
        out[label] = out.get(label, 0) + n
    rest = sum(counts.values()) - sum(n for _, n in kept)
    if rest or len(kept) < len(counts):
        reasons.folded += len(counts) - len(kept)
        out[OTHER] = out.get(OTHER, 0) + rest
    return out


def _histogram(value: object) -> dict[str, Any] | None:
    """A heartbeat's handling histogram: ascending finite bucket bounds, counts one longer."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise Refused(INVALID_DETAILS, "details.handling is not a map")
    buckets, counts, total = value.get("buckets"), value.get("counts"), value.get("sum")
    if not (isinstance(buckets, list) and isinstance(counts, list)):
        raise Refused(INVALID_DETAILS, "details.handling needs lists buckets and counts")
    if len(buckets) > MAX_HISTOGRAM_BUCKETS or len(counts) != len(buckets) + 1:
        raise Refused(
            INVALID_DETAILS, f"details.handling has {len(buckets)} buckets and {len(counts)} counts"
        )
    if isinstance(total, bool) or not isinstance(total, int | float):
        raise Refused(INVALID_DETAILS, "details.handling.sum is not a number")
    check_number(total, "details.handling.sum")
    for b in buckets:
        if isinstance(b, bool) or not isinstance(b, int | float):
            raise Refused(INVALID_DETAILS, "details.handling.buckets holds a non-number")
        check_number(b, "details.handling.buckets")
    if any(a >= b for a, b in itertools.pairwise(buckets)):
        raise Refused(INVALID_DETAILS, "details.handling.buckets are not ascending")
    kept = [_count(c, "details.handling.counts") for c in counts]
    return {"buckets": [float(b) for b in buckets], "counts": kept, "sum": float(total)}


def _cut(text: str, n: int) -> str:
    return text if len(text) <= n else text[:n] + "..."


def cut(text: str | None, n: int = MAX_TEXT) -> str | None:
    """Free text of a fact kept to ``n`` characters."""
    return None if text is None else _cut(text, n)
