"""``python -m spool`` is the ``spool`` command (used where the console script is not on PATH)."""

from spool import main

main()
