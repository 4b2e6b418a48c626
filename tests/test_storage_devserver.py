"""The test XRootD server itself: both protocols answer, checksums and third-party copy work, the
read-only and full exports refuse writes. If these fail, the remote-storage tests cannot be trusted."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from common.storage.devserver import LocalXrootd
from tests.storage_fixtures import adler
from tests.xrootd_fixtures import remote_dir, xrootd_server  # noqa: F401  (fixtures)


def _xrdcp(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["xrdcp", "--nopbar", *args], capture_output=True, text=True, timeout=60)


def test_root_upload_checksum_and_third_party_copy(
    xrootd_server: LocalXrootd,  # noqa: F811
    remote_dir: str,  # noqa: F811
    tmp_path: Path,
) -> None:
    data = os.urandom(200_000)
    (tmp_path / "f").write_bytes(data)
    src = f"{xrootd_server.root_url('site-a')}/{remote_dir}/f"
    assert _xrdcp(str(tmp_path / "f"), src).returncode == 0
    query = subprocess.run(
        ["xrdfs", f"127.0.0.1:{xrootd_server.port}", "query", "checksum", f"/site-a/{remote_dir}/f"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert query.stdout.split() == ["adler32", adler(data)]
    dst = f"{xrootd_server.root_url('site-b')}/{remote_dir}/f"
    assert _xrdcp("--tpc", "only", src, dst).returncode == 0
    assert xrootd_server.path("site-b", f"{remote_dir}/f").read_bytes() == data


def test_read_only_and_full_exports_refuse_writes(
    xrootd_server: LocalXrootd,  # noqa: F811
    remote_dir: str,  # noqa: F811
    tmp_path: Path,
) -> None:
    (tmp_path / "big").write_bytes(os.urandom(xrootd_server.full_bytes + 1024))
    ro = _xrdcp(str(tmp_path / "big"), f"{xrootd_server.root_url('site-ro')}/{remote_dir}/big")
    assert ro.returncode != 0 and "read/only" in ro.stderr
    full = _xrdcp(str(tmp_path / "big"), f"{xrootd_server.root_url('site-full')}/{remote_dir}/big")
    assert full.returncode != 0 and "no space left" in full.stderr


def test_https_answers_with_the_adler32_digest(
    xrootd_server: LocalXrootd,  # noqa: F811
    remote_dir: str,  # noqa: F811
    tmp_path: Path,
) -> None:
    data = os.urandom(50_000)
    (tmp_path / "f").write_bytes(data)
    url = f"{xrootd_server.https_url('site-a')}/{remote_dir}/f"
    put = subprocess.run(
        ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--cacert", str(xrootd_server.ca_file),
         "-T", str(tmp_path / "f"), url], capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert put.stdout in ("200", "201")  # XrdHttp answers 200 to a PUT that created a file
    head = subprocess.run(
        ["curl", "-s", "-I", "-H", "Want-Digest: adler32", "--cacert", str(xrootd_server.ca_file), url],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert f"Digest: adler32={adler(data)}" in head.stdout
