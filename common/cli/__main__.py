"""``python -m common.cli``: the operator's commands without the daemons (``spool run`` refuses).
The whole ``spool`` command is ``python -m daemons``."""

from common.cli import main

main()
