"""The ``spool`` program: the operator's commands (``common.cli``) and the daemons ``spool run``
starts (``daemons.registry``), put together here because ``common`` never imports ``daemons``.

The console script ``spool`` and ``python -m daemons`` both run ``main``.
"""

from __future__ import annotations

from collections.abc import Sequence

from common import cli
from daemons import registry


def main(argv: Sequence[str] | None = None) -> None:
    cli.main(argv, daemons=registry)
