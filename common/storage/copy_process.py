"""The copy process: a helper process of a daemon that runs its batches of small copies.

Why a process and not a thread: a 1 KiB copy is a dozen system calls, and a worker thread has to
take the GIL back after each one while the event loop holds it. Measured with ingest at 700
files/s, the copy thread was busy 92 % of the run and spent 1.3 ms of wall time per 1 KiB copy,
mostly waiting for the GIL: it set the daemon's pace. A process has its own interpreter; the event
loop only packs a batch, writes it to a pipe and reads the answers back.

``copy_processes`` per endpoint (default one; ``PosixStorage`` starts one on a batch that finds
every running one busy, ``small_copies = "process"``), each serving its batches in the order they
arrive, with about ``posix.PIPELINED_BYTES`` of small copies in its pipe. On two cores a second
process did not help (the daemon, the copier and the broker already share them); on a node with
more cores it may. The protocol on its stdin / stdout is length-prefixed msgpack frames (4 bytes
big-endian, then the body):

- first the parent sends ``{"name", "root", "min_free_bytes", "chunk_size"}``, the child
  answers ``"ready"``;
- then each request is a list of ``[operation, args]`` (operations: ``OPERATIONS``), answered by a
  list of outcomes in the same order: ``["c", pfn, path, size, adler32, sha256]`` (a ``CopyResult``),
  ``["v", value]``, ``["e", "permanent" | "retryable", reason, message]`` (a ``SpoolError``) or
  ``["x", type, text]`` (a bug).

Lifetime and faults:

- The child exits when its stdin closes (``close``) and dies with its parent (``PR_SET_PDEATHSIG``,
  so a daemon killed with SIGKILL does not leave a copier writing behind its restarted successor).
- It ignores SIGINT and SIGTERM: systemd and a terminal signal the whole group, and the daemon's
  drain needs the copier to finish the copies in flight. The daemon closes it after its drain.
- When it dies during a batch (killed, out of memory), every copy of that batch fails with
  ``Retryable("storage_io_error")`` and the next batch starts a new process. A temporary file the
  dead process was writing stays until the next start-up's ``cleanup_temp``.
- When it stops answering — stopped (SIGSTOP), stuck in a hung file system, looping — for
  ``stall_seconds`` (the endpoint's setting) while batches wait, it is **abandoned**: killed
  without waiting for it to exit (a process in uninterruptible sleep does not die until its I/O
  returns; it is reaped in a thread), every waiting copy fails ``Retryable("transfer_timeout")``
  and the next batch starts a new process. The retry copies again; nothing waits on the stuck one.
- Its log lines (JSON on stderr, which it shares with the daemon) carry ``process="copier"``.

What does not cross: monkeypatches of the copy engine's modules (``copy_engine``, ``kernel``,
``tempfiles``) made in the parent (tests that corrupt bytes use ``small_copies = "thread"``), and
``min_free_bytes`` accounting, which each process's ``CopyEngine`` keeps for its own copies (small
ones: at most ``batch_copy_bytes`` each).

The child runs the copy engine (``copy_engine.CopyEngine.operations``) with ``run_each``, as a
worker thread of the backend does; it never builds a ``PosixStorage``, and this module does not
import the backend (which imports it).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import gc
import os
import signal
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import msgpack
import structlog

import common
from common.errors import Permanent, Retryable, SpoolError
from common.storage.copy_engine import CopyEngine, CopyResult, EngineEndpoint
from common.storage.kernel import _Aborted

HEADER = 4
OPERATIONS = ("copy", "replicate", "replicate_from", "verify")
# The child imports ``common`` from where this process did (a source checkout run from elsewhere,
# say), added to its path only when missing: PYTHONPATH would put it before the standard library.
# ``rich`` refused: structlog imports it (and pygments) when installed, for console tracebacks the
# copier never prints (its lines are JSON): 4 MB of the copier's memory.
CHILD_COMMAND = (
    "import sys; root = sys.argv[2]; root in sys.path or sys.path.insert(0, root); "
    "sys.modules.setdefault('rich', None); "
    "from common.storage.copy_process import main; main()"
)
log = structlog.get_logger("spool.storage")
START_TIMEOUT = 30.0  # seconds for the child to import and answer "ready" (a loaded machine)
_IMPORT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(common.__file__)))


class Failed:
    """One operation of a batch that raised: handed back to its caller, not to the whole batch."""

    __slots__ = ("error",)

    def __init__(self, error: Exception) -> None:
        self.error = error


_Job = tuple[Callable[..., Any], tuple[Any, ...]]


def run_each(cancelled: threading.Event, jobs: Sequence[_Job]) -> list[Any]:
    """Run a batch's operations one after another; one that raises becomes its own ``Failed``."""
    out: list[Any] = []
    for fn, args in jobs:
        try:
            out.append(fn(cancelled, *args))
        except _Aborted:
            raise  # cancelled: the whole batch stops (each operation removed its temp file)
        except Exception as exc:
            out.append(Failed(exc))
    return out


