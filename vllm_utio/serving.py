"""Launch and stop a real ``vllm serve`` subprocess (demo, tests).

The server always binds 127.0.0.1. It runs in its own process group so that stopping
it also stops the engine-core and worker processes vLLM forks. Only the standard
library is used, so this works without the test extras installed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

HOST = "127.0.0.1"
LOG_TAIL_LINES = 40

logger = logging.getLogger(__name__)
# No proxies: traffic to our local server must never leave the machine via *_proxy env vars.
_LOCAL_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class ServerError(RuntimeError):
    """The server failed to start, died, or did not become healthy in time."""


def find_vllm_executable() -> str:
    """The ``vllm`` CLI of the running interpreter's environment (not whatever is on PATH)."""
    candidate = Path(sys.executable).parent / "vllm"
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    found = shutil.which("vllm")
    if found is None:
        raise ServerError(f"no `vllm` executable next to {sys.executable} or on PATH")
    return found


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def tail_lines(path: Path, n: int = LOG_TAIL_LINES, max_bytes: int = 256 * 1024) -> str:
    """The last ``n`` lines of a (possibly large) text file; empty if unreadable."""
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            data = f.read()
    except OSError:
        return ""
    return "\n".join(data.decode("utf-8", errors="replace").splitlines()[-n:])


class ServerProcess:
    """A ``vllm serve`` subprocess on 127.0.0.1, usable as a context manager.

    ``with ServerProcess(model, ["--enable-utio"]) as server: ... server.base_url ...``
    On exit the process group gets SIGINT, then SIGTERM, then SIGKILL, each after a
    timeout; ``returncode`` and ``stopped_cleanly`` tell how it ended.
    """

    def __init__(
        self,
        model: str | os.PathLike[str],
        extra_args: Sequence[str] = (),
        *,
        port: int | None = None,
        log_path: str | os.PathLike[str] | None = None,
        startup_timeout: float = 300.0,
        stop_timeout: float = 60.0,
        env: Mapping[str, str] | None = None,
        poll_interval: float = 1.0,
    ) -> None:
        # The bind address is fixed; let no caller widen it by accident.
        for flag in ("--host", "--port"):
            if any(a == flag or a.startswith(flag + "=") for a in extra_args):
                raise ValueError(f"pass the port as port=..., not {flag} in extra_args")
        self.model = str(model)
        self.extra_args = list(extra_args)
        self.port = port if port is not None else free_port()
        if log_path is None:
            log_path = Path(tempfile.mkdtemp(prefix="vllm-serve-")) / "server.log"
        self.log_path = Path(log_path)
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self.env = dict(env) if env is not None else None
        self.poll_interval = poll_interval
        self.returncode: int | None = None
        self.stopped_cleanly = False
        self.startup_seconds: float | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    # ----------------------------------------------------------------- properties

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def command(self) -> list[str]:
        return [
            find_vllm_executable(),
            "serve",
            self.model,
            "--host",
            HOST,
            "--port",
            str(self.port),
            *self.extra_args,
        ]

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def log_tail(self, n: int = LOG_TAIL_LINES) -> str:
        return tail_lines(self.log_path, n)

    def get_text(self, path: str, timeout: float = 30.0) -> str:
        """Body of ``GET base_url + path`` (raises urllib.error.HTTPError on non-2xx)."""
        with _LOCAL_OPENER.open(f"{self.base_url}{path}", timeout=timeout) as resp:
            return resp.read().decode("utf-8", errors="replace")

    # ----------------------------------------------------------------- start

    def start(self) -> ServerProcess:
        """Start the server and wait until ``GET /health`` answers 200."""
        if self._proc is not None:
            raise ServerError("server already started")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ if self.env is None else self.env)
        env.setdefault("PYTHONUNBUFFERED", "1")  # log lines arrive while we wait
        started = time.monotonic()
        # A fresh log per start, so the tail shown on failure is this run's.
        with self.log_path.open("wb") as log:
            # The child keeps its own copy of the descriptor; ours can close.
            self._proc = subprocess.Popen(
                self.command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # own process group: workers stop with it
            )
        logger.info(
            "started vllm serve pid=%d on %s (log %s)", self._proc.pid, self.base_url, self.log_path
        )
        try:
            self._wait_healthy(started)
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - started
        return self

    def _wait_healthy(self, started: float) -> None:
        assert self._proc is not None
        deadline = started + self.startup_timeout
        while True:
            code = self._proc.poll()
            if code is not None:
                raise ServerError(
                    f"vllm serve exited with code {code} before becoming healthy; "
                    f"last lines of {self.log_path}:\n{self.log_tail()}"
                )
            if self._health_ok():
                return
            if time.monotonic() >= deadline:
                raise ServerError(
                    f"vllm serve not healthy after {self.startup_timeout:.0f} s; "
                    f"last lines of {self.log_path}:\n{self.log_tail()}"
                )
            time.sleep(self.poll_interval)

    def _health_ok(self) -> bool:
        try:
            with _LOCAL_OPENER.open(f"{self.base_url}/health", timeout=5) as resp:
                return resp.status == 200
        except (urllib.error.URLError, OSError):
            return False  # not listening yet, or still starting

    # ----------------------------------------------------------------- stop

    def stop(self) -> int | None:
        """Stop the whole process group; returns the server's exit code (None if never started).

        Idempotent. SIGINT is vLLM's graceful shutdown; SIGTERM and SIGKILL follow only
        if the previous signal did not end the process within ``stop_timeout``.
        """
        proc = self._proc
        if proc is None:
            return None
        if proc.poll() is None:
            self.stopped_cleanly = False
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._signal_group(proc.pid, sig)
                try:
                    proc.wait(timeout=self.stop_timeout)
                    self.stopped_cleanly = True
                    break
                except subprocess.TimeoutExpired:
                    logger.warning("vllm serve pid=%d ignored %s", proc.pid, sig.name)
            if not self.stopped_cleanly:
                self._signal_group(proc.pid, signal.SIGKILL)
                proc.wait(timeout=self.stop_timeout)
        self._reap_group(proc.pid)
        self.returncode = proc.returncode
        logger.info("vllm serve pid=%d exited with code %s", proc.pid, self.returncode)
        return self.returncode

    @staticmethod
    def _signal_group(pgid: int, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):  # the whole group is already gone
            os.killpg(pgid, sig)

    def _reap_group(self, pgid: int, grace: float = 10.0) -> None:
        """Give leftover children (engine core, workers) a moment, then kill them."""
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return
            except PermissionError:
                return  # pgid reused by someone else's process: not ours to touch
            time.sleep(0.2)
        logger.warning("killing processes left in vllm serve's group %d", pgid)
        self._signal_group(pgid, signal.SIGKILL)

    # ----------------------------------------------------------------- context manager

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
