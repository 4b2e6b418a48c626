"""``spool dataset verify``: a copy of a release checked offline against its signed manifest; each
kind of tampering detected with its own line (and exit code), never a read outside the copy.

Most tests run the command in this process (``common.cli.main``, as the console script does: a
subprocess costs seconds of imports on a loaded machine); the first and the endpoint one run the
``spool`` program itself."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest

from common.cli import main
from common.manifest.document import canonical_bytes
from common.manifest.keys import load_signing_key
from tests.cli_fixtures import spool
from tests.conftest import write_config
from tests.manifest_fixtures import Release, make_key, write_release


@pytest.fixture
def release(tmp_path: Path) -> Release:
    return write_release(tmp_path)


@pytest.fixture
def config(tmp_path: Path) -> Path:
    return write_config(tmp_path / "spool.toml", tmp_path / "state", "manifest")


@pytest.fixture
def run_spool(capsys: pytest.CaptureFixture[str]):
    """``spool ARGS`` in this process: a ``CompletedProcess`` like ``cli_fixtures.spool``'s."""

    def run(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
        argv = ["--config", str(config), *args]
        try:
            main(argv)
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        out = capsys.readouterr()
        return subprocess.CompletedProcess(argv, code, out.out, out.err)

    return run


@pytest.fixture
def verify(config: Path, release: Release, run_spool):
    def run(*extra: str, manifest: Path | None = None) -> subprocess.CompletedProcess[str]:
        where = str(manifest or release.manifest)
        return run_spool(config, "dataset", "verify", str(release.root), "--manifest", where, *extra)

    return run


def lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.strip()]


def edit_manifest(release: Release, change) -> None:
    doc = json.loads(release.manifest.read_bytes())
    change(doc)
    release.manifest.write_text(json.dumps(doc))


def test_an_untouched_copy_verifies(config: Path, release: Release) -> None:
    done = spool(config, "dataset", "verify", str(release.root), "--manifest", str(release.manifest),
                 "--key", str(release.public))  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert lines(done.stdout) == ["OK: 4 files match the signed manifest"]


def test_one_byte_changed_is_named_with_both_checksums(verify, release: Release) -> None:
    path = release.root / "run000042/sub0002.fits.fz"
    data = bytearray(path.read_bytes())
    data[12345] ^= 0x01
    path.write_bytes(bytes(data))
    done = verify("--key", str(release.public))
    assert done.returncode == 1
    [line] = lines(done.stdout)
    assert line.startswith("changed: run000042/sub0002.fits.fz: sha256 ")
    assert ", expected " in line
    assert "1 problems" in done.stderr


def test_a_file_removed_is_missing(verify, release: Release) -> None:
    (release.root / "run000042/calib/pedestal.fits").unlink()
    done = verify("--key", str(release.public))
    assert done.returncode == 1
    assert lines(done.stdout) == ["missing: run000042/calib/pedestal.fits"]


def test_a_file_added_next_to_the_dataset_files_is_named(verify, release: Release) -> None:
    (release.root / "run000042/sub0003.fits.fz").write_bytes(b"smuggled")
    done = verify("--key", str(release.public))
    assert done.returncode == 1
    assert lines(done.stdout) == ["added: run000042/sub0003.fits.fz is not in the manifest"]


def test_a_file_of_another_size_is_named_with_both_sizes(verify, release: Release) -> None:
    with open(release.root / "run000042/calib/pedestal.fits", "ab") as f:
        f.write(b"!")
    done = verify("--key", str(release.public))
    assert done.returncode == 1
    assert lines(done.stdout) == ["size differs: run000042/calib/pedestal.fits has 9 bytes, expected 8"]


def test_an_edited_manifest_fails_its_signature_and_no_file_is_read(verify, release: Release) -> None:
    # The attacker's edit: a file's checksum replaced by the one of the bytes they put there.
    (release.root / "run000042/calib/pedestal.fits").write_bytes(b"PEDESTAL")

    def swap(doc: dict) -> None:
        for f in doc["files"]:
            if f["name"] == "run000042/calib/pedestal.fits":
                f["sha256"] = hashlib.sha256(b"PEDESTAL").hexdigest()

    edit_manifest(release, swap)
    done = verify("--key", str(release.public))
    assert done.returncode == 4
    [line] = lines(done.stdout)
    assert line.startswith(f"signature invalid: the signature does not verify with key {release.key_id!r}")


def test_reindenting_the_manifest_keeps_it_valid(verify, release: Release) -> None:
    edit_manifest(release, lambda doc: None)  # re-encoded with other whitespace
    done = verify("--key", str(release.public))
    assert done.returncode == 0, done.stdout


def test_the_wrong_key_is_an_unknown_key_id(verify, release: Release, tmp_path: Path) -> None:
    _, other_public, other_id = make_key(tmp_path / "keys", "other")
    done = verify("--key", str(other_public))
    assert done.returncode == 4
    assert lines(done.stdout) == [
        f"unknown key: the manifest is signed by key id {release.key_id!r}; "
        f"the keys given have ids {other_id}"
    ]


def test_a_key_claiming_the_signers_id_fails_the_signature(verify, release: Release, tmp_path: Path) -> None:
    _, other_public, _ = make_key(tmp_path / "keys", "impostor")
    done = verify("--key", f"{release.key_id}={other_public}")
    assert done.returncode == 4
    assert lines(done.stdout)[0].startswith("signature invalid:")


