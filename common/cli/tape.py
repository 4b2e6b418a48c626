"""``spool tape list`` and ``spool drive list``: what the tape library holds and what its drives do."""

from __future__ import annotations
