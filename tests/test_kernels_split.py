"""Split-KV decode attention (vllm_utio.kernels.decode_attention) vs the torch reference.

Every selection form (implicit ranges: dense and throttle; explicit lists: per KV head
and shared) on random paged layouts in vLLM's packed FlashAttention layout (strided NHD
views, scattered blocks, spare table columns, loud garbage in unowned slots), partial
last blocks, GQA 9/3 (head_dim 64) and 32/8 (head_dim 128), empty selections; split and
unsplit; tl.dot and elementwise query tiles; tiles inside a page and spanning pages.
"""

from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn.functional as F
from test_kernels_env import (
    DEVICE,
    TOLERANCES,
    assert_close,
    decode_attention,
    light_cpu,  # noqa: F401 (a fixture)
    needs_kernels,
)

from vllm_utio.kernels import reference as ref
from vllm_utio.kernels.paged_cases import PagedCase, make_paged_case
from vllm_utio.kernels.selection import DENSE, BlockLists, BlockRanges

pytestmark = [needs_kernels, pytest.mark.usefixtures("light_cpu")]


def case_for(lens, dtype=torch.float32, seed=0, **shape) -> PagedCase:
    return make_paged_case(lens, dtype=dtype, device=DEVICE, seed=seed, garbage=50.0, **shape)


def expected(case: PagedCase, block_sets) -> torch.Tensor:
    """The reference over exactly the positions of ``block_sets[b][h]``."""
    scale = 1 / math.sqrt(case.q.shape[-1])
    mask = ref.blocks_mask(block_sets, case.lens, case.block_size)
    args = (case.q, case.key_cache, case.value_cache, case.block_table, case.seq_lens, scale)
    return ref.sparse_decode_attention_ref(*args, mask)


def attend(case: PagedCase, selection=DENSE, **kw) -> torch.Tensor:
    scale = 1 / math.sqrt(case.q.shape[-1])
    args = (case.q, case.key_cache, case.value_cache, case.block_table, case.seq_lens, scale)
    return decode_attention.paged_decode_attention(*args, selection, **kw)


def range_sets(case: PagedCase, ranges: BlockRanges):
    sets = [
        ref.range_blocks(n, case.block_size, ranges.sink_blocks, ranges.recent_tokens)
        for n in case.lens
    ]
    return [[s] * case.num_kv_heads for s in sets]


