"""Every reason code Spool emits or acts on is in ``common.reasons``, and nothing else is.

The source of ``common/`` and ``daemons/`` is read (AST, nothing imported) for the places a code is
*emitted* (a ``Permanent`` / ``Retryable`` / ``InvalidMessage`` / ``SpoolError`` raised, a monitor
``Refused``, a CLI ``OperatorError``, a ``reason=`` given to a call or a ``"reason":`` to a record,
a ``reason`` variable set, a backend's ``*_reason`` function's answer, a (class, code) row of a
table) or *acted on* (``err.reason == "..."``, ``err.reason in SOME_SET``). A code given as a
constant (``codec.UNDECODABLE``, ``SOURCE_CORRUPT``, ``_OTHER[side]``, ``"a" if x else "b"``) is
resolved through the module's constants and imports. A site passing on a reason it was given
(``Retryable(exc.reason, ...)``) names no code and is skipped.

Fails naming ``file:line`` for a code not registered, for a code raised with a class its entry does
not list, and names registered codes that nothing uses (or a class nothing raises them with).
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from common import reasons

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ("common", "daemons")

# The call -> the class a code it is given gets.
CLASS_OF_CALL = {
    "Permanent": "permanent",
    "Retryable": "retryable",
    "NoAnswer": "retryable",  # common.storage.https_errors: a Retryable
    "InvalidMessage": "invalid",
    "SpoolError": None,  # the base: no class of its own
    "Refused": "refused",  # daemons.monitor.intake
    "OperatorError": "cli",  # common.cli.errors
}
EXCEPTION_CLASSES = {"Permanent": "permanent", "Retryable": "retryable", "InvalidMessage": "invalid"}
SNAKE = re.compile(r"[a-z][a-z0-9_]*")


@dataclass(frozen=True)
class Site:
    code: str
    cls: str | None  # the class the site gives the code; None when it only passes it on / tests it
    where: str  # file:line


class Module:
    """One source file: its string-valued constants and what its imported names stand for."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rel = path.relative_to(ROOT).as_posix()
        self.name = self.rel.removesuffix(".py").removesuffix("/__init__").replace("/", ".")
        self.tree = ast.parse(path.read_text(), self.rel)
        self.constants: dict[str, ast.expr] = {}
        self.imports: dict[str, tuple[str, str | None]] = {}  # name -> (module, attribute or None)
        for node in self.tree.body:
            if isinstance(node, ast.Assign | ast.AnnAssign) and node.value is not None:
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for target in targets:
                    if isinstance(target, ast.Name):
                        self.constants[target.id] = node.value
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for alias in node.names:
                    self.imports[alias.asname or alias.name] = (node.module, alias.name)
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    self.imports[alias.asname or alias.name.split(".")[0]] = (alias.name, None)


