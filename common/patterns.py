"""Operator-supplied regular expressions, run on a linear-time engine (RE2).

Dataset naming patterns (``[datasets] patterns``) and rule dataset filters (``spool rule add
--datasets``, ``[rules.*] datasets``) are written by operators and matched against names that
come off the bus. Python's ``re`` backtracks: ``(a+)+$`` against a 30-character name held the GIL
for a minute and froze every daemon of the process. RE2 matches in time linear in the name
whatever the pattern, so a careless pattern cannot stall a daemon.

Decisions:

- A pattern RE2 cannot compile (backreferences ``\\1``, lookaround ``(?=``, ``(?<!``, possessive
  quantifiers, repetition counts above 1000) is refused when it is given - at config load or by
  ``spool rule add`` - with one line naming the pattern and RE2's reason. It is never silently run
  on Python's engine instead.
- A pattern is at most ``MAX_PATTERN_LENGTH`` characters and its compiled program at most
  ``MAX_PROGRAM_BYTES``: a pattern too large is refused the same way.
- A name longer than ``MAX_NAME_LENGTH`` characters matches no pattern (dataset names on the bus
  are at most 255 characters; rules are matched against catalogue dataset names, which come from
  there).
- RE2's ``\\d``, ``\\w`` and ``\\s`` are ASCII-only (Python's match Unicode digits and letters
  too); dataset names are ASCII in practice, and ASCII is the stricter reading.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import re2

MAX_PATTERN_LENGTH = 1024
MAX_NAME_LENGTH = 255
MAX_PROGRAM_BYTES = 8 << 20  # RE2's own default; stated so a change is deliberate


# Names whose verdict a pattern remembers (each at most MAX_NAME_LENGTH characters).
MAX_CACHED_VERDICTS = 4096


class PatternError(ValueError):
    """A pattern refused: not valid for RE2, or too large. The message names the pattern."""


def _options() -> Any:
    options = re2.Options()
    options.log_errors = False  # RE2 would print its own copy of the error to stderr
    options.max_mem = MAX_PROGRAM_BYTES
    return options


def _reason(exc: BaseException) -> str:
    detail = exc.args[0] if exc.args else exc
    if isinstance(detail, bytes):
        detail = detail.decode("utf-8", "replace")
    return str(detail)


@dataclass(frozen=True)
class NamePattern:
    """A compiled operator pattern; ``fullmatch(name)`` is True when the whole name matches."""

    text: str
    _compiled: Any = field(repr=False, compare=False)
    # Verdicts by name: a pattern's answer for a name never changes, a night has few dataset
    # names, and one match through the RE2 wrapper cost ~100 us (a tenth of ingest's CPU per
    # file, docs/benchmarks.md). Bounded: cleared when full, so a flood of names costs a match each.
    _verdicts: dict[str, bool] = field(default_factory=dict, repr=False, compare=False)

    def fullmatch(self, name: str) -> bool:
        verdict = self._verdicts.get(name)
        if verdict is None:
            verdict = len(name) <= MAX_NAME_LENGTH and self._compiled.fullmatch(name) is not None
            if len(self._verdicts) >= MAX_CACHED_VERDICTS:
                self._verdicts.clear()
            self._verdicts[name] = verdict
        return verdict


def compile_pattern(text: str) -> NamePattern:
    """Compile an operator pattern on RE2; ``PatternError`` (one line, naming it) if refused."""
    if not isinstance(text, str):
        raise PatternError(f"pattern {text!r} is not a string")
    if len(text) > MAX_PATTERN_LENGTH:
        raise PatternError(
            f"pattern {text[:40]!r}... is {len(text)} characters (at most {MAX_PATTERN_LENGTH})"
        )
    try:
        compiled = re2.compile(text, _options())
    except Exception as exc:  # re2.error, and TypeError/ValueError on odd input (NUL bytes)
        raise PatternError(
            f"pattern {text!r} is refused: {_reason(exc)} (patterns run on RE2: no backreferences "
            "or lookaround)"
        ) from None
    return NamePattern(text, compiled)