def _frame(obj: Any) -> bytes:
    body: bytes = msgpack.packb(obj, default=os.fspath, use_bin_type=True)
    return len(body).to_bytes(HEADER, "big") + body


# --- parent side ---------------------------------------------------------------------------------
class CopyProcess:
    """The parent's handle on one copy process; ``run`` sends a batch and returns its outcomes.

    Batches may be sent while earlier ones are still being served (the process keeps its stdin's
    order, and one reader task pairs each answer with the oldest batch waiting), so the next batch
    is already in the pipe when the process finishes one.
    """

    def __init__(
        self, name: str, endpoint: EngineEndpoint, chunk_size: int, stall_seconds: float = 120.0
    ) -> None:
        self.stall_seconds = stall_seconds
        # When the process last showed progress: its last answer, or a send with nothing waiting
        # (the head batch's wait starts then). Read by the watchdog (``_watch``).
        self._progress = 0.0
        self._watchdog: asyncio.Task[None] | None = None
        self._hello = {
            "name": name, "root": os.fspath(endpoint.root), "min_free_bytes": endpoint.min_free_bytes,
            "chunk_size": chunk_size,
        }  # fmt: skip
        self._proc: subprocess.Popen[bytes] | None = None
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._read_transport: asyncio.BaseTransport | None = None
        self._answers: asyncio.Task[None] | None = None
        # Batches sent and not answered yet, oldest first: (their answer, how many jobs).
        self._waiting: deque[tuple[asyncio.Future[list[Any]], int]] = deque()
        self._send_lock = asyncio.Lock()
        self._writes: set[asyncio.Task[None]] = set()
        self.started = 0  # processes started so far (a restart after a death counts)
        self._owed = 0  # batches whose answer has not come (``in_flight``)

    @property
    def in_flight(self) -> int:
        """Batches sent (or being sent) and not answered yet."""
        return self._owed

    def _answered(self, _answer: asyncio.Future[list[Any]]) -> None:
        self._owed -= 1

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    async def run(self, jobs: Sequence[tuple[str, Sequence[Any]]]) -> list[Any]:
        """Outcomes of ``jobs`` (``[operation, args]``): values, ``CopyResult``s or ``Failed``.

        Cancelling the caller does not cut the exchange short (the answer is still read, so it is
        never taken for another batch's): the batch finishes in the background, as a copy already
        in the kernel would.
        """
        return await asyncio.shield(self._send(jobs))

    async def start(self) -> None:
        """Start the process now, if it is not running (``run`` starts it on demand otherwise)."""
        async with self._send_lock:
            await self._start_if_stopped()

    async def _start_if_stopped(self) -> None:
        """Start the process unless it runs (the caller holds the send lock)."""
        if self._proc is None or self._proc.poll() is not None:
            await self._start()

    def _send(self, jobs: Sequence[tuple[str, Sequence[Any]]]) -> asyncio.Future[list[Any]]:
        answer: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        self._owed += 1
        answer.add_done_callback(self._answered)
        writing = asyncio.ensure_future(self._write(jobs, answer))
        self._writes.add(writing)  # a reference, so the task is not collected while it runs
        writing.add_done_callback(self._writes.discard)
        return answer

    async def _write(
        self, jobs: Sequence[tuple[str, Sequence[Any]]], answer: asyncio.Future[list[Any]]
    ) -> None:
        async with self._send_lock:
            try:
                await self._start_if_stopped()
                assert self._writer is not None
                if not self._waiting:
                    self._progress = asyncio.get_running_loop().time()
                self._waiting.append((answer, len(jobs)))
                self._writer.write(_frame(jobs))  # msgpack writes tuples as arrays: no copies
                await self._writer.drain()
            except (OSError, EOFError, asyncio.IncompleteReadError, TimeoutError) as exc:
                self._fail(f"{type(exc).__name__}: {exc}", extra=answer, jobs=len(jobs))
            except Exception as exc:  # a bug: its callers hear of it rather than wait for ever
                if not answer.done():
                    answer.set_exception(exc)

    async def _read_answers(self) -> None:
        try:
            while True:
                outcomes = await self._read()
                self._progress = asyncio.get_running_loop().time()
                answer, jobs = self._waiting.popleft()
                if len(outcomes) != jobs:  # a protocol bug: never pair answers with the wrong copies
                    self._fail("answered out of step", extra=answer, jobs=jobs)
                    return
                if not answer.done():
                    answer.set_result([_decode(o) for o in outcomes])
        except (OSError, EOFError, asyncio.IncompleteReadError) as exc:
            self._fail(f"{type(exc).__name__}: {exc}")
        except Exception as exc:  # a bug (an answer that does not decode): nobody waits for ever
            self._fail(f"unreadable answer: {type(exc).__name__}: {exc}")

    async def _watch(self) -> None:
        """Abandon the process when batches wait and it has shown no progress for ``stall_seconds``."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(min(1.0, self.stall_seconds / 4))
            idle = loop.time() - self._progress
            if self._waiting and idle > self.stall_seconds:
                log.error(
                    "copy_process_stalled", storage=self._hello["name"], pid=self.pid,
                    seconds=round(idle, 1), batches=len(self._waiting),
                )  # fmt: skip
                self._fail(f"stalled: no answer for {idle:.0f} s", reason="transfer_timeout", abandon=True)
                return

    def _fail(
        self,
        why: str,
        *,
        extra: asyncio.Future[list[Any]] | None = None,
        jobs: int = 0,
        reason: str = "storage_io_error",
        abandon: bool = False,
    ) -> None:
        """The process is gone, out of step or stalled: every batch waiting fails, each copy
        ``Retryable`` (``reason``)."""
        waiting = list(self._waiting)
        self._waiting.clear()
        if extra is not None and all(extra is not a for a, _ in waiting):
            waiting.append((extra, jobs))
        what = self._stop(why, from_reader=asyncio.current_task() is self._answers, abandon=abandon)
        error = Retryable(reason, f"the copy process of {self._hello['name']} {what}")
        for answer, n in waiting:
            if not answer.done():
                answer.set_result([Failed(error) for _ in range(n)])

    async def _read(self) -> Any:
        assert self._reader is not None
        head = await self._reader.readexactly(HEADER)
        return msgpack.unpackb(await self._reader.readexactly(int.from_bytes(head, "big")), raw=False)

    async def _start(self) -> None:
        if self._proc is not None or self._waiting:
            # Found dead before its reader saw the EOF: what it still owed fails, as on the EOF.
            self._fail("exited")
        # In a thread: fork and exec take milliseconds, which the event loop should not wait out.
        self._proc = proc = await asyncio.to_thread(_spawn)
        self.started += 1
        assert proc.stdin is not None and proc.stdout is not None
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=2**24)
        self._read_transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), proc.stdout
        )
        transport, protocol = await loop.connect_write_pipe(asyncio.streams.FlowControlMixin, proc.stdin)
        self._reader, self._writer = reader, asyncio.StreamWriter(transport, protocol, reader, loop)
        self._writer.write(_frame(self._hello))
        await self._writer.drain()
        answer = await asyncio.wait_for(self._read(), START_TIMEOUT)
        if answer != "ready":
            raise EOFError(f"unexpected greeting {answer!r}")
        self._answers = asyncio.ensure_future(self._read_answers())
        self._watchdog = asyncio.ensure_future(self._watch())

    def _stop(self, why: str, *, from_reader: bool = False, abandon: bool = False) -> str:
        """Close the pipes and make sure the process is gone (``abandon``: killed, not waited
        for); returns what happened, for errors."""
        proc, self._proc = self._proc, None
        answers, self._answers = self._answers, None
        if answers is not None and not from_reader:
            answers.cancel()
        watchdog, self._watchdog = self._watchdog, None
        if watchdog is not None and not (abandon and not watchdog.done()):  # abandon: from the watchdog
            with contextlib.suppress(RuntimeError):  # its loop is closed (sync teardown): nothing runs it
                watchdog.cancel()
        writer, self._writer = self._writer, None
        pairs = [  # each transport with the pipe it was made on
            (writer.transport if writer else None, proc.stdin if proc else None),
            (self._read_transport, proc.stdout if proc else None),
        ]
        self._reader = self._read_transport = None
        null: int | None = None
        try:
            for transport, pipe in pairs:
                if transport is not None:
                    try:
                        transport.close()  # first: it takes the descriptor out of the loop's selector
                    except RuntimeError:  # its event loop is closed (sync teardown): closed below
                        transport = None
                if pipe is None or pipe.closed:  # closed by its transport already (an EOF)
                    continue
                if transport is None:
                    pipe.close()  # now, not on the loop's next turn: EOF tells the child to exit
                    continue
                # The transport closes the pipe on the loop's next turn; the child must have its
                # EOF now. The pipe is released at once, its number kept on /dev/null until then:
                # freed now, the number would go to the next descriptor opened (the next copy
                # process's pipe, a copy's file), which the loop would then close (uvloop closes
                # the number itself).
                if null is None:
                    null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
                os.dup2(null, pipe.fileno(), inheritable=False)
        finally:
            if null is not None:
                os.close(null)
        if proc is None:
            return why
        if abandon:
            proc.kill()  # even a stopped process dies; one in a hung file system when its I/O returns
            threading.Thread(target=proc.wait, name="reap-copy-process", daemon=True).start()
            return f"failed ({why}; the process {proc.pid} was killed and abandoned)"
        try:
            code = proc.wait(timeout=2)  # stdin closed: it exits after its current operation
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
        return f"failed ({why}; the process exited with code {code})"

    def close(self) -> None:
        """Let the process exit (EOF on its stdin) and reap it. Call with no batch in flight."""
        self._stop("closed")
        self._waiting.clear()


def _spawn() -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        # -c, not -m: run as __main__ this module would be a second copy of itself.
        [sys.executable, "-c", CHILD_COMMAND, str(os.getpid()), _IMPORT_ROOT],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        close_fds=True,
    )


def _decode(outcome: list[Any]) -> Any:
    tag = outcome[0]
    if tag == "c":
        return CopyResult(
            pfn=outcome[1], location=outcome[2], size=outcome[3], adler32=outcome[4], sha256=outcome[5]
        )
    if tag == "v":
        return outcome[1]
    if tag == "e":
        cls = Permanent if outcome[1] == "permanent" else Retryable
        return Failed(cls(outcome[2], outcome[3]))
    return Failed(RuntimeError(f"copy process: {outcome[1]}: {outcome[2]}"))


# --- child side ----------------------------------------------------------------------------------
def _encode(value: Any) -> list[Any]:
    if isinstance(value, CopyResult):
        return ["c", value.pfn, value.location, value.size, value.adler32, value.sha256]
    if isinstance(value, Failed):
        exc = value.error
        if isinstance(exc, SpoolError):
            kind = "permanent" if isinstance(exc, Permanent) else "retryable"
            return ["e", kind, exc.reason, exc.message]
        return ["x", type(exc).__name__, str(exc)]
    return ["v", value]


def _read_frame(stream: BinaryIO) -> Any:
    head = stream.read(HEADER)
    if len(head) < HEADER:
        raise EOFError
    size = int.from_bytes(head, "big")
    body = stream.read(size)
    if len(body) < size:
        raise EOFError
    return msgpack.unpackb(body, raw=False)


def _die_with_parent(parent: int) -> None:
    """Linux: SIGKILL this process when its parent dies; elsewhere the EOF on stdin does it."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


