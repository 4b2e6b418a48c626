"""``python -m daemons.replicator`` is ``spool run replicator``."""

from daemons.program import main

if __name__ == "__main__":
    main(["run", "replicator"])
