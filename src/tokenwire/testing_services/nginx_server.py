"""``PrivateNginx``: an nginx of a test's own, in front of gateway instances, from the shipped
snippet (``deploy/nginx/tokenwire.conf``).

The snippet is what an operator includes in nginx's ``http {}`` context. :func:`render_snippet`
keeps every line of it except three, which only say *where*: the upstream block's ``server``
lines (the test's instances), ``listen`` (a loopback port) and the access log's path (the temp
dir); ``changes`` may swap more (exact text, each must be found). The result is included from
a minimal main configuration that keeps every path in the temp dir. Never the system nginx:
the master runs in the foreground (``daemon off``), with ``-p``/``-c``/``-e`` pointing into
the temp dir.
"""

from __future__ import annotations

import re
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from tokenwire.testing_cluster import loopback_urls
from tokenwire.testing_services.common import (
    POLL_INTERVAL_S,
    STARTUP_TIMEOUT_S,
    OwnedServer,
    ServiceError,
    end_process,
)

_UPSTREAM = re.compile(r"(upstream\s+tokenwire\s*\{)(.*?)(\n\})", re.DOTALL)
_UPSTREAM_SERVER = re.compile(r"^[ \t]*server[ \t]+[^;]+;[^\n]*\n", re.MULTILINE)
_LISTEN = re.compile(r"^([ \t]*)listen[ \t]+[^;]+;", re.MULTILINE)
_ACCESS_LOG = re.compile(r"access_log[ \t]+\S+[ \t]+tokenwire;")

_MAIN = """daemon off;
master_process on;
worker_processes 1;
pid {root}/nginx.pid;
error_log {root}/error.log info;
events {{ worker_connections 4096; }}
http {{
    client_body_temp_path {root}/tmp/body;
    proxy_temp_path {root}/tmp/proxy;
    fastcgi_temp_path {root}/tmp/fastcgi;
    uwsgi_temp_path {root}/tmp/uwsgi;
    scgi_temp_path {root}/tmp/scgi;
    include {root}/tokenwire.conf;
}}
"""


def render_snippet(
    text: str,
    *,
    upstreams: list[str],
    port: int,
    access_log: Path,
    changes: dict[str, str] | None = None,
) -> str:
    """The shipped snippet for these instances, this port and log (see the module docstring)."""
    block = _UPSTREAM.search(text)
    if block is None or not _UPSTREAM_SERVER.search(block.group(2)):
        raise ServiceError("the snippet has no `upstream tokenwire { server …; }` block")
    servers = "".join(f"    server {address};\n" for address in upstreams)
    body = _UPSTREAM_SERVER.sub("", block.group(2), count=0)
    text = text[: block.start(2)] + "\n" + servers + body.lstrip("\n") + text[block.end(2) :]
    text, listens = _LISTEN.subn(rf"\g<1>listen 127.0.0.1:{port};", text, count=1)
    text, logs = _ACCESS_LOG.subn(f"access_log {access_log} tokenwire;", text, count=1)
    if not listens or not logs:
        raise ServiceError("the snippet has no `listen` or no `access_log … tokenwire;` line")
    for old, new in (changes or {}).items():
        if old not in text:
            raise ServiceError(f"the snippet has no {old!r}")
        text = text.replace(old, new)
    return text


@dataclass(frozen=True)
class AccessLine:
    """One request nginx logged: method, path, status and the instance that served it."""

    method: str
    path: str
    status: int
    upstream: str


_LINE = re.compile(r'"(\S+) (\S+) [^"]*" (\d{3}) \d+ upstream=(\S+)')


class PrivateNginx(OwnedServer):
    """nginx on a loopback port in front of ``upstreams`` (``host:port``), from ``snippet``."""

    _kind = "nginx"
    _log_name = "error.log"

    def __init__(
        self,
        snippet: Path,
        upstreams: list[str],
        *,
        changes: dict[str, str] | None = None,
        base_dir: Path | None = None,
        executable: str = "nginx",
        startup_timeout_s: float = STARTUP_TIMEOUT_S,
    ) -> None:
        found = shutil.which(executable) or shutil.which(executable, path="/usr/sbin:/sbin")
        if found is None:
            raise ServiceError(f"{executable!r} not found (Debian: apt-get install nginx)")
        super().__init__(base_dir, startup_timeout_s)
        self._executable = found
        self._snippet = snippet.read_text()
        self._upstreams = upstreams
        self._changes = changes

    @property
    def base_url(self) -> str:
        return loopback_urls(self.port)[0]

    @property
    def ws_url(self) -> str:
        return loopback_urls(self.port)[1]

    @property
    def access_log_path(self) -> Path:
        return self._dir() / "access.log"

    def access_lines(self) -> list[AccessLine]:
        """The requests logged so far (nginx logs each when it ends), in that order."""
        try:
            text = self.access_log_path.read_text()
        except FileNotFoundError:
            return []
        found = (_LINE.search(line) for line in text.splitlines())
        return [AccessLine(m[1], m[2], int(m[3]), m[4]) for m in found if m is not None]

    def start(self) -> None:
        if self.running:
            raise ServiceError(f"nginx on port {self._port} is already running")
        self._make_dir("tokenwire-nginx-")
        root = self._dir()
        root.chmod(0o755)  # nginx's workers (user nobody when run as root) read below it
        (root / "tmp").mkdir(exist_ok=True)
        self._launch_on_its_port()

    def _launch(self, port: int) -> None:
        root = self._dir()
        (root / "tokenwire.conf").write_text(
            render_snippet(
                self._snippet,
                upstreams=self._upstreams,
                port=port,
                access_log=self.access_log_path,
                changes=self._changes,
            )
        )
        (root / "nginx.conf").write_text(_MAIN.format(root=root))
        command = [self._executable, "-p", str(root), "-c", str(root / "nginx.conf")]
        command += ["-e", str(self.log_path)]
        self._run_until_ready(command, root / "nginx.out", lambda p: self._wait_ready(p, port))

    def _wait_ready(self, process: subprocess.Popen[bytes], port: int) -> None:
        deadline = time.monotonic() + self._startup_timeout_s
        while True:
            if process.poll() is not None:
                raise ServiceError(
                    f"nginx on port {port} exited with {process.returncode}:\n"
                    + self.log_tail()
                    + (self._dir() / "nginx.out").read_text(errors="replace")[-2000:]
                )
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise ServiceError(
                    f"nginx on port {port} did not listen in time:\n{self.log_tail()}"
                )
            time.sleep(POLL_INTERVAL_S)  # the polling interval

    def _halt(self) -> None:
        if self._process is not None:
            end_process(self._process, signal.SIGTERM, 10)
