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
"""

from __future__ import annotations

import json
from typing import Any

import msgpack
from pydantic import ValidationError

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


def decode(body: bytes, content_type: str | None, routing_key: str, message_id: str | None = None) -> Message:
    """Decode and validate one delivery into its model; raise ``InvalidMessage`` otherwise."""
    ctype = (content_type or "").split(";")[0].strip().lower()
    if ctype == MSGPACK:
        raw = _unpack(body)
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
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidMessage(UNDECODABLE, f"body is not valid JSON: {exc}") from None


def _validate(model: type[Message], raw: Any, routing_key: str) -> Message:
    if not isinstance(raw, dict):
        raise InvalidMessage(INVALID, f"{routing_key} body must be a map, got {type(raw).__name__}")
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors()[:5]
        )
        raise InvalidMessage(INVALID, f"invalid {routing_key}: {problems}") from None
