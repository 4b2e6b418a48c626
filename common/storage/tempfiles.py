"""Temporary files of the posix backend: where a copy is written before it has its final name.

A crash must never leave a truncated file under a real name, so every copy is written to an
unnamed file in the destination directory (``O_TMPFILE``, linked under its final name through
``/proc/self/fd`` once complete) or, where the file system has none, to a temporary name
``.<basename>.spool-tmp-<hex>`` there (on the same file system, so that ``rename`` is atomic, and
recognisable, so ``PosixStorage.cleanup_temp`` can find what a killed process left). ``_TempFile``
is the one class every copy goes through; the rules (same directory, atomic appearance, directory
fsync, nothing left on failure) are written once, here.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import threading

from common.errors import Permanent, SpoolError
from common.storage import confined
from common.storage.reasons import _destination_error

TEMP_MARKER = ".spool-tmp-"
_TEMP_RE = re.compile(r"\..+\.spool-tmp-[0-9a-f]{12}")
# NAME_MAX is 255 on the usual file systems; keep room for the dot, the marker and the token.
_TEMP_BASENAME_MAX = 200


def is_temp_name(name: str) -> bool:
    """True for the name of a temporary file left by ``put_from`` (a basename, not a path)."""
    return _TEMP_RE.fullmatch(name) is not None


def temp_name_for(basename: str) -> str:
    """A fresh temporary name next to ``basename``; hidden, recognisable, unique per attempt."""
    return f".{basename[:_TEMP_BASENAME_MAX]}{TEMP_MARKER}{secrets.token_hex(6)}"


# Where they can, copies are written to an unnamed file (O_TMPFILE) that is linked under its final
# name once complete: the same atomic appearance as a temporary name and a rename, with one
# directory update instead of three (create; rename's removal and insertion), and a process killed
# mid-copy leaves nothing behind (the kernel frees an unlinked inode). It is no faster per small
# file (docs/decisions.md#unnamed-files-for-copies-commonstoragetempfilespy): what it buys is that.
# The link goes through /proc/self/fd (linkat with AT_SYMLINK_FOLLOW needs no privilege;
# AT_EMPTY_PATH would need CAP_DAC_READ_SEARCH). Where the file system (NFS, older kernels) or
# /proc does not allow it: a temporary name and a rename.
_O_TMPFILE: int = getattr(os, "O_TMPFILE", 0)
_NO_TMPFILE = (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL, errno.ENOTSUP)
_no_tmpfile_dirs: set[str] = set()  # directories where O_TMPFILE was refused (bounded below)
_proc_fd_dir: int | None = None  # descriptor of this process's /proc/self/fd (-1: none)
_proc_lock = threading.Lock()


def _proc_fds() -> int | None:
    """A descriptor of this process's /proc/self/fd, opened on first use."""
    global _proc_fd_dir
    if _proc_fd_dir is None:
        with _proc_lock:
            if _proc_fd_dir is None:
                try:
                    _proc_fd_dir = os.open("/proc/self/fd", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                except OSError:
                    _proc_fd_dir = -1
    return _proc_fd_dir if _proc_fd_dir >= 0 else None


def _forget_proc_fds() -> None:
    global _proc_fd_dir
    _proc_fd_dir = None  # a forked child's /proc/self is not its parent's (the descriptor is)


os.register_at_fork(after_in_child=_forget_proc_fds)


def _link_unnamed(fd: int, name: str, dir_fd: int) -> None:
    """Give the unnamed file open as ``fd`` the name ``name`` in the directory open as ``dir_fd``
    (``FileExistsError`` if taken; an existing symlink there is not followed)."""
    os.link(str(fd), name, src_dir_fd=_proc_fds(), dst_dir_fd=dir_fd, follow_symlinks=True)


def destination_refused(exc: OSError, where: str) -> SpoolError:
    """An ``OSError`` on the destination side, classified; a symlink on the destination path
    (``confined``) is ``path_outside_area`` for the *destination*: never a source's fault."""
    if confined.is_refused(exc):
        return Permanent(
            confined.PATH_OUTSIDE_AREA, f"destination {where}: a symbolic link on the path (not followed)"
        )
    return _destination_error(exc, where)


class _TempFile:
    """The file a copy is written to before it appears as ``rel`` beneath ``root``.

    The destination directory is opened beneath the root with no symlink followed (created where
    missing: ``confined.parent_of``), and every later step goes through its descriptor: the
    unnamed file (O_TMPFILE, see above) where the file system allows, else a temporary name there
    (``path``). ``commit`` makes it durable (optionally) and puts it at ``rel`` atomically: by
    linking the unnamed file there, or through a temporary name renamed onto it when a file
    exists there already or no unnamed file could be made. ``discard`` closes it and removes any
    temporary name. Every copy method goes through this one class, so the crash-safety rules of
    the module docstring (same directory, atomic appearance, directory fsync, nothing left on
    failure) and containment (a directory swapped for a symlink is never written through) are
    written once.
    """

    __slots__ = ("dest", "dir", "fd", "parent", "path")

    def __init__(self, root: str, rel: str, flags: int) -> None:
        # Strings, not Paths: built for every file, and pathlib's parsing showed in profiles.
        self.dest = dest = root + "/" + rel
        self.parent = os.path.dirname(dest)  # for messages and the O_TMPFILE memory
        self.path: str | None = None  # the temporary name, when there is one
        self.fd: int | None = None
        try:
            self.dir = confined.parent_of(root, rel, create=True, make_root=True)
        except OSError as exc:
            raise destination_refused(exc, dest) from None
        try:
            self._open(flags)
        except OSError as exc:
            self.dir.close()
            raise destination_refused(exc, self.where) from None

    @property
    def where(self) -> str:
        """The file being written, for messages."""
        return (
            os.path.join(self.parent, self.path) if self.path else os.path.join(self.parent, "(unnamed file)")
        )

    def _open(self, flags: int) -> None:
        dir_fd = self.dir.fd
        if _O_TMPFILE and self.parent not in _no_tmpfile_dirs and _proc_fds() is not None:
            try:
                self.fd = os.open(".", flags | _O_TMPFILE | os.O_CLOEXEC, 0o644, dir_fd=dir_fd)
                return
            except OSError as exc:
                if exc.errno not in _NO_TMPFILE:
                    raise
                if len(_no_tmpfile_dirs) > 4096:
                    _no_tmpfile_dirs.clear()
                _no_tmpfile_dirs.add(self.parent)
        self.path = temp_name_for(self.dir.name)
        self.fd = os.open(
            self.path, flags | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644, dir_fd=dir_fd
        )

    def commit(self, fsync: bool) -> None:
        fd = self.fd
        assert fd is not None, "temporary file already closed"
        dir_fd, name = self.dir.fd, self.dir.name
        try:
            if fsync:
                os.fsync(fd)
            if self.path is None:
                try:
                    _link_unnamed(fd, name, dir_fd)
                except FileExistsError:  # replacing a file: rename is the atomic way
                    self.path = temp_name_for(name)
                    _link_unnamed(fd, self.path, dir_fd)
                    os.rename(self.path, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
                self.fd = None
                os.close(fd)
            else:
                self.fd = None
                os.close(fd)  # network file systems report deferred write errors here
                os.rename(self.path, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            self.path = None
            if fsync:
                os.fsync(dir_fd)
                for created_in in self.dir.created_in:
                    os.fsync(created_in)
        except OSError as exc:
            raise _destination_error(exc, self.dest) from None
        finally:
            if self.fd is None and self.path is None:
                self.dir.close()

    def discard(self) -> None:
        if self.fd is not None:
            fd, self.fd = self.fd, None
            with contextlib.suppress(OSError):  # the error being handled matters more
                os.close(fd)  # an unnamed file is freed by the kernel here
        if self.path is not None:
            # Fails only if already renamed or the directory vanished; cleanup_temp gets the rest.
            with contextlib.suppress(OSError):
                os.unlink(self.path, dir_fd=self.dir.fd)
            self.path = None
        self.dir.close()
