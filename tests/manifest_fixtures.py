"""A signed release on disk for the manifest tests: a directory of files under their names, a key
pair, and the manifest, as ``spool dataset manifest`` would have written it."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from common.catalogue.releases import ReleaseContents, ReleaseFile
from common.manifest.keys import load_signing_key, write_new_key
from common.manifest.release import build_manifest, write_atomically

FILES = {
    "run000042/sub0001.fits.fz": b"first file of the run\n" * 100,
    "run000042/sub0002.fits.fz": os.urandom(70_000),
    "run000042/calib/pedestal.fits": b"pedestal",
    "run000043/sub0001.fits.fz": b"",
}


@dataclass
class Release:
    root: Path  # the copy: files under their names
    manifest: Path
    private: Path
    public: Path
    key_id: str


def make_key(directory: Path, stem: str = "release") -> tuple[Path, Path, str]:
    private, public = directory / f"{stem}.key", directory / f"{stem}.pub"
    key_id = write_new_key(private, public)
    return private, public, key_id


def write_release(
    tmp_path: Path, files: dict[str, bytes] | None = None, dataset: str = "lst1.run42"
) -> Release:
    files = FILES if files is None else files
    root = tmp_path / "copy"
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    keys = tmp_path / "keys"
    keys.mkdir(exist_ok=True)
    private, public, key_id = make_key(keys)
    contents = ReleaseContents(
        dataset, "closed", [ReleaseFile(n, len(d), hashlib.sha256(d).hexdigest()) for n, d in files.items()]
    )
    manifest = tmp_path / f"{dataset}.manifest.json"
    write_atomically(manifest, build_manifest(contents, load_signing_key(private)).encode())
    return Release(root, manifest, private, public, key_id)
