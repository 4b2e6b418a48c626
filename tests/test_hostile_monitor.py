"""Issue 16, class 6: a monitor that believes anything. Hostile facts, decoded as the monitor's
runner decodes them (JSON and msgpack bodies through ``common.codec``), are refused (counted by
reason) or folded into bounded labels; afterwards ``/metrics`` and ``/api/status`` still render,
stay small, and the monitor still counts good facts.

The real-broker cases (a heartbeat forged by another RabbitMQ user, hostile values over the bus)
are in ``test_hostile_monitor_bus.py``."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import msgpack
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from common import codec
from common.errors import InvalidMessage
from common.messages import DaemonHeartbeat, FileFailed, FileIngested
from daemons.monitor import intake
from daemons.monitor.metrics import build_registry
from daemons.monitor.report import Observed, status_document
from daemons.monitor.steps import MonitorState, Thresholds
from daemons.monitor.web import WebServer

T0 = datetime(2026, 11, 23, 2, 0, tzinfo=UTC)
HUGE = 10**400
METRICS_BOUND = 64 * 1024  # bytes of /metrics for a handful of daemons, whatever was sent


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now


class Monitor:
    """A monitor's state with its /metrics and /api/status, fed as its runner feeds it."""

    def __init__(self) -> None:
        self.clock = Clock()
        self.state = MonitorState(Thresholds(interval=15.0), clock=self.clock)
        self.observed = Observed()
        self.registry = build_registry(self.state, self.observed)
        self.web = WebServer(
            self.registry, lambda: status_document(self.state, self.observed), status_max_age=0
        )

    def feed(
        self, routing_key: str, data: dict[str, Any], *, trusted: bool = True, packed: bool = False
    ) -> str:
        """What became of one delivery: ``counted``, ``malformed:<reason>`` or ``refused:<reason>``."""
        body = msgpack.packb(data) if packed else json.dumps(data).encode()
        ctype = codec.MSGPACK if packed else codec.JSON
        try:
            msg = codec.decode(body, ctype, routing_key)
        except InvalidMessage as exc:
            self.state.observe_malformed(routing_key, exc.reason, exc.message)
            return f"malformed:{exc.reason}"
        before = sum(self.state.refused.values())
        self.state.observe(msg, trusted=trusted)
        if sum(self.state.refused.values()) > before:
            return f"refused:{self.state.last_refused['reason']}"  # type: ignore[index]
        return "counted"

    def metrics(self) -> str:
        text = generate_latest(self.registry).decode()
        list(text_string_to_metric_families(text))  # parses
        return text

    def status(self) -> dict[str, Any]:
        body = self.web.status_body()
        return json.loads(body, parse_constant=_no_constant)  # type: ignore[no-any-return]

    def still_answering_and_counting(self, metrics_bound: int = METRICS_BOUND) -> None:
        """/metrics and /api/status render and stay small; a good fact is still counted."""
        assert len(self.metrics()) < metrics_bound
        assert len(self.web.status_body()) < 512 * 1024
        self.status()
        good = self.state.events["file.ingested"]
        assert self.feed("file.ingested", _ingested(f"good-{good}")) == "counted"
        assert self.state.events["file.ingested"] == good + 1
        beat = _beat(instance="good", time=self.clock.now.isoformat())
        assert self.feed("daemon.heartbeat", beat) == "counted"
        assert any(v.instance == "good" and v.state == "alive" for v in self.state.daemons())


def not_believed(outcome: str, *reasons: str) -> bool:
    """Refused at the monitor's door for one of ``reasons``, or already by the codec (strict and
    bounded since issue 16: a forged fact need not get as far as the monitor's own checks)."""
    return outcome in {f"refused:{r}" for r in reasons} or outcome.startswith("malformed:")


def _no_constant(name: str) -> None:
    raise AssertionError(f"/api/status holds {name}: not JSON a browser can parse")


def _beat(**kw: Any) -> dict[str, Any]:
    beat = {
        "daemon": "ingest", "instance": "i1", "host": "node1", "pid": 42, "version": "0.1",
        "started": T0.isoformat(), "time": T0.isoformat(), "processed": 3, "failed": 0, "in_flight": 0,
        "details": {
            "retried": 1, "queue": "spool.ingest", "retried_by_reason": {"disk_full": 1},
            "dead_by_reason": {}, "handling": {"buckets": [0.1, 1.0], "counts": [1, 1, 1], "sum": 1.5},
        },
    }  # fmt: skip
    details = kw.pop("details", {})
    beat.update(kw)
    beat["details"] = {**beat["details"], **details}  # type: ignore[dict-item]
    return beat


