"""What the tests' own servers (tests/s3server.py, tests/gcsserver.py) share: ports the kernel chooses,
and a server run as a process of its own, in a session of its own, its output kept in a log, stopped on
exit (SIGTERM, then SIGKILL after 10 s)."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    folder: Path
    proc: subprocess.Popen | None = None

    def _spawn(self, args: list[str], log: str, env: dict | None = None) -> None:
        self.log_path = self.folder / log
        self.log = open(self.log_path, "wb")  # (closed in __exit__)
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)

    def _check_running(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"{Path(self.proc.args[0]).name} exited: {self.log_path.read_text()[-2000:]}")

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
