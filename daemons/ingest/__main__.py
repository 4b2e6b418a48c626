"""``python -m daemons.ingest`` is ``spool run ingest``."""

from common.cli import main

if __name__ == "__main__":
    main(["run", "ingest"])
