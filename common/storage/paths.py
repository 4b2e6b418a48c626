"""Confining paths to a directory tree (landing areas, storage endpoints): the names, as written.

Paths arrive in messages from systems we do not control. This module only *names* files: it
refuses a NUL byte, a ``..`` component and an absolute path not below the root, and joins the
rest onto the root's path (resolved once, the root's own path being the operator's). What the
components *are* is decided by the kernel at the moment of each open, create and delete
(``confined``: beneath the root, no symlink followed at any component), never by a check made
earlier and remembered: a directory swapped for a symlink after a check is refused at the open.
(Until issue 16, names were resolved with symlinks followed and kept in a cache of resolved
directories for a few seconds: a landing directory swapped for a link to ``/etc`` was trusted for
that long.)

Anything outside is a ``Permanent("path_outside_area")``: retrying cannot make a bad path good.
"""

from __future__ import annotations

import os
from pathlib import Path

from common.errors import Permanent
from common.storage import confined

PATH_OUTSIDE_AREA = confined.PATH_OUTSIDE_AREA

# Configured roots -> their real paths, resolved on first use. Not a containment check (nothing
# below a root is resolved or remembered): the operator's own path, so that the names given out
# are the ones the kernel walks (a root configured through a symlinked mount point works).
_real_roots: dict[str, str] = {}
_REAL_ROOTS_MAX = 1024


def real_root(root: str | os.PathLike[str]) -> str:
    """The real path of a configured root (``os.path.realpath``, once per root)."""
    text = os.fspath(root)
    real = _real_roots.get(text)
    if real is None:
        real = os.path.realpath(text)
        if len(_real_roots) >= _REAL_ROOTS_MAX:
            _real_roots.clear()
        _real_roots[text] = real
    return real


def _relative(root: str, path: str) -> str:
    """``path`` relative to ``root`` (``""`` for the root itself), checked lexically; an absolute
    path may name the root as configured or as resolved."""
    if "\x00" in path or "\x00" in root:
        raise Permanent(PATH_OUTSIDE_AREA, f"path {path!r} contains a NUL byte")
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise Permanent(PATH_OUTSIDE_AREA, f"path {path!r} has a '..' component: it may lead outside {root}")
    if path.startswith("/"):
        clean = "/" + "/".join(parts)
        for base in (real_root(root), os.path.abspath(root)):
            if clean == base:
                return ""
            if is_within(clean, base):
                return relative_to(clean, base)
        raise Permanent(PATH_OUTSIDE_AREA, f"path {path!r} is not below {root}")
    return "/".join(parts)


def resolve_inside(root: Path, path: str | os.PathLike[str]) -> Path:
    """``path`` (absolute, or relative to ``root``) joined onto the real root, if it lies inside
    ``root`` as written. The result may equal the root itself; callers wanting a file below it
    check that themselves. ``Permanent("path_outside_area")`` for a NUL byte, a ``..`` component
    or an absolute path elsewhere. Symlinks are not resolved: ``confined`` refuses them at the open.
    """
    return Path(inside(os.fspath(root), os.fspath(path)))


def inside(root: str, path: str) -> str:
    """``resolve_inside`` on strings."""
    rel = _relative(root, path)
    real = real_root(root)
    return os.path.join(real, rel) if rel else real


def is_within(real: str, real_root: str) -> bool:
    """Whether the normalised path ``real`` is ``real_root`` or lies below it (string test)."""
    if real == real_root or real_root == "/":
        return real.startswith("/")
    return real.startswith(real_root) and real[len(real_root) : len(real_root) + 1] == "/"


def relative_to(real: str, real_root: str) -> str:
    """``real`` relative to ``real_root`` for a path ``is_within`` it (``.`` for the root itself)."""
    if real == real_root:
        return "."
    return real[len(real_root) + 1 :] if real_root != "/" else real[1:]


def below(root: str | os.PathLike[str], relpath: str | os.PathLike[str], name: str) -> str:
    """``relpath`` strictly below the endpoint ``root``, as a clean relative path (``a/b/c``);
    ``Permanent("path_outside_area")`` if it escapes or names the root."""
    raw = os.fspath(relpath)
    rel = _relative(os.fspath(root), raw)
    if not rel:
        raise Permanent(PATH_OUTSIDE_AREA, f"path {raw!r} names the root of {name}")
    return rel


def resolve_below(root: str | os.PathLike[str], relpath: str | os.PathLike[str], name: str) -> Path:
    """Absolute path of ``relpath`` strictly below the endpoint ``root`` (``PosixStorage.resolve``):
    the real root joined with ``below``'s relative path."""
    return Path(real_root(root) + "/" + below(root, relpath, name))
