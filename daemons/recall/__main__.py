"""``python -m daemons.recall`` is ``spool run recall``."""

from daemons.program import main

if __name__ == "__main__":
    main(["run", "recall"])
