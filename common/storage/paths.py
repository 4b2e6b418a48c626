"""Confining paths to a directory tree (landing areas, storage endpoints).

Paths arrive in messages from systems we do not control, so every one is resolved *with symlinks
followed* before it is compared with the root: a lexical check alone would let
``landing/link -> /etc`` or ``a/../../etc/passwd`` through. Anything that ends up outside is a
``Permanent`` error: retrying cannot make a bad path good.

The check is made at resolution time; a process able to swap directories for symlinks inside the
area between the check and the open can still race it. Opening the final component with
``O_NOFOLLOW`` (as ``PosixStorage`` does) narrows that window to the parent directories.
"""

from __future__ import annotations

import os
from pathlib import Path

from common.errors import Permanent

PATH_OUTSIDE_AREA = "path_outside_area"


def resolve_inside(root: Path, path: str | os.PathLike[str]) -> Path:
    """Return ``path`` (absolute, or relative to ``root``) fully resolved, if it lies inside ``root``.

    Symlinks are followed in both ``root`` and ``path``; components that do not exist yet are kept
    as written (after ``..`` is folded), so a destination that is about to be created can be checked.
    The result may equal the root itself; callers wanting a file below it check that themselves.

    Raises ``Permanent("path_outside_area")`` for a NUL byte, an escape through ``..``, an absolute
    path elsewhere, or a symlink inside the area pointing outside it.
    """
    raw = os.fspath(path)
    if "\x00" in raw or "\x00" in os.fspath(root):
        raise Permanent(PATH_OUTSIDE_AREA, f"path {raw!r} contains a NUL byte")
    real_root = Path(os.path.realpath(root))
    # os.path.join keeps an absolute ``raw`` as it is and anchors a relative one at the root.
    real = Path(os.path.realpath(os.path.join(real_root, raw)))
    if real != real_root and not real.is_relative_to(real_root):
        raise Permanent(PATH_OUTSIDE_AREA, f"path {raw!r} resolves to {real}, outside {real_root}")
    return real
