"""Confining paths to a directory tree (landing areas, storage endpoints).

Paths arrive in messages from systems we do not control, so every one is resolved *with symlinks
followed* before it is compared with the root: a lexical check alone would let
``landing/link -> /etc`` or ``a/../../etc/passwd`` through. Anything that ends up outside is a
``Permanent`` error: retrying cannot make a bad path good.

The check is made at resolution time; a process able to swap directories for symlinks inside the
area between the check and the open can still race it. Opening the final component with
``O_NOFOLLOW`` (as ``PosixStorage`` does) narrows that window to the parent directories.

``resolve_below`` and ``_below_parent`` are the storage endpoints' forms: a file strictly below an
endpoint's root (never the root itself), and the copy engine's per-file shortcut that resolves
only the directories, from a cache.
"""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

from common.errors import Permanent

PATH_OUTSIDE_AREA = "path_outside_area"

# Resolved directories, kept a few seconds. A night's files share a handful of directories, and on
# this machine class every lstat costs tens of microseconds: resolving each path component by
# component was a measurable share of ingest's time. The final component is always checked afresh
# (a file replaced by a symlink is caught); a *directory* swapped for a symlink is seen within
# DIR_CACHE_SECONDS — the race described above exists without the cache too.
DIR_CACHE_SECONDS = 5.0
_DIR_CACHE_MAX = 4096
_dir_cache: dict[str, tuple[float, str]] = {}


def real_dir(path: str) -> str:
    """``os.path.realpath`` of a directory, cached for ``DIR_CACHE_SECONDS``."""
    now = time.monotonic()
    hit = _dir_cache.get(path)
    if hit is not None and hit[0] > now:
        return hit[1]
    real = os.path.realpath(path)
    if len(_dir_cache) >= _DIR_CACHE_MAX:
        _dir_cache.clear()
    _dir_cache[path] = (now + DIR_CACHE_SECONDS, real)
    return real


def real_parent(path: str) -> str | None:
    """``path`` with its directories resolved (``real_dir``, cached) and its final component as
    written; ``None`` where only ``os.path.realpath`` can say (a ``..``, no final component)."""
    if ".." in path.split("/"):
        return None  # ".." after a symlink must be resolved the kernel's way
    parent, name = os.path.split(os.path.normpath(path))
    if name in ("", "."):
        return None
    return os.path.join(real_dir(parent), name)


def _realpath(path: str) -> str:
    """``os.path.realpath`` with the parent directory taken from the cache."""
    candidate = real_parent(path)
    if candidate is None:
        return os.path.realpath(path)
    try:
        if stat.S_ISLNK(os.lstat(candidate).st_mode):
            return os.path.realpath(candidate)
    except OSError:
        pass  # not there (yet): kept as written, like realpath does
    return candidate


def resolve_inside(root: Path, path: str | os.PathLike[str]) -> Path:
    """Return ``path`` (absolute, or relative to ``root``) fully resolved, if it lies inside ``root``.

    Symlinks are followed in both ``root`` and ``path``; components that do not exist yet are kept
    as written (after ``..`` is folded), so a destination that is about to be created can be checked.
    The result may equal the root itself; callers wanting a file below it check that themselves.

    Raises ``Permanent("path_outside_area")`` for a NUL byte, an escape through ``..``, an absolute
    path elsewhere, or a symlink inside the area pointing outside it.
    """
    return Path(inside(os.fspath(root), os.fspath(path)))


def inside(root: str, path: str) -> str:
    """``resolve_inside`` on strings: the per-file form (no pathlib parsing on the hot path)."""
    if "\x00" in path or "\x00" in root:
        raise Permanent(PATH_OUTSIDE_AREA, f"path {path!r} contains a NUL byte")
    real_root = real_dir(root)
    # os.path.join keeps an absolute ``path`` as it is and anchors a relative one at the root.
    real = _realpath(os.path.join(real_root, path))
    if not is_within(real, real_root):
        raise Permanent(PATH_OUTSIDE_AREA, f"path {path!r} resolves to {real}, outside {real_root}")
    return real


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


def resolve_below(root: str | os.PathLike[str], relpath: str | os.PathLike[str], name: str) -> Path:
    """Absolute path of ``relpath`` strictly below the endpoint ``root`` (``PosixStorage.resolve``);
    ``Permanent("path_outside_area")`` if it escapes or names the root."""
    raw = os.fspath(relpath)
    root_text = os.fspath(root)
    if "\x00" not in raw and "\x00" not in root_text:
        # Fast path for the common case, per file: the very string resolve_inside would compute,
        # accepted when it lies strictly below the root, tested on the string instead of by
        # three pathlib constructions (half the cost of resolving, ~15 us a file here). Any
        # other answer goes through resolve_inside, which decides and words the error.
        real_root = real_dir(root_text)
        real = _realpath(os.path.join(real_root, raw))
        if real != real_root and is_within(real, real_root):
            return Path(real)
    path = resolve_inside(Path(root_text), relpath)
    if os.fspath(path) == real_dir(root_text):  # both are normalised real paths
        raise Permanent("path_outside_area", f"path {raw!r} names the root of {name}")
    return path


def _below_parent(root: str | os.PathLike[str], relpath: str) -> str | None:
    """``relpath`` under ``root`` with its directories resolved (cached), its final component as
    written; ``None`` when only the full resolution can say (``..``, a NUL, an escape, the root).

    The answer for the directory part is kept (as long as ``real_dir`` keeps a directory): the
    copy process asks twice per small copy, and the string work was a tenth of a copy's CPU. Kept
    on top of ``real_dir``'s own cache, a directory swapped for a symlink is seen within twice
    ``DIR_CACHE_SECONDS`` (the race the module docstring describes, a few seconds longer).
    """
    cut = relpath.rfind("/") + 1
    prefix, name = relpath[:cut], relpath[cut:]  # "a/b/" and "c"; "/" and "c" (absolute); "" and "c"
    if name in ("", ".", "..") or "\x00" in name:
        return _below_parent_uncached(root, relpath)
    key = (root, prefix)
    now = time.monotonic()
    hit = _parent_cache.get(key)
    if hit is None or hit[0] <= now:
        # The parent's answer does not depend on the final component: asked with a stand-in.
        found = _below_parent_uncached(root, prefix + "x")
        if len(_parent_cache) >= _DIR_CACHE_MAX:
            _parent_cache.clear()
        hit = _parent_cache[key] = (now + DIR_CACHE_SECONDS, None if found is None else found[:-1])
    return None if hit[1] is None else hit[1] + name


# (root, a relpath up to its last "/") -> (expiry, the resolved parent directory + "/", or None).
_parent_cache: dict[tuple[str | os.PathLike[str], str], tuple[float, str | None]] = {}


def _below_parent_uncached(root: str | os.PathLike[str], relpath: str) -> str | None:
    if "\x00" in relpath:
        return None
    real_root = real_dir(os.fspath(root))
    path = real_parent(os.path.join(real_root, relpath))
    if path is None or not is_within(os.path.dirname(path), real_root):
        return None
    return path
