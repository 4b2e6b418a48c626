"""``python -m daemons.ingest`` is ``spool run ingest``."""

from daemons.program import main

if __name__ == "__main__":
    main(["run", "ingest"])