@dataclass(frozen=True)
class _Endpoint:
    """The endpoint settings the child's engine reads (``copy_engine.EngineEndpoint``), sent by
    the parent, which validated them: the child imports neither pydantic nor the config (the
    copier was 48 MB resident with them, every daemon running one per endpoint)."""

    root: Path
    min_free_bytes: int


def serve(stream_in: BinaryIO, stream_out: BinaryIO) -> None:
    """Answer batches until EOF on ``stream_in``."""
    hello = _read_frame(stream_in)
    endpoint = _Endpoint(Path(hello["root"]), int(hello["min_free_bytes"]))
    engine = CopyEngine(hello["name"], endpoint, hello["chunk_size"])
    never = threading.Event()  # a batch is not cancelled midway: it is a few milliseconds long
    ops = engine.operations
    # As the daemon does (common.runtime.tune_gc): what start-up built out of the collector's
    # sight, and collections rarer. It ran every few copies here, 4 % of the process's time.
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)
    try:
        stream_out.write(_frame("ready"))
        stream_out.flush()
        while True:
            try:
                jobs = _read_frame(stream_in)
            except EOFError:
                return
            outcomes = run_each(never, [(ops[op], tuple(args)) for op, args in jobs])
            stream_out.write(_frame([_encode(o) for o in outcomes]))
            stream_out.flush()
    except BrokenPipeError:
        # The parent closed its end (it stopped, or gave up on this process): nobody waits for
        # the answer. The copies made are whole files under their names or nothing; what was
        # not recorded is copied again on redelivery.
        structlog.get_logger("spool.storage").info("copy_process_parent_gone", storage=hello["name"])


def main() -> None:
    _die_with_parent(int(sys.argv[1]))
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # The protocol owns the original stdout; anything else printing goes to stderr instead.
    protocol_out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    from common.logging import LogChoice, configure_logging

    configure_logging(LogChoice(level=os.environ.get("SPOOL_LOG__LEVEL", "info"), format="json"))
    structlog.contextvars.bind_contextvars(process="copier")
    serve(sys.stdin.buffer, protocol_out)
    with contextlib.suppress(BrokenPipeError):  # what is still buffered, for a parent gone
        protocol_out.close()
