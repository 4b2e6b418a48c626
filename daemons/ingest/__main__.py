"""``python -m daemons.ingest`` is ``spool run ingest``."""

from spool import main

if __name__ == "__main__":
    main(["run", "ingest"])
