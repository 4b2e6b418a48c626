"""A real XRootD server on localhost for the tests and ``make demo``: two sites, root:// and https.

One ``xrootd`` process (Debian's ``xrootd-server``) serves, below one base directory:

- ``root://127.0.0.1:<port>//site-a`` and ``//site-b``: two exports standing for two sites, with
  server-side adler32 (``xrootd.chksum``) and XRootD third-party copy (``ofs.tpc``);
- ``https://127.0.0.1:<https_port>/site-a`` ...: the same exports over WebDAV (XrdHttp) with
  ``Want-Digest: adler32`` and HTTP third-party copy (``libXrdHttpTPC``: ``COPY`` with ``Source:``
  or ``Destination:``). XrdHttp rather than a second server (nginx's WebDAV module): it is what
  dCache-like sites answer (RFC 3230 digests, HTTP-TPC with performance markers), which nginx has
  not;
- ``site-ro``: an export the server refuses to write (``r/o``);
- ``site-full``: an export on a small file system of its own (a tmpfs of ``full_bytes``, mounted
  when running as root) for "no space left" faults.

A CA and a host certificate for ``localhost`` / ``127.0.0.1`` are generated at start (openssl), so
clients verify the server against ``ca_file`` / ``ca_dir``. Hosts are spelled ``127.0.0.1``: the
XRootD TPC rendezvous compares the name the client used with the address the destination server
connects from, and ``localhost`` vs ``vm`` vs ``::1`` make it expire.

xrootd refuses to run as root: when we are root it runs as the ``xrootd`` user (created by the
package) over a base directory that user owns.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

SITES = ("site-a", "site-b", "site-ro", "site-full")


class XrootdUnavailable(RuntimeError):
    """The server cannot be started here (package missing, port never answered)."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_pki(directory: Path) -> None:
    """A throw-away CA and a host certificate (``host.pem`` / ``host.key``) signed by it."""
    directory.mkdir(parents=True, exist_ok=True)
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "3", "-subj", "/CN=Spool Test CA",
             "-keyout", "ca.key", "-out", "ca.pem", cwd=directory)  # fmt: skip
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost",
             "-keyout", "host.key", "-out", "host.csr", cwd=directory)  # fmt: skip
    (directory / "ext.cnf").write_text(
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n"
        "keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth,clientAuth\n"
    )
    _openssl("x509", "-req", "-in", "host.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
             "-days", "3", "-extfile", "ext.cnf", "-out", "host.pem", cwd=directory)  # fmt: skip
    cadir = directory / "cadir"
    cadir.mkdir(exist_ok=True)
    shutil.copy(directory / "ca.pem", cadir / "ca.pem")
    _openssl("rehash", str(cadir), cwd=directory)
    (directory / "host.key").chmod(0o600)


@dataclass
class LocalXrootd:
    """One running server; ``start()`` then ``stop()`` (or use it as a context manager)."""

    base: Path | None = None
    port: int = 0
    https_port: int = 0
    full_bytes: int = 4 * 1024 * 1024
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    _own_base: bool = field(default=False, repr=False)
    _mounted: bool = field(default=False, repr=False)

    # -- where things are ---------------------------------------------------------------------
    @property
    def data(self) -> Path:
        assert self.base is not None
        return self.base / "data"

    @property
    def pki(self) -> Path:
        assert self.base is not None
        return self.base / "pki"

    @property
    def ca_file(self) -> Path:
        return self.pki / "ca.pem"

    @property
    def ca_dir(self) -> Path:
        return self.pki / "cadir"

    @property
    def log_file(self) -> Path:
        assert self.base is not None
        return self.base / "run" / "xrootd.log"

    def root_url(self, site: str) -> str:
        return f"root://127.0.0.1:{self.port}//{site}"

    def https_url(self, site: str) -> str:
        return f"https://127.0.0.1:{self.https_port}/{site}"

    def path(self, site: str, relpath: str = "") -> Path:
        """The file behind ``site``/``relpath`` on this machine (tests read the bytes there)."""
        return self.data / site / relpath if relpath else self.data / site

    # -- life ---------------------------------------------------------------------------------
    def start(self, timeout: float = 30.0) -> LocalXrootd:
        binary = shutil.which("xrootd")
        if binary is None:
            raise XrootdUnavailable("xrootd is not installed (apt-get install xrootd-server xrootd-client)")
        if self.base is None:
            # Not under a private tmp dir of root's: the xrootd user must reach it.
            self.base = Path(tempfile.mkdtemp(prefix="spool-xrootd-"))
            self._own_base = True
        self.base.mkdir(parents=True, exist_ok=True)
        self.base.chmod(0o755)
        for site in SITES:
            (self.data / site).mkdir(parents=True, exist_ok=True)
        (self.base / "run").mkdir(exist_ok=True)
        if not self.ca_file.exists():
            make_pki(self.pki)
        as_root = os.geteuid() == 0
        if as_root and not self._mounted:
            full = str(self.path("site-full"))
            subprocess.run(
                ["mount", "-t", "tmpfs", "-o", f"size={self.full_bytes}", "tmpfs", full],
                check=True, capture_output=True,
            )  # fmt: skip
            self._mounted = True
        self.port = self.port or _free_port()
        self.https_port = self.https_port or _free_port()
        config = self.base / "xrootd.cfg"
        config.write_text(self._config())
        command = [binary, "-c", str(config), "-l", str(self.log_file), "-n", "spool"]
        if as_root:
            user = pwd.getpwnam("xrootd")
            for path in [self.base, *self.base.rglob("*")]:
                if not path.is_mount() and path.parent != self.path("site-full"):
                    os.chown(path, user.pw_uid, user.pw_gid, follow_symlinks=False)
            os.chown(self.path("site-full"), user.pw_uid, user.pw_gid)
            command[1:1] = ["-R", "xrootd"]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while not (_port_open(self.port) and _port_open(self.https_port)):
            if self.process.poll() is not None or time.monotonic() > deadline:
                log = self.log_text()[-2000:]
                self.stop()
                raise XrootdUnavailable(f"xrootd did not start (log tail):\n{log}")
            time.sleep(0.1)
        return self

    def _config(self) -> str:
        assert self.base is not None
        exports = "\n".join(f"all.export /{s}{' r/o' if s == 'site-ro' else ''}" for s in SITES)
        return f"""{exports}
oss.localroot {self.data}
xrd.port {self.port}
all.adminpath {self.base / "run"}
all.pidpath {self.base / "run"}
xrootd.chksum max 32 adler32
ofs.tpc pgm {shutil.which("xrdcp") or "/usr/bin/xrdcp"} --server
xrd.tls {self.pki / "host.pem"} {self.pki / "host.key"}
xrd.tlsca certdir {self.ca_dir}
xrd.protocol XrdHttp:{self.https_port} libXrdHttp.so
http.exthandler xrdtpc libXrdHttpTPC.so
http.header2cgi Authorization authz
"""

    def log_text(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        """Stop the server (files stay until ``cleanup``)."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)

    def restart(self, timeout: float = 30.0) -> None:
        """Stop and start again on the same ports and directories (a server outage)."""
        self.stop()
        self.start(timeout)

    def cleanup(self) -> None:
        self.stop()
        if self._mounted:
            subprocess.run(["umount", "-l", str(self.path("site-full"))], capture_output=True)
            self._mounted = False
        if self._own_base and self.base is not None:
            shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> LocalXrootd:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()
