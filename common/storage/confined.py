"""Opening, creating, deleting and stat-ing paths *beneath a root*, never through a symlink.

Paths from messages name files in directories other people can write (landing areas, storage
roots). A check of a resolved name made before the open proves nothing at the open: a directory
can be swapped for a symlink in between (issue 16: a landing directory swapped for a link to
``/etc`` was trusted for the lifetime of a cache of resolved directories). So containment is
enforced *by the kernel at the moment of each open*: every path is resolved from the root's
directory descriptor with ``openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS |
RESOLVE_NO_MAGICLINKS)`` where the kernel has it (Linux 5.6+, probed once), otherwise by a walk
of ``openat(O_NOFOLLOW | O_DIRECTORY)`` one component at a time. Creating, deleting and renaming
go through the descriptor of the parent directory obtained the same way (``mkdirat``,
``unlinkat``, ``renameat``, ``linkat``), so no name is looked up twice.

Decisions (an operator's expectations):

- **The root is not kept open: its real path is walked afresh by each operation**, together
  with the relative path, in one ``openat2`` from this process's descriptor of ``/`` with
  ``RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS``. The root's path is the
  operator's, resolved once at start (``paths.real_root``), so it has no symlink; with ``..``
  refused and no symlink followed anywhere, the walk cannot leave the root, and a root (or any
  of its parents) replaced by a symlink since start is refused too. Why not a descriptor of the
  root held for the process's life: it would go on writing into a directory the operator has
  since replaced or mounted over (a storage mount that came up after the daemon), and the copy
  process (a fresh interpreter) would need it passed along. Why not open the root per operation
  and then ``openat2`` beneath it: the same guarantee for one more ``open`` and ``close`` per
  file, which showed in the copy process's profile (ingest's hot path).
- **A symlink anywhere below the root is refused** with ``path_outside_area``, whether it points
  inside the area or out: Spool never follows one, so a path through one does not name a file
  *in* the area. (A link pointing inside used to be accepted; the kernel cannot tell the two apart
  without following it, and following is what let ``/etc`` in.) The copy engine maps the same
  errno to the *side* at fault: ``source_corrupt`` for a source replica, ``path_outside_area`` for
  the destination (never the source's fault).
- **``..`` and absolute paths leaving the root** are ``path_outside_area`` before any system call
  (``paths``, which names files; this module only opens them); a ``..`` reaching here anyway is
  refused (``EXDEV``), as ``RESOLVE_BENEATH`` would refuse an escape.
- **Untrusted files are opened ``O_NONBLOCK`` and ``fstat``-checked** to be regular before a
  byte is read (``open_regular``): a FIFO, a socket, a device or a directory is
  ``NotARegularFile`` (the callers' ``not_a_file`` / ``source_corrupt``), and no open can block
  a worker thread for ever (a FIFO without a writer).

Errors are ``OSError`` with the kernel's errno (``ELOOP``: a symlink; ``EXDEV``: an escape;
``ENOENT``, ``ENOTDIR`` ...) for the caller to classify, since only the caller knows whose file
it is; ``is_refused`` tells the containment ones apart.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import stat as stat_mod
import threading
from collections.abc import Callable, Iterator
from typing import Any

PATH_OUTSIDE_AREA = "path_outside_area"

# <linux/openat2.h>
_SYS_OPENAT2 = 437  # the same number on every architecture (added after the syscall table unification)
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
_RESOLVE = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS
# The kernel refused a path because of a symlink on it (ELOOP) or an escape from the root (EXDEV).
REFUSED_ERRNOS = frozenset({errno.ELOOP, errno.EXDEV})
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
READ_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


class NotARegularFile(Exception):
    """An untrusted path names a FIFO, socket, device or directory (``what`` says which)."""

    def __init__(self, what: str) -> None:
        super().__init__(what)
        self.what = what


def _load_openat2() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.syscall
    except (OSError, AttributeError):
        return None
    fn.restype = ctypes.c_long
    fn.argtypes = [ctypes.c_long, ctypes.c_int, ctypes.c_char_p, ctypes.POINTER(_OpenHow), ctypes.c_size_t]
    return fn


_syscall = _load_openat2()
_has_openat2: bool | None = None  # probed on first use
_probe_lock = threading.Lock()


# (flags, mode) -> the open_how argument: a handful of combinations, built once (per file, the
# struct and its reference were a measurable share of the Python around the call).
_hows: dict[tuple[int, int], Any] = {}
_HOW_SIZE = ctypes.sizeof(_OpenHow)


def _openat2(dirfd: int, path: str, flags: int, mode: int) -> int:
    creates = flags & os.O_CREAT or flags & os.O_TMPFILE == os.O_TMPFILE
    key = (flags, mode if creates else 0)
    how = _hows.get(key)
    if how is None:
        how = _hows[key] = ctypes.byref(_OpenHow(key[0], key[1], _RESOLVE))
    raw = os.fsencode(path)
    for _ in range(8):  # EAGAIN: a rename raced the walk (RESOLVE_BENEATH re-checks); try again
        fd = _syscall(_SYS_OPENAT2, dirfd, raw, how, _HOW_SIZE)  # type: ignore[misc]
        if fd >= 0:
            return int(fd)
        err = ctypes.get_errno()
        if err == errno.EINTR:
            continue
        if err != errno.EAGAIN:
            raise OSError(err, os.strerror(err), path)
    raise OSError(errno.EAGAIN, os.strerror(errno.EAGAIN), path)


def has_openat2() -> bool:
    """Whether this kernel (and seccomp policy) gives us ``openat2``: probed once."""
    global _has_openat2
    if _has_openat2 is None:
        with _probe_lock:
            if _has_openat2 is None:
                _has_openat2 = _probe()
    return _has_openat2


def _probe() -> bool:
    if _syscall is None:
        return False
    try:
        fd = _openat2(-100, "/", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, 0)  # AT_FDCWD
    except OSError as exc:
        # ENOSYS: an old kernel; EPERM: a seccomp filter refusing it. "/" refused for another
        # reason: the call itself exists.
        return exc.errno not in (errno.ENOSYS, errno.EPERM, errno.EINVAL, errno.E2BIG)
    os.close(fd)
    return True


def use_walk_only(walk: bool) -> None:
    """Tests: force the ``O_NOFOLLOW`` walk (``True``) or probe again (``False``)."""
    global _has_openat2
    _has_openat2 = False if walk else None


def is_refused(exc: OSError) -> bool:
    """The kernel refused the path for containment: a symlink on it, or an escape."""
    return exc.errno in REFUSED_ERRNOS


# --- opening -------------------------------------------------------------------------------------
_slash_fd: int | None = None  # this process's descriptor of "/" (see the module docstring)
_slash_lock = threading.Lock()


def _slash() -> int:
    global _slash_fd
    if _slash_fd is None:
        with _slash_lock:
            if _slash_fd is None:
                _slash_fd = os.open("/", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    return _slash_fd


def _under_slash(path: str) -> str:
    if not path.startswith("/") or "\x00" in path or ".." in path.split("/"):
        raise OSError(errno.EXDEV, "not a clean absolute path", path)
    return path.lstrip("/") or "."


def open_root(root: str) -> int:
    """A descriptor of the root directory: its real path, no symlink at any component."""
    return openat(_slash(), _under_slash(root), _DIR_FLAGS)


def openat(dirfd: int, rel: str, flags: int, mode: int = 0o644) -> int:
    """Open ``rel`` (clean and relative: ``paths.below``) beneath ``dirfd``, no symlink followed."""
    if has_openat2():
        # RESOLVE_NO_SYMLINKS covers the last component too, and says ELOOP where O_NOFOLLOW with
        # O_DIRECTORY would say ENOTDIR.
        return _openat2(dirfd, rel, (flags | os.O_CLOEXEC) & ~os.O_NOFOLLOW, mode)
    return _walk_open(dirfd, rel, flags | os.O_CLOEXEC | os.O_NOFOLLOW, mode)


def _open_dir(part: str, dirfd: int) -> int:
    """One directory component, not followed; a symlink is ``ELOOP`` as ``openat2`` says it
    (``O_DIRECTORY | O_NOFOLLOW`` on a symlink answers ``ENOTDIR``)."""
    try:
        return os.open(part, _DIR_FLAGS, dir_fd=dirfd)
    except NotADirectoryError:
        try:
            link = stat_mod.S_ISLNK(os.stat(part, dir_fd=dirfd, follow_symlinks=False).st_mode)
        except OSError:
            link = False
        if link:
            raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), part) from None
        raise


def _walk_open(dirfd: int, rel: str, flags: int, mode: int) -> int:
    parts = rel.split("/")
    current = dirfd
    try:
        for part in parts[:-1]:
            nxt = _open_dir(part, current)
            if current != dirfd:
                os.close(current)
            current = nxt
        if flags & os.O_DIRECTORY and not flags & os.O_CREAT:
            return (
                _open_dir(parts[-1], current)
                if flags == _DIR_FLAGS
                else os.open(parts[-1], flags, mode, dir_fd=current)
            )
        return os.open(parts[-1], flags, mode, dir_fd=current)
    finally:
        if current != dirfd:
            os.close(current)


def open_beneath(root: str, rel: str, flags: int, mode: int = 0o644) -> int:
    """Open ``rel`` beneath ``root`` (a real path): ``open_path`` of the two joined."""
    return open_path(root.rstrip("/") + "/" + rel, flags, mode)


def open_path(path: str, flags: int, mode: int = 0o644) -> int:
    """Open an absolute ``path`` with **no symlink followed at any component**, from ``/``.

    For a root's real path joined with a relative path without ``..`` (``paths.below``, and the
    absolute paths handed between modules: a landing-area file located by ingest, a replica
    ``PosixStorage.resolve`` named), a walk that follows no symlink cannot leave that root; it
    needs no knowledge of which root it was (the copy process gets bare paths).
    """
    return openat(_slash(), _under_slash(path), flags, mode)


def check_regular(fd: int) -> os.stat_result:
    """``fstat`` of an open untrusted file; ``NotARegularFile`` unless it is a regular file."""
    st = os.fstat(fd)
    if not stat_mod.S_ISREG(st.st_mode):
        raise NotARegularFile(kind(st.st_mode))
    return st


def kind(mode: int) -> str:
    """What a non-regular file is, for messages."""
    for test, name in (
        (stat_mod.S_ISDIR, "a directory"),
        (stat_mod.S_ISFIFO, "a FIFO"),
        (stat_mod.S_ISSOCK, "a socket"),
        (stat_mod.S_ISCHR, "a character device"),
        (stat_mod.S_ISBLK, "a block device"),
        (stat_mod.S_ISLNK, "a symbolic link"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def open_regular(path: str) -> tuple[int, os.stat_result]:
    """Open an untrusted absolute ``path`` for reading: no symlink at any component
    (``open_path``), non-blocking, and a regular file (``NotARegularFile`` otherwise, the
    descriptor closed). A socket's open fails with ``ENXIO``: also ``NotARegularFile``."""
    return _regular(open_path, path, READ_FLAGS)


