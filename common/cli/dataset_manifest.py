"""``spool dataset manifest | verify | keygen``: signed release manifests (docs/operator-guide.md,
"Verifiable releases").

``verify`` is offline: it reads the manifest, the public keys and the copy, never the catalogue
nor the broker, so it runs anywhere a copy of the release lands (only a configuration file is read,
and only when the copy is named by its endpoint). Exit codes: 0 the copy is the release; 1 the
copy differs (one line per problem); 4 the manifest is not to be trusted (unreadable, malformed,
unknown key, signature invalid): its files are then not read.
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import Progress

from common.catalogue import Catalogue
from common.cli._util import UserError, console, err_console, print_error, settings_from
from common.cli.dataset_group import dataset_app
from common.manifest.check import Problem, check_directory, check_signature
from common.manifest.document import MAX_MANIFEST_BYTES, Manifest, ManifestRefused, parse
from common.manifest.keys import KeyFileError, load_public_key, write_new_key
from common.manifest.release import ReleaseRefused, write_release_manifest

EXIT_DIFFERS = 1
EXIT_UNTRUSTED = 4


@dataset_app.command("manifest")
def manifest_command(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="The dataset (closed; every file with a sha256).")],
    out: Annotated[
        Path | None, typer.Option("--out", help="Where to write it (default: [manifests] directory).")
    ] = None,
) -> None:
    """Write the signed release manifest of a closed dataset: its files' names, sizes, sha256."""
    settings = settings_from(ctx)

    async def go() -> Path:
        catalogue = await Catalogue.open(settings.catalogue.url)
        try:
            return await write_release_manifest(catalogue, name, settings, out)
        finally:
            await catalogue.close()

    try:
        path = asyncio.run(go())
    except ReleaseRefused as exc:
        raise UserError(str(exc)) from None
    console.print(str(path), highlight=False)


@dataset_app.command("verify")
def verify_command(
    ctx: typer.Context,
    copy: Annotated[
        str,
        typer.Argument(
            metavar="DIR|ENDPOINT",
            help="A directory holding the files under their names, or a posix endpoint's name.",
        ),
    ],
    manifest: Annotated[Path, typer.Option("--manifest", "-m", help="The manifest file.")],
    key: Annotated[
        list[str],
        typer.Option("--key", "-k", help="A public key file, or ID=FILE; repeat for several (rotation)."),
    ],
    json_out: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Check a copy of a release against its signed manifest, offline (no catalogue)."""
    try:
        keys = [load_public_key(k) for k in key]
    except KeyFileError as exc:
        raise UserError(str(exc)) from None
    root = _copy_root(ctx, copy)
    try:
        document = parse(_read_manifest(manifest))
    except ManifestRefused as exc:
        _finish([Problem("manifest", None, str(exc))], 0, json_out, EXIT_UNTRUSTED)
        return
    bad = check_signature(document, keys)
    if bad is not None:
        _finish([bad], 0, json_out, EXIT_UNTRUSTED)
        return
    problems = _check(root, document, manifest)
    _finish(problems, len(document.files), json_out, EXIT_DIFFERS)


@dataset_app.command("keygen")
def keygen_command(
    private: Annotated[Path, typer.Argument(help="Where to write the new private key (PEM, mode 0600).")],
    public: Annotated[
        Path | None, typer.Option("--public", help="Where to write its public key (default: PRIVATE.pub).")
    ] = None,
) -> None:
    """Make a new Ed25519 signing key pair (never replaces an existing file)."""
    public = public or private.with_name(private.name + ".pub")
    for path in (private, public):
        if path.exists() or path.is_symlink():
            raise UserError(f"{path} exists: keys are never replaced (rotate to a new file)")
    key_id = write_new_key(private, public)
    console.print(f"private key {private} (mode 0600), public key {public}, key id {key_id}")
    console.print(f"[manifests]\nsigning_key = {json.dumps(str(private.absolute()))}")


def _copy_root(ctx: typer.Context, copy: str) -> Path:
    """A directory as given, else a configured posix endpoint's root."""
    if os.path.isdir(copy):
        return Path(copy)
    settings = settings_from(ctx)
    endpoint = settings.storage.get(copy)
    if endpoint is None:
        raise UserError(f"{copy} is neither a directory nor a configured storage endpoint")
    if endpoint.kind != "disk" or endpoint.backend != "posix":
        raise UserError(
            f"endpoint {copy} is {endpoint.kind}/{endpoint.backend}: verify reads posix endpoints only; "
            "copy the dataset down (xrdcp -r, davix-get) and verify that directory"
        )
    return endpoint.root


def _read_manifest(path: Path) -> bytes:
    """The manifest's bytes, bounded before reading (a hostile file may be huge or a FIFO)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise ManifestRefused(f"manifest {path}: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ManifestRefused(f"manifest {path}: not a regular file")
        if info.st_size > MAX_MANIFEST_BYTES:
            raise ManifestRefused(f"manifest is {info.st_size} bytes, at most {MAX_MANIFEST_BYTES} allowed")
        with os.fdopen(os.dup(fd), "rb") as fh:
            return fh.read(MAX_MANIFEST_BYTES + 1)
    finally:
        os.close(fd)


def _check(root: Path, document: Manifest, manifest: Path) -> list[Problem]:
    if not err_console.is_terminal:
        return check_directory(root, document, ignore=[manifest])
    with Progress(console=err_console, transient=True) as bar:
        task = bar.add_task("checking", total=len(document.files))
        return check_directory(root, document, ignore=[manifest], progress=lambda n: bar.advance(task, n))


def _finish(problems: list[Problem], checked: int, json_out: bool, code: int) -> None:
    if json_out:
        doc = {"ok": not problems, "files": checked, "problems": [
            {"kind": p.kind, "name": p.name, "text": p.text} for p in problems
        ]}  # fmt: skip
        print(json.dumps(doc))
    else:
        for p in problems:
            console.print(p.text, soft_wrap=True, highlight=False)
        if not problems:
            console.print(f"OK: {checked} files match the signed manifest")
    if problems:
        if not json_out:
            print_error(f"{len(problems)} problems", label="verify failed")
        raise typer.Exit(code)
