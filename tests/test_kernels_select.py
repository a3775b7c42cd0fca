"""Block selection on the device vs its torch definitions, and every policy end to end.

- vslash/throttle lists (block_lists) vs vllm_utio.attention_policy.vslash_blocks, the
  runner's block-granular rule, and the reference's vslash_block_set;
- summaries folded in place (block_summaries) vs vllm_utio.kv_selection.BlockSummaries
  (the spec) and vs min/max recomputed from the cache;
- Quest bounds (block_select) vs the reference; top-k per KV head vs the per-KV-head
  reference; one list per row vs the spec's select_blocks; ties;
- SparseDecoder (dense, throttle, vslash, query-aware) vs the reference attention over
  the reference selection.
"""

from __future__ import annotations

import math
import random

import pytest
import torch
from test_kernels_env import (
    DEVICE,
    assert_close,
    block_lists,
    block_select,
    block_summaries,
    decoder,
    light_cpu,  # noqa: F401 (a fixture)
    needs_kernels,
)

from vllm_utio import kv_selection as spec
from vllm_utio.attention_policy import vslash_blocks
from vllm_utio.kernels import reference as ref
from vllm_utio.kernels.paged_cases import PagedCase, make_paged_case

pytestmark = [needs_kernels, pytest.mark.usefixtures("light_cpu")]


def ints(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int32, device=DEVICE)


def list_sets(lists, num_seqs: int) -> list[list[list[int]]]:
    """Each (row, head)'s real entries, sorted; asserts they have no repeats."""
    out = []
    for b in range(num_seqs):
        row = []
        for h in range(lists.heads):
            got = lists.blocks[b, h, : int(lists.counts[b, h])].tolist()
            assert len(got) == len(set(got)), f"repeated blocks {got}"
            row.append(sorted(got))
        out.append(row)
    return out


# ------------------------------------------------------------------ vslash lists


