"""Steps with nothing UTIO-specific run vLLM's own compiled model (zero overhead).

One compiled engine (no ``enforce_eager``: vLLM's CPU default, a dynamo-traced and
inductor-compiled model) with UTIO on at full depth, and the shared eager forced engine,
whose all-full-depth steps take vLLM's model too while a routed row takes the layer loop.
"""

from __future__ import annotations

import pytest
from conftest import make_llm, shutdown
from prompts import PROMPTS

pytestmark = pytest.mark.engine

MAX_TOKENS = 8


def _compile_facts(worker) -> dict:
    """The worker's decoder stack: is it vLLM's compile wrapper, and how many dynamo
    graphs and (AOT) compilations the worker has made so far."""
    import torch
    from vllm.compilation.counter import compilation_counter
    from vllm.compilation.wrapper import TorchCompileWithNoGuardsWrapper

    model = worker.model_runner.model.model  # LlamaForCausalLM.model: the compiled part
    return {
        "wrapped": isinstance(model, TorchCompileWithNoGuardsWrapper),
        "graphs": int(torch._dynamo.utils.counters["stats"]["unique_graphs"]),
        "compiles": compilation_counter.num_aot_compiles
        + compilation_counter.num_backend_compilations,
    }


def _run(llm, prompts, extra_args: list[dict] | None = None):
    from vllm import SamplingParams

    params = [
        SamplingParams(
            temperature=0.0, max_tokens=MAX_TOKENS, extra_args=extra_args[i] if extra_args else None
        )
        for i in range(len(prompts))
    ]
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


@pytest.fixture(scope="module")
def compiled_llm():
    llm = make_llm({"enabled": True}, enforce_eager=False)
    yield llm
    shutdown(llm)


def test_full_depth_steps_run_the_compiled_model_without_recompiling(compiled_llm):
    before = compiled_llm.collective_rpc(_compile_facts)[0]
    stats0 = compiled_llm.collective_rpc("utio_stats")[0]
    assert before["wrapped"] and before["graphs"] >= 1, before
    tokens = [_run(compiled_llm, PROMPTS[:n]) for n in (1, 3, len(PROMPTS))]  # batch sizes
    after = compiled_llm.collective_rpc(_compile_facts)[0]
    stats = compiled_llm.collective_rpc("utio_stats")[0]
    steps = stats["steps"] - stats0["steps"]
    assert steps >= 3 * MAX_TOKENS
    assert stats["vllm_model_steps"] - stats0["vllm_model_steps"] == steps
    # varying batch sizes and prefill/decode mixes after warm-up: no new graph or compile
    assert (after["graphs"], after["compiles"]) == (before["graphs"], before["compiles"])
    assert all(len(t) == MAX_TOKENS for run in tokens for t in run)
    # a row's greedy tokens do not depend on the batch it ran in (same compiled graph)
    assert tokens[0][0] == tokens[2][0]


def test_routed_steps_take_the_layer_loop_and_plain_steps_do_not(forced_llm):
    stats0 = forced_llm.collective_rpc("utio_stats")[0]
    _run(forced_llm, PROMPTS[:2])  # every row full depth: vLLM's model only
    stats1 = forced_llm.collective_rpc("utio_stats")[0]
    plain = stats1["steps"] - stats0["steps"]
    assert plain >= MAX_TOKENS
    assert stats1["vllm_model_steps"] - stats0["vllm_model_steps"] == plain
    # one row pinned shallow: its decode steps run the layer loop
    _run(forced_llm, PROMPTS[:2], [{"utio_bucket": "shallow"}, {}])
    stats2 = forced_llm.collective_rpc("utio_stats")[0]
    routed = stats2["routed_steps"] - stats1["routed_steps"]
    assert routed >= MAX_TOKENS - 1  # every decode step has the shallow row
    loop = (stats2["steps"] - stats1["steps"]) - (
        stats2["vllm_model_steps"] - stats1["vllm_model_steps"]
    )
    assert loop == routed