def test_rotation_several_keys_are_given_and_the_named_one_is_used(
    verify, release: Release, tmp_path: Path
) -> None:
    _, new_public, _ = make_key(tmp_path / "keys", "next")
    done = verify("--key", str(new_public), "--key", str(release.public))
    assert done.returncode == 0, done.stdout


def test_a_posix_endpoint_is_verified_by_its_name(release: Release, tmp_path: Path) -> None:
    cfg = write_config(
        tmp_path / "ep.toml", tmp_path / "state", "manifest", **{"storage.copy1": f'root = "{release.root}"'}
    )
    done = spool(
        cfg, "dataset", "verify", "copy1", "--manifest", str(release.manifest), "--key", str(release.public)
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_json_output_lists_each_problem(verify, release: Release) -> None:
    (release.root / "run000043/sub0001.fits.fz").unlink()
    done = verify("--key", str(release.public), "--json")
    assert done.returncode == 1
    assert json.loads(done.stdout) == {
        "ok": False,
        "files": 4,
        "problems": [
            {
                "kind": "missing",
                "name": "run000043/sub0001.fits.fz",
                "text": "missing: run000043/sub0001.fits.fz",
            }
        ],
    }


# --- hostile manifests ---------------------------------------------------------------------------
def resign(release: Release, doc: dict) -> None:
    """A manifest signed by the right key but crafted: what a stolen key could do (the checks of
    the names must hold even then)."""
    unsigned = {k: v for k, v in doc.items() if k != "signature"}
    doc["signature"] = base64.b64encode(
        load_signing_key(release.private).sign(canonical_bytes(unsigned))
    ).decode()
    release.manifest.write_text(json.dumps(doc))


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("../outside.txt", "has an empty, '.' or '..' component"),
        ("run000042/../../outside.txt", "has an empty, '.' or '..' component"),
        ("/etc/passwd", "is absolute"),
        ("run000042/a\x00b", "contains a NUL byte"),
    ],
    ids=["dotdot", "nested-dotdot", "absolute", "nul"],
)
def test_names_escaping_the_directory_are_refused_before_any_read(
    verify, release: Release, tmp_path: Path, name: str, why: str
) -> None:
    (tmp_path / "outside.txt").write_text("secret")
    doc = json.loads(release.manifest.read_bytes())
    doc["files"] = sorted(
        [*doc["files"], {"name": name, "size": 6, "sha256": "0" * 64}], key=lambda f: f["name"]
    )
    resign(release, doc)
    done = verify("--key", str(release.public))
    assert done.returncode == 4
    [line] = lines(done.stdout)
    assert line.startswith("manifest refused: file name ") and why in line


def test_a_symlink_planted_in_the_copy_is_not_followed(verify, release: Release, tmp_path: Path) -> None:
    outside = tmp_path / "outside.fits"
    outside.write_bytes(b"pedestal")  # the same bytes: only following the link would pass
    target = release.root / "run000042/calib/pedestal.fits"
    target.unlink()
    target.symlink_to(outside)
    done = verify("--key", str(release.public))
    assert done.returncode == 1
    assert lines(done.stdout) == [
        "not a file: run000042/calib/pedestal.fits has a symbolic link on its path (not followed)"
    ]


def test_bad_json_is_refused(verify, release: Release) -> None:
    release.manifest.write_text('{"format": "spool-manifest/1", "files": [')
    done = verify("--key", str(release.public))
    assert done.returncode == 4
    assert lines(done.stdout)[0].startswith("manifest is not valid JSON")


def test_an_oversized_manifest_is_refused_unread(verify, release: Release) -> None:
    with open(release.manifest, "r+b") as f:
        f.truncate(64 * 1024 * 1024 + 1)  # sparse: the size alone refuses it
    done = verify("--key", str(release.public))
    assert done.returncode == 4
    assert lines(done.stdout) == [
        f"manifest is {64 * 1024 * 1024 + 1} bytes, at most {64 * 1024 * 1024} allowed"
    ]


def test_a_fifo_as_manifest_does_not_block(verify, release: Release, tmp_path: Path) -> None:
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    done = verify("--key", str(release.public), manifest=fifo)
    assert done.returncode == 4
    assert "not a regular file" in done.stdout


@pytest.mark.parametrize(
    ("change", "why"),
    [
        (lambda d: d["files"][0].update(size="8"), "size must be an integer"),
        (lambda d: d["files"][0].update(size=True), "size must be an integer"),
        (lambda d: d["files"][0].update(sha256="A" * 64), "sha256 must be 64 lower-case"),
        (lambda d: d["files"].append(dict(d["files"][0])), "sorted by name, each name once"),
        (lambda d: d.update(extra=1), "unknown ['extra']"),
        (lambda d: d.update(format="spool-manifest/9"), "is not 'spool-manifest/1'"),
        (lambda d: d.update(signature="!!"), "signature is not valid base64"),
    ],
    ids=["size-text", "size-bool", "sha-upper", "duplicate", "extra-member", "format", "signature"],
)
def test_malformed_fields_are_refused_with_what_is_wrong(verify, release: Release, change, why: str) -> None:
    edit_manifest(release, change)
    done = verify("--key", str(release.public))
    assert done.returncode == 4
    [line] = lines(done.stdout)
    assert why in line, line
