"""Shared fixtures: real vLLM engines on the real default model, started once per session.

Engines take 20-60 s to start, so the suite uses few configurations: ``vanilla_llm``
(plugin installed, UTIO off) and ``forced_llm`` (UTIO on, two shallow buckets, the
forced router so tests choose each request's depth). Both use the same scheduler
settings (small token budget, so long prompts are chunked and mixed with decodes).
"""

from __future__ import annotations

import gc
import os

import pytest

from vllm_utio.paths import default_model_dir

# Tests send small inspection functions to workers through collective_rpc.
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")

NUM_LAYERS = 30
# bytes of one 128-token KV block of the default model (K and V, 3 KV heads of 64, bf16):
# tests that need a tiny cache size it in blocks
KV_BLOCK_BYTES = 128 * NUM_LAYERS * 2 * 3 * 64 * 2
# Nested buckets of the test engines: "shallow" skips layers 12..19, "mid" 14..17.
BUCKETS = [
    {"name": "shallow", "max_score": 0.3, "keep_first": 12, "keep_last": 10},
    {"name": "mid", "max_score": 0.6, "keep_first": 14, "keep_last": 12},
]
ENGINE_KW = {
    "dtype": "bfloat16",
    "max_model_len": 1024,
    "enforce_eager": True,
    "kv_cache_memory_bytes": 512 << 20,
    "max_num_batched_tokens": 256,
    "max_num_seqs": 64,
    "seed": 0,
}


def model_path() -> str:
    path = default_model_dir()
    if not (path / "config.json").is_file():
        pytest.skip(f"default model not built at {path}: run `make setup`")
    return str(path)


def make_llm(utio: dict | None = None, **overrides):
    from vllm import LLM

    kw = {**ENGINE_KW, **overrides}
    if utio is not None:
        kw["additional_config"] = {"utio": utio}
    return LLM(model_path(), **kw)


def shutdown(llm) -> None:
    engine = getattr(llm, "llm_engine", None)
    core = getattr(engine, "engine_core", None)
    if core is not None and hasattr(core, "shutdown"):
        core.shutdown()
    del llm
    gc.collect()


@pytest.fixture(scope="session")
def vanilla_llm():
    llm = make_llm()
    yield llm
    shutdown(llm)


@pytest.fixture(scope="session")
def forced_llm():
    llm = make_llm({"enabled": True, "router": "forced", "buckets": BUCKETS})
    yield llm
    shutdown(llm)
