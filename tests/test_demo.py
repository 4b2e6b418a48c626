"""``make demo`` end to end, smaller: the documented example config, every daemon in one process,
ingest, replication to a second site and to tape, eviction and recall of one dataset."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import AMQP_URL

pytestmark = [pytest.mark.integration, pytest.mark.slow]
REPO = Path(__file__).resolve().parent.parent


def demo_config(tmp_path: Path, tag: str) -> Path:
    """config/spool.toml with its own state directory, exchange, queues and a free monitor port."""
    text = (REPO / "config" / "spool.toml").read_text()
    text = re.sub(r"(?m)^state_dir = .*$", f'state_dir = "{tmp_path / "var"}"', text)
    text = re.sub(r'(?m)^url = "amqp://.*?"', f'url = "{AMQP_URL}"', text)
    text = re.sub(r'(?m)^exchange = "spool"', f'exchange = "spool-demo-{tag}"', text)
    text = re.sub(r'(?m)^queue_prefix = "spool"', f'queue_prefix = "demo{tag}"', text)
    text = re.sub(r"(?m)^http_port = \d+", "http_port = 0", text)
    path = tmp_path / "spool.toml"
    path.write_text(text)
    return path


def test_demo_accounts_for_every_file_copy_and_recall(tmp_path, tag):
    config = demo_config(tmp_path, tag)
    command = [sys.executable, "-m", "daemons", "--config", str(config), "demo"]
    done = subprocess.run(
        [*command, "--files", "60", "--datasets", "4"], capture_output=True, text=True, cwd=REPO, timeout=600
    )
    out = done.stdout
    assert done.returncode == 0, out[-3000:] + done.stderr[-3000:]
    assert "every file accounted for" in out
    assert (
        re.search(r"recalled from tape and\s+│\s+15 of 15 files", out.replace("\n│", " "))
        or "15 of 15" in out
    )
    assert "disk2 45, tape1 60" in out
