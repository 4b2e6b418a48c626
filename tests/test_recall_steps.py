"""Pure decisions of recall: copy choice, mount plan, ordering, backpressure arithmetic."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from common.catalogue.recall import DiskCopy, PendingFile, TapeCopy
from common.config import StorageEndpoint
from common.errors import Permanent
from daemons.recall import steps

T0 = datetime(2026, 11, 24, tzinfo=UTC)
LIBS = {"tape1": "lib", "tape2": "lib", "far": "other"}


def pf(
    fid: int,
    *copies: tuple[str, int] | tuple[str, int, str],
    recall: str = "r1",
    priority: int = 3,
    age: int = 0,
    dest: str = "disk1",
    size: int = 10,
    disk: tuple[DiskCopy, ...] = (),
    blocked: bool = False,
    chosen: TapeCopy | None = None,
) -> PendingFile:
    tape = tuple(TapeCopy(c[2] if len(c) == 3 else "tape1", c[0], c[1]) for c in copies)  # type: ignore[misc]
    return PendingFile(
        recall_id=recall, name=f"f{fid}", file_id=fid, size=size, adler32="00000001", destination=dest,
        priority=priority, requested=T0 - timedelta(seconds=age), chosen=chosen, tape=tape, disk=disk,
        blocked=blocked,
    )  # fmt: skip


def vids(chosen: dict[int, TapeCopy]) -> dict[int, str]:
    return {fid: c.cartridge for fid, c in chosen.items()}


# --- copy choice ---------------------------------------------------------------------------------


def test_a_single_copy_is_the_choice() -> None:
    files = [pf(1, ("A1", 3)), pf(2, ("A2", 1))]
    assert vids(steps.choose_copies(files, LIBS)) == {1: "A1", 2: "A2"}


def test_files_with_two_copies_go_to_the_cartridge_other_files_need_anyway() -> None:
    # f1 and f2 only live on A1; f3 is on A1 and A9: reading it from A1 saves the A9 mount.
    files = [pf(1, ("A1", 1)), pf(2, ("A1", 2)), pf(3, ("A9", 5, "tape2"), ("A1", 3))]
    assert vids(steps.choose_copies(files, LIBS)) == {1: "A1", 2: "A1", 3: "A1"}


def test_greedy_cover_picks_the_cartridge_serving_most_files() -> None:
    # Every file has two copies; B serves three of them, so one mount of B plus one of A or C.
    files = [
        pf(1, ("A", 1), ("B", 1, "tape2")),
        pf(2, ("B", 2, "tape2"), ("C", 1)),
        pf(3, ("B", 3, "tape2"), ("C", 2)),
        pf(4, ("A", 2), ("C", 3)),
    ]
    chosen = vids(steps.choose_copies(files, LIBS))
    assert chosen[1] == chosen[2] == chosen[3] == "B"
    assert len(set(chosen.values())) == 2


def test_a_cartridge_in_a_drive_is_preferred_to_a_mount() -> None:
    files = [pf(1, ("A", 1), ("B", 1, "tape2"))]
    assert vids(steps.choose_copies(files, LIBS, loaded=[("lib", "B")])) == {1: "B"}


def test_a_file_ahead_of_a_running_mount_joins_it_and_one_behind_does_not() -> None:
    files = [pf(1, ("A", 5), ("B", 1, "tape2")), pf(2, ("A", 2), ("C", 1, "tape2"))]
    chosen = steps.choose_copies(files, LIBS, heads={("lib", "A"): 3})
    assert vids(chosen) == {1: "A", 2: "C"}


def test_cartridges_backing_off_are_avoided_and_files_without_other_copy_wait() -> None:
    files = [pf(1, ("A", 1), ("B", 1, "tape2")), pf(2, ("A", 2))]
    assert vids(steps.choose_copies(files, LIBS, avoid=[("lib", "A")])) == {1: "B"}


def test_the_same_vid_in_two_libraries_is_two_cartridges() -> None:
    files = [pf(1, ("A1", 1)), pf(2, ("A1", 1, "far"))]
    plan = steps.plan_mounts(files, steps.choose_copies(files, LIBS), LIBS)
    assert sorted(m.key for m in plan) == [("lib", "A1"), ("other", "A1")]


def test_several_requests_for_one_file_get_one_copy() -> None:
    files = [pf(1, ("A", 1), ("B", 1, "tape2"), recall="r1"), pf(1, ("A", 1), ("B", 1, "tape2"), recall="r2")]
    chosen = steps.choose_copies(files, LIBS)
    assert list(chosen) == [1]
    changes = steps.changed_choices(files, chosen)
    assert [(r, n) for r, n, _ in changes] == [("r1", "f1"), ("r2", "f1")]
    assert steps.changed_choices([pf(1, ("A", 1), chosen=chosen[1])], chosen) == []


# --- mount plan ----------------------------------------------------------------------------------


def test_one_mount_per_cartridge_with_files_in_fseq_order() -> None:
    files = [pf(1, ("A", 9)), pf(2, ("B", 4)), pf(3, ("A", 2)), pf(4, ("A", 5)), pf(5, ("B", 1))]
    plan = steps.plan_mounts(files, steps.choose_copies(files, LIBS), LIBS)
    assert {m.vid: [p.file_id for p in m.files] for m in plan} == {"A": [3, 4, 1], "B": [5, 2]}


def test_priority_orders_mounts_then_the_oldest_request() -> None:
    files = [
        pf(1, ("OLD", 1), priority=3, age=100),
        pf(2, ("NEW", 1), priority=3, age=10),
        pf(3, ("URGENT", 1), priority=9, age=0),
        pf(4, ("MIXED", 1), priority=1, age=500),
        pf(5, ("MIXED", 2), priority=7, age=0),
    ]
    plan = steps.plan_mounts(files, steps.choose_copies(files, LIBS), LIBS)
    assert [m.vid for m in plan] == ["URGENT", "MIXED", "OLD", "NEW"]
    assert (plan[1].priority, plan[1].oldest) == (7, T0 - timedelta(seconds=500))


def test_busy_cartridges_and_cartridges_whose_files_do_not_fit_are_not_planned() -> None:
    files = [
        pf(1, ("A", 1)),
        pf(2, ("B", 1), size=500, dest="small"),
        pf(3, ("C", 1), size=500, dest="small"),
        pf(4, ("C", 2), size=5, dest="small"),
    ]
    space = {"disk1": 10**9, "small": 100}
    plan = steps.plan_mounts(files, steps.choose_copies(files, LIBS), LIBS, busy=[("lib", "A")], space=space)
    assert [m.vid for m in plan] == ["C"]  # A is being read; nothing of B fits; C's second file does


def test_room_is_free_space_less_reserve_and_reads_in_flight() -> None:
    assert steps.room(free_bytes=1000, min_free_bytes=100, in_flight=300) == 600
    assert steps.room(free_bytes=100, min_free_bytes=100, in_flight=1) < 0


# --- triage and destination ----------------------------------------------------------------------


def test_triage_disk_first_then_tape_then_lost_and_blocked_files_wait() -> None:
    on_disk = pf(1, ("A", 1), disk=(DiskCopy("disk2", "f1"),))
    on_tape = pf(2, ("A", 2))
    lost = pf(3)
    waiting = pf(4, blocked=True)
    assert steps.triage([on_disk, on_tape, lost, waiting]) == ([on_disk], [on_tape], [lost])


def test_destination_must_be_a_disk_endpoint_and_defaults_to_the_first() -> None:
    storage = {
        "tape1": StorageEndpoint(kind="tape", backend="simulated"),
        "disk1": StorageEndpoint(root=Path("/d1")),
        "disk2": StorageEndpoint(root=Path("/d2")),
    }
    assert steps.destination(None, storage) == "disk1"
    assert steps.destination("disk2", storage) == "disk2"
    for bad in ("tape1", "nosuch"):
        with pytest.raises(Permanent) as info:
            steps.destination(bad, storage)
        assert info.value.reason == "unknown_storage"


def test_copies_on_an_unknown_tape_endpoint_are_ignored_and_the_file_waits() -> None:
    both = pf(1, ("A", 1), ("G", 1, "gone"))
    only_gone = pf(2, ("G", 2, "gone"))
    kept, waiting = steps.readable([both, only_gone], LIBS)
    assert kept.tape == (TapeCopy("tape1", "A", 1),) and not kept.blocked
    assert (waiting.tape, waiting.blocked) == ((), True)
    assert steps.triage([waiting]) == ([], [], [])
