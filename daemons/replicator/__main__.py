"""``python -m daemons.replicator`` is ``spool run replicator``."""

from spool import main

if __name__ == "__main__":
    main(["run", "replicator"])
