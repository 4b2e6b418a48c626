"""``python -m daemons.tape`` is ``spool run tape``."""

from spool import main

if __name__ == "__main__":
    main(["run", "tape"])
