"""One repository per domain: the only way daemons, the CLI and the benches reach the catalogue.

``catalogue.<domain>.<verb>(...)`` runs one transaction. The SQL lives beside each domain's
repository in ``common.catalogue.<domain>`` as plain functions of a ``Connection``; a repository
method names the function, whether it reads or writes, and whether a write is run again when it
loses a race with another node (see ``Catalogue.write``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from common.catalogue import Catalogue


class Repository:
    """A domain's typed entry points; holds the catalogue whose transactions it runs."""

    __slots__ = ("_catalogue",)

    def __init__(self, catalogue: Catalogue) -> None:
        self._catalogue = catalogue
