"""Steps with nothing UTIO-specific run vLLM's own compiled model (zero overhead); routed
steps run the layer loop with a compiled layer body.

One compiled engine (no ``enforce_eager``: vLLM's CPU default, a dynamo-traced and
inductor-compiled model) with UTIO on, 32-token KV blocks, a shallow bucket (layers 12-19
skipped) and a full-depth bucket whose decode tokens read KV blocks chosen per layer
(``select``), and the shared eager forced engine, whose all-full-depth steps take vLLM's
model too while a routed row takes the (eager) layer loop.
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


SELECT = {"policy": "select", "sink_tokens": 32, "recent_tokens": 64, "budget_tokens": 256}
BUCKETS = [
    {"name": "shallow", "max_score": 0.3, "keep_first": 12, "keep_last": 10},
    # every layer (12 + 18), written so the shallow plan nests in it
    {"name": "select", "max_score": 0.5, "keep_first": 12, "keep_last": 18, "attention": SELECT},
]


@pytest.fixture(scope="module")
def compiled_llm():
    utio = {"enabled": True, "router": "forced", "buckets": BUCKETS}
    llm = make_llm(utio, enforce_eager=False, block_size=32)
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


def test_select_steps_run_the_compiled_model(compiled_llm):
    """'select' chooses each layer's blocks inside vLLM's attention call, so its steps
    stay on the compiled model: fewer KV positions read, no new graph or compile."""
    from vllm import SamplingParams

    from vllm_utio.assets.data import load_wiki_documents

    tok = compiled_llm.get_tokenizer()
    text = next(d["text"] for d in load_wiki_documents() if len(d["text"]) > 6000)
    prompts = [{"prompt_token_ids": tok.encode(text)[:n]} for n in (700, 500)]
    params = SamplingParams(
        temperature=0.0,
        max_tokens=MAX_TOKENS,
        ignore_eos=True,
        extra_args={"utio_bucket": "select"},
    )
    compiled_llm.generate(prompts[:1], params, use_tqdm=False)  # warm-up of this shape mix
    before = compiled_llm.collective_rpc(_compile_facts)[0]
    stats0 = compiled_llm.collective_rpc("utio_stats", kwargs={"reset": True})[0]
    compiled_llm.generate(prompts, params, use_tqdm=False)
    stats = compiled_llm.collective_rpc("utio_stats", kwargs={"reset": True})[0]
    after = compiled_llm.collective_rpc(_compile_facts)[0]
    assert stats0 is not None and stats["steps"] >= MAX_TOKENS
    assert stats["vllm_model_steps"] == stats["steps"]
    assert stats["select_s"] > 0
    # decode tokens past the 256-position budget read about 256 positions at 28 layers
    assert stats["kv_tokens_read"] < 0.6 * stats["kv_tokens_dense"], stats
    assert (after["graphs"], after["compiles"]) == (before["graphs"], before["compiles"])


def _body_facts(worker) -> dict:
    """The compiled layer body's layer runs, and its segment graphs checked against the
    eager layer code on the real layers (attention stubbed: a copy of the query)."""
    import torch

    from vllm_utio.integration import layer_body as lb

    runner = worker.model_runner
    body = runner._utio_executor.stack.body
    if body is None:
        return {"compiled": False}
    layers = runner._utio_executor.stack.layers
    gen = torch.Generator().manual_seed(0)
    width = layers[0].input_layernorm.weight.shape[0]
    errors = []
    with torch.inference_mode(), lb.stub_attention():
        for n in (1, 5):
            positions = torch.arange(100, 100 + n)
            hidden = torch.randn(n, width, generator=gen).to(torch.bfloat16)
            residual = torch.randn(n, width, generator=gen).to(torch.bfloat16)
            # the segments [0, 12) and [12, 20) warmed the graphs up at load (with and
            # without a residual); [20, 28) must get its own weights through the latter
            for indices, res in ((range(0, 12), None), (range(20, 28), residual)):
                got = sum(body.run_layers(layers, indices, positions, hidden, res))
                want = sum(lb.eager_segment([layers[i] for i in indices], positions, hidden, res))
                # the residual stream after the segment (its two halves alone can be small)
                errors.append(float((got - want).abs().max() / want.abs().max()))
    return {
        "compiled": True,
        "calls": body.calls,
        "attention": dict(lb.ATTENTION_CALLS),
        "max_rel_error": max(errors),
        "bypassing": sorted(body.bypassing),
    }


def test_routed_steps_run_the_compiled_layer_body_without_recompiling(compiled_llm):
    """Rows below full depth take the layer loop; its layers run the compiled body (a
    graph per segment length, compiled at load), and varying batch sizes and mixes of
    routed and full-depth rows compile nothing new."""
    shallow = {"utio_bucket": "shallow"}
    _run(compiled_llm, PROMPTS[:2], [shallow, {}])  # warm-up of this engine's loop paths
    body0 = compiled_llm.collective_rpc(_body_facts)[0]
    before = compiled_llm.collective_rpc(_compile_facts)[0]
    stats0 = compiled_llm.collective_rpc("utio_stats")[0]
    assert body0["compiled"], "compiled engine's layer loop should run the compiled body"
    for n in (1, 3, len(PROMPTS)):
        _run(compiled_llm, PROMPTS[:n], [shallow if i % 2 == 0 else {} for i in range(n)])
    after = compiled_llm.collective_rpc(_compile_facts)[0]
    body = compiled_llm.collective_rpc(_body_facts)[0]
    stats = compiled_llm.collective_rpc("utio_stats")[0]
    routed = stats["routed_steps"] - stats0["routed_steps"]
    assert routed >= 3 * (MAX_TOKENS - 1)
    # every layer a routed step runs went through the compiled segments (30 or 22 per step)
    assert body["calls"] - body0["calls"] >= 22 * routed
    # ... and their attention op did the module's work itself: no layer is hooked (the
    # forced router needs no attention heat, so the heat layer is not captured)
    direct = body["attention"]["direct"] - body0["attention"]["direct"]
    assert direct >= 22 * routed
    assert body["attention"]["module"] == body0["attention"]["module"]
    # the segments of a routed step ([0, 12) from the embedding, [12, 20) for the deep
    # rows, [20, 30)), for one token and many, run dynamo's bytecode without dynamo
    segments = {
        (length, start0, one)
        for length, start0 in ((12, True), (8, False), (10, False))
        for one in (True, False)
    }
    assert segments <= {tuple(key) for key in body["bypassing"]}, body["bypassing"]
    assert (after["graphs"], after["compiles"]) == (before["graphs"], before["compiles"])
    # the compiled segments compute what the eager layer code does, within bf16 rounding
    # over 8-12 layers (inductor fuses the norms, RoPE and activation, so the rounding
    # points differ; measured <= 1.7%; other layers' weights give 80-240%)
    assert body["max_rel_error"] < 0.03, body


def _has_compiled_body(worker) -> bool:
    return worker.model_runner._utio_executor.stack.body is not None


def test_layer_loop_auto_stays_eager_under_enforce_eager(forced_llm, compiled_llm):
    """``layer_loop: auto`` compiles the loop's layers only where vLLM compiles its model."""
    assert forced_llm.collective_rpc(_has_compiled_body) == [False]
    assert compiled_llm.collective_rpc(_has_compiled_body) == [True]
