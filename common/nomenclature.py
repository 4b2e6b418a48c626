"""Dataset naming nomenclatures: patterns with named, typed fields.

``{telescope}.{date:%Y%m%d}.run{run:06d}.{level}`` names the parts of a dataset name. A name that
matches is parsed into its fields (stored as the dataset's metadata at ingest, searchable with
``spool find``), and ``spool dataset name --telescope lst1 ...`` builds a valid name from fields.

Decisions:

- The syntax is Python's format syntax, read with ``string.Formatter`` (``{{`` / ``}}`` are literal
  braces). Three field types, from the format spec:
  ``{f}`` a string of ``STRING_CLASS`` (ASCII letters, digits, ``_`` and ``-``: no ``.``, which
  separates fields in practice, so a name splits one way only), 1-``MAX_STRING`` characters;
  ``{f:d}`` / ``{f:06d}`` a non-negative integer (zero-padded to the width), at most 18 digits;
  ``{f:%Y%m%d}`` a date or time in ``strftime`` directives ``%Y %m %d %H %M %S %j``, stored as
  ISO 8601 text (``2026-11-23``, ``2026-11-23T02:13:00``) so that ranges compare as dates.
  Anything else (conversions ``!r``, nested fields, other specs, positional ``{}``, a field named
  twice) is refused when the configuration is loaded, with one line naming the pattern.
- Each pattern compiles to an RE2 program with named groups (linear time, like every operator
  pattern, ``common.patterns``). A match must also be canonical: the fields, formatted back, give
  the same name (``run0012345`` for ``{run:06d}`` is not the name of run 12345, ``20261131`` is no
  date), so one dataset has one name and parsing and building agree.
- Field values are metadata: a field name is a metadata key, a value obeys the catalogue's bounds.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Literal

from common.patterns import (
    MAX_CACHED_VERDICTS,
    MAX_NAME_LENGTH,
    MAX_PATTERN_LENGTH,
    PatternError,
    compile_pattern,
)

FieldKind = Literal["str", "int", "date"]
FieldValue = str | int

STRING_CLASS = "A-Za-z0-9_-"
MAX_STRING = 64
MAX_INT_DIGITS = 18  # below 2**63: every value fits the catalogue's 64-bit integers
MAX_FIELDS = 32
FIELD_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
_INT_SPEC = re.compile(r"(0?)([1-9][0-9]?)?d")
# strftime directives a date field may use, with the text each one spells.
_DATE_PARTS = {"Y": r"\d{4}", "m": r"\d{2}", "d": r"\d{2}", "H": r"\d{2}", "M": r"\d{2}", "S": r"\d{2}",
               "j": r"\d{3}"}  # fmt: skip
_TIME_PARTS = frozenset("HMS")


class FieldError(ValueError):
    """A field value refused when building a name; the message names the field."""


@dataclass(frozen=True, slots=True)
class NameField:
    name: str
    kind: FieldKind
    spec: str  # the format spec as written: "", "06d", "%Y%m%d"

    @property
    def has_time(self) -> bool:
        return self.kind == "date" and any(f"%{c}" in self.spec for c in _TIME_PARTS)

    def regex(self) -> str:
        if self.kind == "str":
            return f"[{STRING_CLASS}]{{1,{MAX_STRING}}}"
        if self.kind == "int":
            return rf"\d{{1,{MAX_INT_DIGITS}}}"
        out, i = [], 0
        while i < len(self.spec):
            ch = self.spec[i]
            if ch == "%":
                out.append(_DATE_PARTS[self.spec[i + 1]] if self.spec[i + 1] != "%" else "%")
                i += 2
            else:
                out.append(re.escape(ch))
                i += 1
        return "".join(out)

    def parse(self, text: str) -> FieldValue:
        """The value ``text`` spells (already matched by ``regex``); ``ValueError`` if none."""
        if self.kind == "str":
            return text
        if self.kind == "int":
            return int(text)
        moment = datetime.strptime(text, self.spec)
        return moment.isoformat() if self.has_time else moment.date().isoformat()

    def format(self, value: FieldValue) -> str:
        if self.kind == "str":
            return str(value)
        if self.kind == "int":
            return format(int(value), self.spec)
        moment = datetime.fromisoformat(str(value)) if self.has_time else date.fromisoformat(str(value))
        return moment.strftime(self.spec)

    def coerce(self, text: str) -> FieldValue:
        """A value given by an operator (``spool dataset name --run 12345``), checked; the stored form."""
        if self.kind == "str":
            if not re.fullmatch(f"[{STRING_CLASS}]{{1,{MAX_STRING}}}", text):
                raise FieldError(
                    f"{self.name}: {text[:80]!r} must be 1-{MAX_STRING} of the characters {STRING_CLASS}"
                )
            return text
        if self.kind == "int":
            if not text.isascii() or not text.isdigit() or len(text.lstrip("0") or "0") > MAX_INT_DIGITS:
                raise FieldError(f"{self.name}: {text[:80]!r} is not a whole number of at most 18 digits")
            return int(text)
        for reading in (self._iso, self._own):
            try:
                return reading(text)
            except ValueError:
                continue
        shown = "an ISO 8601 " + ("date and time" if self.has_time else "date")
        raise FieldError(f"{self.name}: {text[:80]!r} is neither {shown} nor in the form {self.spec}")

    def _iso(self, text: str) -> str:
        if self.has_time:
            return datetime.fromisoformat(text).replace(tzinfo=None).isoformat()
        return date.fromisoformat(text).isoformat()

    def _own(self, text: str) -> str:
        return str(self.parse(text))


def _field(name: str, spec: str, pattern: str) -> NameField:
    if not FIELD_NAME.fullmatch(name):
        raise PatternError(
            f"nomenclature {pattern!r}: field {name[:40]!r} must be a name (letters, digits, _; "
            "not starting with a digit)"
        )
    if spec == "":
        return NameField(name, "str", "")
    if _INT_SPEC.fullmatch(spec):
        return NameField(name, "int", spec)
    if spec.startswith("%"):
        i = 0
        while i < len(spec):
            if spec[i] == "%":
                directive = spec[i + 1 : i + 2]
                if directive != "%" and directive not in _DATE_PARTS:
                    raise PatternError(
                        f"nomenclature {pattern!r}: field {name!r}: %{directive} is not one of "
                        + " ".join(f"%{d}" for d in _DATE_PARTS)
                    )
                i += 2
            else:
                i += 1
        return NameField(name, "date", spec)
    raise PatternError(
        f"nomenclature {pattern!r}: field {name!r} has format {spec!r}; use none (a string), "
        "d or 0Nd (an integer) or strftime directives (a date: %Y%m%d)"
    )


@dataclass(frozen=True)
class Nomenclature:
    """One compiled nomenclature pattern."""

    text: str
    fields: tuple[NameField, ...]
    # (literal text, field or None) in order: how a name is built.
    parts: tuple[tuple[str, NameField | None], ...]
    _regex: object
    # Parses by name, as ``NamePattern``'s verdicts: ingest asks for every file of a dataset.
    _parsed: dict[str, dict[str, FieldValue] | None] = field(default_factory=dict, repr=False, compare=False)

    @property
    def field_names(self) -> list[str]:
        return [f.name for f in self.fields]

    def parse(self, name: str) -> dict[str, FieldValue] | None:
        """The fields of ``name``, or None when it is not a (canonical) name of this pattern."""
        if name in self._parsed:
            cached = self._parsed[name]
            return dict(cached) if cached is not None else None
        values = self._parse(name)
        if len(self._parsed) >= MAX_CACHED_VERDICTS:
            self._parsed.clear()
        self._parsed[name] = values
        return dict(values) if values is not None else None

    def _parse(self, name: str) -> dict[str, FieldValue] | None:
        if len(name) > MAX_NAME_LENGTH:
            return None
        m = self._regex._compiled.fullmatch(name)  # type: ignore[attr-defined]
        if m is None:
            return None
        try:
            values = {f.name: f.parse(m.group(f.name)) for f in self.fields}
        except ValueError:  # 20261131: digits in place, but no date
            return None
        return values if self.build(values) == name else None

    def build(self, values: dict[str, FieldValue]) -> str:
        return "".join(text + (f.format(values[f.name]) if f else "") for text, f in self.parts)

    def name_from(self, given: dict[str, str]) -> str:
        """A name from operator text values; ``FieldError`` naming what is missing, unknown or invalid."""
        missing = [f.name for f in self.fields if f.name not in given]
        if missing:
            raise FieldError(f"missing field(s) {', '.join(missing)} for {self.text}")
        unknown = sorted(set(given) - set(self.field_names))
        if unknown:
            raise FieldError(f"unknown field(s) {', '.join(unknown)} for {self.text}")
        values = {f.name: f.coerce(given[f.name]) for f in self.fields}
        name = self.build(values)
        if len(name) > MAX_NAME_LENGTH:
            raise FieldError(f"the name would be {len(name)} characters, at most {MAX_NAME_LENGTH}")
        if self.parse(name) != values:
            raise FieldError(f"{name!r} would not read back as these fields (a value holds a separator?)")
        return name


def compile_nomenclature(text: str) -> Nomenclature:
    """Compile a nomenclature pattern; ``PatternError`` (one line, naming it) when refused."""
    if not isinstance(text, str):
        raise PatternError(f"nomenclature {text!r} is not a string")
    if len(text) > MAX_PATTERN_LENGTH:
        raise PatternError(f"nomenclature {text[:40]!r}... is longer than {MAX_PATTERN_LENGTH} characters")
    try:
        pieces = list(string.Formatter().parse(text))
    except ValueError as exc:  # "Single '}' encountered", "expected '}' before end of string"
        raise PatternError(f"nomenclature {text!r} is refused: {exc}") from None
    parts: list[tuple[str, NameField | None]] = []
    fields: list[NameField] = []
    regex: list[str] = []
    for literal, name, spec, conversion in pieces:
        regex.append(re.escape(literal))
        if name is None:
            parts.append((literal, None))
            continue
        if conversion is not None:
            raise PatternError(
                f"nomenclature {text!r}: field {name!r}: conversions (!{conversion}) are not allowed"
            )
        if "{" in (spec or ""):
            raise PatternError(f"nomenclature {text!r}: field {name!r}: nested fields are not allowed")
        if name == "":
            raise PatternError(f"nomenclature {text!r}: every field needs a name ({{}} has none)")
        one = _field(name, spec or "", text)
        if one.name in (f.name for f in fields):
            raise PatternError(f"nomenclature {text!r}: field {name!r} appears twice")
        fields.append(one)
        parts.append((literal, one))
        regex.append(f"(?P<{one.name}>{one.regex()})")
    if not fields:
        raise PatternError(f"nomenclature {text!r} has no {{field}}: write it as a plain pattern instead")
    if len(fields) > MAX_FIELDS:
        raise PatternError(f"nomenclature {text!r} has {len(fields)} fields, at most {MAX_FIELDS}")
    compiled = compile_pattern("".join(regex))
    return Nomenclature(text, tuple(fields), tuple(parts), compiled)