@pytest.mark.parametrize("per_head", [False, True], ids=["per_seq", "per_kv_head"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_vslash_lists_match_policy(seed: int, per_head: bool):
    rng = random.Random(seed)
    bs, heads = 16, 2 if per_head else 1
    lens = [0, 1, 16, *(rng.randint(2, 40 * bs) for _ in range(5))]
    for _ in range(3):
        sink, recent = rng.randint(0, 3), rng.randint(1, 5 * bs)
        offsets = [rng.randint(0, 30 * bs) for _ in range(rng.randint(0, 5))]
        k, ranked_len = rng.randint(0, 6), rng.randint(1, 12)
        ranked = [
            [[rng.randint(-2, 45) for _ in range(ranked_len)] for _ in range(heads)] for _ in lens
        ]
        arg = ints(ranked) if per_head else ints(ranked)[:, 0]
        lists = block_lists.vslash_block_lists(ints(lens), bs, sink, recent, ints(offsets), arg, k)
        assert lists.width == block_lists.vslash_width(bs, sink, recent, len(offsets), k)
        for b, n in enumerate(lens):
            for h, got in enumerate(list_sets(lists, len(lens))[b]):
                cut = vslash_blocks(n, bs, sink * bs, recent, tuple(offsets), ranked[b][h], k)
                want = list(range(-(-n // bs))) if cut is None else cut[0]
                assert got == want, (n, sink, recent, offsets, ranked[b][h], k)
                assert got == ref.vslash_block_set(n, bs, sink, recent, offsets, ranked[b][h], k)


def test_throttle_lists_are_the_ranges():
    lens = [1, 15, 16, 17, 100, 333]
    lists = block_lists.vslash_block_lists(ints(lens), 16, 2, 40, ints([]))
    for b, n in enumerate(lens):
        assert list_sets(lists, len(lens))[b][0] == ref.range_blocks(n, 16, 2, 40)


# ----------------------------------------------------------------- summaries


def slots_of(case: PagedCase, b: int, positions: range) -> torch.Tensor:
    pos = torch.tensor(list(positions), dtype=torch.long, device=DEVICE)
    return (
        case.block_table[b].long()[pos // case.block_size] * case.block_size + pos % case.block_size
    )


def keys_of(case: PagedCase, b: int, positions: range) -> torch.Tensor:
    pos = torch.tensor(list(positions), dtype=torch.long, device=DEVICE)
    blocks = case.block_table[b].long()[pos // case.block_size]
    return case.key_cache[blocks, pos % case.block_size]


def fold_case(case: PagedCase, packed: torch.Tensor, chunk: int = 11) -> None:
    """Write every sequence's keys through the fold in chunks mixing rows, like vLLM steps
    (a prefill chunk per row, padding slots at the end)."""
    for start in range(0, max(case.lens), chunk):
        slots, keys = [], []
        for b, n in enumerate(case.lens):
            span = range(start, min(start + chunk, n))
            if len(span):
                slots.append(slots_of(case, b, span))
                keys.append(keys_of(case, b, span))
        pad = torch.full((2,), -1, dtype=torch.long, device=DEVICE)
        junk = torch.full((2, *keys[0].shape[1:]), 1e4, dtype=keys[0].dtype, device=DEVICE)
        block_summaries.fold_block_summaries(
            packed, torch.cat([*keys, junk]), torch.cat([*slots, pad]), case.block_size
        )


def recomputed(case: PagedCase) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Physical block -> (min, max) [kv_heads, D] over the slots sequences own."""
    out = {}
    for b, n in enumerate(case.lens):
        for j in range(-(-n // case.block_size)):
            span = range(j * case.block_size, min((j + 1) * case.block_size, n))
            keys = keys_of(case, b, span).float()  # [T, H, D]
            out[int(case.block_table[b, j])] = (keys.amin(0), keys.amax(0))
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_summaries_fold_equals_recomputation(dtype: torch.dtype):
    case = make_paged_case(
        [5, 16, 37], num_kv_heads=2, head_dim=16, block_size=8, dtype=dtype, device=DEVICE
    )
    num_blocks = case.kv_cache.shape[0]
    packed = torch.full((2, num_blocks, 32), float("-inf"), dtype=dtype, device=DEVICE)
    packed[:, :, :] = 7.0  # stale values of a previous owner: every block starts over
    fold_case(case, packed)
    for block, (lo, hi) in recomputed(case).items():
        assert torch.equal(packed[:, block, :16].float(), hi), block
        assert torch.equal(packed[:, block, 16:].float(), -lo), block


def test_summaries_fold_equals_spec():
    """The spec's fold (BlockSummaries, float32) through prefill, decode, padding and a
    recycled block, call by call."""
    bs, heads, dim, blocks = 4, 2, 8, 10
    want = spec.BlockSummaries(1, blocks, bs, heads, dim)
    got = torch.full((heads, blocks, 2 * dim), float("-inf"), device=DEVICE)
    gen = torch.Generator().manual_seed(0)
    for slots in (
        [8, 9, 10, 11, 12, 13, 20, 21, -1, -1],
        [14, 22, 4],
        [15, 23, 5, -1],
        [12, 13, 16],
    ):
        keys = torch.randn(len(slots), heads, dim, generator=gen)
        want.fold(0, keys, torch.tensor(slots))
        block_summaries.fold_block_summaries(
            got, keys.to(DEVICE), torch.tensor(slots, device=DEVICE), bs
        )
        assert torch.equal(got.cpu(), want.packed[0])


# ------------------------------------------------------------ scores and top-k


def select_case(seed: int = 0, per_seq_blocks: int = 16):
    """Random packed summaries (max >= min) and rows with partial last blocks."""
    gen = torch.Generator().manual_seed(seed)
    bs, heads, dim, q_heads, num_blocks = 4, 2, 16, 6, 48
    lens = [1, 9, 37, 60, 64]
    a, b = (
        torch.randn(heads, num_blocks, dim, generator=gen),
        torch.randn(heads, num_blocks, dim, generator=gen),
    )
    packed = torch.cat([torch.maximum(a, b), -torch.minimum(a, b)], -1)
    table = torch.stack([torch.randperm(num_blocks, generator=gen)[:per_seq_blocks] for _ in lens])
    q = torch.randn(len(lens), q_heads, dim, generator=gen)
    return q.to(DEVICE), packed.to(DEVICE), table.to(torch.int32).to(DEVICE), lens, bs


def test_scores_match_reference_bound():
    q, packed, table, lens, bs = select_case()
    got = block_select.block_scores(q, packed, table, ints(lens), bs).cpu()
    kmin, kmax = ref.gather_summaries(packed.cpu(), table.cpu(), table.shape[1])
    want = ref.kv_head_bounds(q.cpu(), kmin, kmax)
    for b, n in enumerate(lens):
        nb = -(-n // bs)
        torch.testing.assert_close(got[b, :, :nb], want[b, :, :nb], rtol=1e-5, atol=1e-5)
        assert torch.isinf(got[b, :, nb:]).all() and (got[b, :, nb:] < 0).all()


@pytest.mark.parametrize(
    ("sink", "recent", "budget"), [(1, 4, 16), (0, 1, 8), (2, 9, 4), (0, 5, 100)]
)
def test_topk_per_kv_head_matches_reference(sink: int, recent: int, budget: int):
    q, packed, table, lens, bs = select_case(1)
    scores = block_select.block_scores(q, packed, table, ints(lens), bs)
    lists = block_select.topk_block_lists(scores, ints(lens), bs, sink, recent, budget)
    want = ref.select_per_kv_head(scores.cpu(), lens, bs, sink, recent, budget)
    assert list_sets(lists, len(lens)) == want


@pytest.mark.parametrize("seed", [0, 2])
def test_shared_topk_matches_spec_select_blocks(seed: int):
    """One list per row = vllm_utio.kv_selection.select_blocks on packed_bound."""
    q, packed, table, lens, bs = select_case(seed)
    scores = block_select.block_scores(q, packed, table, ints(lens), bs)
    gathered = packed.cpu()[:, table.cpu().long()]  # BlockSummaries.gather's layout
    bound = spec.packed_bound(q.cpu(), gathered)
    for rule in (spec.SelectRule(1, 6, 24), spec.SelectRule(0, 1, 10), spec.SelectRule(3, 20, 8)):
        lists = block_select.topk_block_lists(
            scores,
            ints(lens),
            bs,
            rule.sink_blocks,
            rule.recent_tokens,
            rule.budget_tokens,
            per_kv_head=False,
        )
        kept, _ = spec.select_blocks(bound, torch.tensor(lens), bs, rule)
        for b in range(len(lens)):
            assert list_sets(lists, len(lens))[b][0] == torch.nonzero(kept[b]).flatten().tolist()


def test_topk_ties_go_to_the_lower_block():
    """Block 7 is the recent window (always kept); the others compete, equal bounds in
    block order."""
    scores = torch.tensor([[[1.0, 3.0, 2.0, 3.0, 3.0, 2.0, -1.0, 3.0]]], device=DEVICE)
    lens = ints([8 * 4])
    cases = [(1, [7]), (2, [1, 7]), (4, [1, 3, 4, 7]), (5, [1, 2, 3, 4, 7]), (8, list(range(8)))]
    for budget_blocks, want in cases:
        lists = block_select.topk_block_lists(scores, lens, 4, 0, 1, 4 * budget_blocks)
        assert list_sets(lists, 1)[0][0] == want, budget_blocks


# ----------------------------------------------------------------- end to end


POLICIES = {
    "dense": decoder.Dense() if decoder else None,
    "throttle": decoder.Throttle(16, 20) if decoder else None,
    "vslash": decoder.Vslash(8, 12, (0, 30, 31, 200), 3) if decoder else None,
    "query_aware": decoder.QueryAware(8, 12, 48) if decoder else None,
    "query_aware_shared": decoder.QueryAware(8, 12, 48, per_kv_head=False) if decoder else None,
}


def reference_sets(name: str, case: PagedCase, q: torch.Tensor, packed, ranked):
    bs, heads, lens = case.block_size, case.num_kv_heads, case.lens
    policy = POLICIES[name]
    if name == "dense":
        return [[ref.range_blocks(n, bs, 0, None)] * heads for n in lens]
    sink = policy.sink_tokens // bs
    if name == "throttle":
        return [[ref.range_blocks(n, bs, sink, policy.recent_tokens)] * heads for n in lens]
    if name == "vslash":
        return [
            [
                ref.vslash_block_set(
                    n, bs, sink, policy.recent_tokens, policy.slash_offsets, ranked[b], 3
                )
            ]
            * heads
            for b, n in enumerate(lens)
        ]
    kmin, kmax = ref.gather_summaries(
        packed.cpu(), case.block_table.cpu(), case.block_table.shape[1]
    )
    bounds = ref.kv_head_bounds(q.cpu(), kmin, kmax)
    if not policy.per_kv_head:
        bounds = bounds.amax(1, keepdim=True)
    sets = ref.select_per_kv_head(
        bounds, lens, bs, sink, policy.recent_tokens, policy.budget_tokens
    )
    return sets if policy.per_kv_head else [row * heads for row in sets]


@pytest.mark.parametrize("name", list(POLICIES))
def test_decoder_policies_match_reference(name: str):
    """Each policy all in (selection on the device + split-KV attention) = the reference
    attention over the reference selection; GQA 9/3, head_dim 64, 8-token pages."""
    case = make_paged_case(
        [3, 40, 130], num_q_heads=9, num_kv_heads=3, head_dim=64, block_size=8,
        dtype=torch.bfloat16, device=DEVICE, garbage=50.0,
    )  # fmt: skip
    packed = torch.full(
        (3, case.kv_cache.shape[0], 128), float("-inf"), dtype=torch.bfloat16, device=DEVICE
    )
    fold_case(case, packed, chunk=50)
    ranked = [[11, 2, 2, -1, 5, 9, 14] for _ in case.lens]
    shape = decoder.DecodeShape(3, 9, 3, 64, 8, case.block_table.shape[1])
    dec = decoder.SparseDecoder(POLICIES[name], shape, DEVICE, num_sms=2)
    out = torch.empty_like(case.q)
    scale = 0.125
    dec(case.q, case.key_cache, case.value_cache, case.block_table, case.seq_lens, scale,
        out=out, summaries=packed, ranked=ints(ranked))  # fmt: skip
    sets = reference_sets(name, case, case.q, packed, ranked)
    mask = ref.blocks_mask(sets, case.lens, case.block_size)
    want = ref.sparse_decode_attention_ref(
        case.q, case.key_cache, case.value_cache, case.block_table, case.seq_lens, scale, mask
    )
    assert_close(out, want, torch.bfloat16)
    if name != "dense":  # and it is sparse: some row reads less than everything
        assert not mask[-1].all()
    assert math.isfinite(float(out.float().abs().max()))
