"""``python -m daemons.tape`` is ``spool run tape``."""

from common.cli import main

if __name__ == "__main__":
    main(["run", "tape"])
