"""``spool recall ...``: bring files back from tape, follow a recall."""

from __future__ import annotations
