"""Tape libraries: the ``TapeLibrary`` protocol the daemons use, and the simulated backend.

``await open_library(config)`` gives the embedded default, a ``SimulatedLibrary`` kept in a
directory (see ``common.tape.simulated``). A real backend (LTFS, SCSI changer) implements the same
``TapeLibrary`` protocol and fills in the same records, so the daemons do not change.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from common.tape.config import SimulatedLibraryConfig
from common.tape.library import (
    Cartridge,
    CartridgeState,
    Drive,
    DriveStatus,
    DriveUsage,
    LibraryUsage,
    ReadResult,
    TapeChecksumMismatch,
    TapeFile,
    TapeLibrary,
    TapeMember,
)
from common.tape.timing import TapeTiming

if TYPE_CHECKING:
    from common.tape.simulated import SimulatedLibrary

__all__ = [
    "Cartridge",
    "CartridgeState",
    "Drive",
    "DriveStatus",
    "DriveUsage",
    "LibraryUsage",
    "ReadResult",
    "SimulatedLibrary",
    "SimulatedLibraryConfig",
    "TapeChecksumMismatch",
    "TapeFile",
    "TapeLibrary",
    "TapeMember",
    "TapeTiming",
    "open_library",
]


async def open_library(config: SimulatedLibraryConfig) -> SimulatedLibrary:
    """Create or reopen the simulated library described by ``config``."""
    from common.tape.simulated import SimulatedLibrary

    return await SimulatedLibrary.open(config)


def __getattr__(name: str) -> Any:
    # The backend is imported on first use: ``common.config`` embeds ``SimulatedLibraryConfig``,
    # and the backend imports the storage helpers, which import ``common.config``.
    if name == "SimulatedLibrary":
        from common.tape.simulated import SimulatedLibrary

        return SimulatedLibrary
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
