"""``spool dataset ...``: every module that registers a command on the group, imported together
(``COMMAND_MODULES`` maps a command word to one module)."""

from __future__ import annotations

from common.cli import (
    dataset_lifecycle,  # noqa: F401  close, show, delete
    dataset_manifest,  # noqa: F401  manifest, verify, keygen
    dataset_names,  # noqa: F401  name
)
