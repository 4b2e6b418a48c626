"""The broker of a chaos run. ``PrivateBroker``: a private RabbitMQ node for one run (the
machine's shared broker on 5672 serves other people, and a run stops its broker several times on
purpose). ``ClusterBroker``: the three-node cluster of ``.ci/rabbitmq-cluster.sh``, the run in a
vhost of its own, for the several-node run.

Everything the node writes (Mnesia, logs, config, pid file, Erlang cookie) lives in a directory
of its own; its AMQP and distribution ports are free ones picked at start, on the loopback
interface only. ``rabbitmqctl`` finds the node by its name (``spool-chaos-<id>@localhost``) and
authenticates with the cookie in the directory (``HOME`` points there for both the node and the
CLI). Measured on the 2-core development machine: the node boots in 6-7 s, ``stop_app`` takes
~1 s and ``start_app`` ~1.6 s, so an outage costs about 3 s more than the pause asked for.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import quote

# The Debian wrapper in /usr/sbin switches to the rabbitmq user when run as root, which drops
# HOME and with it the private cookie: call the scripts it wraps when they are there.
_LIB_BIN = Path("/usr/lib/rabbitmq/bin")


def _tool(name: str) -> str:
    if (_LIB_BIN / name).exists():
        return str(_LIB_BIN / name)
    found = shutil.which(name)
    if found is None:
        raise RuntimeError(f"{name} not found: apt-get install rabbitmq-server")
    return found


def available() -> str | None:
    """Why a private node cannot be started here, or None when it can."""
    try:
        _tool("rabbitmq-server")
        _tool("rabbitmqctl")
    except RuntimeError as exc:
        return str(exc)
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PrivateBroker:
    """Start with ``start()``; ``stop_app`` / ``start_app`` make an outage; ``close()`` always."""

    def __init__(self, base: Path, tag: str) -> None:
        self.dir = base / "rabbitmq"
        self.node = f"spool-chaos-{tag}@localhost"
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self.boot_seconds = 0.0

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    @property
    def urls(self) -> list[str]:
        return [self.url]

    def _env(self) -> dict[str, str]:
        d = self.dir
        return {
            **os.environ,
            "HOME": str(d / "home"),
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(d / "mnesia"),
            "RABBITMQ_LOG_BASE": str(d / "log"),
            "RABBITMQ_CONFIG_FILE": str(d / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(d / "advanced.config"),
            "RABBITMQ_CONF_ENV_FILE": str(d / "rabbitmq-env.conf"),  # not /etc's (the shared node's)
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(d / "enabled_plugins"),  # management off
            "RABBITMQ_PID_FILE": str(d / "pid"),
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
        }

    def _prepare(self) -> None:
        for sub in ("home", "mnesia", "log"):
            shutil.rmtree(self.dir / sub, ignore_errors=True)
            (self.dir / sub).mkdir(parents=True)
        cookie = self.dir / "home" / ".erlang.cookie"
        cookie.write_text(secrets.token_hex(16).upper())
        cookie.chmod(0o400)
        (self.dir / "rabbitmq.conf").write_text("loopback_users = none\n")
        (self.dir / "enabled_plugins").write_text("[].\n")
        (self.dir / "rabbitmq-env.conf").write_text("")
        (self.dir / "pid").unlink(missing_ok=True)

    def start(self, attempts: int = 3, timeout: float = 120.0) -> None:
        """Boot the node and wait until it serves AMQP; new ports on each try (a port picked free
        can be taken by someone else before the node listens on it)."""
        for attempt in range(1, attempts + 1):
            self.port, self.dist_port = free_port(), free_port()
            self._prepare()
            t0 = time.monotonic()
            with (self.dir / "server.log").open("ab") as out:
                self.process = subprocess.Popen(
                    [_tool("rabbitmq-server")], env=self._env(), stdout=out, stderr=out,
                    stdin=subprocess.DEVNULL, start_new_session=True, cwd=self.dir,
                )  # fmt: skip
            pid_file = str(self.dir / "pid")
            waited = self.ctl("wait", pid_file, "--timeout", str(int(timeout)), timeout=timeout + 10)
            if waited == 0 and self._serves():
                self.boot_seconds = time.monotonic() - t0
                return
            self._kill()
            if attempt == attempts:
                tail = (self.dir / "server.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"private RabbitMQ node {self.node} did not start:\n{tail}")

    def _serves(self, seconds: float = 30.0) -> bool:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return True
            time.sleep(0.2)
        return False

    def ctl(self, *args: str, timeout: float = 60.0) -> int:
        """``rabbitmqctl -n <node> ARGS``; its return code (a timeout counts as failure)."""
        try:
            done = subprocess.run(
                [_tool("rabbitmqctl"), "-q", "-n", self.node, *args], env=self._env(),
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=timeout,
            )  # fmt: skip
        except subprocess.TimeoutExpired:
            return -1
        return done.returncode

    def stop_app(self) -> bool:
        return self.ctl("stop_app") == 0

    def start_app(self) -> bool:
        """Start the app again; True once it serves AMQP. (``rabbitmqctl await_startup`` after it
        took up to 50 s to return on a loaded machine; the port is what clients see.)"""
        return self.ctl("start_app", timeout=120) == 0 and self._serves()

    def _kill(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=30)
        self.process = None

    def close(self) -> None:
        """Stop the node (politely, then by force) and remove what it wrote."""
        if self.process is not None and self.process.poll() is None:
            self.ctl("shutdown", timeout=60)
        self._kill()
        shutil.rmtree(self.dir, ignore_errors=True)


class ClusterBroker:
    """The three-node cluster of ``.ci/rabbitmq-cluster.sh`` (shared with the cluster tests), the run
    kept to a vhost of its own: created at ``start()``, deleted with its queues at ``close()``, so
    neither the tests' queues nor another run's are touched. A fault here is a node's Erlang VM
    SIGKILLed (``kill``), a power cut rather than ``stop_app``, and booted again (``restart``).

    Everything after the cluster is up goes through the management API, not ``rabbitmqctl``: on
    the loaded 2-core machine each CLI call is an Erlang VM of its own taking seconds, and some
    printed their answer and then did not exit (``ctl 3 ping`` hung a minute; a ``wait`` held the
    cluster's ``start`` for minutes)."""

    SCRIPT = Path(__file__).resolve().parents[2] / ".ci" / "rabbitmq-cluster.sh"
    SERVICES = SCRIPT.parent / "services.sh"
    NODES = (1, 2, 3)

    def __init__(self, tag: str) -> None:
        self.vhost = f"spool-chaos-{tag}"
        self.base_port = int(os.environ.get("SPOOL_RABBIT_CLUSTER_PORT", "5681"))
        self.boot_seconds = 0.0

    def node_url(self, n: int) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.base_port + n - 1}/{self.vhost}"

    @property
    def urls(self) -> list[str]:
        return [self.node_url(n) for n in self.NODES]

    @property
    def url(self) -> str:
        return self.urls[0]

    def node(self, n: int) -> str:
        return f"spool-c{n}@localhost"

    def api(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        """Call the management API of the first node that answers."""
        auth = base64.b64encode(b"guest:guest").decode()
        errors = []
        for n in self.NODES:
            request = urllib.request.Request(
                f"http://127.0.0.1:{self.base_port + 10000 + n - 1}/api/{path}", method=method,
                data=None if body is None else json.dumps(body).encode(),
                headers={"Authorization": f"Basic {auth}", "Content-Type": "application/json"},
            )  # fmt: skip
            try:
                with urllib.request.urlopen(request, timeout=15) as response:
                    raw = response.read()
                    return json.loads(raw) if raw else None
            except OSError as exc:
                errors.append(f"node {n}: {exc}")
        raise OSError("; ".join(errors))

    def running(self) -> set[str]:
        try:
            return {n["name"] for n in self.api("GET", "nodes") if n.get("running")}
        except (OSError, ValueError):
            return set()

    def start(self) -> None:
        """The cluster up (``services.sh rabbitmq-cluster`` when a node is not), then the vhost."""
        t0 = time.monotonic()
        if len(self.running()) < len(self.NODES):
            done = subprocess.run(
                ["bash", str(self.SERVICES), "rabbitmq-cluster"], capture_output=True, text=True, timeout=900
            )
            if done.returncode != 0:
                raise RuntimeError(f"the RabbitMQ cluster did not start:\n{done.stdout}{done.stderr}")
        self.boot_seconds = time.monotonic() - t0
        vhost = quote(self.vhost, safe="")
        self.api("PUT", f"vhosts/{vhost}", {})
        self.api("PUT", f"permissions/{vhost}/guest", {"configure": ".*", "write": ".*", "read": ".*"})

    def pid(self, n: int) -> int | None:
        out = subprocess.run(["bash", str(self.SCRIPT), "pid", str(n)], capture_output=True, text=True)
        return int(out.stdout) if out.stdout.strip().isdigit() else None

    def kill(self, n: int) -> bool:
        """SIGKILL node ``n``'s VM and wait until it is gone; False when it was not running."""
        pid = self.pid(n)
        if pid is None:
            return False
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while self.pid(n) is not None and time.monotonic() < deadline:
            time.sleep(0.1)
        return True

    def restart(self, n: int, timeout: float = 600) -> bool:
        """Boot node ``n`` again (``rabbitmq-cluster.sh boot``) and wait until the management API
        lists the three nodes running: the node rejoined the cluster."""
        deadline = time.monotonic() + timeout
        try:
            booted = subprocess.run(
                ["bash", str(self.SCRIPT), "boot", str(n)], capture_output=True, timeout=timeout
            )
        except subprocess.TimeoutExpired:
            return False
        while booted.returncode == 0 and time.monotonic() < deadline:
            if len(self.running()) == len(self.NODES):
                return True
            time.sleep(1)
        return False

    def close(self) -> None:
        """Delete the run's vhost (and with it every queue of the run); a node the run left down
        is booted again first, so the cluster is left as it was found."""
        for n in self.NODES:
            if self.pid(n) is None:
                self.restart(n)
        with contextlib.suppress(OSError):
            self.api("DELETE", f"vhosts/{quote(self.vhost, safe='')}")