def _ingested(name: str, **kw: Any) -> dict[str, Any]:
    return {"name": name, "dataset": "d", "size": 10, "adler32": "00000001", "storage": "disk1", "pfn": name,
            **kw}  # fmt: skip


@pytest.fixture
def monitor() -> Monitor:
    return Monitor()


# --- numbers -------------------------------------------------------------------------------------
BAD_NUMBERS = [HUGE, -HUGE, -1, 2**63, 2**64, float("inf"), float("-inf"), float("nan"), 1e400]


# msgpack carries integers in [-2**63, 2**64) only
PACKABLE = [v for v in BAD_NUMBERS if not isinstance(v, int) or -(2**63) <= v < 2**64]


@pytest.mark.parametrize("field", ["processed", "failed", "in_flight", "pid"])
@pytest.mark.parametrize(
    ("value", "packed"),
    [(v, False) for v in BAD_NUMBERS] + [(v, True) for v in PACKABLE],
    ids=lambda v: "msgpack" if v is True else "json" if v is False else repr(v)[:12],
)
def test_a_heartbeat_with_a_number_out_of_range_is_not_believed(monitor, field, value, packed):
    outcome = monitor.feed("daemon.heartbeat", _beat(**{field: value}), packed=packed)
    assert not_believed(outcome, "number_out_of_range")
    assert not monitor.state.instances and monitor.state.processed == {}
    monitor.still_answering_and_counting()


@pytest.mark.parametrize(
    "details",
    [
        {"retried": HUGE},
        {"retried": -1},
        {"retried": 2**64},
        {"retried": float("nan")},
        {"retried": "7"},
        {"retried": True},
        {"retried_by_reason": {"disk_full": HUGE}},
        {"dead_by_reason": {"no_source": -5}},
        {"dead_by_reason": {"no_source": float("inf")}},
        {"retried_by_reason": ["disk_full"]},
        {"handling": {"buckets": [0.1, 1.0], "counts": [1, 1, HUGE], "sum": 1.0}},
        {"handling": {"buckets": [0.1, 1.0], "counts": [1, -1, 1], "sum": 1.0}},
        {"handling": {"buckets": [0.1, 1.0], "counts": [1, 1, 1], "sum": float("nan")}},
        {"handling": {"buckets": [0.1, 1.0], "counts": [1, 1, 1], "sum": 1e400}},
        {"handling": {"buckets": [0.1, float("inf")], "counts": [1, 1, 1], "sum": 1.0}},
        {"handling": {"buckets": [1.0, 0.1], "counts": [1, 1, 1], "sum": 1.0}},
        {"handling": {"buckets": [0.1], "counts": [1, 1, 1], "sum": 1.0}},
        {"handling": {"buckets": list(range(1, 1000)), "counts": [0] * 1000, "sum": 1.0}},
        {"queue": 7},
        {"queue": "q" * 100_000},
        {"oldest_delivery": ["file.ready", 3]},
        {"oldest_delivery": {"seconds": -1, "what": "x"}},
        {"oldest_delivery": {"seconds": float("nan"), "what": "x"}},
        {"oldest_delivery": {"seconds": float("inf"), "what": "x"}},
        {"oldest_delivery": {"seconds": "600", "what": "x"}},
        {"oldest_delivery": {"seconds": True, "what": "x"}},
        {"oldest_delivery": {"seconds": 5, "what": 7}},
        {"oldest_delivery": {"seconds": 5}},
        {"oldest_delivery": {"seconds": 5, "what": "w" * 100_000}},
        {"oldest_delivery": {"seconds": 5, "what": "\udcff lone surrogate"}},
    ],
    ids=lambda d: json.dumps(d)[:60],
)
def test_a_heartbeat_with_malformed_details_is_refused_whole(monitor, details):
    outcome = monitor.feed("daemon.heartbeat", _beat(details=details))
    assert not_believed(outcome, "number_out_of_range", "invalid_details", "field_too_long", "invalid_text")
    assert not monitor.state.instances
    monitor.still_answering_and_counting()


