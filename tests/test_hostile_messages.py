"""Issue 16, classes 3 and 5 (message fields): what comes off the bus is typed strictly and every
field is bounded. Each bound is tested at the limit (accepted) and one over (refused, naming the
field); hostile bodies (huge, deeply nested, NaN, endless digits) are ``undecodable`` before they are
parsed; and through the real broker one hostile message is one dead letter while the daemon goes on
ingesting good files."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import msgpack
import pytest

from common import codec, limits
from common.catalogue import Catalogue
from common.config import Settings
from common.errors import InvalidMessage
from common.messages import (
    DaemonHeartbeat,
    FileFailed,
    FileIngested,
    FileReady,
    RecallRequest,
    ReplicaCreated,
    ReplicaRequest,
)
from daemons.ingest.handlers import service as ingest_service
from tests.conftest import cloudevent, publish_raw, queue_depth, running, wait_for
from tests.conftest import dead_reasons as _dead_reasons

DATASET = "lst1.20261123.run012345.dl0"
READY = {"path": "/landing/run1/f.fits", "dataset": DATASET}
RECALL = {"names": ["run1/f.fits"]}


def _md(meta: Any) -> dict[str, Any]:
    return {**READY, "metadata": meta}


def decode_json(data: dict[str, Any], routing_key: str = "file.ready") -> Any:
    return codec.decode(cloudevent(data, type_=routing_key), codec.CLOUDEVENTS_JSON, routing_key)


def refused(data: dict[str, Any], routing_key: str = "file.ready") -> InvalidMessage:
    with pytest.raises(InvalidMessage) as info:
        decode_json(data, routing_key)
    return info.value


# --- strict types: never coerced -------------------------------------------------------------------
@pytest.mark.parametrize(
    ("routing_key", "data", "field"),
    [
        ("file.ready", {**READY, "size": "2558"}, "size"),
        ("file.ready", {**READY, "size": True}, "size"),
        ("file.ready", {**READY, "size": 2558.0}, "size"),
        ("file.ready", {**READY, "size": [2558]}, "size"),
        ("file.ready", {**READY, "path": 17}, "path"),
        ("file.ready", {**READY, "dataset": ["a"]}, "dataset"),
        ("file.ready", {**READY, "name": 5}, "name"),
        ("file.ready", {**READY, "parents": "raw/a"}, "parents"),
        ("file.ready", {**READY, "parents": [1]}, "parents"),
        ("file.ready", _md([["run", 1]]), "metadata"),
        ("file.ready", _md({"run": [1]}), "metadata"),
        ("file.ready", _md({"run": {"a": 1}}), "metadata"),
        ("file.ready", {**READY, "adler32": 123}, "adler32"),
        ("recall.request", {**RECALL, "priority": "7"}, "priority"),
        ("recall.request", {**RECALL, "priority": True}, "priority"),
        ("recall.request", {**RECALL, "priority": 7.0}, "priority"),
        ("recall.request", {"names": "run1/f.fits"}, "names"),
        ("recall.request", {"names": {"a": 1}}, "names"),
        ("recall.request", {**RECALL, "destination": 3}, "destination"),
        ("recall.request", {"dataset": 3}, "dataset"),
        ("replica.request", {"name": "a", "destination": "disk2", "priority": "1"}, "priority"),
        ("replica.request", {"names": "a", "destination": "disk2"}, "names"),
    ],
)
def test_a_wrong_type_is_refused_naming_the_field_never_coerced(routing_key, data, field):
    err = refused(data, routing_key)
    assert err.reason == codec.INVALID
    assert f"{field}" in err.message


def test_the_correct_types_are_accepted():
    msg = decode_json({**READY, "size": 2558, "metadata": {"a": 1, "b": 1.5, "c": True, "d": "x", "e": None}})
    assert isinstance(msg, FileReady) and msg.size == 2558
    assert msg.metadata == {"a": 1, "b": 1.5, "c": True, "d": "x", "e": None}
    assert type(msg.metadata["c"]) is bool and type(msg.metadata["a"]) is int


def test_spools_own_msgpack_still_decodes_with_its_iso_timestamps():
    for msg in (
        FileReady(path="/l/a", dataset=DATASET, size=3, metadata={"a": 1.5, "b": True}),
        FileIngested(name="a", dataset=DATASET, size=3, adler32="1", storage="disk1", pfn="a"),
        ReplicaCreated(storage="disk2", copies=[{"name": "a", "pfn": "a", "size": 1, "adler32": "2"}]),
        DaemonHeartbeat(
            daemon="ingest",
            instance="i",
            host="h",
            pid=1,
            version="1",
            started=FileReady(path="/a", dataset="d").time,
            details={"retried_by_reason": {"x": 1}},
        ),
        FileFailed(daemon="ingest", reason="x", error="e" * 10_000, attempts=1),
    ):
        body = codec.encode(msg)
        assert isinstance(msgpack.unpackb(body)["time"], str)
        assert codec.decode(body, codec.MSGPACK, msg.ROUTING_KEY) == msg


@pytest.mark.parametrize(
    "value", ["2026-11-23T02:13:00Z", "2026-11-23T02:13:00+01:00", "2026-11-23T02:13:00"]
)
def test_a_timestamp_is_parsed_and_always_carries_an_offset(value):
    event = json.loads(cloudevent(READY))
    event["time"] = value
    msg = codec.decode(json.dumps(event).encode(), codec.CLOUDEVENTS_JSON, "file.ready")
    assert msg.time.tzinfo is not None


@pytest.mark.parametrize("value", [1700000000, "yesterday", "2026-11-23T02:13:00Z" + " " * 60, True])
def test_a_timestamp_that_is_not_iso_text_is_refused(value):
    event = json.loads(cloudevent(READY))
    event["time"] = value
    with pytest.raises(InvalidMessage) as info:
        codec.decode(json.dumps(event).encode(), codec.CLOUDEVENTS_JSON, "file.ready")
    assert info.value.reason == codec.INVALID and "time" in info.value.message


# --- every bound: at the limit accepted, one over refused ----------------------------------------
def _meta(n_keys: int, key_len: int = 4, value: Any = 1) -> dict[str, Any]:
    return {f"{i:0{key_len}d}": value for i in range(n_keys)}


BOUNDS: list[tuple[str, str, dict[str, Any], dict[str, Any]]] = [
    # (field named in the error, routing key, at the limit, one over)
    ("size", "file.ready", {**READY, "size": limits.MAX_SIZE}, {**READY, "size": limits.MAX_SIZE + 1}),
    ("size", "file.ready", {**READY, "size": 0}, {**READY, "size": -1}),
    ("size", "file.ready", {**READY, "size": 0}, {**READY, "size": 2**64}),
    ("priority", "recall.request", {**RECALL, "priority": 9}, {**RECALL, "priority": 10}),
    ("priority", "recall.request", {**RECALL, "priority": 0}, {**RECALL, "priority": -1}),
    ("dataset", "file.ready", {**READY, "dataset": "d" * 255}, {**READY, "dataset": "d" * 256}),
    ("name", "file.ready", {**READY, "name": "n" * 1024}, {**READY, "name": "n" * 1025}),
    ("path", "file.ready", {**READY, "path": "/" + "a/" * 2047 + "b"}, {**READY, "path": "/" + "a/" * 2048}),
    ("path", "file.ready", {**READY, "path": "/" + "é" * 2047}, {**READY, "path": "/" + "é" * 2048}),
    ("metadata", "file.ready", _md(_meta(64)), _md(_meta(65))),
    ("metadata", "file.ready", _md({"k" * 128: 1}), _md({"k" * 129: 1})),
    ("metadata", "file.ready", _md({"k": "v" * 512}), _md({"k": "v" * 513})),
    ("metadata", "file.ready", _md({"k": 2**63 - 1}), _md({"k": 2**63})),
    ("metadata", "file.ready", _md({"k": -(2**63)}), _md({"k": -(2**63) - 1})),
    # 40 keys of 400 characters: every key and value within its own bound, the whole over 16 KiB.
    ("metadata", "file.ready", _md(_meta(30, 3, "v" * 500)),
     _md(_meta(40, 3, "v" * 500))),
    ("parents", "file.ready", {**READY, "parents": ["p"] * 1000}, {**READY, "parents": ["p"] * 1001}),
    ("parents", "file.ready", {**READY, "parents": ["p" * 1024]}, {**READY, "parents": ["p" * 1025]}),
    ("names", "recall.request", {"names": ["n"] * 10_000}, {"names": ["n"] * 10_001}),
    ("names", "recall.request", {"names": ["n" * 1000] * 1048}, {"names": ["n" * 1000] * 1049}),
    ("names", "recall.request", {"names": ["n" * 1024]}, {"names": ["n" * 1025]}),
    ("names", "replica.request", {"names": ["n"] * 10_000, "destination": "d"},
     {"names": ["n"] * 10_001, "destination": "d"}),
    ("destination", "recall.request", {**RECALL, "destination": "d" * 64},
     {**RECALL, "destination": "d" * 65}),
    ("dataset", "recall.request", {"dataset": "d" * 255}, {"dataset": "d" * 256}),
]  # fmt: skip


@pytest.mark.parametrize(("field", "routing_key", "at_limit", "over"), BOUNDS)
def test_every_bound_accepts_the_limit_and_refuses_one_more(field, routing_key, at_limit, over):
    decode_json(at_limit, routing_key)
    err = refused(over, routing_key)
    assert err.reason == codec.INVALID
    assert field in err.message
    assert len(err.message) < 2000  # the refusal never quotes the hostile value


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({**READY, "name": "a\nb"}, "name"),
        ({**READY, "dataset": "lst1\x1b[31m"}, "dataset"),
        ({**READY, "path": "/landing/a\rb"}, "path"),
        (_md({"k\x00": 1}), "metadata"),
        ({**READY, "name": "\ud800"}, "name"),
        (_md({"k": "\udfff"}), "metadata"),
        (_md({"k": 1e308 * 10}), None),  # json.dumps writes Infinity
    ],
)
def test_control_characters_lone_surrogates_and_infinities_are_refused(data, field):
    with pytest.raises(InvalidMessage) as info:
        decode_json(data)
    assert info.value.reason in (codec.INVALID, codec.UNDECODABLE)
    if field is not None:
        assert field in info.value.message


def test_an_unknown_field_named_by_a_megabyte_is_named_briefly():
    err = refused({**READY, "x" * 1_000_000: 1})
    assert err.reason == codec.INVALID and len(err.message) < 500


def _nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


# --- hostile bodies: refused before parsing -------------------------------------------------------
@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        (b"[" * 100_000 + b"]" * 100_000, codec.JSON),
        (b'{"a":' * 50_000 + b"1" + b"}" * 50_000, codec.CLOUDEVENTS_JSON),
        (b'{"path": "/a", "dataset": "d", "metadata": {"a": ' + b"[" * 33 + b"]" * 33 + b"}}", codec.JSON),
        (b'{"path": "/a", "dataset": "d", "size": NaN}', codec.JSON),
        (b'{"path": "/a", "dataset": "d", "size": -Infinity}', codec.JSON),
        (b'{"path": "/a", "dataset": "d", "size": ' + b"9" * 5000 + b"}", codec.JSON),
        (b'{"path": "' + b"a" * (limits.MAX_BODY_BYTES + 1) + b'"}', codec.JSON),
        (b"\x91" * 100_000 + b"\xc0", codec.MSGPACK),
        (msgpack.packb({"path": "/a", "dataset": "d", "metadata": {"a": _nested(40)}}), codec.MSGPACK),
        (b"\xff\xfe not json", codec.JSON),
    ],
)
def test_hostile_bodies_are_undecodable_quickly_without_a_crash(body, content_type):
    started = time.perf_counter()
    with pytest.raises(InvalidMessage) as info:
        codec.decode(body, content_type, "file.ready")
    assert info.value.reason == codec.UNDECODABLE
    assert time.perf_counter() - started < 1.0
    assert len(info.value.message) < 2000


def test_json_nesting_up_to_the_bound_is_still_parsed():
    depth = limits.MAX_JSON_DEPTH
    assert not limits.json_depth_exceeds(b"[" * depth + b"]" * depth)
    assert limits.json_depth_exceeds(b"[" * (depth + 1) + b"]" * (depth + 1))
    # Brackets inside strings are text, not nesting.
    assert not limits.json_depth_exceeds(b'{"a": "' + b"[" * 1000 + b'"}')
    assert not limits.json_depth_exceeds(b'{"a": "\\"' + b"[" * 1000 + b'"}')


def test_internal_messages_are_bounded_too_but_spools_own_text_is_truncated():
    with pytest.raises(ValueError):
        ReplicaRequest(names=["n"] * 10_001, destination="disk2")
    with pytest.raises(ValueError):
        RecallRequest(names=["n" * 1000] * 1100)
    failed = FileFailed(daemon="ingest", reason="x", error="e" * 100_000, attempts=1)
    assert len(failed.error) <= limits.MAX_TEXT


# --- through the real broker: one dead letter each, the daemon goes on ---------------------------
HOSTILE_BODIES: list[tuple[str, bytes, str]] = [
    ("size_as_text", b"", codec.INVALID),
    ("size_as_bool", b"", codec.INVALID),
    ("size_2_64", b"", codec.INVALID),
    ("metadata_value_513", b"", codec.INVALID),
    ("metadata_2mb", b"", codec.INVALID),
    ("deep_json", b"[" * 200_000 + b"]" * 200_000, codec.UNDECODABLE),
    ("huge_body", b"{" + b" " * (limits.MAX_BODY_BYTES + 10) + b"}", codec.UNDECODABLE),
]


def _hostile_body(case: str, src: Path) -> bytes:
    base = {"path": str(src), "dataset": DATASET}
    if case == "size_as_text":
        return cloudevent({**base, "size": "4"})
    if case == "size_as_bool":
        return cloudevent({**base, "size": True})
    if case == "size_2_64":
        return cloudevent({**base, "size": 2**64})
    if case == "metadata_value_513":
        return cloudevent({**base, "metadata": {"k": "v" * 513}})
    if case == "metadata_2mb":
        return cloudevent({**base, "metadata": {f"k{i}": "v" * 500 for i in range(4200)}})
    return dict((c, b) for c, b, _ in HOSTILE_BODIES)[case]


@pytest.mark.integration
@pytest.mark.parametrize(("case", "reason"), [(c, r) for c, _, r in HOSTILE_BODIES])
async def test_one_hostile_message_is_one_dead_letter_and_nothing_is_copied(
    settings: Settings, broker, topology, case, reason
):
    landing = settings.landing_areas["lst1"]
    (landing / "run1").mkdir(parents=True)
    src = landing / "run1/hostile.fits"
    src.write_bytes(b"data")
    good = landing / "run1/good.fits"
    good.write_bytes(b"good")
    async with running([ingest_service], settings) as process:
        await publish_raw(broker, settings, "file.ready", _hostile_body(case, src))
        await wait_for(lambda: _depth(broker, settings.dead_queue("ingest"), 1))
        await publish_raw(broker, settings, "file.ready", cloudevent({"path": str(good), "dataset": DATASET}))
        await wait_for(lambda: _registered(settings, 1))
        assert process.runners[0].stats.retried == 0
    assert await _dead_reasons(broker, settings) == [reason]
    root = settings.storage["disk1"].root
    assert sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()) == [
        "run1/good.fits"
    ]


async def _depth(broker, name: str, n: int) -> bool:
    return await queue_depth(broker, name) == n


async def _registered(settings: Settings, n: int) -> bool:
    async with await Catalogue.open(settings.catalogue.url) as c:
        return (await c.queries.counts()).files == n
