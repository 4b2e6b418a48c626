"""A cartridge's journal replayed (``CartridgeFiles``): where the next file goes after writes,
commits and drops — kept as records arrive, recomputed after a drop."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from common.tape import store as store_module
from common.tape.store import JOURNAL, CartridgeFiles, Store


def _reserve(fseq: int, offset: int, size: int, session: str = "s1") -> dict[str, Any]:
    file = {"fseq": fseq, "name": f"f{fseq}", "size": size, "adler32": "00000001", "offset": offset,
            "state": "writing", "written_at": 0.0}  # fmt: skip
    return {"op": "reserve", "session": session, "file": file}


def _append(cf: CartridgeFiles, *records: dict[str, Any]) -> None:
    """As ``Store.append`` does: each record a line of the journal, applied with its place."""
    with open(cf.path, "ab") as journal:
        for record in records:
            line = json.dumps(record).encode() + b"\n"
            at = journal.tell()
            journal.write(line)
            journal.flush()
            cf.apply(record, (at, len(line)))


def test_end_of_data_and_next_fseq_follow_reservations_commits_and_drops(tmp_path: Path) -> None:
    cf = CartridgeFiles(tmp_path / "journal.jsonl")
    assert (cf.end_of_data(), cf.next_fseq()) == (0, 1)
    _append(cf, _reserve(1, 0, 100), _reserve(2, 100, 50), _reserve(3, 150, 10))
    _append(cf, {"op": "commit", "fseq": 1, "at": 1.0})
    assert (cf.end_of_data(), cf.next_fseq()) == (160, 4)
    _append(cf, {"op": "drop", "fseq": 3})  # the last file, written by a dead session
    assert (cf.end_of_data(), cf.next_fseq()) == (150, 3)
    _append(cf, _reserve(3, 150, 70, session="s2"))  # its place taken again
    assert (cf.end_of_data(), cf.next_fseq()) == (220, 4)
    _append(cf, {"op": "drop", "fseq": 1})  # a hole in the middle (a committed file) moves nothing
    assert (cf.end_of_data(), cf.next_fseq()) == (220, 4)
    assert not cf.holds(1) and cf.holds(2) and cf.committed_count() == 0
    _append(cf, {"op": "drop", "fseq": 2}, {"op": "drop", "fseq": 3})
    assert (cf.end_of_data(), cf.next_fseq()) == (0, 1)
    assert cf.empty()


def test_committed_files_are_found_after_drops_and_out_of_order_commits(tmp_path: Path) -> None:
    """Commits arrive in fseq order from one writer; a file dropped and written again, or commits
    replayed in another order, still leave each committed file found by its fseq and nothing else."""
    cf = CartridgeFiles(tmp_path / "journal.jsonl")
    _append(cf, *(_reserve(n, (n - 1) * 10, 10) for n in range(1, 7)))
    _append(cf, *({"op": "commit", "fseq": n, "at": float(n)} for n in (2, 1, 5, 3)))
    _append(cf, {"op": "drop", "fseq": 3}, _reserve(3, 20, 10, session="s2"))
    _append(cf, {"op": "commit", "fseq": 3, "at": 9.0})
    assert [(f.fseq, f.written_at) for f in cf.committed()] == [(1, 1.0), (2, 2.0), (3, 9.0), (5, 5.0)]
    assert [n for n in range(8) if cf.committed_file(n) is not None] == [1, 2, 3, 5]
    assert sorted(cf.pending) == [4, 6] and cf.next_fseq() == 7


def test_committed_files_come_back_as_tape_files_with_their_aggregate_index(tmp_path: Path) -> None:
    """The index is read back from the journal line, not held: ``committed`` has it,
    ``committed_file`` (a place and a size, for a locate or a read) does not."""
    cf = CartridgeFiles(tmp_path / "journal.jsonl")
    plain, aggregate = _reserve(1, 0, 100), _reserve(2, 100, 3000)
    members = [{"name": "r/a", "member": "0-7", "offset": 512, "size": 10, "adler32": "00000002"}]
    aggregate["file"]["members"] = members
    _append(cf, plain, aggregate, _reserve(3, 3100, 5))
    _append(cf, {"op": "commit", "fseq": 1, "at": 5.0}, {"op": "commit", "fseq": 2, "at": 6.0})
    assert [(f.fseq, f.state, f.written_at) for f in cf.committed()] == [
        (1, "committed", 5.0),
        (2, "committed", 6.0),
    ]
    assert cf.committed_count() == 2
    listed = cf.committed()[1]
    assert listed.members is not None and (listed.members[0].name, listed.members[0].offset) == ("r/a", 512)
    assert list(cf.commits.fseq) == [1, 2] and sorted(cf.pending) == [3]  # held: columns, no index
    got = cf.committed_file(2)
    assert got is not None and (got.offset, got.size, got.members) == (100, 3000, None)
    assert cf.committed_file(3) is None  # still being written
    assert cf.committed_file(9) is None


def test_journals_let_go_are_replayed_from_their_file_the_same(tmp_path: Path, monkeypatch) -> None:
    """A store keeps the ``JOURNALS_KEPT`` most recently used journals in memory (a night's full
    cartridges held every file they carry); one let go comes back replayed from its file."""
    monkeypatch.setattr(store_module, "JOURNALS_KEPT", 2)
    store = Store(tmp_path)
    for vid in ("A1", "A2", "A3"):
        store.cartridge_dir(vid).mkdir(parents=True)
        (store.cartridge_dir(vid) / JOURNAL).touch()
        store.append(vid, _reserve(1, 0, 100), _reserve(2, 100, 7), {"op": "commit", "fseq": 1, "at": 2.0})
    assert len(store._journals) == 2 and "A1" not in store._journals
    again = store.journal("A1")
    assert [(f.fseq, f.state) for f in again.committed()] == [(1, "committed")]
    assert (again.end_of_data(), again.next_fseq(), again.writers) == (107, 3, {2: "s1"})
    assert list(store._journals) == ["A3", "A1"]  # A2, the least recently used, let go
