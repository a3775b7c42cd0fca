"""Killing the engine-core process of a live server: the API server must not hang.

vLLM's API server watches its engine core; when the core dies it fails the requests in
flight and shuts down (it exits; ``/health`` stops answering 200). This module kills the
core with SIGKILL while a streamed request is being answered and measures, from the
outside, how long the server takes to report it, what the request got, and which of
the server's processes outlive it. The process is found by its title
(``VLLM::EngineCore``, set by vLLM) among the server's own descendants only.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx
import psutil

from vllm_utio.serving import ServerProcess
from vllm_utio.soak.client import Outcome, new_http_client, send
from vllm_utio.soak.workload import COMPLETION, RequestSpec

ENGINE_CORE_TITLE = "VLLM::EngineCore"


@dataclass
class FaultResult:
    engine_core_pid: int | None
    seconds_to_unhealthy: float | None  # /health first not 200 (or refused)
    seconds_to_exit: float | None  # the API server process ended
    exit_code: int | None
    deadline_s: float
    in_flight: dict[str, Any] = field(default_factory=dict)  # what the open request got
    left_running: list[str] = field(default_factory=list)  # group members alive after exit
    error: str = ""

    @property
    def bounded(self) -> bool:
        """Reported unhealthy or exited within the deadline, and the request that was
        streaming when the core died got an answer (an error) instead of hanging."""
        reported = self.seconds_to_exit is not None or self.seconds_to_unhealthy is not None
        answered = self.in_flight.get("error_class") not in (None, "hung")
        return self.error == "" and reported and answered

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "bounded": self.bounded}


def engine_core_of(server_pid: int) -> psutil.Process | None:
    for proc in psutil.Process(server_pid).children(recursive=True):
        try:
            if proc.name() == ENGINE_CORE_TITLE:
                return proc
        except psutil.NoSuchProcess:
            continue
    return None


async def kill_engine_core(
    server: ServerProcess,
    model: str,
    max_tokens: int = 1024,
    deadline_s: float = 60.0,
    linger_s: float = 5.0,
) -> FaultResult:
    """SIGKILL the server's engine core while a streamed request runs; poll ``/health``
    and the server process every 0.25 s until it exits or ``deadline_s`` passes. The
    server is stopped (its process group reaped) before this returns."""
    pid = server.pid
    if pid is None or not server.is_running():
        return FaultResult(None, None, None, None, deadline_s, error="server not running")
    core = engine_core_of(pid)
    if core is None:
        return FaultResult(None, None, None, None, deadline_s, error="no engine core found")
    # long enough to be still streaming when the core dies
    spec = RequestSpec(0, COMPLETION, "Once upon a time", False, True, 1, 0.0, max_tokens)
    async with new_http_client(4, deadline_s) as client:
        watched = Outcome(spec.index)
        request = asyncio.create_task(send(client, server.base_url, model, spec, out=watched))
        # kill once tokens stream (a fixed 2 s wait raced: a quiet machine had streamed
        # all 1024 tokens by then)
        t_wait = time.monotonic()
        while watched.ttft_s is None and not request.done():
            if time.monotonic() - t_wait > deadline_s:
                break
            await asyncio.sleep(0.02)
        result = FaultResult(core.pid, None, None, None, deadline_s)
        os.kill(core.pid, signal.SIGKILL)
        t0 = time.monotonic()
        while time.monotonic() - t0 < deadline_s:
            now = time.monotonic() - t0
            if result.seconds_to_unhealthy is None and not await _healthy(client, server):
                result.seconds_to_unhealthy = now
            if not server.is_running():
                result.seconds_to_exit = now
                break
            await asyncio.sleep(0.25)
        try:
            outcome: Outcome = await asyncio.wait_for(request, timeout=deadline_s)
            result.in_flight = {
                "status": outcome.status,
                "error_class": outcome.error_class,
                "error": outcome.error[:300],
                "tokens_before": sum(len(c.token_ids) for c in outcome.choices.values()),
            }
        except asyncio.TimeoutError:
            result.in_flight = {"status": None, "error_class": "hung", "error": "no answer"}
    if result.seconds_to_exit is not None:
        await asyncio.sleep(linger_s)  # what is still alive a moment after the exit
        result.left_running = _group_members(pid)
    code = server.stop()  # reaps what is left (vLLM may leave a worker behind)
    if result.seconds_to_exit is not None:
        result.exit_code = code
    return result


async def _healthy(client: httpx.AsyncClient, server: ServerProcess) -> bool:
    try:
        resp = await client.get(f"{server.base_url}/health", timeout=2.0)
    except httpx.HTTPError:
        return False
    return resp.status_code == 200


def _group_members(pgid: int) -> list[str]:
    """Processes still in the server's process group (it runs in its own session)."""
    out = []
    for proc in psutil.process_iter(["pid", "name"]):
        try:
            if os.getpgid(proc.info["pid"]) == pgid:
                out.append(f"{proc.info['pid']} {proc.info['name']}")
        except (ProcessLookupError, PermissionError, psutil.NoSuchProcess):
            continue
    return out
