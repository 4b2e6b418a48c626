"""``python -m daemons.recall`` is ``spool run recall``."""

from common.cli import main

if __name__ == "__main__":
    main(["run", "recall"])
