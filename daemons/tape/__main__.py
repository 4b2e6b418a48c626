"""``python -m daemons.tape`` is ``spool run tape``."""

from daemons.program import main

if __name__ == "__main__":
    main(["run", "tape"])
