"""Bytes <-> message models.

Inside Spool: msgpack (``application/msgpack``) of the model's JSON-mode dump. From outside, three
bodies are accepted for a routing key that names a known type:

- ``application/cloudevents+json``: a CloudEvents 1.0 event in structured mode; ``id``, ``source``,
  ``type`` and ``specversion`` are required, ``type`` must equal the routing key, ``data`` is the
  payload.
- ``application/json`` (or no content type with a JSON body): either a CloudEvent (detected by
  ``specversion``) or the bare payload; the event id then comes from the AMQP ``message_id``.
- ``application/msgpack``: a Spool message.

Every failure raises ``InvalidMessage`` with one of the reason codes below, so the runner can
dead-letter it with a precise cause.

Hostile bodies are refused before they are parsed into Python objects: a body above
``limits.MAX_BODY_BYTES``, JSON nested deeper than ``limits.MAX_JSON_DEPTH``, ``NaN`` /
``Infinity`` or an integer of more than ``_MAX_INT_DIGITS`` digits is ``undecodable``. A decoded
body is validated **strictly** (no ``"7"`` for 7, see ``common.messages``); the error text names at
most five fields, each location cut short, never the value.
"""

from __future__ import annotations

import json
from typing import Any

import msgpack
from pydantic import ValidationError

from common import limits
from common.errors import InvalidMessage
from common.messages import MODELS, Message

MSGPACK = "application/msgpack"
CLOUDEVENTS_JSON = "application/cloudevents+json"
JSON = "application/json"

# Reason codes (stable: the monitor groups by them, operators retry by them).
UNDECODABLE = "undecodable"
NOT_CLOUDEVENT = "not_cloudevent"
UNKNOWN_TYPE = "unknown_type"
INVALID = "invalid_message"

_CE_REQUIRED = ("specversion", "id", "source", "type")
# Envelope attributes we map onto the model; other attributes are CloudEvents extensions (ignored).
_CE_KNOWN = {*_CE_REQUIRED, "time", "data", "datacontenttype", "subject", "dataschema"}


def encode(msg: Message) -> bytes:
    return msgpack.packb(msg.model_dump(mode="json"), use_bin_type=True)


# 2**64 has 20 digits: a longer integer is refused by every bound, and converting thousands of
# digits costs quadratic time (Python caps it at 4300 with a ValueError).
_MAX_INT_DIGITS = 24
_LOC_PART = 64  # characters of one part of a field location quoted in an error


def decode(body: bytes, content_type: str | None, routing_key: str, message_id: str | None = None) -> Message:
    """Decode and validate one delivery into its model; raise ``InvalidMessage`` otherwise."""
    if len(body) > limits.MAX_BODY_BYTES:
        raise InvalidMessage(
            UNDECODABLE, f"body is {len(body)} bytes, at most {limits.MAX_BODY_BYTES} accepted"
        )
    ctype = (content_type or "").split(";")[0].strip().lower()
    if ctype == MSGPACK:
        raw = _unpack(body)
        if limits.nesting_exceeds(raw):
            raise InvalidMessage(UNDECODABLE, f"msgpack nested deeper than {limits.MAX_JSON_DEPTH} levels")
        model = _model_for(routing_key)
        return _validate(model, raw, routing_key)
    raw = _parse_json(body)
    if ctype == CLOUDEVENTS_JSON or (isinstance(raw, dict) and "specversion" in raw):
        return from_cloudevent(raw, routing_key)
    if ctype not in ("", JSON, "text/json", "text/plain"):
        raise InvalidMessage(UNDECODABLE, f"unsupported content type {content_type!r}")
    model = _model_for(routing_key)
    if not isinstance(raw, dict):
        raise InvalidMessage(INVALID, f"body must be a JSON object, got {type(raw).__name__}")
    if message_id and "id" not in raw:
        raw = {**raw, "id": message_id}
    return _validate(model, raw, routing_key)