@pytest.mark.parametrize(
    ("routing_key", "data"),
    [
        ("file.ingested", _ingested("a", size=HUGE)),
        ("file.ingested", _ingested("a", size=-1)),
        ("file.ingested", _ingested("a", size=2**63)),
        ("file.ingested", _ingested("a", size=2**64 + 1)),
        (
            "replica.created",
            {"storage": "disk1", "copies": [{"name": "a", "pfn": "a", "size": HUGE, "adler32": "1"}]},
        ),
        (
            "replica.created",
            {"storage": "disk1", "copies": [{"name": "a", "pfn": "a", "size": -3, "adler32": "1"}]},
        ),
        (
            "endpoint.paused",
            {"storage": "d", "reason": "r", "error": "e", "failures": 1, "cooldown": float("inf")},
        ),
        (
            "endpoint.paused",
            {"storage": "d", "reason": "r", "error": "e", "failures": 1, "cooldown": float("nan")},
        ),
        ("endpoint.paused", {"storage": "d", "reason": "r", "error": "e", "failures": -1, "cooldown": 1}),
        ("endpoint.paused", {"storage": "d", "reason": "r", "error": "e", "failures": HUGE, "cooldown": 1}),
        ("endpoint.resumed", {"storage": "d", "paused_seconds": 1e400, "waiting": 0}),
        ("endpoint.resumed", {"storage": "d", "paused_seconds": 1, "waiting": -7}),
        ("file.archived", {"name": "a", "storage": "t", "cartridge": "A1", "fseq": 2**70}),
        ("recall.completed", {"request_id": "r", "files": -5}),
        ("file.failed", {"daemon": "ingest", "reason": "r", "error": "e", "attempts": HUGE}),
        (
            "file.failed",
            {"daemon": "ingest", "reason": "r", "error": "e", "attempts": 1, "schema_version": -1},
        ),
    ],
    ids=lambda v: v if isinstance(v, str) else json.dumps(v)[-40:],
)
def test_an_event_with_a_number_out_of_range_is_not_believed(monitor, routing_key, data):
    outcome = monitor.feed(routing_key, data)
    assert not_believed(outcome, "number_out_of_range")
    assert not monitor.state.moved_bytes and not monitor.state.failures
    assert monitor.state.events[routing_key] == 0
    monitor.still_answering_and_counting()


def test_moved_bytes_up_to_the_bound_still_export_as_finite_numbers(monitor):
    # The largest size a message may carry (common.limits), until the sum is past 2**63.
    biggest, n = 2**50, 9_000
    for i in range(n):
        assert monitor.feed("file.ingested", _ingested(f"big{i}", size=biggest), packed=True) == "counted"
    samples = {s.name: s.value for f in text_string_to_metric_families(monitor.metrics()) for s in f.samples
               if s.name == "spool_moved_bytes_total"}  # fmt: skip
    assert samples["spool_moved_bytes_total"] == pytest.approx(n * biggest)
    assert n * biggest > 2**63
    monitor.still_answering_and_counting()


# --- timestamps ----------------------------------------------------------------------------------
NAIVE = ["2026-11-23T02:00:00", "2026-11-23T02:00:00.123456", "2026-11-23 02:00"]


# One rule for every consumer (common.messages): a time without a UTC offset is read as UTC when
# decoded, so the monitor never compares naive and aware times (it raised a TypeError).
@pytest.mark.parametrize("value", NAIVE)
@pytest.mark.parametrize("field", ["time", "started"])
def test_a_heartbeat_with_a_naive_timestamp_is_read_as_utc_not_a_type_error(monitor, field, value):
    assert monitor.feed("daemon.heartbeat", _beat()) == "counted"  # an aware one already listed
    assert monitor.feed("daemon.heartbeat", _beat(instance="naive", **{field: value})) == "counted"
    assert sorted(v.instance for v in monitor.state.daemons()) == ["i1", "naive"]
    monitor.still_answering_and_counting()