def random_lists(case: PagedCase, heads: int, rng: random.Random, width: int):
    """Random duplicate-free block subsets per (sequence, head), some empty; padded with
    garbage entries past the count (never read)."""
    sets, blocks = [], torch.full((len(case.lens), heads, width), 10**6, dtype=torch.int32)
    counts = torch.zeros((len(case.lens), heads), dtype=torch.int32)
    for b, n in enumerate(case.lens):
        total = -(-n // case.block_size)
        row = []
        for h in range(heads):
            k = 0 if (b + h) % 4 == 3 else rng.randint(0, min(total, width))
            chosen = rng.sample(range(total), k)  # any order: the kernel does not sort
            blocks[b, h, :k] = torch.tensor(chosen, dtype=torch.int32)
            counts[b, h] = k
            row.append(chosen)
        sets.append(row if heads > 1 else row * case.num_kv_heads)
    lists = BlockLists(blocks.to(DEVICE), counts.to(DEVICE))
    return sets, lists


LENS = [1, 16, 17, 45, 83]  # one token, an exact block, partial last blocks


@pytest.mark.parametrize("dtype", list(TOLERANCES), ids=str)
@pytest.mark.parametrize(
    "ranges", [DENSE, BlockRanges(1, 20), BlockRanges(0, 1), BlockRanges(2, 3)]
)
def test_ranges_match_reference(dtype: torch.dtype, ranges: BlockRanges):
    case = case_for(LENS, dtype, num_q_heads=9, num_kv_heads=3, head_dim=64)
    want = expected(case, range_sets(case, ranges))
    for splits in (1, 3):
        assert_close(attend(case, ranges, num_splits=splits), want, dtype)


@pytest.mark.parametrize("heads", ["per_kv_head", "shared"])
@pytest.mark.parametrize("seed", [0, 1])
def test_lists_match_reference(heads: str, seed: int):
    rng = random.Random(seed)
    lens = [rng.randint(1, 90) for _ in range(4)]
    case = case_for(lens, torch.bfloat16, seed, num_q_heads=9, num_kv_heads=3, head_dim=64)
    sets, lists = random_lists(case, 3 if heads == "per_kv_head" else 1, rng, width=6)
    want = expected(case, sets)
    for splits in (1, 4):
        assert_close(attend(case, lists, num_splits=splits), want, torch.bfloat16)


def test_llama_shape_gqa_32_8():
    """Llama-3-8B's attention shape (32 q / 8 KV heads, head_dim 128), tiny lengths."""
    case = case_for(
        [5, 40], torch.bfloat16, num_q_heads=32, num_kv_heads=8, head_dim=128, block_size=16
    )
    ranges = BlockRanges(1, 8)
    want = expected(case, range_sets(case, ranges))
    assert_close(attend(case, ranges, num_splits=2), want, torch.bfloat16)


@pytest.mark.parametrize("use_dot", [True, False], ids=["dot", "elementwise"])
@pytest.mark.parametrize(("block_size", "block_n"), [(4, 64), (32, 16), (16, 16)])
def test_tiles_and_query_tiles(use_dot: bool, block_size: int, block_n: int):
    """Tiles spanning several pages (4-token pages, 64-position tiles), tiles inside a
    page (32 / 16), aligned; padded tl.dot query tiles and elementwise ones."""
    case = case_for(
        [3, 50, 77], torch.float16, num_q_heads=4, num_kv_heads=2, block_size=block_size
    )
    config = decode_attention.KernelConfig(block_n=block_n, use_dot=use_dot)
    want = expected(case, range_sets(case, DENSE))
    assert_close(attend(case, DENSE, num_splits=2, config=config), want, torch.float16)


def test_split_equals_unsplit():
    case = case_for([9, 64, 100], torch.float32, num_q_heads=4, num_kv_heads=1, block_size=8)
    one = attend(case, DENSE, num_splits=1)
    for splits in (2, 5, 13, 40):  # 40 > the longest row's 13 blocks: empty splits
        torch.testing.assert_close(
            attend(case, DENSE, num_splits=splits), one, rtol=1e-5, atol=1e-5
        )


def test_dense_is_sdpa():
    case = case_for([1, 31, 64], torch.float32, num_q_heads=8, num_kv_heads=2)
    outs = []
    for b, n in enumerate(case.lens):
        k = ref.gather_sequence(case.key_cache, case.block_table[b], n).permute(1, 0, 2)[None]
        v = ref.gather_sequence(case.value_cache, case.block_table[b], n).permute(1, 0, 2)[None]
        q = case.q[b][None, :, None, :]
        outs.append(F.scaled_dot_product_attention(q, k, v, enable_gqa=True)[0, :, 0])
    torch.testing.assert_close(
        attend(case, DENSE, num_splits=3), torch.stack(outs), rtol=1e-5, atol=1e-5
    )


def test_empty_selections_give_zeros():
    case = case_for([0, 20, 0], torch.float32, num_q_heads=4, num_kv_heads=2)
    lists = BlockLists(
        torch.tensor([[0, 1]], dtype=torch.int32, device=DEVICE).expand(3, 2, 2).contiguous(),
        torch.tensor([[1, 1], [0, 2], [0, 0]], dtype=torch.int32, device=DEVICE),
    )  # a count on a seq_len-0 row reads nothing either
    for selection in (DENSE, BlockRanges(1, 4), lists):
        for splits in (1, 2):
            out = torch.full_like(case.q, float("nan"))
            got = attend(case, selection, num_splits=splits, out=out)
            assert got is out
            assert torch.equal(out[0], torch.zeros_like(out[0]))
            assert torch.equal(out[2], torch.zeros_like(out[2]))
    got = attend(case, lists, num_splits=2)
    assert torch.equal(got[1, :2], torch.zeros_like(got[1, :2]))  # KV head 0's count is 0
    assert_close(
        got[1, 2:], expected(case, [[[], []], [[], [0, 1]], [[], []]])[1, 2:], torch.float32
    )


def test_hnd_layout_and_workspace():
    case = case_for([7, 33], torch.float16, num_q_heads=4, num_kv_heads=2)
    hnd_k, hnd_v = (c.transpose(1, 2).contiguous() for c in (case.key_cache, case.value_cache))
    ws = decode_attention.SplitWorkspace.allocate(4, 4, 64, 8, DEVICE)
    scale = 1 / 8
    got = decode_attention.paged_decode_attention(
        case.q,
        hnd_k,
        hnd_v,
        case.block_table,
        case.seq_lens,
        scale,
        layout="HND",
        num_splits=3,
        workspace=ws,
    )
    assert_close(got, expected(case, range_sets(case, DENSE)), torch.float16)


def test_choose_num_splits():
    choose = decode_attention.choose_num_splits
    assert choose(64, 8, 32768, 132) == 2  # 512 programs: 2 splits for 4 per SM
    assert choose(128, 8, 32768, 132) == 1
    assert choose(1, 8, 32768, 132) == 64  # capped by max_splits
    assert choose(1, 8, 640, 132) == 5  # a short selection: no split under 128 positions
    assert choose(8, 8, 4096, 132) == 9
    assert choose(1, 1, 10, 2) == 1


def test_rejects_bad_selection_inputs():
    case = case_for([9, 20])
    bad = BlockLists(
        torch.zeros((2, 3, 4), dtype=torch.int32, device=DEVICE),
        torch.zeros((2, 3), dtype=torch.int32, device=DEVICE),
    )
    with pytest.raises(ValueError, match="block lists must be"):
        attend(case, bad)
    with pytest.raises(TypeError, match="must be int32"):
        BlockLists(
            torch.zeros((2, 1, 4), dtype=torch.int64), torch.zeros((2, 1), dtype=torch.int32)
        )
    with pytest.raises(ValueError, match="num_splits must be >= 1"):
        attend(case, num_splits=0)
    small = decode_attention.SplitWorkspace.allocate(2, 8, 64, 2, DEVICE)
    with pytest.raises(ValueError, match="workspace"):
        attend(case, num_splits=3, workspace=small)
    with pytest.raises(ValueError, match="recent_tokens must be >= 1"):
        BlockRanges(0, 0)
