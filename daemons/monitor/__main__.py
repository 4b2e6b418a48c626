"""``python -m daemons.monitor`` is ``spool run monitor``."""

from common.cli import main

if __name__ == "__main__":
    main(["run", "monitor"])