def open_regular_beneath(root: str, rel: str) -> tuple[int, os.stat_result]:
    """``open_regular`` of ``rel`` beneath ``root``."""
    return _regular(open_beneath, root, rel, READ_FLAGS)


def _regular(opener: Callable[..., int], *args: Any) -> tuple[int, os.stat_result]:
    """``opener(*args)``, then the regular-file check; the descriptor is closed on any failure."""
    try:
        fd = opener(*args)
    except OSError as exc:
        if exc.errno == errno.ENXIO:
            raise NotARegularFile("a socket or a device without a driver") from None
        raise
    try:
        return fd, check_regular(fd)
    except BaseException:
        os.close(fd)
        raise


# --- directories, creating, deleting -------------------------------------------------------------
class Parent:
    """The directory holding ``rel`` below a root, open (``fd``), and ``rel``'s last component
    (``name``). With ``create``, missing directories are made (``mkdirat``, each one opened
    without following a symlink afterwards); ``created_in`` holds descriptors of the directories
    that gained an entry, for a caller making the copy durable. ``close`` releases them all."""

    __slots__ = ("created_in", "fd", "name")

    def __init__(self, fd: int, name: str, created_in: list[int]) -> None:
        self.fd = fd
        self.name = name
        self.created_in = created_in

    def close(self) -> None:
        """Release the descriptors (once: a second call does nothing)."""
        fds, self.fd, self.created_in = (self.fd, *self.created_in), -1, []
        for fd in fds:
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)