@pytest.mark.parametrize("value", NAIVE)
@pytest.mark.parametrize(
    ("routing_key", "data"),
    [
        ("file.failed", {"daemon": "ingest", "reason": "disk_full", "error": "e", "attempts": 1}),
        ("endpoint.paused", {"storage": "d", "reason": "r", "error": "e", "failures": 1, "cooldown": 1}),
        ("file.ingested", _ingested("n")),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_an_event_with_a_naive_timestamp_is_read_as_utc(monitor, routing_key, data, value):
    assert monitor.feed(routing_key, {**data, "time": value}) == "counted"
    assert monitor.state.events[routing_key] == 1
    monitor.still_answering_and_counting()


def test_a_cloudevent_time_without_an_offset_is_read_as_utc(monitor):
    event = {"specversion": "1.0", "id": "x1", "source": "s", "type": "file.failed", "time": NAIVE[0],
             "data": {"daemon": "ingest", "reason": "disk_full", "error": "e", "attempts": 1}}  # fmt: skip
    msg = codec.decode(json.dumps(event).encode(), codec.CLOUDEVENTS_JSON, "file.failed")
    assert msg.time.utcoffset() == timedelta(0)
    monitor.state.observe(msg)
    assert monitor.state.refused == {} and monitor.state.failures


@pytest.mark.parametrize("offset", ["+05:30", "-11:00", "Z", "+00:00"])
def test_a_timestamp_with_any_utc_offset_is_believed(monitor, offset):
    when = (T0 + timedelta(seconds=1)).strftime("%Y-%m-%dT%H:%M:%S") + offset
    assert monitor.feed("daemon.heartbeat", _beat(time=when, started=when)) == "counted"


# --- cardinality ---------------------------------------------------------------------------------
def test_a_heartbeat_with_a_hundred_thousand_reason_keys_is_not_believed(monitor):
    reasons = {f"reason_{i}": i for i in range(100_000)}
    beat = _beat(details={"retried_by_reason": reasons, "dead_by_reason": reasons})
    assert not_believed(monitor.feed("daemon.heartbeat", beat, packed=True), "invalid_details")
    assert not monitor.state.instances
    assert len(monitor.metrics()) < METRICS_BOUND
    monitor.still_answering_and_counting()


def test_a_heartbeat_with_thousands_of_reason_keys_is_folded_to_the_largest(monitor):
    reasons = {f"reason_{i}": i for i in range(1_500)}  # as many as a heartbeat may carry
    beat = _beat(details={"retried_by_reason": reasons, "dead_by_reason": reasons})
    assert monitor.feed("daemon.heartbeat", beat, packed=True) == "counted"
    [instance] = monitor.state.instances.values()
    assert len(instance.retried_by_reason) <= intake.MAX_REASON_KEYS + 1
    assert sum(instance.retried_by_reason.values()) == sum(reasons.values())  # nothing lost: summed
    assert instance.retried_by_reason["other"] > 0
    assert len(monitor.metrics()) < METRICS_BOUND
    folded = _sample(monitor.metrics(), "spool_folded_label_values_total", label="reason")
    assert folded >= 1_500 - intake.MAX_REASON_KEYS
    monitor.still_answering_and_counting()


@pytest.mark.parametrize(
    "key",
    ["x" * 10_000, "Disk Full", "a\nspool_fake_metric 1", 'a"}', "", "é", "reason-with-dash"],
    ids=["10k", "spaces", "newline", "quote", "empty", "unicode", "dash"],
)
def test_a_reason_key_that_is_not_a_reason_code_is_folded(monitor, key):
    assert monitor.feed("daemon.heartbeat", _beat(details={"retried_by_reason": {key: 2}})) == "counted"
    [instance] = monitor.state.instances.values()
    assert instance.retried_by_reason == {"other": 2}
    assert not any(line.startswith("spool_fake_metric") for line in monitor.metrics().splitlines())
    monitor.still_answering_and_counting()


def test_ten_thousand_failure_reasons_storages_and_daemons_are_bounded(monitor):
    for i in range(10_000):
        fact = {"daemon": f"d{i}", "reason": f"reason_{i}", "error": "e" * 100, "attempts": 1,
                "endpoint": f"site{i}", "name": f"f{i}"}  # fmt: skip
        assert monitor.feed("file.failed", fact, packed=True) == "counted"
        assert monitor.feed("file.ingested", _ingested(f"f{i}", storage=f"st{i}"), packed=True) == "counted"
    s = monitor.state
    assert len({g.reason for g in s.failures.values()}) <= intake.SPARE_REASONS + 1
    assert {g.daemon for g in s.failures.values()} == {"other"}
    assert len({g.endpoint for g in s.failures.values()}) <= intake.SPARE_STORAGES + 1
    assert len(s.moved_bytes) <= intake.SPARE_STORAGES + 1 + 1  # + disk1 of the good facts
    assert sum(s.moved_bytes.values()) == 10_000 * 10  # every byte counted, under "other" at worst
    assert sum(g.count for g in s.failures.values()) == 10_000
    text = monitor.metrics()
    assert len(text) < 256 * 1024
    monitor.still_answering_and_counting()


@pytest.mark.parametrize("field", ["reason", "endpoint", "daemon"])
def test_a_megabyte_label_in_a_failure_is_not_believed(monitor, field):
    fact = {"daemon": "ingest", "reason": "disk_full", "error": "E" * 1_000_000, "attempts": 1,
            "endpoint": "disk1", "name": "N" * 1_000_000, field: "L" * 1_000_000}  # fmt: skip
    assert not_believed(monitor.feed("file.failed", fact), "field_too_long")
    assert not monitor.state.failures
    assert len(monitor.metrics()) < METRICS_BOUND
    monitor.still_answering_and_counting()


@pytest.mark.parametrize("field", ["instance", "host", "version"])
def test_a_heartbeat_with_an_over_long_label_is_refused(monitor, field):
    assert not_believed(monitor.feed("daemon.heartbeat", _beat(**{field: "x" * 100_000})), "field_too_long")
    assert not monitor.state.instances
    monitor.still_answering_and_counting()


@pytest.mark.parametrize(
    ("routing_key", "data"),
    [
        ("daemon.heartbeat", _beat(host="\ud800")),
        ("daemon.heartbeat", _beat(instance="a\udfff")),
        ("daemon.heartbeat", _beat(version="\ud800")),
        ("daemon.heartbeat", _beat(details={"queue": "q\ud800"})),
        ("file.failed", {"daemon": "ingest", "reason": "r", "error": "\ud800", "attempts": 1}),
        ("file.failed", {"daemon": "ingest", "reason": "r\ud800", "error": "e", "attempts": 1}),
        ("file.ingested", _ingested("n\ud800")),
        ("file.ingested", _ingested("n", storage="s\udc80")),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_a_fact_with_text_that_is_not_unicode_is_refused(monitor, routing_key, data):
    """A lone surrogate (valid JSON escape, not a character) cannot be written into /metrics."""
    assert not_believed(monitor.feed(routing_key, data), "invalid_text")
    monitor.still_answering_and_counting()


def test_a_reason_key_that_is_not_unicode_is_not_believed(monitor):
    outcome = monitor.feed("daemon.heartbeat", _beat(details={"retried_by_reason": {"r\ud800": 2}}))
    assert not_believed(outcome, "invalid_text") or outcome == "counted"
    if outcome == "counted":  # believed only with the key folded away
        assert monitor.state.instances[("ingest", "i1")].retried_by_reason == {"other": 2}
    monitor.still_answering_and_counting()


@pytest.mark.parametrize("daemon", ["nosuchdaemon", "", "x" * 10_000, "ingest\n"])
def test_a_heartbeat_of_a_daemon_spool_does_not_have_is_refused(monitor, daemon):
    assert not_believed(monitor.feed("daemon.heartbeat", _beat(daemon=daemon)), "unknown_daemon")
    assert not monitor.state.instances
    monitor.still_answering_and_counting()


def test_instances_are_bounded_and_dead_ones_make_room(monitor):
    for i in range(intake.MAX_INSTANCES + 50):
        monitor.feed("daemon.heartbeat", _beat(instance=f"i{i}"), packed=True)
    assert len(monitor.state.instances) == intake.MAX_INSTANCES
    assert monitor.state.refused["too_many_instances"] == 50
    monitor.clock.now += timedelta(hours=1)  # all of them dead now
    assert (
        monitor.feed("daemon.heartbeat", _beat(instance="new", time=monitor.clock.now.isoformat()))
        == "counted"
    )
    assert len(monitor.state.instances) == intake.MAX_INSTANCES
    monitor.still_answering_and_counting(metrics_bound=intake.MAX_INSTANCES * 1024)


def test_metrics_stay_bounded_with_every_bound_reached_at_once(monitor):
    """The worst a Spool user could make of /metrics: the most instances, longest labels, full maps."""
    reasons = {f"reason_{i:03d}_{'x' * 50}": i + 1 for i in range(300)}
    for i in range(intake.MAX_INSTANCES + 10):
        beat = _beat(instance=f"{i:04d}" + "i" * 60, host="h" * 253, version="v" * 64,
                     details={"retried_by_reason": reasons, "dead_by_reason": reasons})  # fmt: skip
        monitor.feed("daemon.heartbeat", beat, packed=True)
    size = len(monitor.metrics())
    assert 1024 * 1024 < size < 3 * 1024 * 1024  # the bounds were all reached, and held
    monitor.clock.now += timedelta(hours=1)  # dead now: room for the good heartbeat
    monitor.still_answering_and_counting(metrics_bound=3 * 1024 * 1024)


# --- whom to believe -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("routing_key", "data"),
    [
        ("daemon.heartbeat", _beat()),
        ("file.ingested", _ingested("forged")),
        ("file.failed", {"daemon": "ingest", "reason": "disk_full", "error": "e", "attempts": 1}),
        ("endpoint.paused", {"storage": "d", "reason": "r", "error": "e", "failures": 1, "cooldown": 1}),
        ("alert.raised", {"kind": "new_failure_reason", "summary": "forged"}),
        ("tape.mounted", {"library": "l", "drive": "d", "cartridge": "c", "purpose": "archive"}),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_spools_facts_from_another_sender_are_refused(monitor, routing_key, data):
    assert monitor.feed(routing_key, data, trusted=False) == "refused:untrusted_sender"
    s = monitor.state
    assert not s.instances and not s.failures and not s.moved_bytes and not s.alerts and s.tape_mounts == 0
    assert s.events[routing_key] == 0
    monitor.still_answering_and_counting()


@pytest.mark.parametrize(
    ("routing_key", "data"),
    [("file.ready", {"path": "/l/a", "dataset": "d"}), ("recall.request", {"names": ["a"]})],
)
def test_the_external_contract_is_counted_from_anyone(monitor, routing_key, data):
    assert monitor.feed(routing_key, data, trusted=False) == "counted"
    assert monitor.state.events[routing_key] == 1


def test_refusals_are_counted_by_reason_in_metrics_and_status(monitor):
    monitor.feed("daemon.heartbeat", _beat(), trusted=False)
    monitor.feed("file.ingested", _ingested("forged"), trusted=False)
    for i in range(intake.MAX_INSTANCES + 1):  # the last one finds no room
        monitor.feed("daemon.heartbeat", _beat(instance=f"i{i}"), packed=True)
    text = monitor.metrics()
    assert _sample(text, "spool_refused_facts_total", reason="untrusted_sender") == 2
    assert _sample(text, "spool_refused_facts_total", reason="too_many_instances") == 1
    doc = monitor.status()
    assert doc["refused"]["total"] == 3
    assert doc["refused"]["last"]["reason"] == "too_many_instances"


def test_every_refusal_is_logged_and_repeats_are_folded():
    from daemons.monitor.handlers import _refusal_logger

    lines: list[tuple[str, dict[str, Any]]] = []
    log_refusal = _refusal_logger()
    import daemons.monitor.handlers as handlers

    original = handlers.log
    handlers.log = _Recorder(lines)  # type: ignore[assignment]
    try:
        for _ in range(1000):
            log_refusal("daemon.heartbeat", intake.Refused("untrusted_sender", "forged"))
        log_refusal("file.failed", intake.Refused("naive_timestamp", "naive"))
    finally:
        handlers.log = original
    assert [(event, kw["reason"]) for event, kw in lines] == [
        ("fact_refused", "untrusted_sender"),
        ("fact_refused", "naive_timestamp"),
    ]


class _Recorder:
    def __init__(self, lines: list[tuple[str, dict[str, Any]]]) -> None:
        self.lines = lines

    def warning(self, event: str, **kw: Any) -> None:
        self.lines.append((event, kw))


def test_known_good_messages_pass_the_door_unchanged(monitor):
    """What Spool's own daemons send is believed (the heartbeat a runtime builds, real events)."""
    beat = DaemonHeartbeat(daemon="replicator", instance="r1", host="n", pid=1, version="v", started=T0,
                           time=T0, details={"retried": 0, "queue": "q", "retried_by_reason": {},
                                             "dead_by_reason": {}, "handling": {"buckets": [0.005, 0.01],
                                             "counts": [0, 0, 0], "sum": 0.0}})  # fmt: skip
    monitor.state.observe(beat)
    monitor.state.observe(
        FileIngested(name="a", dataset="d", size=0, adler32="00000001", storage="disk1", pfn="a")
    )
    monitor.state.observe(FileFailed(daemon="tape", reason="drive_error", error="e", attempts=3, name="a"))
    assert not monitor.state.refused
    assert [g.reason for g in monitor.state.failure_groups()] == ["drive_error"]


def _sample(text: str, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    raise AssertionError(f"no sample {name} {labels}")


def test_a_malformed_message_with_a_huge_routing_key_and_error_stays_small(monitor):
    """The routing key of a malformed delivery may come from a header anyone can set."""
    for i in range(100):
        monitor.state.observe_malformed("k" * 100_000, f"reason {i}" * 1000, "E" * 1_000_000)
    assert len(monitor.web.status_body()) < 64 * 1024
    assert len(monitor.state.malformed) <= 33  # reasons not shaped like one: "other"
    monitor.still_answering_and_counting()
