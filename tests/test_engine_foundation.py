"""Foundation, end to end on real vLLM: plugin loading, worker swap, token identity."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import BUCKETS, ENGINE_KW, make_llm, model_path
from prompts import PROMPTS

from vllm_utio.config import UtioConfigError
from vllm_utio.integration.huge_pages import huge_pages_possible

pytestmark = pytest.mark.engine
MAX_TOKENS = 24


def greedy(llm, prompts=PROMPTS, extra_args=None, max_tokens=MAX_TOKENS):
    from vllm import SamplingParams

    params = [
        SamplingParams(
            temperature=0.0,
            max_tokens=max_tokens,
            ignore_eos=True,
            extra_args=extra_args[i] if extra_args else None,
        )
        for i in range(len(prompts))
    ]
    outs = llm.generate(prompts, params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def _worker_facts(wrapper) -> dict:
    import sys as worker_sys

    worker = getattr(wrapper, "worker", wrapper)  # vLLM passes its WorkerWrapperBase
    return {
        "plugin_loaded": "vllm_utio" in worker_sys.modules,
        "worker": type(worker).__name__,
        "runner": type(worker.model_runner).__name__,
    }


def test_plugin_loaded_in_worker_but_nothing_swapped_when_off(vanilla_llm):
    facts = vanilla_llm.collective_rpc(_worker_facts)
    assert facts == [{"plugin_loaded": True, "worker": "CPUWorker", "runner": "CPUModelRunner"}]


def test_utio_worker_and_runner_in_use_when_on(forced_llm):
    assert forced_llm.collective_rpc("utio_classes") == [
        {"worker": "UtioCPUWorker", "model_runner": "UtioCPUModelRunner"}
    ]
    assert forced_llm.collective_rpc(_worker_facts)[0]["plugin_loaded"]


def test_utio_off_matches_vllm_without_plugin(vanilla_llm, tmp_path: Path):
    prompts_file = tmp_path / "prompts.json"
    prompts_file.write_text(json.dumps(PROMPTS))
    out_file = tmp_path / "out.json"
    env = {**os.environ, "VLLM_PLUGINS": "no-such-plugin"}
    helper = Path(__file__).parent / "helpers" / "greedy_tokens.py"
    kw = {**ENGINE_KW, "model": model_path()}
    subprocess.run(
        [
            sys.executable,
            str(helper),
            str(prompts_file),
            str(out_file),
            str(MAX_TOKENS),
            json.dumps(kw),
        ],
        env=env,
        check=True,
        timeout=600,
        capture_output=True,
    )
    baseline = json.loads(out_file.read_text())
    assert baseline["plugin"] is False
    assert greedy(vanilla_llm) == baseline["tokens"]


def test_full_depth_plan_matches_vanilla(vanilla_llm, forced_llm):
    # No request names a bucket: every row runs full depth, so every step is vLLM's own
    # model (the layer loop's full-depth rows are checked in test_engine_depth, next to
    # routed rows).
    before = forced_llm.collective_rpc("utio_stats")[0]
    assert greedy(forced_llm) == greedy(vanilla_llm)
    after = forced_llm.collective_rpc("utio_stats")[0]
    steps = after["steps"] - before["steps"]
    assert steps > 0 and after["vllm_model_steps"] - before["vllm_model_steps"] == steps
    assert after["layer_tokens_run"] - before["layer_tokens_run"] == (
        after["layer_tokens_full"] - before["layer_tokens_full"]
    )


@pytest.mark.skipif(not huge_pages_possible(), reason="no transparent huge pages on this kernel")
def test_kv_cache_is_on_huge_pages_and_tokens_stay_vanilla(forced_llm):
    # kv_huge_pages is on by default: the worker reports how much of its KV cache
    # /proc/self/smaps shows on 2 MiB pages (all but the unaligned ends of the buffer);
    # the test above is the token identity with it on
    stats = forced_llm.collective_rpc("utio_stats")[0]
    assert stats["kv_huge_page_bytes"] >= ENGINE_KW["kv_cache_memory_bytes"] - (4 << 20)


def test_bad_request_control_is_refused_before_anything_runs(forced_llm):
    from vllm import SamplingParams

    from vllm_utio.request_controls import RequestControlError

    good = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)
    bad = SamplingParams(max_tokens=2, extra_args={"utio_bucket": "nope"})
    before = forced_llm.collective_rpc("utio_stats")[0]["steps"]
    # Refused at admission: neither it nor the rest of the call reaches the engine core.
    with pytest.raises(RequestControlError, match=r"'utio_bucket'.*'nope'.*\['full', 'shallow'"):
        forced_llm.generate([PROMPTS[0], PROMPTS[1]], [bad, good], use_tqdm=False)
    assert not forced_llm.llm_engine.has_unfinished_requests()
    assert forced_llm.collective_rpc("utio_stats")[0]["steps"] == before
    # The engine still answers, and a valid pin is accepted.
    assert len(greedy(forced_llm, PROMPTS[:1], max_tokens=2)[0]) == 2
    assert len(greedy(forced_llm, PROMPTS[:1], [{"utio_bucket": "mid"}], max_tokens=2)[0]) == 2


def test_utio_controls_are_not_checked_with_utio_off(vanilla_llm, forced_llm):
    # Validation follows each engine's own config, even with a UTIO engine in the process.
    out = greedy(vanilla_llm, PROMPTS[:1], [{"utio_bucket": "nope"}], max_tokens=2)
    assert len(out[0]) == 2


def test_bad_config_fails_before_engine_start():
    with pytest.raises(UtioConfigError, match=r"buckets\[0\]\.keep_first"):
        make_llm({"enabled": True, "buckets": [{**BUCKETS[0], "keep_first": 0}]})


def test_model_dependent_check_names_model_depth():
    bucket = {**BUCKETS[0], "keep_first": 20, "keep_last": 20}
    with pytest.raises(UtioConfigError, match="exceeds the model's 30 decoder layers"):
        make_llm({"enabled": True, "buckets": [bucket]})
