"""The ``spool`` command run as an operator runs it: a subprocess of this interpreter, from the
repository root, its output captured."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def spool(
    config: Path, *args: str, input_: str | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "daemons", "--config", str(config), *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        input=input_,
        env={**os.environ, **(env or {})},
        timeout=120,
    )
