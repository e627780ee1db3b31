"""
Real processes for end-to-end tests: twistd daemons on 127.0.0.1 with
ports chosen by the kernel (read back from their logs), stopped by pid.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from typing import Any, Optional, Sequence

_LISTEN = {
    "llmgate": re.compile(r"GatewaySite starting on (\d+)"),
    "llmgate-mock": re.compile(r"Site starting on (\d+)"),
}


class Daemon:
    """
    A C{twistd -n PLUGIN ...} child process. Its log is collected by a
    thread so the pipe never fills.
    """

    def __init__(
        self,
        plugin: str,
        args: list[str],
        cwd: str,
        env: Optional[dict[str, str]] = None,
        wait: bool = True,
        systemd_fd: Optional[int] = None,
        twistd_args: Sequence[str] = (),
    ) -> None:
        """
        @param systemd_fd: a listening socket to pass as systemd's socket
            activation does (fd 3, C{LISTEN_FDS=1}, C{LISTEN_PID}).
        @param twistd_args: twistd's own options (before the plugin name).
        """
        self.plugin = plugin
        if plugin == "llmgate" and not any(a.startswith("--workers") for a in args):
            # The default (one worker per CPU) depends on the machine; tests
            # that are not about workers keep the single process.
            args = [*args, "--workers", "1"]
        script = "from twisted.scripts.twistd import run; run()"
        extra: list[str] = []
        if systemd_fd is not None:
            script = (
                "import os, sys; os.dup2(int(sys.argv.pop(1)), 3); "
                "os.environ.update(LISTEN_FDS='1', LISTEN_FDNAMES='llmgate', LISTEN_PID=str(os.getpid())); "
                "from twisted.scripts.twistd import run; run()"
            )
            extra = [str(systemd_fd)]
        cmd = [sys.executable, "-c", script, *extra, "-n", "--pidfile=", *twistd_args, plugin, *args]
        full_env = dict(os.environ)
        full_env.update(env or {})
        self.proc = subprocess.Popen(
            cmd, cwd=cwd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            preexec_fn=_die_with_parent, pass_fds=() if systemd_fd is None else (systemd_fd,),
        )
        self.pid = self.proc.pid
        self.lines: list[str] = []
        self._seen = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.port = 0
        if wait:
            self.port = self.wait_for_port()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            with self._seen:
                self.lines.append(raw.decode("utf-8", "replace"))
                self._seen.notify_all()
        with self._seen:
            self._seen.notify_all()

    def output(self) -> str:
        with self._seen:
            return "".join(self.lines)

    def wait_for(self, pattern: str, timeout: float = 20.0) -> re.Match[str]:
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._seen:
            while True:
                for line in self.lines:
                    m = rx.search(line)
                    if m:
                        return m
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._reader.is_alive()):
                    raise AssertionError(f"{self.plugin}: no {pattern!r} in log:\n" + "".join(self.lines))
                self._seen.wait(min(left, 0.2))

    def wait_for_port(self) -> int:
        return int(self.wait_for(_LISTEN[self.plugin].pattern).group(1))

    def url(self, path: str = "") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def rss_kb(self) -> int:
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        raise AssertionError("no VmRSS")

    def stop(self, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            os.kill(self.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
                self.proc.wait(5)
        self._reader.join(5)
        return self.proc.returncode


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def post_json(url: str, body: Any = None) -> Any:
    req = urllib.request.Request(url, data=json.dumps(body or {}).encode(), method="POST")
    with urllib.request.urlopen(req, timeout=10) as r:
        return r.read()


def _die_with_parent() -> None:
    # A test run that is killed must not leave daemons behind.
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def gateway_config(mock_port: int, extra: str = "") -> str:
    return (
        "[providers.mock]\n"
        'kind = "openai"\n'
        f'base_url = "http://127.0.0.1:{mock_port}/v1"\n'
        'api_key_env = "E2E_UPSTREAM_KEY"\n'
        "default = true\n"
        "[providers.mockant]\n"
        'kind = "anthropic"\n'
        f'base_url = "http://127.0.0.1:{mock_port}"\n'
        'api_key_env = "E2E_UPSTREAM_KEY"\n'
        "default = true\n"
        '[models."public-name"]\n'
        'provider = "mock"\n'
        'upstream_model = "upstream-name"\n' + extra
    )


class MockStack:
    """
    One mock provider and one gateway in front of it (L{gateway_config},
    with a ledger in the stack's directory), both real twistd processes.

    @param prefix: of the temporary directory both run in.
    @param upstream_key: the provider key the gateway holds.
    @param extra: more config (after the providers and the ledger).
    """

    def __init__(self, prefix: str, upstream_key: str, extra: str = "") -> None:
        self.dir = tempfile.mkdtemp(prefix=prefix)
        self.ledger = os.path.join(self.dir, "usage.db")
        self.conf = os.path.join(self.dir, "llmgate.toml")
        self.upstream_key = upstream_key
        extra += self.prepare()
        self.mock = Daemon("llmgate-mock", ["--port", "tcp:0:interface=127.0.0.1"], self.dir)
        with open(self.conf, "w") as f:
            f.write(gateway_config(self.mock.port, f'[ledger]\npath = "{self.ledger}"\n' + extra))
        self.gw = self.start_gateway()

    def prepare(self) -> str:
        """Files a subclass needs in C{self.dir} before start; more config."""
        return ""

    def start_gateway(self) -> Daemon:
        return Daemon(
            "llmgate", ["--config", self.conf, "--port", "tcp:0:interface=127.0.0.1"], self.dir,
            env={"E2E_UPSTREAM_KEY": self.upstream_key},
        )

    def stop(self) -> None:
        self.gw.stop()
        self.mock.stop()


_shared_stacks: dict[str, Any] = {}


def shared(name: str, make: Any) -> Any:
    """
    One stack per name for the whole test run (trial has no setUpClass),
    made by C{make()} on first use and stopped when the test process exits.
    """
    if name not in _shared_stacks:
        stack = _shared_stacks[name] = make()
        atexit.register(stack.stop)
    return _shared_stacks[name]