class Source:
    def __init__(self) -> None:
        self.modules = {
            m.name: m for root in SOURCES for p in sorted((ROOT / root).rglob("*.py")) for m in [Module(p)]
        }

    def codes(self, node: ast.expr | None, module: Module, depth: int = 0) -> list[str]:
        """The codes ``node`` may stand for (empty: not a code, or one only known at run time)."""
        if node is None or depth > 6:
            return []
        if isinstance(node, ast.Constant):
            return [node.value] if isinstance(node.value, str) else []
        if isinstance(node, ast.IfExp):
            return self.codes(node.body, module, depth + 1) + self.codes(node.orelse, module, depth + 1)
        if isinstance(node, ast.BoolOp):
            return [c for value in node.values for c in self.codes(value, module, depth + 1)]
        if isinstance(node, ast.Set | ast.Tuple | ast.List):
            return [c for e in node.elts for c in self.codes(e, module, depth + 1)]
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in ("frozenset", "set")
        ):
            return [c for a in node.args for c in self.codes(a, module, depth + 1)]
        if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name):  # _OTHER[side]
            table = self.constant(node.value.id, module)
            if table is not None and isinstance(table[0], ast.Dict):
                return [c for v in table[0].values for c in self.codes(v, table[1], depth + 1)]
            return []
        if isinstance(node, ast.Name):
            found = self.constant(node.id, module)
            return self.codes(found[0], found[1], depth + 1) if found else []
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):  # codec.UNDECODABLE
            target = module.imports.get(node.value.id)
            if target is not None:
                other = self.modules.get(target[0] if target[1] is None else f"{target[0]}.{target[1]}")
                if other is not None and node.attr in other.constants:
                    return self.codes(other.constants[node.attr], other, depth + 1)
        return []

    def constant(self, name: str, module: Module) -> tuple[ast.expr, Module] | None:
        if name in module.constants:
            return module.constants[name], module
        target = module.imports.get(name)
        if target is not None and target[1] is not None:
            other = self.modules.get(target[0])
            if other is not None and target[1] in other.constants:
                return other.constants[target[1]], other
        return None

    def sites(self) -> Iterator[Site]:
        for module in self.modules.values():
            if module.name == "common.reasons":
                continue
            yield from self._sites(module)

    def _sites(self, module: Module) -> Iterator[Site]:
        def at(node: ast.AST) -> str:
            return f"{module.rel}:{getattr(node, 'lineno', 0)}"

        for node in ast.walk(module.tree):
            if isinstance(node, ast.ClassDef) and any(_name(b) in EXCEPTION_CLASSES for b in node.bases):
                cls = next(EXCEPTION_CLASSES[n] for b in node.bases if (n := _name(b)) in EXCEPTION_CLASSES)
                for call in ast.walk(node):  # super().__init__("tape_checksum_mismatch", ...)
                    if isinstance(call, ast.Call) and _name(call.func) == "__init__" and call.args:
                        for code in self.codes(call.args[0], module):
                            yield Site(code, cls, at(call))
            if isinstance(node, ast.Call):
                name = _name(node.func)
                if name in CLASS_OF_CALL:
                    first = node.args[0] if node.args else _keyword(node, "reason")
                    for code in self.codes(first, module):
                        yield Site(code, CLASS_OF_CALL[name], at(node))
                elif (value := _keyword(node, "reason")) is not None:  # record_failure, log lines
                    for code in self.codes(value, module):
                        yield Site(code, None, at(node))
            elif isinstance(node, ast.Dict):  # {"reason": ...}: a history record, a reply
                for key, value in zip(node.keys, node.values, strict=True):
                    if isinstance(key, ast.Constant) and key.value == "reason":
                        for code in self.codes(value, module):
                            yield Site(code, None, at(node))
            elif isinstance(node, ast.Assign):  # reason = "delivery_limit"; reason, error = (...)
                for target in node.targets:
                    yield from (
                        Site(c, None, at(node)) for c in self._assigned_reason(target, node.value, module)
                    )
            elif isinstance(node, ast.FunctionDef) and node.name.endswith("reason"):  # xrootd's _reason
                for ret in ast.walk(node):
                    if isinstance(ret, ast.Return):
                        for code in self.codes(ret.value, module):
                            yield Site(code, None, at(ret))
            elif isinstance(node, ast.Tuple):  # a table row (..., Retryable, "auth_failed")
                for cls_node, code_node in zip(node.elts, node.elts[1:], strict=False):
                    if _name(cls_node) in EXCEPTION_CLASSES:
                        for code in self.codes(code_node, module):
                            yield Site(code, EXCEPTION_CLASSES[_name(cls_node)], at(node))
            elif isinstance(node, ast.Compare) and _is_reason(node.left):  # err.reason in SOURCE_BAD
                for comparator in node.comparators:
                    for code in self.codes(comparator, module):
                        yield Site(code, None, at(node))

    def _assigned_reason(self, target: ast.expr, value: ast.expr, module: Module) -> list[str]:
        if isinstance(target, ast.Name) and target.id == "reason":
            return self.codes(value, module)
        if isinstance(target, ast.Tuple):
            position = next((i for i, e in enumerate(target.elts) if _name(e) == "reason"), None)
            if position is None:
                return []
            branches = [value.body, value.orelse] if isinstance(value, ast.IfExp) else [value]
            return [
                c
                for b in branches
                if isinstance(b, ast.Tuple) and len(b.elts) == len(target.elts)
                for c in self.codes(b.elts[position], module)
            ]
        return []


