"""``python -m daemons.monitor`` is ``spool run monitor``."""

from daemons.program import main

if __name__ == "__main__":
    main(["run", "monitor"])
