"""
A real C{redis-server} for the tests, on a free loopback port.

Not skipped when missing: C{.ci/run} installs it (Debian's
C{redis-server}), so its absence is a broken setup and the tests say so.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from typing import Optional


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class RedisServer:
    """
    C{redis-server} on 127.0.0.1:C{port}, without persistence: L{start}
    waits for PONG; L{kill} (SIGKILL) and L{start} again simulate a crash
    and a restart that lost everything.
    """

    def __init__(self, port: Optional[int] = None) -> None:
        self.binary = shutil.which("redis-server")
        if self.binary is None:
            raise RuntimeError(
                "redis-server is not installed: the tests of the shared limit state need it "
                "(apt-get install redis-server; .ci/run installs it)"
            )
        self.port = port or free_port()
        self.dir = tempfile.mkdtemp(prefix="llmgate-redis-")
        self.proc: Optional[subprocess.Popen[bytes]] = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> None:
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", self.dir, "--logfile", os.path.join(self.dir, "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self.command("PING") == b"+PONG\r\n":
                    return
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server did not answer PING on port {self.port}")
            time.sleep(0.02)

    def command(self, *args: str) -> bytes:
        """One command by a fresh blocking socket (test setup only): the raw reply."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
            out = b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a.encode()), a.encode()) for a in args)
            s.sendall(out)
            return s.recv(65536)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def pause(self) -> None:
        """SIGSTOP: the server holds connections but answers nothing (a slow Redis)."""
        assert self.proc is not None
        os.kill(self.proc.pid, 19)

    def resume(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, 18)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, 18)
            except OSError:
                pass
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)
