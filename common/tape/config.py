"""Configuration of a simulated tape library, self-contained so the main config can embed it.

Only ``root`` is required. The layout (drives, cartridges, capacity, labels) is used when the
directory is first initialised and is then owned by the library's own state: reopening with a
different layout changes nothing, just as editing a config file does not add tapes to a real
library. The timing model and ``time_scale`` are read at every open, so a test or a benchmark can
replay the same library faster or slower.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator

from common.tape.timing import TapeTiming

VID_LENGTH = 6  # LTO barcode labels carry a 6-character volume serial (plus the "L9" media suffix)


class SimulatedLibraryConfig(BaseModel):
    """A library kept in a directory: cartridges, drives and an LTO-9 timing model."""

    model_config = ConfigDict(extra="forbid")

    # Directory holding the library's state, journals and file data; created on first open.
    # Keep it on a local file system: processes sharing it coordinate with flock(2).
    root: Path
    # Drives in the library. Four is a small LTO-9 library (a rack-mounted autoloader holds 1-6);
    # a tape daemon and a recall daemon then compete for them as they do in production.
    drives: int = Field(default=4, ge=1, le=99)
    # Cartridges labelled for a pool at creation: pool name -> count. Archive sites pre-assign
    # tapes to pools (e.g. one per instrument or per copy) so copies never share a cartridge.
    pools: dict[str, int] = Field(default_factory=dict)
    # Unassigned cartridges any pool takes when its own run out (``allocate_cartridge``).
    scratch_cartridges: int = Field(default=20, ge=0)
    # Native (uncompressed) capacity of an LTO-9 cartridge: 18 TB. Science data does not compress,
    # so the 45 TB "compressed" figure is never reached. Tests use a few kB to fill tapes quickly.
    capacity_bytes: int = Field(default=18_000_000_000_000, gt=0)
    # Labels are ``<prefix><number>`` padded to 6 characters: A00001, A00002, ...
    label_prefix: str = Field(default="A", pattern=r"^[A-Z][A-Z0-9]{0,3}$")
    # Durations and rates; defaults from LTO-9 drive manuals (see ``common.tape.timing``).
    timing: TapeTiming = Field(default_factory=TapeTiming)
    # Real seconds slept per simulated second: 1.0 behaves like the hardware, 0.001 turns a 16 s
    # mount into 16 ms for tests, 0 does not sleep at all (the simulated clocks still advance).
    time_scale: float = Field(default=1.0, ge=0)
    # fsync state, journals and data before a flush (or a write with ``flush=True``) returns, as a
    # real drive writes out its buffer at a synchronous tape mark: a fseq handed to the catalogue
    # must survive a power cut. Buffered writes are never synced on their own. False trades that
    # for more small-file operations per second (benchmarks of scheduling only).
    durable: bool = True

    @model_validator(mode="after")
    def _labels_fit(self) -> SimulatedLibraryConfig:
        if any(count < 0 for count in self.pools.values()) or any(not p for p in self.pools):
            raise ValueError("pools maps non-empty pool names to cartridge counts >= 0")
        room = 10 ** (VID_LENGTH - len(self.label_prefix)) - 1
        if self.cartridge_count > room:
            raise ValueError(
                f"{self.cartridge_count} cartridges do not fit {VID_LENGTH}-character labels "
                f"with prefix {self.label_prefix!r} (at most {room})"
            )
        return self

    @property
    def cartridge_count(self) -> int:
        return sum(self.pools.values()) + self.scratch_cartridges

    def label(self, number: int) -> str:
        """The VID of the ``number``-th cartridge (1-based)."""
        return f"{self.label_prefix}{number:0{VID_LENGTH - len(self.label_prefix)}d}"
