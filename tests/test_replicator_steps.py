"""Pure decisions of the replicator."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.catalogue import ReplicaTask, Source
from common.config import StorageEndpoint
from common.errors import Permanent
from daemons.replicator import steps

STORAGE = {
    "disk1": StorageEndpoint(root=Path("/a"), attributes={"site": "LOCAL"}),
    "cnaf": StorageEndpoint(root=Path("/b"), attributes={"site": "CNAF"}),
    "pic1": StorageEndpoint(root=Path("/c"), attributes={"site": "PIC"}),
    "pic2": StorageEndpoint(root=Path("/d"), attributes={"site": "PIC"}),
    "tape1": StorageEndpoint(kind="tape", root=Path("/e")),
}


def task(state: str | None, needed: bool = True) -> ReplicaTask:
    return ReplicaTask("f", 1, "00000001", state, "f" if state else None, needed, 3, ())


def test_destination_must_be_a_configured_disk_endpoint() -> None:
    assert steps.destination("pic1", STORAGE) is STORAGE["pic1"]
    with pytest.raises(Permanent) as e:
        steps.destination("nosuch", STORAGE)
    assert e.value.reason == "unknown_storage"
    with pytest.raises(Permanent) as e:
        steps.destination("tape1", STORAGE)
    assert e.value.reason == "wrong_endpoint_kind"


@pytest.mark.parametrize(
    ("state", "needed", "expected"),
    [
        (None, True, "copy"),
        ("queued", True, "copy"),
        ("waiting", True, "copy"),
        ("bad", True, "copy"),
        ("available", True, "verify"),
        ("available", False, "verify"),
        ("queued", False, "cancel"),
        (None, False, "cancel"),
    ],
)
def test_action_for_a_request(state: str | None, needed: bool, expected: str) -> None:
    assert steps.action(task(state, needed)) == expected


def test_sources_same_site_first_then_least_busy_and_never_down() -> None:
    sources = [Source("disk1", "f"), Source("cnaf", "f"), Source("pic1", "f"), Source("gone", "f")]
    ranked = steps.rank_sources(sources, "pic2", STORAGE, {}, {})
    assert [s.storage for s in ranked] == ["pic1", "cnaf", "disk1"]
    ranked = steps.rank_sources(sources, "pic2", STORAGE, {"pic1": "down"}, {"disk1": 3})
    assert [s.storage for s in ranked] == ["cnaf", "disk1"]
    ranked = steps.rank_sources(sources, "cnaf", STORAGE, {"pic1": "readonly"}, {"disk1": 1})
    assert [s.storage for s in ranked] == ["pic1", "disk1"]


def test_reason_classes_match_the_storage_layer() -> None:
    from common.storage import reasons

    assert reasons.SOURCE_REASONS <= steps.SOURCE_BAD | steps.SOURCE_TRANSIENT
    assert reasons.DESTINATION_REASONS <= steps.ENDPOINT_FAILURES


def test_replica_request_is_one_file_or_a_bulk_list() -> None:
    from pydantic import ValidationError

    from common.messages import ReplicaRequest

    assert ReplicaRequest(name="a", destination="d").files == ["a"]
    assert ReplicaRequest(names=["a", "b"], destination="d").files == ["a", "b"]
    for bad in ({}, {"name": "a", "names": ["b"]}, {"names": []}):
        with pytest.raises(ValidationError, match="either name or names"):
            ReplicaRequest(destination="d", **bad)
