"""The malformed requests the soak sends, one table row each.

UTIO rows put a bad value into ``vllm_xargs``; the message must name the key and list
the allowed values (derived from the key). vLLM rows change one field of a valid body;
each says which field the message should name and a regex for the rule it should state.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

from vllm_utio.soak.bad_inputs import CHAT_PATH, COMPLETION_PATH, BadInput

C, H = "completion", "chat"  # which valid body a row starts from
PATHS = {C: COMPLETION_PATH, H: CHAT_PATH}

# (name, body, vllm_xargs, key): a bad per-request UTIO control
UTIO_ROWS: list[tuple[str, str, Any, str]] = [
    ("utio_bucket unknown name", C, {"utio_bucket": "no_such_bucket"}, "utio_bucket"),
    ("utio_bucket unknown name (chat)", H, {"utio_bucket": "no_such_bucket"}, "utio_bucket"),
    ("utio_bucket is a path", C, {"utio_bucket": "/etc/passwd"}, "utio_bucket"),
    ("utio_bucket a relative path", H, {"utio_bucket": "../router.safetensors"}, "utio_bucket"),
    ("utio_bucket wrong case", C, {"utio_bucket": "FULL"}, "utio_bucket"),
    ("utio_bucket empty", C, {"utio_bucket": ""}, "utio_bucket"),
    ("utio_bucket an integer", C, {"utio_bucket": 7}, "utio_bucket"),
    ("utio_bucket a float", H, {"utio_bucket": 0.5}, "utio_bucket"),
    ("utio_bucket a list", C, {"utio_bucket": ["full"]}, "utio_bucket"),
    ("utio_bucket a boolean", H, {"utio_bucket": True}, "utio_bucket"),
    ("utio_attention unknown", C, {"utio_attention": "sparse"}, "utio_attention"),
    ("utio_attention a policy name", H, {"utio_attention": "select"}, "utio_attention"),
    ("utio_attention an integer", C, {"utio_attention": 1}, "utio_attention"),
    ("utio_speculate unknown", C, {"utio_speculate": "on"}, "utio_speculate"),
    ("utio_speculate a list", H, {"utio_speculate": ["off"]}, "utio_speculate"),
    ("unknown utio_ key", C, {"utio_foo": "x"}, "utio_foo"),
    (
        "utio_ key asking for a file",
        H,
        {"utio_probe_path": "/tmp/x.safetensors"},
        "utio_probe_path",
    ),
    ("utio_ key carrying a config", C, {"utio_config": '{"artifact": "/tmp"}'}, "utio_config"),
    (
        "bad control next to good ones",
        C,
        {"utio_bucket": "full", "utio_attention": "dense", "utio_speculate": "maybe"},
        "utio_speculate",
    ),
]
# rows that stream: the refusal comes as the stream's first event
UTIO_STREAMED = [
    ("utio_bucket unknown, streamed", C, {"utio_bucket": "nope"}, "utio_bucket"),
    ("utio_attention unknown, streamed chat", H, {"utio_attention": "none"}, "utio_attention"),
]
ALLOWED_KEYS = "['utio_bucket', 'utio_attention', 'utio_speculate']"

# (name, body, changes to the valid body, field to name, regex of the rule)
VLLM_ROWS: list[tuple[str, str, dict[str, Any], str, str]] = [
    ("vllm_xargs value null", C, {"vllm_xargs": {"utio_bucket": None}}, "utio_bucket", r"string"),
    ("vllm_xargs value an object", H, {"vllm_xargs": {"utio_bucket": {"a": 1}}}, "utio_bucket", r"string"),
    ("vllm_xargs a string", C, {"vllm_xargs": "utio_bucket=full"}, "vllm_xargs", r"dictionary"),
    ("max_tokens zero", C, {"max_tokens": 0}, "max_tokens", r"at least 1"),
    ("max_tokens negative", H, {"max_tokens": -1}, "max_tokens", r"at least 1"),
    ("max_completion_tokens zero", H, {"max_completion_tokens": 0}, "max_completion_tokens", r"at least 1"),
    ("max_tokens a string", C, {"max_tokens": "ten"}, "max_tokens", r"valid integer"),
    ("max_tokens zero, streamed", C, {"max_tokens": 0, "stream": True}, "max_tokens", r"at least 1"),
    ("min_tokens above max_tokens", C, {"min_tokens": 10}, "min_tokens", r"less than or equal"),
    ("n zero", C, {"n": 0, "temperature": 0.8}, "n", r"at least 1"),
    ("n negative", H, {"n": -1, "temperature": 0.8}, "n", r"at least 1"),
    ("n huge", H, {"n": 100000, "temperature": 0.8}, "n", r"at most \d+"),
    ("n 2 with greedy sampling", C, {"n": 2, "temperature": 0}, "n", r"must be 1"),
    ("temperature negative", C, {"temperature": -1}, "temperature", r"non-negative"),
    ("temperature a string", H, {"temperature": "hot"}, "temperature", r"valid number"),
    ("top_p zero", C, {"top_p": 0}, "top_p", re.escape("(0, 1]")),
    ("top_p above one", H, {"top_p": 1.5}, "top_p", re.escape("(0, 1]")),
    ("top_k negative", C, {"top_k": -5}, "top_k", r"at least 1"),
    ("min_p above one", C, {"min_p": 2}, "min_p", re.escape("[0, 1]")),
    ("presence_penalty out of range", C, {"presence_penalty": 5}, "presence_penalty", r"\[-2, 2\]"),
    ("frequency_penalty out of range", H, {"frequency_penalty": -3}, "frequency_penalty", r"\[-2, 2\]"),
    ("repetition_penalty zero", C, {"repetition_penalty": 0}, "repetition_penalty", r"greater than"),
    ("seed a string", C, {"seed": "abc"}, "seed", r"valid integer"),
    ("logprobs too many", C, {"logprobs": 1000}, "logprobs", r"max allowed: \d+"),
    ("top_logprobs too many", H, {"logprobs": True, "top_logprobs": 1000}, "top_logprobs", r"max allowed"),
    ("logit_bias token out of vocabulary", C, {"logit_bias": {"999999": 5}}, "logit_bias", r"Vocabulary size"),
    ("stop an integer", C, {"stop": 5}, "stop", r"valid (string|list)"),
    ("stop strings too many", C, {"stop": ["a"] * 100}, "stop", r"at most \d+ items"),
    ("stream_options without stream", C, {"stream_options": {"include_usage": True}}, "stream_options", r"stream=True"),
    ("response_format unknown type", H, {"response_format": {"type": "xml"}}, "response_format", r"json_object"),
    ("prompt token id out of vocabulary", C, {"prompt": [999999]}, "prompt", r"out of vocabulary"),
    ("prompt empty", C, {"prompt": ""}, "prompt", r"non-empty"),
    ("prompt an object", C, {"prompt": {"text": "hi"}}, "prompt", r"valid (string|list)"),
    ("message content an integer", H, {"messages": [{"role": "user", "content": 5}]}, "content", r"valid string"),
    ("messages empty", H, {"messages": []}, "messages", r"at least|empty|non-empty"),
    ("unknown model", C, {"model": "no-such-model"}, "model", r"Valid aliases"),
    ("unknown model (chat)", H, {"model": "no-such-model"}, "model", r"Valid aliases"),
]  # fmt: skip


def refused_cases(
    model: str, bucket_names: Sequence[str], max_model_len: int, max_n: int
) -> list[BadInput]:
    bodies = _bodies(model)
    allowed = {
        "utio_bucket": re.escape(str(["full", *bucket_names])),
        "utio_attention": re.escape("['default', 'dense']"),
        "utio_speculate": re.escape("['default', 'off']"),
    }
    cases = []
    for rows, stream in ((UTIO_ROWS, False), (UTIO_STREAMED, True)):
        for name, kind, xargs, key in rows:
            body = {**bodies[kind], "vllm_xargs": xargs, **({"stream": True} if stream else {})}
            rule = allowed.get(key, re.escape(ALLOWED_KEYS))
            cases.append(BadInput(name, PATHS[kind], body, field=key, allowed=rule, owner="utio"))
    for name, kind, changes, field, rule in VLLM_ROWS:
        cases.append(
            BadInput(name, PATHS[kind], {**bodies[kind], **changes}, field=field, allowed=rule)
        )
    too_long = "hello " * (max_model_len + 16)
    limit = rf"maximum context length is {max_model_len}"
    cases += [
        BadInput("n oversized", COMPLETION_PATH, {**bodies[C], "n": max_n + 1, "temperature": 0.8}, field="n", allowed=rf"at most {max_n}"),
        BadInput("max_tokens above the model length", COMPLETION_PATH, {**bodies[C], "max_tokens": max_model_len + 1}, field="max_tokens", allowed=rf"max_model_len={max_model_len}"),
        BadInput("prompt longer than the model allows", COMPLETION_PATH, {**bodies[C], "prompt": too_long}, field="prompt", allowed=limit),
        BadInput("chat longer than the model allows", CHAT_PATH, {**bodies[H], "messages": [{"role": "user", "content": too_long}]}, field="messages", allowed=limit),
        BadInput("prompt missing", COMPLETION_PATH, {"model": model, "max_tokens": 4}, field="prompt", allowed=r"must be provided"),
        BadInput("messages missing", CHAT_PATH, {"model": model, "max_tokens": 4}, field="messages", allowed=r"Field required"),
        BadInput("invalid JSON", COMPLETION_PATH, raw=b'{"model": "m", "prompt": "x",', allowed=r"JSON"),
        BadInput("empty body", CHAT_PATH, raw=b"", allowed=r"Field required"),
        BadInput("JSON array body", COMPLETION_PATH, raw=b"[1, 2]", allowed=r"dictionary"),
        BadInput("text/plain body", COMPLETION_PATH, raw=json.dumps(bodies[C]).encode(), content_type="text/plain", allowed=r"application/json"),
        BadInput("GET on a POST endpoint", COMPLETION_PATH, method="GET", allowed=r"Method Not Allowed"),
    ]  # fmt: skip
    return cases


def lenient_cases(model: str, max_model_len: int) -> list[BadInput]:
    """Accepted by vLLM 0.32 although they look malformed; cheap to answer (a few tokens,
    or streamed and closed after the first event)."""
    bodies = _bodies(model)
    comp, chat = bodies[C], bodies[H]
    long_ask = {**comp, "prompt": "hello " * 64, "max_tokens": max_model_len - 8, "stream": True}
    return [
        BadInput("message role unknown ('wizard')", CHAT_PATH, {**chat, "messages": [{"role": "wizard", "content": "Hi"}]}, field="role"),
        BadInput("stream a string ('yes')", COMPLETION_PATH, {**comp, "stream": "yes"}, field="stream"),
        BadInput("unknown top-level field", COMPLETION_PATH, {**comp, "bogus_field": 1}, field="bogus_field"),
        BadInput("best_of zero", COMPLETION_PATH, {**comp, "best_of": 0}, field="best_of"),
        BadInput("upper-case UTIO_BUCKET key", COMPLETION_PATH, {**comp, "vllm_xargs": {"UTIO_BUCKET": "x"}}, field="UTIO_BUCKET", owner="utio"),
        BadInput("prompt + max_tokens beyond the model length", COMPLETION_PATH, long_ask, field="max_tokens"),
    ]  # fmt: skip


def _bodies(model: str) -> dict[str, dict[str, Any]]:
    return {
        C: {"model": model, "prompt": "The capital of France is", "max_tokens": 4},
        H: {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4},
    }
