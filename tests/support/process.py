"""A p2pchat service as a child process: started with `python -m MODULE ARGS`, ready once its
log prints a line matching READY (kept as `ready`; by default its groups are the ports it bound),
stopped by signal."""

from __future__ import annotations

import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading

# Below Linux's ephemeral range (32768-60999 by default): a port picked here and bound a moment
# later is never taken meanwhile by the local end of some outgoing connection.
_LISTEN_PORTS = (20_000, 32_000)


def free_port() -> int:
    """A loopback port that was free a moment ago (for listen addresses kept across restarts),
    outside the ephemeral range."""
    while True:
        port = random.randrange(*_LISTEN_PORTS)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port


class ServiceProcess:
    MODULE = ""
    READY: re.Pattern[str] = re.compile("")

    def __init__(self, args: list[str], env: dict[str, str] | None = None) -> None:
        self.args = args
        self.proc = subprocess.Popen(
            [sys.executable, "-m", self.MODULE, *args],
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **(env or {})},
        )
        self.log: list[str] = []
        self.ready = self._wait_ready()
        self._drain = threading.Thread(target=self._read_rest, daemon=True)
        self._drain.start()

    @property
    def ports(self) -> tuple[int, ...]:
        return tuple(int(group) for group in self.ready.groups())

    def _wait_ready(self, timeout: float = 30) -> re.Match[str]:
        assert self.proc.stderr is not None
        timer = threading.Timer(timeout, self.proc.kill)
        timer.start()
        try:
            for line in self.proc.stderr:
                self.log.append(line)
                found = self.READY.search(line)
                if found:
                    return found
        finally:
            timer.cancel()
        raise RuntimeError(f"{self.MODULE} exited before serving:\n" + "".join(self.log))

    def _read_rest(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.log.append(line)

    def terminate(self, timeout: float = 15) -> int:
        """SIGTERM and wait; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            self._drain.join(5)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def close(self) -> None:
        """Kills the child if it still runs, reads its log to the end and closes the pipe."""
        self.kill()
        if self.proc.stderr is not None:
            self._drain.join(5)
            self.proc.stderr.close()
