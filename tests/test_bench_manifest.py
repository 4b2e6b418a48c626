"""``bench/manifest.py`` at a toy size: it signs, verifies its own copy and prints the figures."""

from __future__ import annotations

from pathlib import Path

from bench.manifest import main, parse_args


def test_the_bench_signs_and_verifies_a_small_release(tmp_path: Path) -> None:
    r = main(
        parse_args(["--files", "150", "--size", "4096", "--rate-seconds", "0.05", "--dir", str(tmp_path)])
    )
    assert (r["files"], r["bytes"]) == (150, 150 * 4096)
    assert r["sha256_mb_s_1"] > 0 and r["sha256_mb_s_all"] > 0
    assert r["sign_s"] > 0 and r["verify_s"] > 0 and r["manifest_bytes"] > 150 * 64
    assert list(tmp_path.iterdir()) == []  # its work directory removed
