"""In-worker check of the paged-KV invariant against the pure-torch reference.

Sent to the worker with ``collective_rpc``. For one live request it takes the tokens
whose K/V are in the cache, computes every layer's K/V with the reference model under
the per-position plans the request really ran (frozen-state fill for skipped layers),
writes those values through the backend's own cache-write op into a copy of the
request's blocks, and measures how far the copy is from the real cache. The copy
differs from the cache only at the written slots, so the error is layout-independent
(the CPU backend packs blocks differently per ISA).
"""

from __future__ import annotations

from typing import Any

import torch


def kv_relative_errors(
    wrapper: Any,
    req_id: str,
    model_path: str,
    plan_ranges: list[tuple[int, int, int, int]],
    num_positions: int,
    correction_files: dict[tuple[int, int], str] | None = None,
) -> dict[str, list[float]]:
    """Per-layer relative error of the cache vs the reference, for each position range.

    ``plan_ranges``: (start, stop, keep_first, keep_last) per range of positions; positions
    not covered run full depth. Returns {"range i": [error of layer 0, ..., layer L-1]}.
    """
    from vllm_utio.evaluation.reference import ReferenceLlama
    from vllm_utio.integration.model_stack import DecoderStack

    runner = getattr(wrapper, "worker", wrapper).model_runner
    # the engine may add a suffix to user request ids
    matches = [k for k in runner.requests if k == req_id or k.startswith(req_id + "-")]
    assert len(matches) == 1, f"request {req_id!r} not unique among {list(runner.requests)}"
    state = runner.requests[matches[0]]
    tokens = list(state.prompt_token_ids) + list(state.output_token_ids)
    assert num_positions <= len(tokens)
    tokens = tokens[:num_positions]
    ref = ReferenceLlama.from_pretrained(model_path)
    full = (ref.num_layers, 0)
    plans = [full] * num_positions
    for start, stop, keep_first, keep_last in plan_ranges:
        for p in range(start, min(stop, num_positions)):
            plans[p] = (keep_first, keep_last)
    corrections = None
    if correction_files:
        from vllm_utio.corrections import load_correction

        hidden = ref.config.hidden_size
        corrections = {
            plan: load_correction(path, hidden, torch.float32)
            for plan, path in correction_files.items()
        }
    out = ref.forward(torch.tensor(tokens), plans=plans, corrections=corrections)
    stack = DecoderStack.from_causal_lm(runner.model)
    block_ids = list(state.block_ids[0])
    errors: dict[str, list[float]] = {}
    ranges = [(0, num_positions)] + [(a, min(b, num_positions)) for a, b, _, _ in plan_ranges]
    for r, (start, stop) in enumerate(ranges):
        # The copy holds the request's blocks in block-table order, so a position's
        # slot in the copy is the position itself.
        local_slots = torch.arange(start, stop)
        per_layer = []
        for layer in range(stack.num_layers):
            attn = stack.layers[layer].self_attn.attn
            real = attn.kv_cache[block_ids]
            copy = real.clone()
            k = out.keys[layer, start:stop].to(real.dtype).contiguous()
            v = out.values[layer, start:stop].to(real.dtype).contiguous()
            attn.impl.do_kv_cache_update(attn, k, v, copy, local_slots)
            diff = (copy.float() - real.float()).norm()
            scale = torch.cat([k.float().flatten(), v.float().flatten()]).norm()
            per_layer.append(float(diff / scale))
        errors["all" if r == 0 else f"range{r}"] = per_layer
    return errors


def run_until(engine: Any, req_id: str, target_outputs: int) -> int:
    """Step ``engine`` until the request has ``target_outputs`` tokens; return how many of
    its positions are cached (the last token is not yet)."""
    for _ in range(500):
        for out in engine.step():
            if out.request_id == req_id:
                n = len(out.outputs[0].token_ids)
                if n >= target_outputs:
                    return len(out.prompt_token_ids) + n - 1
    raise AssertionError("request did not reach the target length")