def _name(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return None


def _keyword(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_reason(node: ast.expr) -> bool:
    return _name(node) == "reason"


@pytest.fixture(scope="module")
def sites() -> list[Site]:
    return list(Source().sites())


def test_the_walk_finds_the_sites(sites: list[Site]) -> None:
    """A walker that found nothing would pass everything: it must see the known sites."""
    assert len(sites) > 150
    where = {s.where.split(":")[0] for s in sites}
    for path in (
        "common/codec.py",  # InvalidMessage(UNDECODABLE, ...)
        "common/bus/admission.py",  # Permanent("not_permitted", ...)
        "daemons/monitor/intake.py",  # Refused(UNTRUSTED_SENDER, ...)
        "common/cli/errors.py",  # OperatorError("queue_missing", ...)
        "common/storage/https_errors.py",  # the (statuses, side, Retryable, "auth_failed") table
        "common/storage/xrootd_errors.py",  # _reason's answers
        "common/bus/dead.py",  # reason = "delivery_limit"
        "common/tape/library.py",  # TapeChecksumMismatch's super().__init__
    ):
        assert path in where, path
    found = {s.code for s in sites}
    assert {"undecodable", "not_permitted", "untrusted_sender", "queue_missing", "delivery_limit"} <= found
    assert {"tape_checksum_mismatch", "no_copy", "unexpected_error"} <= found


def test_every_code_is_registered(sites: list[Site]) -> None:
    unknown = sorted(f"{s.where}: {s.code!r}" for s in sites if s.code not in reasons.REASONS)
    assert not unknown, "reason codes missing from common/reasons.py:\n" + "\n".join(unknown)


def test_every_code_is_raised_with_a_registered_class(sites: list[Site]) -> None:
    wrong = sorted(
        f"{s.where}: {s.code!r} as {s.cls}, registered {sorted(reasons.REASONS[s.code].classes)}"
        for s in sites
        if s.cls is not None and s.code in reasons.REASONS and s.cls not in reasons.REASONS[s.code].classes
    )
    assert not wrong, "\n".join(wrong)


def test_no_registered_code_or_class_is_dead(sites: list[Site]) -> None:
    used = {s.code for s in sites}
    dead = sorted(code for code in reasons.REASONS if code not in used)
    assert not dead, f"registered but used nowhere in {SOURCES}: {dead}"
    given = {(s.code, s.cls) for s in sites}
    # Only the classes a site states can be checked: ``dead_letter`` and ``outcome`` codes are set,
    # not raised.
    stated = set(CLASS_OF_CALL.values()) - {None}
    unraised = sorted(
        f"{r.code} as {cls}"
        for r in reasons.REASONS.values()
        for cls in r.classes & stated
        if (r.code, cls) not in given
    )
    assert not unraised, f"registered with a class no site gives them: {unraised}"


def test_entries_are_well_formed() -> None:
    assert list(reasons.REASONS) == sorted(reasons.REASONS)  # the docs' table is looked up by code
    for code, entry in reasons.REASONS.items():
        assert entry.code == code
        assert SNAKE.fullmatch(code) and len(code) <= 64, code  # common.limits.MAX_REASON
        assert entry.classes and entry.classes <= set(reasons.CLASSES), code
        assert entry.meaning and "\n" not in entry.meaning and "|" not in entry.meaning, code


def test_storage_sides_come_from_the_registry() -> None:
    from common.storage import reasons as storage

    assert reasons.codes_blaming("source") == storage.SOURCE_REASONS
    assert reasons.codes_blaming("destination") == storage.DESTINATION_REASONS
    assert reasons.codes_blaming("request") == storage.REQUEST_REASONS
    # The sets as they were written out before the registry owned them: the same codes.
    assert {"source_missing", "source_corrupt", "source_io_error"} == storage.SOURCE_REASONS
    assert {
        "destination_not_writable",
        "disk_full",
        "storage_io_error",
        "checksum_mismatch",
    } == storage.DESTINATION_REASONS
    assert {"invalid_checksum", "invalid_size", "path_outside_area"} == storage.REQUEST_REASONS
    named = [storage.SOURCE_MISSING, storage.SOURCE_CORRUPT, storage.SOURCE_IO_ERROR]
    assert set(named) == storage.SOURCE_REASONS
    named = [
        storage.DESTINATION_NOT_WRITABLE,
        storage.DISK_FULL,
        storage.STORAGE_IO_ERROR,
        storage.CHECKSUM_MISMATCH,
    ]
    assert set(named) == storage.DESTINATION_REASONS


def _docs_section() -> str:
    text = (ROOT / "docs" / "event-contract.md").read_text()
    begin, end = "<!-- reasons:begin -->\n", "<!-- reasons:end -->"
    assert text.count(begin) == 1 and text.count(end) == 1
    return text[text.index(begin) + len(begin) : text.index(end)]


def test_the_docs_table_is_the_generated_one() -> None:
    assert _docs_section() == reasons.markdown(), (
        "docs/event-contract.md's reason table differs from the registry: "
        "replace it with `python -m common.reasons --markdown`"
    )


def test_the_command_prints_the_table() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "common.reasons", "--markdown"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out == reasons.markdown()
    assert "| `undecodable` |" in out
