"""Malformed requests against a real server, and how their refusals are judged.

Each :class:`BadInput` says which field its message should name and a pattern for what
the message should say is allowed. ``owner`` says whose check refuses it: ``"utio"``
for the per-request UTIO controls (:mod:`vllm_utio.request_controls`, checked at
admission), ``"vllm"`` for everything vLLM (or its pydantic request models) checks.
UTIO's refusals must name field and allowed values; vLLM's are reported as they are.

:func:`lenient_inputs` are requests that look malformed but vLLM 0.32 accepts (it
coerces or ignores them); they are sent and reported, not judged.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import httpx

CHAT_PATH = "/v1/chat/completions"
COMPLETION_PATH = "/v1/completions"


@dataclass(frozen=True)
class BadInput:
    name: str
    path: str
    body: Any = None  # JSON body (ignored when raw is set)
    raw: bytes | None = None  # exact bytes to send instead
    content_type: str = "application/json"
    field: str | None = None  # what the message should name (None: no field applies)
    allowed: str | None = None  # regex for what is allowed (None: not applicable)
    owner: str = "vllm"  # "utio" | "vllm"
    method: str = "POST"

    @property
    def stream(self) -> bool:
        return isinstance(self.body, dict) and self.body.get("stream") is True


@dataclass
class BadResult:
    name: str
    owner: str
    path: str
    status: int | None  # HTTP status, or the code of an in-stream error event
    in_stream: bool  # the refusal came as an error event after 200 headers
    message: str
    param: str | None
    field: str | None
    names_field: bool | None
    names_allowed: bool | None

    @property
    def refused(self) -> bool:
        return self.status is not None and 400 <= self.status < 500

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "refused": self.refused}


def bad_inputs(
    model: str, bucket_names: Sequence[str], max_model_len: int, max_n: int
) -> list[BadInput]:
    """The malformed requests of :mod:`.bad_cases` for a server serving ``model`` (UTIO
    on, with ``bucket_names`` as its buckets), ``max_model_len`` and
    ``VLLM_MAX_N_SEQUENCES`` = ``max_n``."""
    from vllm_utio.soak import bad_cases

    return bad_cases.refused_cases(model, bucket_names, max_model_len, max_n)


def lenient_inputs(model: str, max_model_len: int) -> list[BadInput]:
    """Malformed-looking requests vLLM 0.32 accepts (coerces or ignores): reported only."""
    from vllm_utio.soak import bad_cases

    return bad_cases.lenient_cases(model, max_model_len)


async def send_bad(client: httpx.AsyncClient, base_url: str, case: BadInput) -> BadResult:
    """Send one case and judge its answer (a stream is closed after its first event)."""
    url = base_url + case.path
    headers = {"Content-Type": case.content_type}
    content = case.raw if case.raw is not None else json.dumps(case.body).encode()
    if case.method == "GET":
        resp = await client.get(url)
        return judge(case, resp.status_code, resp.text, in_stream=False)
    if not case.stream:
        resp = await client.post(url, content=content, headers=headers)
        return judge(case, resp.status_code, resp.text, in_stream=False)
    async with client.stream("POST", url, content=content, headers=headers) as resp:
        if resp.status_code != 200:
            return judge(
                case, resp.status_code, (await resp.aread()).decode(errors="replace"), False
            )
        async for line in resp.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                return judge(case, 200, line[6:], in_stream=True)
    return judge(case, 200, "", in_stream=True)


def judge(case: BadInput, status: int, text: str, in_stream: bool) -> BadResult:
    message, param, code = _error_fields(text)
    if in_stream:
        status = code if code is not None else status  # an error event carries its code
    names_field = None if case.field is None else _names(message, param, case.field)
    names_allowed = None if case.allowed is None else bool(re.search(case.allowed, message))
    return BadResult(
        case.name, case.owner, case.path, status, in_stream, message, param, case.field,
        names_field, names_allowed,
    )  # fmt: skip


def _error_fields(text: str) -> tuple[str, str | None, int | None]:
    """(message, param, code) of an OpenAI-style error body; the raw text otherwise."""
    if text.startswith("data: "):  # an event stream that is not an error event
        return "(answered as an event stream)", None, None
    try:
        data = json.loads(text)
    except ValueError:
        return text[:500], None, None
    err = data.get("error") if isinstance(data, dict) else None
    if isinstance(err, dict):
        code = err.get("code")
        return (
            str(err.get("message", ""))[:1000],
            err.get("param"),
            code if isinstance(code, int) else None,
        )
    if isinstance(data, dict) and "detail" in data:  # starlette's own errors (405, 404)
        return str(data["detail"])[:1000], None, None
    if isinstance(data, dict) and data.get("choices"):  # accepted: what it answered
        first = data["choices"][0]
        said = first.get("text") or (first.get("message") or first.get("delta") or {}).get(
            "content"
        )
        return f"(answered: {str(said)[:60]!r})", None, None
    return text[:500], None, None


def _names(message: str, param: str | None, field: str) -> bool:
    """Whether the message (or the error's ``param``) names ``field`` as a word."""
    pattern = rf"(?<![A-Za-z0-9_]){re.escape(field)}(?![A-Za-z0-9_])"
    if re.search(pattern, message):
        return True
    return param is not None and re.search(pattern, param) is not None
