"""``python -m daemons`` is the ``spool`` command (used where the console script is not on PATH)."""

from daemons.program import main

main()
