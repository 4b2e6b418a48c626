"""Release manifests made from the catalogue (SQLite and PostgreSQL): a closed dataset's files
with their recorded sha256, signed; refusals for an open dataset, files without sha256, no key,
a key others can read. ``write_release_manifest`` is what the dataset-close path calls."""

# Fixtures imported from catalogue_fixtures (not conftest) reappear as test parameters:
# ruff: noqa: F811

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from sqlalchemy import text

from common.catalogue import Catalogue
from common.config import Settings
from common.manifest.check import check_directory, check_signature
from common.manifest.document import parse
from common.manifest.keys import load_public_key
from common.manifest.release import ReleaseRefused, manifest_file_name, write_release_manifest
from tests.catalogue_fixtures import ENDPOINTS, catalogue, catalogue_url, rec  # noqa: F401
from tests.cli_fixtures import spool
from tests.conftest import write_config
from tests.manifest_fixtures import make_key

DATASET = "lst1.20261123.run012345.dl0"
FILES = {"run012345/b.fits": b"second", "run012345/a.fits": b"first" * 1000, "run012345/Z.fits": b""}


async def register(
    cat: Catalogue, files: dict[str, bytes], *, sha256: bool = True, dataset: str = DATASET
) -> None:
    await cat.ingest.register([
        rec(n, dataset=dataset, size=len(d), sha256=hashlib.sha256(d).hexdigest() if sha256 else None)
        for n, d in files.items()
    ])  # fmt: skip


async def close(cat: Catalogue, dataset: str = DATASET) -> None:
    # The close itself is another change's (the dataset lifecycle); its effect is this state.
    async with cat.engine.begin() as conn:
        await conn.execute(text("UPDATE datasets SET state = 'closed' WHERE name = :n"), {"n": dataset})


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path, str]:
    (tmp_path / "keys").mkdir()
    return make_key(tmp_path / "keys")


@pytest.fixture
def settings(tmp_path: Path, keys: tuple[Path, Path, str]) -> Settings:
    return Settings(state_dir=tmp_path / "state", manifests={"signing_key": keys[0]})


def copy_of(tmp_path: Path, files: dict[str, bytes]) -> Path:
    root = tmp_path / "copy"
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


async def test_a_closed_dataset_gets_a_signed_manifest_its_copy_verifies_against(
    catalogue: Catalogue, settings: Settings, keys, tmp_path: Path
) -> None:
    await register(catalogue, FILES)
    await register(catalogue, {"other/x.fits": b"x"}, dataset="lst1.20261123.run099999.dl0")
    await close(catalogue)

    path = await write_release_manifest(catalogue, DATASET, settings)

    assert path == settings.manifests.directory / f"{DATASET}.manifest.json"
    manifest = parse(path.read_bytes())
    assert manifest.dataset == DATASET and manifest.key_id == keys[2]
    assert [(f.name, f.size, f.sha256) for f in manifest.files] == [
        (n, len(FILES[n]), hashlib.sha256(FILES[n]).hexdigest())
        for n in sorted(FILES)  # code point order
    ]
    assert check_signature(manifest, [load_public_key(str(keys[1]))]) is None
    assert check_directory(copy_of(tmp_path, FILES), manifest) == []


async def test_an_open_dataset_is_refused(catalogue: Catalogue, settings: Settings) -> None:
    await register(catalogue, FILES)
    with pytest.raises(ReleaseRefused, match=f"dataset '{DATASET}' is open: close it"):
        await write_release_manifest(catalogue, DATASET, settings)
    assert not settings.manifests.directory.exists()


async def test_files_registered_without_sha256_are_named_in_the_refusal(
    catalogue: Catalogue, settings: Settings
) -> None:
    await register(catalogue, {"run012345/new.fits": b"n"})
    await register(catalogue, {f"run012345/old{i}.fits": b"o" for i in range(7)}, sha256=False)
    await close(catalogue)
    with pytest.raises(ReleaseRefused) as refused:
        await write_release_manifest(catalogue, DATASET, settings)
    assert str(refused.value) == (
        f"dataset '{DATASET}': 7 files have no sha256 recorded (registered before sha256 was): "
        "run012345/old0.fits, run012345/old1.fits, run012345/old2.fits, run012345/old3.fits, "
        "run012345/old4.fits and 2 more"
    )


async def test_an_unknown_dataset_is_refused(catalogue: Catalogue, settings: Settings) -> None:
    with pytest.raises(ReleaseRefused, match="no dataset named 'nope'"):
        await write_release_manifest(catalogue, "nope", settings)


async def test_a_signing_key_others_can_read_is_refused(
    catalogue: Catalogue, settings: Settings, keys
) -> None:
    await register(catalogue, FILES)
    await close(catalogue)
    os.chmod(keys[0], 0o644)
    with pytest.raises(ReleaseRefused, match=r"readable by others \(mode 644\): chmod 600"):
        await write_release_manifest(catalogue, DATASET, settings)


async def test_no_signing_key_configured_is_refused(catalogue: Catalogue, tmp_path: Path) -> None:
    await register(catalogue, FILES)
    await close(catalogue)
    with pytest.raises(ReleaseRefused, match=r"no signing key: set \[manifests\] signing_key"):
        await write_release_manifest(catalogue, DATASET, Settings(state_dir=tmp_path))


async def test_a_configured_key_id_is_named_and_verified_by_id(
    catalogue: Catalogue, keys, tmp_path: Path
) -> None:
    await register(catalogue, FILES)
    await close(catalogue)
    settings = Settings(state_dir=tmp_path, manifests={"signing_key": keys[0], "key_id": "site-2026"})
    manifest = parse(
        (await write_release_manifest(catalogue, DATASET, settings, tmp_path / "m.json")).read_bytes()
    )
    assert manifest.key_id == "site-2026"
    assert check_signature(manifest, [load_public_key(f"site-2026={keys[1]}")]) is None
    assert check_signature(manifest, [load_public_key(str(keys[1]))]).kind == "unknown_key"  # type: ignore[union-attr]


def test_manifest_file_names_are_one_safe_component() -> None:
    assert manifest_file_name("lst1.run42") == "lst1.run42.manifest.json"
    assert manifest_file_name("a/../b") == "a%2F..%2Fb.manifest.json"
    assert manifest_file_name(".hidden") == "%2Ehidden.manifest.json"


async def test_the_command_writes_the_manifest_and_refuses_an_open_dataset(tmp_path: Path, keys) -> None:
    state = tmp_path / "state"
    state.mkdir()
    config = write_config(tmp_path / "spool.toml", state, "rel", manifests=f'signing_key = "{keys[0]}"')
    async with await Catalogue.open(f"sqlite+aiosqlite:///{state / 'catalogue.db'}") as cat:
        await cat.endpoints.sync(ENDPOINTS)
        await register(cat, FILES)
    refused = spool(config, "dataset", "manifest", DATASET)
    assert refused.returncode == 1
    assert f"dataset '{DATASET}' is open" in refused.stderr
    async with await Catalogue.open(f"sqlite+aiosqlite:///{state / 'catalogue.db'}") as cat:
        await close(cat)
    out = tmp_path / "release.json"
    done = spool(config, "dataset", "manifest", DATASET, "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(out)
    checked = spool(config, "dataset", "verify", str(copy_of(tmp_path, FILES)), "--manifest", str(out),
                    "--key", str(keys[1]))  # fmt: skip
    assert checked.returncode == 0, checked.stdout
