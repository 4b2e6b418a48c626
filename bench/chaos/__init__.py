"""The chaos run: Spool's daemons, each its own process, through SIGKILLs, SIGTERMs and broker
outages on a private RabbitMQ node, then every invariant checked at its source (docs/chaos.md).

``python -m bench.chaos`` runs it from the command line (``make chaos`` the long version);
``tests/test_chaos.py`` runs the short version through ``run_chaos``.
"""
