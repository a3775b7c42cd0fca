"""End-to-end tests of the real ``vllm serve`` CLI with the UTIO plugin (127.0.0.1 only).

One server start (module-scoped) serves the happy-path tests; the CLI-help and
bad-config tests run their own short-lived ``vllm serve`` processes. The shared server
allowlists the ``utio`` plugins (``VLLM_PLUGINS=utio``) so its ``/metrics`` carries the
UTIO counters (:mod:`vllm_utio.integration.metrics`).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from vllm_utio.paths import DEFAULT_MODEL_NAME, default_model_dir
from vllm_utio.serving import ServerError, ServerProcess, find_vllm_executable

pytestmark = pytest.mark.server

MODEL_DIR = default_model_dir()
HTTP_TIMEOUT = 120.0
STOP_TIMEOUT = 60.0
# One shallow bucket (24 of 30 layers) so the UTIO split path really runs.
UTIO_CONFIG = {
    "buckets": [{"name": "shallow", "max_score": 0.35, "keep_first": 13, "keep_last": 11}]
}
NUM_LAYERS = 30
LAYERS_RUN = {"full": NUM_LAYERS, "shallow": 13 + 11}
COMMON_ARGS = [
    "--dtype",
    "bfloat16",
    "--max-model-len",
    "2048",
    "--kv-cache-memory-bytes",
    str(512 * 1024 * 1024),
    "--enforce-eager",
]


def _require_model() -> None:
    if not (MODEL_DIR / "config.json").is_file():
        pytest.skip(f"default model not built at {MODEL_DIR}; run `make setup` first")


@pytest.fixture(scope="module")
def utio_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    _require_model()
    log_path = tmp_path_factory.mktemp("vllm-serve") / "server.log"
    server = ServerProcess(
        MODEL_DIR,
        [
            "--served-model-name",
            DEFAULT_MODEL_NAME,
            "--enable-utio",
            "--utio-config",
            json.dumps(UTIO_CONFIG),
            *COMMON_ARGS,
        ],
        log_path=log_path,
        startup_timeout=300.0,
        stop_timeout=STOP_TIMEOUT,
        # Endpoint plugins load only when allowlisted; "utio" names the general one too.
        env={**os.environ, "VLLM_PLUGINS": "utio"},
    )
    with server:
        print(f"vllm serve up in {server.startup_seconds:.1f} s; log {log_path}")
        yield server
    # Normally test_server_stops_cleanly already stopped it; this covers -k runs.
    assert server.stopped_cleanly, (
        f"server did not stop on SIGINT/SIGTERM (exit code {server.returncode}); see {log_path}"
    )


@pytest.fixture(scope="module")
def http() -> Iterator[requests.Session]:
    with requests.Session() as session:
        session.trust_env = False  # ignore *_proxy env vars: traffic stays on 127.0.0.1
        yield session


def _post(
    http: requests.Session, server: ServerProcess, path: str, body: dict[str, object]
) -> dict:
    resp = http.post(f"{server.base_url}{path}", json=body, timeout=HTTP_TIMEOUT)
    assert resp.status_code == 200, resp.text
    return resp.json()


def test_completion_knows_paris(utio_server: ServerProcess, http: requests.Session) -> None:
    out = _post(
        http,
        utio_server,
        "/v1/completions",
        {
            "model": DEFAULT_MODEL_NAME,
            "prompt": "The capital of France is",
            "max_tokens": 16,
            "temperature": 0.0,
        },
    )
    text = out["choices"][0]["text"]
    print(f"completion: {text!r}")
    assert text.strip()
    assert "Paris" in text


def test_chat_completion_answers(utio_server: ServerProcess, http: requests.Session) -> None:
    out = _post(
        http,
        utio_server,
        "/v1/chat/completions",
        {
            "model": DEFAULT_MODEL_NAME,
            "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "max_tokens": 32,
            "temperature": 0.0,
        },
    )
    message = out["choices"][0]["message"]
    print(f"chat answer: {message['content']!r}")
    assert message["role"] == "assistant"
    assert (message["content"] or "").strip()
    assert out["usage"]["completion_tokens"] > 0


def test_models_lists_served_name(utio_server: ServerProcess, http: requests.Session) -> None:
    resp = http.get(f"{utio_server.base_url}/v1/models", timeout=HTTP_TIMEOUT)
    assert resp.status_code == 200, resp.text
    assert DEFAULT_MODEL_NAME in [m["id"] for m in resp.json()["data"]]


def _utio_metrics(http: requests.Session, server: ServerProcess) -> dict[str, float]:
    """``utio_*`` samples of /metrics, keyed ``name`` or ``name[bucket]``."""
    resp = http.get(f"{server.base_url}/metrics", timeout=HTTP_TIMEOUT)
    assert resp.status_code == 200, resp.text[:2000]
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(resp.text):
        for sample in family.samples:
            if not sample.name.startswith("utio_"):
                continue
            assert sample.labels.get("model_name") == DEFAULT_MODEL_NAME, sample
            bucket = sample.labels.get("bucket")
            out[sample.name if bucket is None else f"{sample.name}[{bucket}]"] = sample.value
    return out


def test_metrics_expose_worker_stats(utio_server: ServerProcess, http: requests.Session) -> None:
    before = _utio_metrics(http, utio_server)
    assert "utio_layer_tokens_saved_total" in before, sorted(before)
    processed = generated = 0
    prompts = ["The capital of France is", "Three colours are", "Water boils at"]
    for i, prompt in enumerate(prompts):
        out = _post(
            http,
            utio_server,
            "/v1/completions",
            {
                "model": DEFAULT_MODEL_NAME,
                # Unique and shorter than a KV block: no prefix-cache hit skips prompt work.
                "prompt": f"({i}) {prompt}",
                "max_tokens": 24,
                "temperature": 0.0,
                "ignore_eos": True,
            },
        )
        usage = out["usage"]
        # The last sampled token is never fed back through the model.
        processed += usage["prompt_tokens"] + usage["completion_tokens"] - 1
        generated += usage["completion_tokens"]
    after = _utio_metrics(http, utio_server)
    delta = {k: v - before.get(k, 0.0) for k, v in after.items()}
    print("\n".join(f"{k} {after[k]:g} (+{delta[k]:g})" for k in sorted(after)))

    assert after["utio_steps_total"] > 0
    assert len(prompts) <= delta["utio_steps_total"] <= generated
    # The worker's totals match the work this server really did, token for token.
    tokens = {b: delta[f"utio_bucket_tokens_total[{b}]"] for b in LAYERS_RUN}
    assert sum(tokens.values()) == processed
    assert delta["utio_layer_tokens_full_total"] == NUM_LAYERS * processed
    run = sum(LAYERS_RUN[b] * n for b, n in tokens.items())
    assert delta["utio_layer_tokens_run_total"] == run
    assert delta["utio_layer_tokens_saved_total"] == NUM_LAYERS * processed - run
    # The surrogate router sends this model's confident decodes to "shallow".
    assert after["utio_layer_tokens_saved_total"] > 0
    assert delta["utio_routed_steps_total"] > 0
    assert delta["utio_forward_seconds_total"] > 0
    assert after["utio_stats_fetch_failures_total"] == 0


BAD_XARGS = [
    # (vllm_xargs, the field the error must name, the allowed values it must list)
    ({"utio_bucket": "no_such_bucket"}, "utio_bucket", "['full', 'shallow']"),
    ({"utio_bucket": 7}, "utio_bucket", "['full', 'shallow']"),
    ({"utio_attention": "weird"}, "utio_attention", "['default', 'dense']"),
    ({"utio_foo": "x"}, "utio_foo", "['utio_bucket', 'utio_attention', 'utio_speculate']"),
    ({"utio_speculate": "maybe"}, "utio_speculate", "['default', 'off']"),
]
ENDPOINTS = {
    "/v1/chat/completions": {
        "messages": [{"role": "user", "content": "What is the capital of France?"}]
    },
    "/v1/completions": {"prompt": "The capital of France is"},
}


def test_vllm_xargs_utio_controls_are_validated(
    utio_server: ServerProcess, http: requests.Session
) -> None:
    for path, body in ENDPOINTS.items():
        for xargs, field, allowed in BAD_XARGS:
            request = {
                "model": DEFAULT_MODEL_NAME,
                **body,
                "max_tokens": 4,
                "temperature": 0.0,
                "vllm_xargs": xargs,
            }
            resp = http.post(f"{utio_server.base_url}{path}", json=request, timeout=HTTP_TIMEOUT)
            assert resp.status_code == 400, (path, xargs, resp.status_code, resp.text)
            error = resp.json()["error"]  # OpenAI-style error object
            assert error["type"] == "BadRequestError", error
            assert error["param"] == field, error
            assert f"'{field}'" in error["message"], error
            assert allowed in error["message"], error
        # Streamed, the refusal comes like vLLM's own request errors: as the stream's
        # first event (after the 200 headers), the same OpenAI error object.
        resp = http.post(
            f"{utio_server.base_url}{path}",
            json={
                "model": DEFAULT_MODEL_NAME,
                **body,
                "max_tokens": 4,
                "stream": True,
                "vllm_xargs": {"utio_bucket": "no_such_bucket"},
            },
            timeout=HTTP_TIMEOUT,
        )
        first = json.loads(resp.text.split("\n", 1)[0].removeprefix("data: "))
        assert first["error"]["code"] == 400, resp.text
        assert first["error"]["param"] == "utio_bucket", resp.text
        assert "['full', 'shallow']" in first["error"]["message"], resp.text
        good = {"utio_bucket": "shallow", "utio_attention": "dense"}
        out = _post(
            http,
            utio_server,
            path,
            {
                "model": DEFAULT_MODEL_NAME,
                **body,
                "max_tokens": 8,
                "temperature": 0.0,
                "ignore_eos": True,
                "vllm_xargs": good,
            },
        )
        choice = out["choices"][0]
        text = choice["message"]["content"] if "message" in choice else choice["text"]
        assert (text or "").strip(), out


# Keep this last among the tests using the fixture: it stops the shared server.
def test_server_stops_cleanly(utio_server: ServerProcess) -> None:
    pid = utio_server.pid
    assert pid is not None and utio_server.is_running()
    started = time.monotonic()
    code = utio_server.stop()
    elapsed = time.monotonic() - started
    print(f"stopped in {elapsed:.1f} s with exit code {code}")
    assert utio_server.stopped_cleanly, "needed SIGKILL"
    assert code == 0
    assert elapsed < STOP_TIMEOUT
    with pytest.raises(ProcessLookupError):  # no engine/worker process left in its group
        os.killpg(pid, 0)


def test_help_lists_utio_group() -> None:
    proc = subprocess.run(
        [find_vllm_executable(), "serve", "--help=UTIO"],
        capture_output=True,
        text=True,
        timeout=180,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert "UTIO:" in lines, proc.stdout[-2000:]
    group = "\n".join(lines[lines.index("UTIO:") :])
    assert "--enable-utio" in group
    assert "--utio-config JSON_OR_PATH" in group


def test_bad_utio_config_fails_with_field_name(tmp_path: Path) -> None:
    _require_model()
    bad = {"buckets": [{"name": "x", "max_score": 2.0, "keep_first": 3}]}
    log_path = tmp_path / "server.log"
    server = ServerProcess(
        MODEL_DIR,
        ["--enable-utio", "--utio-config", json.dumps(bad), *COMMON_ARGS],
        log_path=log_path,
        startup_timeout=180.0,  # validation fails in seconds; this bounds a hang
        stop_timeout=30.0,
    )
    with pytest.raises(ServerError, match="exited with code") as info:
        server.start()
    assert server.returncode not in (None, 0)
    log = log_path.read_text(errors="replace")
    # vLLM lets the exception escape `vllm serve`; the traceback's last line is ours.
    assert (
        "vllm_utio.config.UtioConfigError: Invalid UTIO config: field 'buckets[0].max_score'" in log
    )
    assert "buckets[0].max_score" in str(info.value)
