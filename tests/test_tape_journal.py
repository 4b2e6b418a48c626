"""A cartridge's journal replayed (``CartridgeFiles``): where the next file goes after writes,
commits and drops — kept as records arrive, recomputed after a drop."""

from __future__ import annotations

from typing import Any

from common.tape.store import CartridgeFiles


def _reserve(fseq: int, offset: int, size: int, session: str = "s1") -> dict[str, Any]:
    file = {"fseq": fseq, "name": f"f{fseq}", "size": size, "adler32": "00000001", "offset": offset,
            "state": "writing", "written_at": 0.0}  # fmt: skip
    return {"op": "reserve", "session": session, "file": file}


def test_end_of_data_and_next_fseq_follow_reservations_commits_and_drops() -> None:
    cf = CartridgeFiles()
    assert (cf.end_of_data(), cf.next_fseq()) == (0, 1)
    for record in (_reserve(1, 0, 100), _reserve(2, 100, 50), _reserve(3, 150, 10)):
        cf.apply(record)
    cf.apply({"op": "commit", "fseq": 1, "at": 1.0})
    assert (cf.end_of_data(), cf.next_fseq()) == (160, 4)
    cf.apply({"op": "drop", "fseq": 3})  # the last file, written by a dead session
    assert (cf.end_of_data(), cf.next_fseq()) == (150, 3)
    cf.apply(_reserve(3, 150, 70, session="s2"))  # its place taken again
    assert (cf.end_of_data(), cf.next_fseq()) == (220, 4)
    cf.apply({"op": "drop", "fseq": 1})  # a hole in the middle moves nothing
    assert (cf.end_of_data(), cf.next_fseq()) == (220, 4)
    cf.apply({"op": "drop", "fseq": 2})
    cf.apply({"op": "drop", "fseq": 3})
    assert (cf.end_of_data(), cf.next_fseq()) == (0, 1)
