"""A private Ray head for tests that need a real `ray start` (job submission, autoscaling).

Every port is chosen free, the temp dir is unique, and teardown kills only the processes of
this head (its process group and anything whose command line names its temp dir): `ray stop`
would stop every Ray on the machine, including other sessions'.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parent.parent
PORT_OPTIONS = (
    "--port",
    "--dashboard-port",
    "--dashboard-agent-listen-port",
    "--dashboard-agent-grpc-port",
    "--ray-client-server-port",
    "--runtime-env-agent-port",
    "--metrics-export-port",
    "--node-manager-port",
    "--object-manager-port",
)


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports the OS reports free now."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


#: Ray settings of every test cluster: Ray Train's controller polls its workers every 0.25 s
#: (its default is 2 s), so a test's training is seen to end, or a killed worker to die, sooner
TEST_RAY_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25"}


def ray_env(token: str, **extra: str) -> dict:
    """This venv's ``ray`` first on PATH, token auth with ``token``, no inherited address, the
    test clusters' settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return {**env, **TEST_RAY_ENV, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, **extra}


class LocalHead:
    """``ray start --head --block`` in its own session: ``address``, ``dashboard`` once up."""

    def __init__(self, *, num_cpus: int, args: tuple = (), env: dict | None = None):
        self.token = uuid.uuid4().hex  # this head's own token, not the user's ~/.ray/auth_token
        # Short: Ray's unix socket paths under the temp dir must stay below ~107 characters.
        self.temp_dir = tempfile.mkdtemp(prefix="oclr", dir="/tmp")
        self.ports = dict(zip(PORT_OPTIONS, free_ports(len(PORT_OPTIONS)), strict=True))
        self.address = f"127.0.0.1:{self.ports['--port']}"
        self.dashboard = f"http://127.0.0.1:{self.ports['--dashboard-port']}"
        cmd = [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1"]
        cmd += [f"{k}={v}" for k, v in self.ports.items()]
        cmd += [f"--num-cpus={num_cpus}", f"--temp-dir={self.temp_dir}", "--disable-usage-stats"]
        self.cmd, self.start_env = [*cmd, *args], self.env(**(env or {}))
        self.log_path = Path(self.temp_dir) / "ray-start.log"
        self.proc = None

    def start(self, timeout: float = 120, attempts: int = 2) -> LocalHead:
        """Start, and block until the head is up (and its dashboard answers, if it has one).

        `ray start` gives its raylet a fixed 30 s to register; on a saturated machine that can
        run out, so a failed start is cleaned up and tried again."""
        for attempt in range(1, attempts + 1):
            with open(self.log_path, "w") as log:
                self.proc = subprocess.Popen(
                    self.cmd, env=self.start_env, stdout=log, stderr=subprocess.STDOUT,
                    start_new_session=True,
                )  # fmt: skip
            deadline = time.monotonic() + timeout
            while not self._up():
                if self.proc.poll() is not None:
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"Ray head not up after {timeout}s: {self.start_log()}")
                time.sleep(0.5)
            else:
                return self
            if attempt == attempts:
                raise RuntimeError(f"ray start exited {self.proc.returncode}: {self.start_log()}")
            self._kill(self.pids())

    def env(self, **extra: str) -> dict:
        """The environment of a client of this head (``ray job submit``, a driver)."""
        return ray_env(self.token, **extra)

    def _up(self) -> bool:
        import urllib.error
        import urllib.request

        if "Ray runtime started" not in self.start_log():
            return False
        if "--include-dashboard=false" in self.cmd:
            return True
        try:
            urllib.request.urlopen(f"{self.dashboard}/api/version", timeout=2)
        except urllib.error.HTTPError:
            return True  # answering, e.g. 401 without the auth token
        except OSError:
            return False
        return True

    def start_log(self) -> str:
        return self.log_path.read_text()[-3000:] if self.log_path.exists() else ""

    def pids(self) -> list[int]:
        """Live processes of this head: its process group, or naming its temp dir."""
        found, marker = [], self.temp_dir.encode()
        for pid in filter(str.isdigit, os.listdir("/proc")):
            with contextlib.suppress(OSError):
                state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
                in_group = self.proc is not None and os.getpgid(int(pid)) == self.proc.pid
                if state != "Z" and (in_group or marker in cmdline):
                    found.append(int(pid))
        return found

    def _kill(self, pids: list[int], grace: float = 10) -> None:
        """SIGKILL ``pids`` and wait (up to ``grace`` s) until none of this head's is left."""
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + grace
        while self.pids() and time.monotonic() < deadline:
            time.sleep(0.2)

    def stop(self, grace: float = 10) -> list[int]:
        """SIGTERM `ray start --block` (it stops what it started), SIGKILL what is left after
        ``grace`` seconds; returns the pids that needed SIGKILL."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(grace)
        deadline = time.monotonic() + grace
        while (left := self.pids()) and time.monotonic() < deadline:
            time.sleep(0.5)
        self._kill(left, grace)
        if self.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(grace)  # reap it (the SIGKILL above may have been its)
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        return left
