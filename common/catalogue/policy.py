"""Replication policy: which files a rule selects, which endpoints it names, where copies go.

Pure decisions (no I/O), shared by ingest (new files), the replicator (a rule added to existing
files) and the CLI (validating a rule before it is stored).

- A rule selects files by a dataset-name pattern (regular expression, full match) and / or
  metadata filters in ``spool find`` syntax (all must hold).
- Its ``endpoints`` is an endpoint name or an attribute expression: ``site=PIC&kind=disk``
  (``&`` = and, ``|`` = or between and-groups, ``!=`` negates one term). Every endpoint has the
  attributes of its configuration plus ``name`` and ``kind``.
- Placement of ``copies`` copies among the endpoints a rule names is deterministic: the most
  constrained rules are placed first, and endpoints that already hold (or are already chosen
  for) the file come first — so overlapping rules share copies
  instead of making more — then an order given by a hash of (file, endpoint), which spreads files
  evenly across equivalent endpoints and gives the same answer when a redelivered event is
  evaluated again.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from common.catalogue.filters import MetaFilter, as_number, parse_filter
from common.messages import MetaValue
from common.patterns import NamePattern, PatternError, compile_pattern

# Linear by construction (adjacent parts never match the same character): the value is stripped
# in code, not by a trailing ``\s*`` after a lazy group, which backtracked quadratically (100,000
# characters: 40 s with the GIL held).
_TERM_RE = re.compile(r"\s*([A-Za-z_][\w.-]*)\s*(!=|=)([^&|=!]*)")
_NAME_RE = re.compile(r"\s*([\w.-]+)\s*")


class PolicyError(ValueError):
    """A rule that cannot be used: bad pattern, filter, or endpoint expression (the text says why)."""


@dataclass(frozen=True)
class EndpointExpression:
    """``site=PIC&kind=disk|name=CNAF``: a disjunction of conjunctions of (key, negated, value)."""

    text: str
    groups: tuple[tuple[tuple[str, bool, str], ...], ...]

    @classmethod
    def parse(cls, text: str) -> EndpointExpression:
        if not text.strip():
            raise PolicyError("the endpoint expression is empty")
        if "=" not in text:
            m = _NAME_RE.fullmatch(text)
            if not m:
                raise PolicyError(f"endpoint expression {text!r}: expected a name or key=value terms")
            return cls(text, ((("name", False, m.group(1)),),))
        groups = []
        for alternative in text.split("|"):
            terms = []
            for term in alternative.split("&"):
                m = _TERM_RE.fullmatch(term)
                if not m or not m.group(3).strip():
                    raise PolicyError(f"endpoint expression {text!r}: cannot read the term {term.strip()!r}")
                terms.append((m.group(1), m.group(2) == "!=", m.group(3).strip()))
            groups.append(tuple(terms))
        return cls(text, tuple(groups))

    def matches(self, attributes: Mapping[str, str]) -> bool:
        return any(
            all((attributes.get(key) == value) != negated for key, negated, value in group)
            for group in self.groups
        )

    def select(self, endpoints: Mapping[str, Mapping[str, str]]) -> list[str]:
        """Names of the endpoints matching, in configuration order."""
        return [name for name, attrs in endpoints.items() if self.matches(attrs)]


def endpoint_attributes(name: str, kind: str, attributes: Mapping[str, Any]) -> dict[str, str]:
    return {**{k: str(v) for k, v in attributes.items()}, "name": name, "kind": kind}


def filter_matches(f: MetaFilter, metadata: Mapping[str, MetaValue]) -> bool:
    """Evaluate one metadata filter in Python with the catalogue's semantics (see ``filters``):
    numbers (and strings reading as numbers) compare numerically, other values as strings, and a
    file lacking the key matches nothing."""
    if f.key not in metadata:
        return False
    value = metadata[f.key]
    if value is None:
        return False
    have: float | str
    if isinstance(value, bool):
        have = "true" if value else "false"
    elif isinstance(value, int | float):
        have = float(value)
    else:
        num = as_number(value)
        have = value if num is None else float(num)

    def compare(want: object) -> int | None:
        w: float | str
        if isinstance(want, bool):
            w = "true" if want else "false"
        elif isinstance(want, int | float):
            w = float(want)
        else:
            w = str(want)
        if isinstance(have, float) != isinstance(w, float):
            return None  # a number and a string never compare (as in SQL on separate columns)
        return (have > w) - (have < w)  # type: ignore[operator]

    match f.op:
        case "in":
            return any(compare(v) == 0 for v in f.values)
        case "not in":
            return all(compare(v) not in (0, None) for v in f.values)
    c = compare(f.values[0])
    if c is None:
        return False
    return {"=": c == 0, "!=": c != 0, "<": c < 0, "<=": c <= 0, ">": c > 0, ">=": c >= 0}[f.op]


@dataclass(frozen=True)
class Rule:
    id: str
    endpoints: str
    copies: int = 1
    datasets: str | None = None
    metadata: tuple[str, ...] = ()
    lifetime: float | None = None
    priority: int = 3
    origin: str = "cli"
    state: str = "active"
    _pattern: NamePattern | None = field(default=None, init=False, repr=False, compare=False)
    _filters: tuple[MetaFilter, ...] = field(default=(), init=False, repr=False, compare=False)
    _expression: EndpointExpression | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.id or len(self.id) > 64:
            raise PolicyError("a rule id must be 1-64 characters")
        if self.datasets is None and not self.metadata:
            raise PolicyError(f"rule {self.id}: needs a dataset pattern and / or metadata filters")
        if self.copies < 1:
            raise PolicyError(f"rule {self.id}: copies must be at least 1")
        if not 0 <= self.priority <= 9:
            raise PolicyError(f"rule {self.id}: priority must be 0-9")
        if self.lifetime is not None and not (self.lifetime > 0 and math.isfinite(self.lifetime)):
            raise PolicyError(f"rule {self.id}: lifetime must be a positive number of seconds")
        try:  # RE2, linear time: an operator's pattern cannot stall a daemon (common.patterns)
            pattern = compile_pattern(self.datasets) if self.datasets is not None else None
        except PatternError as exc:
            raise PolicyError(f"rule {self.id}: dataset {exc}") from None
        try:
            filters = tuple(parse_filter(t) for t in self.metadata)
        except ValueError as exc:
            raise PolicyError(f"rule {self.id}: {exc}") from None
        object.__setattr__(self, "_pattern", pattern)
        object.__setattr__(self, "_filters", filters)
        object.__setattr__(self, "_expression", EndpointExpression.parse(self.endpoints))

    @property
    def filters(self) -> tuple[MetaFilter, ...]:
        return self._filters

    @property
    def expression(self) -> EndpointExpression:
        assert self._expression is not None
        return self._expression

    def dataset_matches(self, dataset: str) -> bool:
        return self._pattern is None or self._pattern.fullmatch(dataset)

    def selects(self, dataset: str, metadata: Mapping[str, MetaValue]) -> bool:
        return self.dataset_matches(dataset) and all(filter_matches(f, metadata) for f in self._filters)

    def describe(self) -> dict[str, Any]:
        return {
            "id": self.id, "datasets": self.datasets, "metadata": list(self.metadata),
            "endpoints": self.endpoints, "copies": self.copies, "lifetime": self.lifetime,
            "priority": self.priority, "origin": self.origin, "state": self.state,
        }  # fmt: skip


def check_rule(rule: Rule, endpoints: Mapping[str, Mapping[str, str]]) -> list[str]:
    """The endpoints ``rule`` names; ``PolicyError`` if it names none, or fewer than its copies.

    Used when a rule is added: a rule naming an unknown endpoint is refused with a clear error
    instead of silently never placing anything.
    """
    chosen = rule.expression.select(endpoints)
    if not chosen:
        known = ", ".join(endpoints) or "none"
        raise PolicyError(
            f"rule {rule.id}: endpoint expression {rule.endpoints!r} matches no endpoint (known: {known})"
        )
    if len(chosen) < rule.copies:
        raise PolicyError(
            f"rule {rule.id}: asks for {rule.copies} copies but {rule.endpoints!r} matches only "
            f"{len(chosen)} endpoint(s): {', '.join(chosen)}"
        )
    return chosen


def _spread_key(file_name: str, endpoint: str) -> bytes:
    return hashlib.blake2b(f"{file_name}\0{endpoint}".encode(), digest_size=8).digest()


def place(rule: Rule, file_name: str, candidates: Sequence[str], have: Collection[str]) -> list[str]:
    """The endpoints (at most ``rule.copies``) that hold ``file_name``'s copies for ``rule``.

    ``candidates``: endpoints the rule names; ``have``: endpoints that already hold a copy of the
    file or are already chosen for it by another rule. Those are reused first.
    """
    if len(candidates) < 2:
        return list(candidates)  # nothing to rank (copies >= 1)
    ranked = sorted(candidates, key=lambda ep: (ep not in have, _spread_key(file_name, ep)))
    return ranked[: rule.copies]


@dataclass(frozen=True)
class Placement:
    rule_id: str
    storage: str
    expires_in: float | None  # the rule's lifetime
    priority: int


def rank_rules(
    rules: Iterable[Rule], endpoints: Mapping[str, Mapping[str, str]]
) -> list[tuple[Rule, list[str]]]:
    """Each rule with the endpoints it names, in placement order: the most constrained rules
    (fewest endpoints to choose from) first, so that broader overlapping rules then find a copy
    they can share: "one copy offsite" and "one copy at PIC" make one copy at PIC, not one at PIC
    and one elsewhere.

    None of it depends on the file: a caller placing many files ranks once (``plan_ranked``).
    """
    pairs = [(rule, rule.expression.select(endpoints)) for rule in rules]
    return sorted(pairs, key=lambda rc: (len(rc[1]), -rc[0].priority, rc[0].id))


def plan_ranked(
    ranked: Sequence[tuple[Rule, Sequence[str]]],
    *,
    file_name: str,
    dataset: str,
    metadata: Mapping[str, MetaValue],
    have: Collection[str],
) -> list[Placement]:
    """``plan`` with the rules ranked already (``rank_rules``)."""
    chosen: set[str] = set(have)
    out: list[Placement] = []
    for rule, candidates in ranked:
        if not rule.selects(dataset, metadata):
            continue
        for storage in place(rule, file_name, candidates, chosen):
            chosen.add(storage)
            out.append(Placement(rule.id, storage, rule.lifetime, rule.priority))
    return out


def plan(
    rules: Iterable[Rule],
    endpoints: Mapping[str, Mapping[str, str]],
    *,
    file_name: str,
    dataset: str,
    metadata: Mapping[str, MetaValue],
    have: Collection[str],
) -> list[Placement]:
    """Every (rule, endpoint) lock the file needs (rules placed in ``rank_rules`` order)."""
    ranked = rank_rules(rules, endpoints)
    return plan_ranked(ranked, file_name=file_name, dataset=dataset, metadata=metadata, have=have)
