import json

import msgpack
import pytest

from common import codec
from common.errors import InvalidMessage
from common.messages import FileIngested, FileReady


def ce(data, **envelope):
    event = {"specversion": "1.0", "id": "e1", "source": "daq", "type": "file.ready", "data": data}
    event.update(envelope)
    return json.dumps(event).encode()


def reason_of(body, content_type=codec.CLOUDEVENTS_JSON, key="file.ready"):
    with pytest.raises(InvalidMessage) as info:
        codec.decode(body, content_type, key)
    return info.value.reason


def test_cloudevent_maps_onto_file_ready_with_normalised_checksum():
    msg = codec.decode(
        ce({"path": "/l/a.fits", "dataset": "d", "adler32": "ABC", "size": 3}),
        codec.CLOUDEVENTS_JSON,
        "file.ready",
    )
    assert isinstance(msg, FileReady)
    assert (msg.id, msg.source, msg.adler32, msg.size) == ("e1", "daq", "00000abc", 3)


def test_msgpack_round_trip_keeps_every_field():
    msg = FileIngested(name="a", dataset="d", size=1, adler32="00000001", storage="disk1", pfn="a")
    assert codec.decode(codec.encode(msg), codec.MSGPACK, "file.ingested") == msg


def test_malformed_json_is_undecodable():
    assert reason_of(b"{not json") == codec.UNDECODABLE


def test_json_that_is_not_a_cloudevent_is_rejected_as_such():
    assert reason_of(json.dumps({"specversion": "1.0", "data": {}}).encode()) == codec.NOT_CLOUDEVENT


def test_unknown_event_type_is_unknown_type():
    assert reason_of(ce({}, type="file.teleported")) == codec.UNKNOWN_TYPE


def test_type_different_from_routing_key_is_invalid():
    assert reason_of(ce({"path": "/a", "dataset": "d"}, type="recall.request")) == codec.INVALID


def test_missing_required_field_names_the_field():
    with pytest.raises(InvalidMessage) as info:
        codec.decode(ce({"dataset": "d"}), codec.CLOUDEVENTS_JSON, "file.ready")
    assert info.value.reason == codec.INVALID and "path" in info.value.message


def test_unknown_data_field_is_rejected_not_ignored():
    with pytest.raises(InvalidMessage) as info:
        codec.decode(ce({"path": "/a", "dataset": "d", "adler23": "1"}), codec.CLOUDEVENTS_JSON, "file.ready")
    assert "adler23" in info.value.message


def test_cloudevent_extension_attributes_are_accepted():
    msg = codec.decode(
        ce({"path": "/a", "dataset": "d"}, traceparent="00-abc"), codec.CLOUDEVENTS_JSON, "file.ready"
    )
    assert msg.id == "e1"


def test_plain_json_payload_takes_id_from_amqp_message_id():
    body = json.dumps({"path": "/a", "dataset": "d"}).encode()
    assert codec.decode(body, "application/json", "file.ready", message_id="m-7").id == "m-7"


def test_relative_path_is_invalid():
    assert reason_of(ce({"path": "a/b", "dataset": "d"})) == codec.INVALID


def test_bad_msgpack_is_undecodable():
    assert reason_of(b"\xc1\xc1", codec.MSGPACK) == codec.UNDECODABLE


def test_newer_schema_version_is_refused():
    body = msgpack.packb({"schema_version": 99, "path": "/a", "dataset": "d"})
    assert reason_of(body, codec.MSGPACK) == codec.INVALID


def test_to_cloudevent_is_accepted_back():
    msg = FileReady(path="/a/b", dataset="d", size=4, metadata={"run": 1})
    back = codec.decode(json.dumps(codec.to_cloudevent(msg)).encode(), codec.CLOUDEVENTS_JSON, "file.ready")
    assert back.model_dump(exclude={"time"}) == msg.model_dump(exclude={"time"})
