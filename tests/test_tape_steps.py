"""The tape daemon's pure decisions: mount policy, drive sharing, batch size, endpoint checks,
reconciliation of a dead writer's copies."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from common.config import StorageEndpoint, TapeSettings
from common.errors import ConfigError, Permanent
from common.tape import TapeFile, TapeMember
from daemons.tape import steps

NOW = datetime(2026, 11, 24, 3, 0, tzinfo=UTC)
POLICY = TapeSettings(mount_min_bytes=1000, mount_min_files=10, mount_max_age=600)


def queue(storage: str = "tape1", *, files: int = 1, size: int = 10, age: float = 0.0, prio: int = 3,
          library: str = "default") -> steps.PoolQueue:  # fmt: skip
    return steps.PoolQueue(storage, library, files, size, NOW - timedelta(seconds=age), prio)


def test_a_small_young_queue_waits():
    assert steps.due(queue(files=9, size=999, age=599), POLICY, NOW) is None


def test_enough_bytes_or_files_or_an_old_request_each_deserve_a_mount():
    assert steps.due(queue(files=1, size=1000), POLICY, NOW) == "bytes"
    assert steps.due(queue(files=10, size=10), POLICY, NOW) == "files"
    assert steps.due(queue(files=1, size=10, age=600), POLICY, NOW) == "age"


def test_an_empty_queue_never_mounts():
    assert steps.due(queue(files=0, size=0, age=10_000), POLICY, NOW) is None


def test_higher_priority_gets_the_only_drive():
    low, high = queue("a", size=5000, prio=2), queue("b", size=5000, prio=7)
    plan = steps.plan_mounts([low, high], POLICY, NOW, {"default": 1}, {})
    assert [(q.storage, why) for q, why in plan] == [("b", "bytes")]


def test_equal_pools_take_turns_least_recently_served_first():
    a, b, c = (queue(n, size=5000) for n in "abc")
    served = {"a": 30.0, "b": 10.0}  # c never served
    plan = steps.plan_mounts([a, b, c], POLICY, NOW, {"default": 2}, served)
    assert [q.storage for q, _ in plan] == ["c", "b"]
    served["c"], served["b"] = 40.0, 41.0
    plan = steps.plan_mounts([a, b, c], POLICY, NOW, {"default": 2}, served)
    assert [q.storage for q, _ in plan] == ["a", "c"]


def test_among_never_served_pools_the_oldest_request_goes_first():
    young, old = queue("young", size=5000, age=1), queue("old", size=5000, age=100)
    plan = steps.plan_mounts([young, old], POLICY, NOW, {"default": 1}, {})
    assert [q.storage for q, _ in plan] == ["old"]


def test_drives_are_counted_per_library_and_queues_not_due_get_none():
    a = queue("a", size=5000, library="east")
    b = queue("b", size=5000, library="west")
    waiting = queue("c", size=1, library="west")
    plan = steps.plan_mounts([a, b, waiting], POLICY, NOW, {"east": 0, "west": 3}, {})
    assert [q.storage for q, _ in plan] == ["b"]


def test_batch_is_capped_by_files_and_bytes_but_always_takes_the_first_file():
    assert steps.batch_size([10] * 8, max_files=5, max_bytes=1000) == 5
    assert steps.batch_size([400, 400, 400], max_files=10, max_bytes=1000) == 2
    assert steps.batch_size([5000, 1], max_files=10, max_bytes=1000) == 1
    assert steps.batch_size([], max_files=10, max_bytes=1000) == 0


def test_cartridge_is_suspect_after_the_configured_number_of_failed_mounts():
    assert not steps.should_suspect(2, 3)
    assert steps.should_suspect(3, 3)


def test_copies_committed_on_the_cartridge_are_recorded_the_rest_requeued():
    on_tape = {"a": (4, None), "c": (6, 1536), "other": (1, None)}
    found, missing = steps.split_in_flight(["a", "b", "c"], on_tape)
    assert found == {"a": (4, None), "c": (6, 1536)}
    assert missing == ["b"]


def test_members_of_an_aggregate_are_found_at_its_fseq_and_their_offsets():
    members = [
        TapeMember(name="x", offset=1536, size=3, adler32="1"),
        TapeMember(name="y", offset=3072, size=1, adler32="2"),
    ]
    files = [
        TapeFile(fseq=1, name="plain", size=5, adler32="1", offset=0),
        TapeFile(fseq=2, name="spool-aggregate-1.tar", size=10240, adler32="1", offset=5, members=members),
    ]
    assert steps.tape_positions(files) == {"plain": (1, None), "x": (2, 1536), "y": (2, 3072)}


def tape(pool: str | None = None, library: str = "default") -> StorageEndpoint:
    return StorageEndpoint(kind="tape", backend="simulated", pool=pool, library=library)


def test_each_tape_endpoint_is_one_pool_and_two_endpoints_may_not_share_one():
    storage = {"disk1": StorageEndpoint(root=Path("/d")), "t1": tape("raw"), "t2": tape()}
    targets = steps.targets(storage)
    assert targets == {
        "t1": steps.TapeTarget("t1", "default", "raw"),
        "t2": steps.TapeTarget("t2", "default", "t2"),
    }
    with pytest.raises(ConfigError, match=r"already the pool of storage\.t1"):
        steps.targets({"t1": tape("raw"), "t2": tape("raw")})
    assert len(steps.targets({"t1": tape("raw"), "t2": tape("raw", library="other")})) == 2


def test_destination_must_be_a_configured_tape_endpoint():
    storage = {"disk1": StorageEndpoint(root=Path("/d")), "t1": tape("raw")}
    targets = steps.targets(storage)
    assert steps.destination("t1", targets, storage).pool == "raw"
    with pytest.raises(Permanent) as e:
        steps.destination("disk1", targets, storage)
    assert e.value.reason == "not_a_tape_endpoint"
    with pytest.raises(Permanent) as e:
        steps.destination("nosuch", targets, storage)
    assert e.value.reason == "unknown_storage"