def from_cloudevent(event: Any, routing_key: str) -> Message:
    if not isinstance(event, dict):
        raise InvalidMessage(NOT_CLOUDEVENT, f"a CloudEvent is a JSON object, got {type(event).__name__}")
    missing = [k for k in _CE_REQUIRED if k not in event]
    if missing:
        raise InvalidMessage(NOT_CLOUDEVENT, f"not a CloudEvent: missing {', '.join(missing)}")
    if event["specversion"] != "1.0":
        raise InvalidMessage(NOT_CLOUDEVENT, f"unsupported specversion {event['specversion']!r}")
    etype = event["type"]
    if etype not in MODELS:
        raise InvalidMessage(UNKNOWN_TYPE, f"unknown event type {etype!r}")
    if routing_key and etype != routing_key:
        raise InvalidMessage(INVALID, f"event type {etype!r} does not match routing key {routing_key!r}")
    data = event.get("data")
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise InvalidMessage(INVALID, "CloudEvent data must be a JSON object")
    forbidden = {"id", "source", "time", "schema_version"} & data.keys()
    if forbidden:
        raise InvalidMessage(INVALID, f"data may not set envelope fields: {', '.join(sorted(forbidden))}")
    raw = {**data, "id": event["id"], "source": event["source"]}
    if event.get("time") is not None:
        raw["time"] = event["time"]
    return _validate(MODELS[etype], raw, etype)


def to_cloudevent(msg: Message) -> dict[str, Any]:
    """The CloudEvents JSON an external system would publish for ``msg`` (used by ``spool ingest``)."""
    data = msg.model_dump(mode="json", exclude={"id", "source", "time", "schema_version", "correlation_id"})
    data = {k: v for k, v in data.items() if v not in (None, [], {})}
    return {
        "specversion": "1.0",
        "id": msg.id,
        "source": msg.source,
        "type": msg.ROUTING_KEY,
        "time": msg.time.isoformat().replace("+00:00", "Z"),
        "datacontenttype": JSON,
        "data": data,
    }


def _model_for(routing_key: str) -> type[Message]:
    try:
        return MODELS[routing_key]
    except KeyError:
        raise InvalidMessage(UNKNOWN_TYPE, f"unknown message type {routing_key!r}") from None


def _unpack(body: bytes) -> Any:
    try:
        return msgpack.unpackb(body, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated exception types
        raise InvalidMessage(UNDECODABLE, f"body is not valid msgpack: {exc}") from None


def _parse_json(body: bytes) -> Any:
    if limits.json_depth_exceeds(body):
        raise InvalidMessage(UNDECODABLE, f"JSON nested deeper than {limits.MAX_JSON_DEPTH} levels")
    try:
        return json.loads(body, parse_constant=_no_constant, parse_int=_bounded_int)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidMessage(UNDECODABLE, f"body is not valid JSON: {exc}") from None
    except (ValueError, RecursionError) as exc:
        raise InvalidMessage(UNDECODABLE, f"body is not acceptable JSON: {exc}") from None


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > _MAX_INT_DIGITS:
        raise ValueError(f"an integer of {len(text)} digits")
    return int(text)


def _validate(model: type[Message], raw: Any, routing_key: str) -> Message:
    if not isinstance(raw, dict):
        raise InvalidMessage(INVALID, f"{routing_key} body must be a map, got {type(raw).__name__}")
    try:
        # Strict: what comes off the bus is never coerced (a string is not a number, nor a list).
        return model.model_validate(raw, strict=True)
    except ValidationError as exc:
        problems = "; ".join(f"{_location(e['loc'])}: {e['msg']}" for e in exc.errors()[:5])
        raise InvalidMessage(INVALID, f"invalid {routing_key}: {problems}") from None
    except RecursionError:  # a msgpack body nested deeper than Python validates
        raise InvalidMessage(UNDECODABLE, f"{routing_key} body is nested too deeply") from None


def _location(loc: tuple[int | str, ...]) -> str:
    """A field location for an error text: each part cut short and without control characters
    (an unknown key may be a megabyte of hostile text)."""
    parts = []
    for p in loc:
        text = str(p)
        text = "".join(c if c.isprintable() else "?" for c in text[:_LOC_PART])
        parts.append(text + ("..." if len(str(p)) > _LOC_PART else ""))
    return ".".join(parts) or "body"
