"""``common`` is the layer under the daemons: nothing in it imports ``daemons`` (where the
``spool`` program, ``daemons.program``, puts the two together). The daemons ``spool run`` starts
reach the CLI as an argument of ``common.cli.main``."""

from __future__ import annotations

import ast
from pathlib import Path

COMMON = Path(__file__).resolve().parents[1] / "common"
ABOVE_COMMON = {"daemons"}


def imports_from_above(path: Path) -> list[str]:
    """``module:line`` of each import in ``path`` of a package above ``common``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found += [f"{name}:{node.lineno}" for name in names if name.split(".")[0] in ABOVE_COMMON]
    return found


def test_nothing_in_common_imports_the_daemons():
    offending = {
        str(path.relative_to(COMMON.parent)): found
        for path in sorted(COMMON.rglob("*.py"))
        if (found := imports_from_above(path))
    }
    assert offending == {}


def test_the_check_finds_an_import_of_the_daemons(tmp_path: Path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from daemons import registry\n\nimport daemons.program, json\n")
    assert sorted(imports_from_above(module)) == ["daemons.program:4", "daemons:2"]
