"""The test suite's own habits: a test module imports helpers from the ``*_fixtures`` modules or
``conftest``, never from another test module (importing one runs its module body again under a
second name and ties two test files together)."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def imported_test_modules(source: str) -> list[str]:
    """Every test module (``test_*``) that ``source`` imports, however it is spelled."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            names = [base] if base else []
            names += [f"{base}.{alias.name}" if base else alias.name for alias in node.names]
        else:
            continue
        found += [n for n in names if any(part.startswith("test_") for part in n.split("."))]
    return found


def test_the_check_sees_every_spelling_of_importing_a_test_module() -> None:
    spelled = imported_test_modules("from tests.test_cli import spool")
    assert spelled == ["tests.test_cli", "tests.test_cli.spool"]
    assert imported_test_modules("import tests.test_cli") == ["tests.test_cli"]
    assert imported_test_modules("from . import test_cli") == ["test_cli"]
    assert imported_test_modules("from .test_cli import spool") == ["test_cli", "test_cli.spool"]
    assert imported_test_modules("from tests.cli_fixtures import spool\nimport pytest") == []


def test_no_test_module_imports_another() -> None:
    offenders = {
        path.name: names
        for path in sorted(TESTS.glob("test_*.py"))
        if (names := imported_test_modules(path.read_text()))
    }
    assert offenders == {}, "move the shared helpers to a tests/*_fixtures.py module or conftest.py"
