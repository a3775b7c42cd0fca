"""Demo: serve the default model with UTIO on, ask it one chat question, stop cleanly.

Starts ``vllm serve <model> --enable-utio --utio-config ...`` on 127.0.0.1, sends a chat
completion through the ``openai`` client, prints the answer and any ``utio_*`` metrics,
then stops the server. Exit code 0 on success, 1 on any failure (with a message).

    .venv/bin/python scripts/demo_serve.py [--port N] [--model DIR] [--question TEXT]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

from vllm_utio.paths import DEFAULT_MODEL_NAME, default_model_dir
from vllm_utio.serving import ServerError, ServerProcess

# The default model's calibration artifact (built by set-up): three nested buckets
# skipping layers 13-18 / 15-18 / 17-18 with trained exit corrections, routed mid-forward
# by the learned probe to a +3% held-out perplexity budget.
UTIO_CONFIG = {"artifact": "default"}
DEFAULT_QUESTION = "Explain in a few sentences why the sky is blue."  # long enough to route
KV_CACHE_BYTES = 512 * 1024 * 1024  # small explicit KV cache: enough for one chat on CPU


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--port", type=int, default=None, help="port on 127.0.0.1 (default: free)")
    p.add_argument("--model", type=Path, default=default_model_dir(), help="HF model folder")
    p.add_argument("--question", default=DEFAULT_QUESTION, help="the user message to send")
    p.add_argument("--max-tokens", type=int, default=96, help="answer length limit")
    p.add_argument("--startup-timeout", type=float, default=300.0, help="seconds")
    return p.parse_args(argv)


def server_args() -> list[str]:
    return [
        "--served-model-name",
        DEFAULT_MODEL_NAME,
        "--enable-utio",
        "--utio-config",
        json.dumps(UTIO_CONFIG),
        "--dtype",
        "bfloat16",
        "--max-model-len",
        "2048",
        "--kv-cache-memory-bytes",
        str(KV_CACHE_BYTES),
        "--enforce-eager",
    ]


def ask(base_url: str, question: str, max_tokens: int) -> str:
    # test/demo extra; imported late so --help works without it
    from openai import DefaultHttpxClient, OpenAI

    client = OpenAI(
        base_url=f"{base_url}/v1",
        api_key="EMPTY",
        timeout=120.0,
        max_retries=0,
        http_client=DefaultHttpxClient(trust_env=False),  # ignore *_proxy: stay on 127.0.0.1
    )
    resp = client.chat.completions.create(
        model=DEFAULT_MODEL_NAME,
        messages=[{"role": "user", "content": question}],
        max_tokens=max_tokens,
        temperature=0.0,
    )
    answer = (resp.choices[0].message.content or "").strip()
    if not answer:
        raise RuntimeError(f"the server returned an empty answer: {resp!r}")
    if resp.usage is not None:
        print(
            f"[demo] tokens: prompt={resp.usage.prompt_tokens} "
            f"completion={resp.usage.completion_tokens} "
            f"finish_reason={resp.choices[0].finish_reason}"
        )
    return answer


def utio_metric_lines(server: ServerProcess) -> list[str]:
    text = server.get_text("/metrics")
    # the counters; the bucket-size histogram's many lines stay on /metrics
    return [
        line
        for line in text.splitlines()
        if line.startswith("utio_") and not line.startswith("utio_bucket_size")
    ]


def run(args: argparse.Namespace) -> int:
    model = args.model
    if not (model / "config.json").is_file():
        print(f"[demo] error: no model at {model}; run `make setup` first", file=sys.stderr)
        return 1
    log_path = Path(tempfile.mkdtemp(prefix="utio-demo-")) / "vllm-serve.log"
    print(f"[demo] model: {model}")
    print(f"[demo] UTIO config: {json.dumps(UTIO_CONFIG)}")
    print(f"[demo] server log: {log_path}")
    print("[demo] starting vllm serve (typically 20-60 s on CPU) ...", flush=True)
    server = ServerProcess(
        model,
        server_args(),
        port=args.port,
        log_path=log_path,
        startup_timeout=args.startup_timeout,
        # vLLM loads endpoint plugins (UTIO's /metrics collector) only when allow-listed
        env={**os.environ, "VLLM_PLUGINS": "utio"},
    )
    try:
        with server:
            print(
                f"[demo] server healthy at {server.base_url} after {server.startup_seconds:.1f} s"
            )
            t0 = time.monotonic()
            answer = ask(server.base_url, args.question, args.max_tokens)
            print(f"[demo] answered in {time.monotonic() - t0:.1f} s")
            print()
            print(f"Question: {args.question}")
            print(f"Answer:   {answer}")
            print()
            lines = utio_metric_lines(server)
            if lines:
                print("[demo] UTIO metrics on /metrics:")
                for line in lines:
                    print(f"  {line}")
            else:
                print("[demo] note: /metrics shows no utio_* lines (is VLLM_PLUGINS=utio set?)")
            print("[demo] stopping the server ...", flush=True)
    except ServerError as err:
        print(f"[demo] error: {err}", file=sys.stderr)
        return 1
    except Exception as err:  # any client-side failure: say what, point at the log
        print(f"[demo] error: {type(err).__name__}: {err}", file=sys.stderr)
        print(f"[demo] server log: {log_path}\n{server.log_tail()}", file=sys.stderr)
        return 1
    if not server.stopped_cleanly:
        print(
            f"[demo] error: the server had to be killed (exit code {server.returncode}); "
            f"see {log_path}",
            file=sys.stderr,
        )
        return 1
    print(f"[demo] server stopped, exit code {server.returncode}")
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="[%(name)s] %(message)s")
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