def parent_of(root: str, rel: str, *, create: bool = False, make_root: bool = False) -> Parent:
    """The open parent directory of ``rel`` beneath ``root`` (see ``Parent``).

    ``make_root`` creates the root itself when missing (an endpoint's first write): the root's
    path is the operator's, created as configured.
    """
    head, _, name = rel.rpartition("/")
    try:
        # One call for the usual case (the directory exists): root and head walked together.
        return Parent(open_path(f"{root}/{head}" if head else root, _DIR_FLAGS), name, [])
    except FileNotFoundError:
        if not create:
            raise
    try:
        rootfd = open_root(root)
    except FileNotFoundError:
        if not make_root:
            raise
        os.makedirs(root, 0o755, exist_ok=True)
        rootfd = open_root(root)
    if not head:
        return Parent(rootfd, name, [])
    return _make_dirs(rootfd, head, name)


def _make_dirs(rootfd: int, head: str, name: str) -> Parent:
    """``mkdir -p`` of ``head`` beneath ``rootfd`` (taken over), one component at a time."""
    current = rootfd
    created_in: list[int] = []
    try:
        for part in head.split("/"):
            try:
                nxt = _open_dir(part, current)
            except FileNotFoundError:
                try:
                    os.mkdir(part, 0o755, dir_fd=current)
                    created_in.append(os.dup(current))
                except FileExistsError:
                    pass  # made by a concurrent copy meanwhile: opened below like any other
                nxt = _open_dir(part, current)
            os.close(current)
            current = nxt
    except BaseException:
        os.close(current)
        for fd in created_in:
            os.close(fd)
        raise
    return Parent(current, name, created_in)


@contextlib.contextmanager
def parent_dir(root: str, rel: str, *, create: bool = False) -> Iterator[Parent]:
    """``parent_of`` as a context manager."""
    parent = parent_of(root, rel, create=create)
    try:
        yield parent
    finally:
        parent.close()


def lstat_beneath(root: str, rel: str) -> os.stat_result:
    """``lstat`` of ``rel`` beneath ``root``: its directories walked without symlinks, the entry
    itself not followed (a symlink there is reported as one, ``S_ISLNK``)."""
    with parent_dir(root, rel) as parent:
        return os.stat(parent.name, dir_fd=parent.fd, follow_symlinks=False)


def unlink_beneath(root: str, rel: str) -> None:
    """Remove the entry ``rel`` beneath ``root`` (``unlinkat`` in its parent; a symlink there is
    removed itself, never its target). ``IsADirectoryError`` / ``EPERM`` for a directory."""
    with parent_dir(root, rel) as parent:
        os.unlink(parent.name, dir_fd=parent.fd)


def open_dir_beneath(root: str, rel: str) -> int:
    """A directory below ``root`` (``rel`` ``""``: the root itself), no symlink followed."""
    if not rel:
        return open_root(root)
    return open_beneath(root, rel, _DIR_FLAGS)
