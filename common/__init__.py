"""Spool's shared library: every daemon and the CLI stand on these modules."""

__version__ = "0.1.0"
