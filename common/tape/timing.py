"""How long a tape drive takes, in simulated seconds.

The scheduling questions Spool cares about (batch before mounting? read in fseq order? keep a tape
mounted?) are decided by four costs that dwarf everything else on tape: loading a cartridge,
unloading it, winding to a position, and streaming. The model keeps exactly those, with defaults
from LTO-9 data sheets, so a benchmark run against the simulator ranks strategies the way a real
library would. It ignores what does not change a ranking: robot travel inside the library, the
serpentine track layout (locate time is taken as linear in the byte distance), drive buffering.

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

    def write_seconds(self, size: int) -> float:
        return size / self.write_rate

    def read_seconds(self, size: int) -> float:
        return size / self.read_rate
