"""The three-node RabbitMQ cluster of ``.ci/rabbitmq-cluster.sh`` for tests: started once per session
(``rabbit_cluster``), its nodes killed and started again by the tests that need it.

The cluster is started through ``.ci/services.sh rabbitmq-cluster``, exactly as a developer or CI
would; a cluster this session started is stopped (and its data deleted) when the session ends, one
that was already up is left up. Off CI a machine that cannot run it (no ``rabbitmq-server``) skips
the tests that need it and says why; on CI (``CI=true``) that is a failure.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / ".ci" / "rabbitmq-cluster.sh"
BASE_PORT = int(os.environ.get("SPOOL_RABBIT_CLUSTER_PORT", "5681"))
NODES = (1, 2, 3)


@dataclass(frozen=True)
class Cluster:
    """Node ``n`` (1..3) is ``spool-c<n>@localhost`` on ``127.0.0.1:<BASE_PORT + n - 1>``."""

    @property
    def urls(self) -> list[str]:
        return [self.url(n) for n in NODES]

    def url(self, n: int) -> str:
        return f"amqp://guest:guest@127.0.0.1:{BASE_PORT + n - 1}/"

    def node(self, n: int) -> str:
        return f"spool-c{n}@localhost"

    def number(self, node: str) -> int:
        return next(n for n in NODES if self.node(n) == node)

    def number_of_port(self, port: int) -> int:
        return port - BASE_PORT + 1

    def pid(self, n: int) -> int | None:
        """The pid of node ``n``'s Erlang VM, None when it is not running."""
        out = subprocess.run(["bash", str(SCRIPT), "pid", str(n)], capture_output=True, text=True)
        return int(out.stdout) if out.stdout.strip().isdigit() else None

    def kill(self, n: int) -> None:
        """SIGKILL node ``n``'s Erlang VM: the node dies at once, as on a power cut."""
        pid = self.pid(n)
        assert pid is not None, f"{self.node(n)} is not running"
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while self.pid(n) is not None:
            assert time.monotonic() < deadline, f"{self.node(n)} survived SIGKILL"
            time.sleep(0.1)

    def start(self) -> None:
        """Start whatever node is down and wait until the three run as one cluster again."""
        ensure_cluster()

    def api(self, path: str, *, via: int | None = None) -> Any:
        """GET the management API of node ``via`` (default: the first that answers)."""
        auth = base64.b64encode(b"guest:guest").decode()
        errors = []
        for n in (via,) if via else NODES:
            request = urllib.request.Request(
                f"http://127.0.0.1:{BASE_PORT + 10000 + n - 1}/api/{path}",
                headers={"Authorization": f"Basic {auth}"},
            )
            try:
                with urllib.request.urlopen(request, timeout=10) as response:
                    return json.load(response)
            except OSError as exc:
                errors.append(f"node {n}: {exc}")
        raise OSError("; ".join(errors))

    def running_nodes(self) -> set[str]:
        return {n["name"] for n in self.api("nodes") if n.get("running")}

    def queue(self, name: str) -> dict[str, Any]:
        """The management API's view of a queue of the default vhost (``members``, ``leader``...)."""
        result: dict[str, Any] = self.api(f"queues/%2F/{quote(name, safe='')}")
        return result

    def connection_nodes(self, connection_name_prefix: str) -> list[str]:
        """The nodes the connections whose name starts with the prefix are open on."""
        return [
            c["node"]
            for c in self.api("connections")
            if str((c.get("client_properties") or {}).get("connection_name", "")).startswith(
                connection_name_prefix
            )
        ]


def ensure_cluster() -> None:
    """``.ci/services.sh rabbitmq-cluster``; ``RuntimeError`` with its output when it fails."""
    done = subprocess.run(
        ["bash", str(REPO / ".ci" / "services.sh"), "rabbitmq-cluster"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"the RabbitMQ cluster did not start:\n{done.stdout}{done.stderr}")


def _cluster_up() -> bool:
    try:
        return len(Cluster().running_nodes()) == len(NODES)
    except (OSError, ValueError):
        return False


@pytest.fixture(scope="session")
def rabbit_cluster() -> Iterator[Cluster]:
    missing = (
        shutil.which("rabbitmq-server") is None and not Path("/usr/lib/rabbitmq/bin/rabbitmq-server").exists()
    )
    on_ci = os.environ.get("CI") == "true"
    if missing and not on_ci:
        pytest.skip("rabbitmq-server is not installed (apt-get install -y rabbitmq-server)")
    was_up = _cluster_up()
    try:
        ensure_cluster()
    except (RuntimeError, subprocess.TimeoutExpired, OSError) as exc:
        if on_ci:
            pytest.fail(f"the cluster tests must run on CI: {exc}")
        pytest.skip(str(exc))
    try:
        yield Cluster()
    finally:
        if not was_up:
            subprocess.run(
                ["bash", str(REPO / ".ci" / "services.sh"), "stop", "rabbitmq-cluster"],
                capture_output=True, timeout=300,
            )  # fmt: skip
