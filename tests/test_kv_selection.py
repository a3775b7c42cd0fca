"""The query-aware selection spec (vllm_utio.kv_selection): pure torch, no engine."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vllm_utio.attention_policy import apply_selections
from vllm_utio.kv_selection import (
    BlockSummaries,
    HeldBlocks,
    SelectRule,
    always_kept,
    block_bound,
    budget_blocks,
    combine_heads,
    head_bounds,
    held_mask,
    packed_bound,
    plan_selection,
    restrict_rows,
    select_blocks,
)


def _reference_summaries(keys: torch.Tensor, written: torch.Tensor, block_size: int):
    """min/max over the written slots of each block (blocks without writes: +-inf)."""
    num_blocks = keys.shape[0] // block_size
    kmin = torch.full((num_blocks, *keys.shape[1:]), float("inf"))
    kmax = torch.full((num_blocks, *keys.shape[1:]), float("-inf"))
    for slot in written.tolist():
        b = slot // block_size
        kmin[b] = torch.minimum(kmin[b], keys[slot])
        kmax[b] = torch.maximum(kmax[b], keys[slot])
    return kmin, kmax


def test_summaries_fold_prefill_decode_and_recycling_exactly():
    torch.manual_seed(0)
    bs, nb, heads, dim = 4, 6, 2, 8
    s = BlockSummaries(2, nb, bs, heads, dim)
    cache = torch.zeros(nb * bs, heads, dim, dtype=torch.bfloat16)
    # prefill of a 10-token request in blocks 3, 1, 5 (slots in block-table order)
    table = [3, 1, 5]
    slots = torch.tensor([table[p // bs] * bs + p % bs for p in range(10)])
    keys = torch.randn(10, heads, dim).to(torch.bfloat16)
    s.fold(1, keys, slots)
    cache[slots] = keys
    # two decode steps, one token each, with a padding slot (-1) that is not written
    for pos in (10, 11):
        slot = torch.tensor([table[pos // bs] * bs + pos % bs, -1])
        k = torch.randn(2, heads, dim).to(torch.bfloat16)
        s.fold(1, k, slot)
        cache[slot[:1]] = k[:1]
    written = torch.tensor([table[p // bs] * bs + p % bs for p in range(12)])
    kmin, kmax = _reference_summaries(cache.float(), written, bs)
    assert torch.equal(s.kmin(1)[table], kmin[table])
    assert torch.equal(s.kmax(1)[table], kmax[table])
    assert torch.isinf(s.kmin(0)).all()  # the other layer is untouched
    # block 1 is recycled by a new request: its first slot is rewritten, old keys forgotten
    k = torch.randn(2, heads, dim).to(torch.bfloat16)
    s.fold(1, k, torch.tensor([4, 5]))
    assert torch.equal(s.kmin(1)[1], torch.minimum(k[0], k[1]))
    assert torch.equal(s.kmax(1)[1], torch.maximum(k[0], k[1]))


@pytest.mark.parametrize("seed", range(5))
def test_bound_is_an_upper_bound_of_every_key(seed: int):
    torch.manual_seed(seed)
    rows, nb, bs, kv_heads, group, dim = 3, 7, 8, 3, 3, 16
    keys = torch.randn(rows, nb, bs, kv_heads, dim) * (1 + seed)
    query = torch.randn(rows, kv_heads * group, dim)
    bound = block_bound(query, keys.amin(2), keys.amax(2), kv_heads)
    # true max q.k per block over its keys and all query heads (head h reads KV head h//G)
    q = query.reshape(rows, 1, 1, kv_heads, group, dim)
    true = (q * keys.unsqueeze(4)).sum(-1).amax(dim=(2, 3, 4))
    assert bound.shape == (rows, nb)
    assert (bound >= true - 1e-4).all()
    # the packed path (what the engine runs) computes the same bound from the summaries
    s = BlockSummaries(1, rows * nb, bs, kv_heads, dim)
    s.fold(0, keys.reshape(-1, kv_heads, dim), torch.arange(rows * nb * bs))
    table = torch.arange(rows * nb).reshape(rows, nb)
    assert torch.allclose(packed_bound(query, s.gather(0, table)), bound, rtol=1e-5, atol=1e-4)
    # and it is tight for a block of one key
    one = block_bound(query, keys[:, :, 0], keys[:, :, 0], kv_heads)
    exact = (query.reshape(rows, 1, kv_heads, group, dim) * keys[:, :, 0].unsqueeze(3)).sum(-1)
    assert torch.allclose(one, exact.amax(dim=(2, 3)), atol=1e-4)


def test_bf16_summaries_are_exact_and_their_bound_is_within_bf16_rounding():
    """A bf16 cache keeps bf16 summaries: min/max of bf16 keys are bf16 values (exact), and
    the bound, a bf16 matmul there, stays within bf16 rounding of the float32 bound."""
    torch.manual_seed(0)
    rows, nb, bs, kv_heads, group, dim = 4, 9, 32, 3, 3, 64
    keys = torch.randn(rows * nb * bs, kv_heads, dim).to(torch.bfloat16)
    slots = torch.arange(rows * nb * bs)
    exact = BlockSummaries(1, rows * nb, bs, kv_heads, dim)
    half = BlockSummaries(1, rows * nb, bs, kv_heads, dim, dtype=torch.bfloat16)
    exact.fold(0, keys, slots)
    half.fold(0, keys, slots)
    assert half.packed.dtype == torch.bfloat16 and half.nbytes * 2 == exact.nbytes
    assert torch.equal(half.kmin(0), exact.kmin(0)) and torch.equal(half.kmax(0), exact.kmax(0))
    query = torch.randn(rows, kv_heads * group, dim).to(torch.bfloat16)
    table = torch.randperm(rows * nb).reshape(rows, nb)
    want = packed_bound(query, exact.gather(0, table))
    got = packed_bound(query, half.gather(0, table))
    assert got.dtype == torch.float32
    # bf16 keeps 8 significant bits: the result is off by at most ~2^-8 of its size
    assert ((got - want).abs() <= 2**-7 * want.abs() + 1e-2).all()


def test_always_kept_sinks_and_recent_with_partial_last_block():
    bs = 32
    rule = SelectRule(sink_blocks=2, recent_tokens=64, budget_tokens=256)
    lens = torch.tensor([320, 321, 70])  # full last block; 1-token last block; short
    mask = always_kept(lens, bs, rule)
    assert mask[0].nonzero().flatten().tolist() == [0, 1, 8, 9]
    # 1 token in block 10: the last 64 positions span blocks 8, 9, 10
    assert mask[1].nonzero().flatten().tolist() == [0, 1, 8, 9, 10]
    assert mask[2].nonzero().flatten().tolist() == [0, 1, 2]


def test_select_fills_the_budget_with_the_highest_bounds():
    bs = 32
    rule = SelectRule(sink_blocks=1, recent_tokens=32, budget_tokens=5 * bs)
    lens = torch.tensor([10 * bs, 6 * bs + 5, 2 * bs])
    bound = torch.tensor(
        [
            [9.0, 1, 7, 3, 8, 0, 6, 2, 5, 9],
            [0.0, 5, 1, 4, 3, 2, 9, -1, -1, -1],  # padding past 7 blocks is ignored
            [0.0, 0, -1, -1, -1, -1, -1, -1, -1, -1],
        ]
    )
    kept, ranked = select_blocks(bound, lens, bs, rule)
    assert kept[0].nonzero().flatten().tolist() == [0, 2, 4, 6, 9]  # sink, top 3, last
    # 5 tokens in block 6: the last 32 positions span blocks 5 and 6
    assert kept[1].nonzero().flatten().tolist() == [0, 1, 3, 5, 6]
    assert kept[2].nonzero().flatten().tolist() == [0, 1]
    assert int(kept.sum(1).max()) <= 5
    assert ranked[0].nonzero().flatten().tolist() == [2, 4, 6]  # the ranking's own picks
    assert not ranked[2].any()
    # a budget below sinks + window still keeps them
    tiny, _ = select_blocks(bound, lens, bs, SelectRule(1, 32, 1))
    assert tiny[0].nonzero().flatten().tolist() == [0, 9]


def test_top_p_stops_early_but_never_beyond_the_budget():
    bs = 32
    lens = torch.tensor([8 * bs])
    bound = torch.tensor([[0.0, 50, 0, 0, 0, 0, 0, 0]])  # block 1 holds nearly all the mass
    full = SelectRule(1, 32, 6 * bs, top_p=None, scale=1.0)
    assert select_blocks(bound, lens, bs, full)[0][0].sum() == 6
    sharp = SelectRule(1, 32, 6 * bs, top_p=0.9, scale=1.0)
    assert select_blocks(bound, lens, bs, sharp)[0][0].nonzero().flatten().tolist() == [0, 1, 7]
    flat = SelectRule(1, 32, 4 * bs, top_p=0.99, scale=1.0)
    assert select_blocks(torch.zeros(1, 8), lens, bs, flat)[0][0].sum() == 4


@pytest.mark.parametrize("top_p", [None, 0.8])
def test_a_plan_reused_across_layers_chooses_what_planning_per_call_does(top_p):
    # the engine plans once per step from the rows' lengths and reuses it at every layer
    bs, gen = 32, torch.Generator().manual_seed(3)
    lens = torch.randint(bs, 40 * bs, (6,), generator=gen)
    width = int((lens.max() + bs - 1) // bs)
    rule = SelectRule(2, 96, 8 * bs, top_p=top_p, scale=0.125)
    plan = plan_selection(lens, bs, rule, width)
    for _ in range(4):  # four layers' bounds
        bound = torch.randn(len(lens), width, generator=gen) * 20
        held = torch.rand(len(lens), width, generator=gen) < 0.1
        planned = select_blocks(bound, lens, bs, rule, held, plan)
        fresh = select_blocks(bound, lens, bs, rule, held)
        assert all(torch.equal(a, b) for a, b in zip(planned, fresh, strict=True))
        assert int(planned[1].sum(1).max()) <= 8  # never past the budget


def test_share_rank_is_the_largest_per_head_softmax_share():
    gen = torch.Generator().manual_seed(5)
    rows, kv_heads, heads, dim, width = 3, 3, 9, 8, 6
    keys = torch.randn(kv_heads, rows, width, dim, generator=gen)
    packed = torch.cat([keys, -keys], dim=-1)  # one-key blocks: max = min = the key
    query = torch.randn(rows, heads, dim, generator=gen)
    valid = torch.arange(width)[None, :] < torch.tensor([[6], [4], [1]])
    per_head = head_bounds(query, packed)
    assert torch.equal(combine_heads(per_head, "bound", valid, 0.5), packed_bound(query, packed))
    share = combine_heads(per_head, "share", valid, 0.5)
    for r in range(rows):
        n = int(valid[r].sum())
        naive = torch.stack(
            [torch.softmax(0.5 * per_head[g, r, h, :n], 0) for g in range(3) for h in range(3)]
        ).amax(0)
        assert torch.allclose(share[r, :n], naive)
    with pytest.raises(ValueError, match="'bound' or 'share'"):
        combine_heads(per_head, "mean", valid, 0.5)


def test_share_lets_a_small_query_head_rank_its_sharp_block_in():
    # head 0 (large queries) prefers blocks 0, 2, 3, 4 mildly; head 1 (small queries)
    # attends block 1 sharply. The raw bound ranks block 1 last, the share first.
    keys = torch.tensor([[1.0, 0], [0, 5], [0.9, 0], [0.8, 0], [0.8, 0]])
    packed = torch.cat([keys, -keys], dim=-1).reshape(1, 1, 5, 4)
    query = torch.tensor([[[10.0, 0], [0, 1]]])  # [R=1, H=2, D=2], one KV head
    per_head = head_bounds(query, packed)
    valid = torch.ones(1, 5, dtype=torch.bool)
    assert combine_heads(per_head, "bound", valid, 1.0).argsort(descending=True)[0, -1] == 1
    assert combine_heads(per_head, "share", valid, 1.0).argmax() == 1


def test_restrict_rows_matches_the_per_row_reference():
    rng = np.random.default_rng(0)
    bs, rows, width = 32, 5, 12
    table = torch.from_numpy(rng.permutation(100)[: rows * width].reshape(rows, width))
    lens = torch.tensor([12 * bs, 11 * bs + 3, 5 * bs + 31, 1, 7 * bs])
    kept = torch.zeros(rows, width, dtype=torch.bool)
    selections = {}
    for r in range(rows):
        n = -(-int(lens[r]) // bs)
        idx = sorted({0, n - 1, *rng.choice(n, size=min(n, 3), replace=False).tolist()})
        kept[r, idx] = True
        last = int(lens[r]) - bs * (n - 1)
        selections[r] = (idx, bs * (len(idx) - 1) + last)
    got_table, got_lens = restrict_rows(table, lens, kept, bs)
    want_table, want_lens, _, _ = apply_selections(table.numpy(), lens.numpy(), selections)
    assert got_lens.tolist() == want_lens.tolist()
    for r, (idx, _) in selections.items():
        assert got_table[r, : len(idx)].tolist() == want_table[r, : len(idx)].tolist()


def test_held_blocks_stay_read_for_hold_steps_on_top_of_the_budget():
    bs = 32
    rule = SelectRule(sink_blocks=1, recent_tokens=1, budget_tokens=3 * bs, hold_steps=2)
    state = HeldBlocks(num_layers=2, max_blocks=12)
    last = state.rows(["a"])[:, 1]  # layer 1, never ranked
    seq = 10 * bs
    picks = []
    for step, best in enumerate([4, 6, 6, 6]):  # block 4 ranks first once, then block 6
        lens = torch.tensor([seq + step])
        width = -(-int(lens[0]) // bs)
        bound = torch.zeros(1, width)
        bound[0, best] = 9.0
        held = held_mask(last[:, :width], lens, rule.hold_steps)
        kept, ranked = select_blocks(bound, lens, bs, rule, held)
        assert ranked[0].nonzero().flatten().tolist() == [best]
        stamp = lens.to(torch.int32).reshape(-1, 1)
        last[:, :width] = torch.where(ranked, stamp, last[:, :width])
        picks.append(kept[0].nonzero().flatten().tolist())
    # block 4 is read on the 2 steps after it was ranked, then dropped
    assert [4 in p for p in picks] == [True, True, True, False]
    assert picks[1] == [0, 4, 6, 10]  # sink, held, ranked, last: one over the budget
    # state round trip and clean-up per request
    full = state.rows(["a", "b"])
    full[0, 1, :10] = 7
    state.store(["a", "b"], full)
    assert state.request_ids() == {"a", "b"}
    assert int(state.rows(["a"])[0, 1, 3]) == 7
    state.forget("a")
    state.forget("b")
    assert state.request_ids() == set()


def test_budget_in_whole_blocks():
    # 1000 positions buy 32 blocks of 32: a 1024-token row reads all, a 1025-token one is scored
    assert budget_blocks(1000, 32) == 32
    assert budget_blocks(1024, 32) == 32
    assert budget_blocks(1, 128) == 1


def test_select_rows_in_order_are_views_and_others_are_taken():
    # the per-layer glue of select (integration): rows 0..n-1 in order are a slice (a view
    # of the query and of the held stamps the op updates in place); others are gathered
    from vllm_utio.integration.select_attention import _rows_or_view, _sub_rows, _take_rows

    t = torch.arange(12).reshape(6, 2)
    assert _rows_or_view(torch.tensor([0, 1, 2])) == slice(0, 3)
    for rows in ([0, 2, 3], [1, 2], [1]):
        index = torch.tensor(rows)
        assert _rows_or_view(index) is index
        assert torch.equal(_take_rows(t, index), t[rows])
    view = _take_rows(t, slice(0, 3))
    assert view.data_ptr() == t.data_ptr() and torch.equal(view, t[:3])
    mask = torch.tensor([True, False, True])
    assert _sub_rows(slice(0, 3), slice(None)) == slice(0, 3)
    assert torch.equal(_sub_rows(slice(0, 3), mask), torch.tensor([0, 2]))
    assert torch.equal(_sub_rows(torch.tensor([0, 2, 3]), mask), torch.tensor([0, 3]))


@pytest.mark.parametrize("select_every", [1, 2, 4])
def test_choosing_layers_take_turns_over_steps(select_every: int):
    # select_every_steps 4: at each decode step about a quarter of the choosing layers
    # choose afresh, whatever select_every leaves as choosing layers
    from vllm_utio.integration.select_attention import choice_turn
    from vllm_utio.kv_selection import chooses_now

    every_steps, dense = 4, 2
    layers = range(dense, 30, select_every)
    never = torch.full((1,), -(2**30), dtype=torch.int32)
    for length in range(100, 108):
        seq = torch.tensor([length])
        choosing = sum(
            bool(chooses_now(seq - 1, seq, choice_turn(i, select_every), every_steps))
            for i in layers
        )
        assert abs(choosing - len(layers) / every_steps) <= 1, (length, choosing)
        assert all(
            chooses_now(never, seq, choice_turn(i, select_every), every_steps) for i in layers
        )
    assert [choice_turn(i, 1) for i in layers] == list(layers)  # every layer: its index


def test_focus_is_a_far_block_over_the_share_and_lasts_one_step_more():
    # focus_mass: a block outside the sinks and recent window over the share focuses the
    # row (a sink or recent block never does); a focused row chooses at every layer on
    # that step and the next, then takes turns again
    from vllm_utio.kv_selection import chooses_now, finds_focus

    bs = 32
    rule = SelectRule(sink_blocks=1, recent_tokens=40, budget_tokens=4 * bs)
    lens = torch.tensor([10 * bs, 10 * bs, 10 * bs, 6 * bs + 5])
    mass = torch.full((4, 10), 0.01)
    mass[0, 0] = mass[0, 9] = mass[0, 8] = 0.9  # sink and recent window (blocks 8-9)
    mass[1, 4] = 0.5  # far
    mass[2, 4] = 0.29  # far, under the share
    mass[3, 8] = 0.9  # past the row's 7 blocks
    assert finds_focus(mass, lens, bs, rule, 0.3).tolist() == [False, True, False, False]
    mass[3, 3] = 0.3  # far (its recent window is blocks 4-6), at the share
    assert finds_focus(mass, lens, bs, rule, 0.3)[3]
    # every_steps 8 and no turn at layer 3 on lengths 320..322: only focus makes it choose
    seq = torch.full((3,), 10 * bs)
    last = seq - 1
    focus = torch.tensor([10 * bs, 10 * bs - 1, 10 * bs - 2], dtype=torch.int32)
    assert chooses_now(last, seq, 3, 8).tolist() == [False] * 3
    assert chooses_now(last, seq, 3, 8, focus).tolist() == [True, True, False]
    # a focus stamped past the row's length (rejected speculation) is ignored
    assert not chooses_now(last[:1], seq[:1], 3, 8, seq[:1].to(torch.int32) + 1).item()
