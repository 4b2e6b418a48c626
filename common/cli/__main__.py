"""``python -m common.cli`` is the ``spool`` command (used where the console script is not on PATH)."""

from common.cli import main

main()
