"""How long a tape drive takes, in simulated seconds.

The scheduling questions Spool cares about (batch before mounting? read in fseq order? keep a tape
mounted?) are decided by four costs that dwarf everything else on tape: loading a cartridge,
unloading it, winding to a position, and streaming. The model keeps exactly those, with defaults
from LTO-9 data sheets, so a benchmark run against the simulator ranks strategies the way a real
library would. It ignores what does not change a ranking: robot travel inside the library, the
serpentine track layout (locate time is taken as linear in the byte distance).

Writing many files adds three costs of how a host feeds the drive (what makes a tape server flush
every N files rather than every file): each file's header and buffered tape mark
(``file_overhead_seconds``), each *synchronous* tape mark, where the drive empties its buffer onto
the tape, stops and repositions before it can stream again (a back-hitch, ``sync_seconds``), and
the rate lost when the host delivers slower than the drive's slowest streaming speed
(``min_stream_rate``: below it the drive stops and back-hitches every time its buffer runs dry).

All functions are pure; the simulated library adds their results to each drive's clock and sleeps
``seconds * time_scale`` of real time.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

MB = 1_000_000  # tape vendors count in decimal units


class TapeTiming(BaseModel):
    """Durations and rates of one drive type (every drive of a simulated library is the same)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Load to ready: IBM's LTO-9 drive manual (TS2290) gives a nominal 16 s for an initialised
    # cartridge (the first load of a new LTO-9 cartridge calibrates for up to 2 hours; not modelled).
    mount_seconds: float = Field(default=16.0, ge=0)
    # Unload: the same manual gives a nominal 56 s for LTO-9 (it rewinds and re-tensions the tape
    # before ejecting, much longer than LTO-8's 24 s). Charged whatever the head position.
    unmount_seconds: float = Field(default=56.0, ge=0)
    # Mean locate between two random positions of a full cartridge. The LTO-9 manual's "average
    # space record time from load point" is 65 s; 60 s is the round figure of the issue. For random
    # positions the mean distance is a third of the tape, so an end-to-end locate takes 3x this.
    locate_average_seconds: float = Field(default=60.0, ge=0)
    # Streaming rates in bytes per second. LTO-9 is rated 400 MB/s native (full height, 300 MB/s
    # half height); 360 MB/s is what a well-fed drive sustains on incompressible science data.
    write_rate: float = Field(default=360.0 * MB, gt=0)
    read_rate: float = Field(default=360.0 * MB, gt=0)
    # Per file written: its header labels and the buffered (immediate) tape mark after it. CTA
    # writes each file as header, data and trailer, each closed by a tape mark written without
    # waiting (the Linux st driver's MTWEOFI); the drive keeps streaming. No vendor manual gives a
    # figure: 10 ms is a typical order of magnitude (a few short blocks at streaming speed and the
    # command round trips), an assumption of this model.
    file_overhead_seconds: float = Field(default=0.01, ge=0)
    # A synchronous tape mark (WRITE FILEMARKS without the immediate bit): the drive writes out its
    # buffer, stops, and must back-hitch (stop, rewind a little, restart) before streaming again.
    # Back-hitches of LTO drives are typically quoted at 1-3 s; no vendor manual we could check
    # states one figure, so 2 s is the typical middle of that range, not a data-sheet value.
    sync_seconds: float = Field(default=2.0, ge=0)
    # Slowest speed the drive can stream at (speed matching). IBM's LTO documentation (TS4300
    # "Speed matching" table) lists 12 native rates for a full-height LTO-9 drive on LTO-9 media,
    # 408 down to 177 MB/s; fed slower than 177 MB/s the drive stops and back-hitches each time its
    # buffer runs dry (shoe-shining).
    min_stream_rate: float = Field(default=177.0 * MB, gt=0)
    # The drive's data buffer: how much it writes between two back-hitches when fed too slowly.
    # Typical: 1 GB is the buffer LTO-9 full-height drive data sheets (IBM, HPE) list; quoted
    # from memory of those sheets, not re-checked for this model.
    buffer_bytes: int = Field(default=1_000 * MB, gt=0)
    # How fast the host delivers data to the drive (disk or network); None: at least the drive's
    # ``write_rate`` (the drive is the bottleneck). Benchmarks set it to model a slow source.
    feed_rate: float | None = Field(default=None, gt=0)

    def locate_seconds(self, from_byte: int, to_byte: int, capacity: int) -> float:
        """Winding from ``from_byte`` to ``to_byte`` on a cartridge of ``capacity`` bytes.

        Proportional to the distance along the tape, scaled so that the mean over uniformly random
        start and target positions is ``locate_average_seconds``. Zero when already there, which is
        why reading consecutive files in fseq order costs no locate at all.
        """
        if capacity <= 0:
            return 0.0
        distance = abs(to_byte - from_byte)
        return 3.0 * self.locate_average_seconds * distance / capacity

    def stream_rate(self, feed_rate: float | None = None) -> float:
        """The rate the drive actually writes at when the host delivers ``feed_rate`` bytes/s.

        At or above ``write_rate`` the drive is the limit; between ``min_stream_rate`` and
        ``write_rate`` it slows down to the host (speed matching, no loss); below the minimum it
        cannot slow down further: it writes a buffer at ``min_stream_rate``, stops, back-hitches,
        and waits for the buffer to fill again, so each ``buffer_bytes`` costs ``sync_seconds`` on
        top of the time the host needs to deliver it.
        """
        if feed_rate is None or feed_rate >= self.write_rate:
            return self.write_rate
        if feed_rate >= min(self.min_stream_rate, self.write_rate):
            return feed_rate
        feed = feed_rate
        per_buffer = self.buffer_bytes / feed + self.sync_seconds
        return self.buffer_bytes / per_buffer

    def write_seconds(self, size: int) -> float:
        """Streaming ``size`` bytes, fed at ``feed_rate`` (the drive's own rate when unset)."""
        return size / self.stream_rate(self.feed_rate)

    def file_seconds(self, size: int) -> float:
        """Writing one file with a buffered tape mark: its streaming time and its overhead."""
        return self.write_seconds(size) + self.file_overhead_seconds

    def flush_seconds(self) -> float:
        """One synchronous tape mark: everything buffered is on the tape, then a back-hitch."""
        return self.sync_seconds

    def batch_write_seconds(self, sizes: list[int], flush_every: int) -> float:
        """Writing files of ``sizes`` with a synchronous tape mark every ``flush_every`` files
        and after the last one: what grouping the flushes saves (``flush_every=1``: per file)."""
        if not sizes:
            return 0.0
        flushes = -(-len(sizes) // max(1, flush_every))
        return sum(self.file_seconds(s) for s in sizes) + flushes * self.flush_seconds()

    def read_seconds(self, size: int) -> float:
        return size / self.read_rate
