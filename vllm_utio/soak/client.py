"""The soak's HTTP client: one request and its answer, and many at a fixed concurrency.

Answers are read the same way streamed or not: per choice, the token ids
(``return_token_ids``), the finish and stop reasons, the text, and the top logprobs per
position keyed by token id (``return_tokens_as_token_ids``). A streamed request may be
cut: the client closes the connection after a number of token-carrying chunks, as a
client that goes away does. Every request has a timeout; the driver stops starting new
ones at a request count or a wall-time cap, whichever comes first, and waits for the
rest only up to a hard deadline (a request still running then is recorded as hung).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx

from vllm_utio.soak.workload import CHAT, RequestSpec

OK = ""
# error classes of an outcome (OK: none)
HTTP_5XX = "http_5xx"
HTTP_4XX = "http_4xx"
STREAM_ERROR = "stream_error"  # an error event inside a 200 stream
TRANSPORT = "transport"  # connection refused/reset, protocol error
TIMEOUT = "timeout"  # no answer within the request's timeout
HUNG = "hung"  # still running at the driver's hard deadline
BAD_RESPONSE = "bad_response"  # a 200 whose body is not what the API promises


@dataclass
class Choice:
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    text: str = ""
    logprob_positions: int = 0  # positions that came with logprobs
    top: list[dict[int, float]] = field(default_factory=list)  # per position: id -> logprob


@dataclass
class Outcome:
    index: int
    status: int | None = None  # HTTP status, or the code of an in-stream error event
    error_class: str = OK
    error: str = ""
    cut: bool = False  # the client closed the stream on purpose
    choices: dict[int, Choice] = field(default_factory=dict)
    usage_completion_tokens: int | None = None
    prompt_tokens: int | None = None
    started_s: float = 0.0  # since the driver started
    latency_s: float = 0.0
    ttft_s: float | None = None  # streamed: time to the first token

    @property
    def ok(self) -> bool:
        return self.error_class == OK

    def to_dict(self, with_tokens: bool = False) -> dict[str, Any]:
        out = asdict(self)
        out["choices"] = {
            i: {
                "tokens": len(c.token_ids),
                "finish_reason": c.finish_reason,
                "stop_reason": c.stop_reason,
                "logprob_positions": c.logprob_positions,
                **({"token_ids": c.token_ids} if with_tokens else {}),
            }
            for i, c in self.choices.items()
        }
        return out


def new_http_client(concurrency: int, timeout_s: float) -> httpx.AsyncClient:
    """Loopback only: proxies from the environment are ignored."""
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency)
    return httpx.AsyncClient(timeout=timeout_s, limits=limits, trust_env=False)


async def send(
    client: httpx.AsyncClient,
    base_url: str,
    model: str,
    spec: RequestSpec,
    cache_salt: str | None = None,
    t0: float | None = None,
    out: Outcome | None = None,
) -> Outcome:
    """Send ``spec`` and read its answer; never raises for what the server does. ``out``:
    the outcome to fill (a caller may watch a stream arrive in it)."""
    started = time.perf_counter()
    out = out if out is not None else Outcome(spec.index)
    out.started_s = started - (t0 if t0 is not None else started)
    body = spec.body(model, cache_salt)
    try:
        if spec.stream:
            await _read_stream(client, base_url + spec.path, body, spec, out, started)
        else:
            resp = await client.post(base_url + spec.path, json=body)
            out.status = resp.status_code
            if not _http_error(out, resp.status_code, resp.text):
                _read_whole(resp.json(), spec, out)
    except httpx.TimeoutException as err:
        out.error_class, out.error = TIMEOUT, f"{type(err).__name__}: {err}"
    except httpx.HTTPError as err:
        out.error_class, out.error = TRANSPORT, f"{type(err).__name__}: {err}"
    except (ValueError, KeyError, TypeError) as err:  # malformed JSON or missing fields
        out.error_class, out.error = BAD_RESPONSE, f"{type(err).__name__}: {err}"
    out.latency_s = time.perf_counter() - started
    return out


def _http_error(out: Outcome, status: int, text: str) -> bool:
    if status == 200:
        return False
    out.error_class = HTTP_5XX if status >= 500 else HTTP_4XX
    out.error = text[:500]
    return True


def _read_whole(data: dict[str, Any], spec: RequestSpec, out: Outcome) -> None:
    for raw in data["choices"]:
        choice = out.choices.setdefault(int(raw["index"]), Choice())
        choice.token_ids = list(raw.get("token_ids") or [])
        choice.finish_reason = raw.get("finish_reason")
        choice.stop_reason = raw.get("stop_reason")
        if spec.kind == CHAT:
            choice.text = (raw.get("message") or {}).get("content") or ""
        else:
            choice.text = raw.get("text") or ""
        _add_logprobs(choice, raw.get("logprobs"), spec.kind)
    usage = data.get("usage") or {}
    out.usage_completion_tokens = usage.get("completion_tokens")
    out.prompt_tokens = usage.get("prompt_tokens")


async def _read_stream(
    client: httpx.AsyncClient,
    url: str,
    body: dict[str, Any],
    spec: RequestSpec,
    out: Outcome,
    started: float,
) -> None:
    chunks_with_tokens = 0
    async with client.stream("POST", url, json=body) as resp:
        out.status = resp.status_code
        if resp.status_code != 200:
            _http_error(out, resp.status_code, (await resp.aread()).decode(errors="replace"))
            return
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            data = json.loads(line[6:])
            if "error" in data:  # vLLM reports errors after the 200 headers this way
                err = data["error"]
                out.status = int(err.get("code") or 0) or None
                out.error_class = STREAM_ERROR
                out.error = str(err.get("message", err))[:500]
                return
            if data.get("usage"):
                out.usage_completion_tokens = data["usage"].get("completion_tokens")
                out.prompt_tokens = data["usage"].get("prompt_tokens")
            got_tokens = False
            for raw in data.get("choices") or []:
                choice = out.choices.setdefault(int(raw["index"]), Choice())
                ids = raw.get("token_ids") or []
                choice.token_ids.extend(ids)
                got_tokens = got_tokens or bool(ids)
                if spec.kind == CHAT:
                    choice.text += (raw.get("delta") or {}).get("content") or ""
                else:
                    choice.text += raw.get("text") or ""
                if raw.get("finish_reason") is not None:
                    choice.finish_reason = raw["finish_reason"]
                    choice.stop_reason = raw.get("stop_reason")
                _add_logprobs(choice, raw.get("logprobs"), spec.kind)
            if got_tokens:
                chunks_with_tokens += 1
                if out.ttft_s is None:
                    out.ttft_s = time.perf_counter() - started
            cut_due = spec.cut_after is not None and chunks_with_tokens >= spec.cut_after
            if cut_due and not _all_finished(out, spec):
                # Leaving the block closes the connection mid-answer. An answer that has
                # already ended is read to the end (its usage comes last): nothing cut.
                out.cut = True
                return


def _all_finished(out: Outcome, spec: RequestSpec) -> bool:
    return len(out.choices) == spec.n and all(
        c.finish_reason is not None for c in out.choices.values()
    )


def _add_logprobs(choice: Choice, logprobs: dict[str, Any] | None, kind: str) -> None:
    """Top logprobs per position, keyed by token id (tokens come as ``token_id:N``)."""
    if not logprobs:
        return
    if kind == CHAT:
        for entry in logprobs.get("content") or []:
            choice.logprob_positions += 1
            top = {
                _token_id(t["token"]): float(t["logprob"]) for t in entry.get("top_logprobs", [])
            }
            top.setdefault(_token_id(entry["token"]), float(entry["logprob"]))
            choice.top.append(top)
    else:
        tops = logprobs.get("top_logprobs") or []
        for k, token in enumerate(logprobs.get("tokens") or []):
            choice.logprob_positions += 1
            top = {_token_id(t): float(lp) for t, lp in (tops[k] if k < len(tops) else {}).items()}
            lp = (logprobs.get("token_logprobs") or [None] * (k + 1))[k]
            if lp is not None:
                top.setdefault(_token_id(token), float(lp))
            choice.top.append(top)


def _token_id(token: str) -> int:
    if not token.startswith("token_id:"):
        raise ValueError(f"logprob token {token!r} is not 'token_id:N'")
    return int(token.split(":", 1)[1])


async def drive(
    base_url: str,
    model: str,
    specs: Sequence[RequestSpec],
    concurrency: int,
    max_wall_s: float,
    timeout_s: float,
    on_done: Callable[[Outcome], None] | None = None,
    grace_s: float | None = None,
) -> tuple[list[Outcome], float]:
    """Send ``specs`` in order, ``concurrency`` at a time, starting none after
    ``max_wall_s``; returns the outcomes of the requests started and the wall time.

    In-flight requests get ``grace_s`` (default: their timeout) past the cap; any still
    running then is cancelled and recorded as :data:`HUNG`.
    """
    grace_s = timeout_s if grace_s is None else grace_s
    sem = asyncio.Semaphore(concurrency)
    t0 = time.perf_counter()
    outcomes: dict[int, Outcome] = {}
    tasks: list[asyncio.Task[None]] = []
    async with new_http_client(concurrency, timeout_s) as client:

        async def one(spec: RequestSpec) -> None:
            try:
                outcome = await send(client, base_url, model, spec, t0=t0)
            finally:
                sem.release()
            outcomes[spec.index] = outcome
            if on_done is not None:
                on_done(outcome)

        for spec in specs:
            await sem.acquire()
            if time.perf_counter() - t0 >= max_wall_s:
                sem.release()
                break
            tasks.append(asyncio.create_task(one(spec)))
        deadline = max(0.0, max_wall_s + grace_s - (time.perf_counter() - t0))
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=deadline)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
    wall = time.perf_counter() - t0
    for spec in specs[: len(tasks)]:
        if spec.index not in outcomes:
            outcomes[spec.index] = Outcome(spec.index, error_class=HUNG, error="cancelled")
    return [outcomes[s.index] for s in specs[: len(tasks)]], wall
