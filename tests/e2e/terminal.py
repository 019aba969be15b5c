"""Run the installed ``ato`` on a pseudo-terminal, as a person at a terminal would see it.

stdin, stdout and stderr are the terminal; the output is collected raw (escape sequences and
all) by a reader thread, so a test can wait for text with a deadline and then inspect bytes.
"""

from __future__ import annotations

import os
import pty
import signal
import subprocess
import threading
import time
from pathlib import Path

from tests.conftest import cli_path


class TtyProc:
    def __init__(self, args: list[str], *, cwd: Path | None = None, env: dict[str, str] | None = None,
                 columns: int = 100) -> None:
        master, slave = pty.openpty()
        import fcntl
        import struct
        import termios

        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, columns, 0, 0))
        full_env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": str(columns), **(env or {})}
        self.p = subprocess.Popen([cli_path("ato"), *args], cwd=cwd, env=full_env, stdin=slave, stdout=slave,
                                  stderr=slave, start_new_session=True, close_fds=True)
        os.close(slave)
        self.master = master
        self.buf = bytearray()
        self.lock = threading.Lock()
        self.reader = threading.Thread(target=self._pump, daemon=True)
        self.reader.start()

    def _pump(self) -> None:
        while True:
            try:
                data = os.read(self.master, 65536)
            except OSError:  # EIO: the last process holding the terminal exited
                return
            if not data:
                return
            with self.lock:
                self.buf += data

    @property
    def output(self) -> str:
        with self.lock:
            return self.buf.decode("utf-8", "replace")

    def wait_for(self, text: str, timeout: float = 60.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = self.output
            if text in out:
                return out
            if self.p.poll() is not None and not self.reader.is_alive():
                break
            time.sleep(0.05)
        raise AssertionError(f"{text!r} did not appear on the terminal; it shows:\n{self.output}")

    def interrupt(self) -> None:
        """Ctrl-C: SIGINT to the foreground process group, as the terminal would send it."""
        os.killpg(self.p.pid, signal.SIGINT)

    def wait(self, timeout: float = 60.0) -> int:
        code = self.p.wait(timeout=timeout)
        self.reader.join(timeout=10)
        return code

    def close(self) -> None:
        if self.p.poll() is None:
            os.killpg(self.p.pid, signal.SIGKILL)
            self.p.wait()
        self.reader.join(timeout=10)
        try:
            os.close(self.master)
        except OSError:
            pass
