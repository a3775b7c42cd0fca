"""UTIO's decode attention op (C++, :mod:`vllm_utio.cpu_ops`) over a cache written by vLLM's
own CPU write op in its 'vec' layout: equals exact attention, and vLLM's CPU kernel, for
one and several query tokens per row, GQA ratios, head sizes, block sizes and dtypes."""

from __future__ import annotations

import numpy as np
import pytest
import torch


def _ops():
    ops = pytest.importorskip("vllm._custom_ops")
    if not hasattr(torch.ops._C, "cpu_attention_with_kv_cache"):
        pytest.skip("this vLLM build has no CPU attention op")
    from vllm_utio.cpu_ops import load

    op = load()
    if not op.decode_attention_available():
        pytest.skip("this CPU has no AVX-512")
    return ops, op


def _cache(ops, dtype, kv_heads, dim, bs, lens, rng):
    """A 'vec' cache written through vLLM's op at random physical blocks per row, the
    block table, and the rows' K/V in logical order [R][T, G, D]."""
    need = [-(-n // bs) for n in lens]
    blocks = sum(need) + 2
    perm = torch.from_numpy(rng.permutation(blocks)).to(torch.int32)
    table = torch.zeros(len(lens), max(need) + 1, dtype=torch.int32)
    cache = torch.zeros(blocks, kv_heads, bs, 2 * dim, dtype=dtype)
    key_cache, value_cache = cache.view(blocks, kv_heads, 2 * bs, dim).chunk(2, dim=2)
    keys, values, used = [], [], 0
    for r, n in enumerate(lens):
        table[r, : need[r]] = perm[used : used + need[r]]
        used += need[r]
        pos = torch.arange(n)
        slots = table[r].long()[pos // bs] * bs + pos % bs
        k = (torch.randn(n, kv_heads, dim) * 2).to(dtype)
        v = torch.randn(n, kv_heads, dim).to(dtype)
        ops.cpu_attn_reshape_and_cache(k, v, key_cache, value_cache, slots, "vec")
        keys.append(k)
        values.append(v)
    # the 'vec' layout per block and KV head: K [D][bs], then V [bs][D]
    layout = [cache.stride(0), 0, 2 * bs * dim, bs, bs * dim, 2 * bs * dim, dim]
    return cache, key_cache, value_cache, table, keys, values, layout


def _exact(q, keys, values, lens, starts, per_kv, scale):
    """Float64 attention; query token i of a row of t tokens sees len - (t - 1 - i)."""
    out = torch.zeros(q.shape, dtype=torch.float64)
    for r, n in enumerate(lens):
        t = starts[r + 1] - starts[r]
        k = keys[r].double().repeat_interleave(per_kv, dim=1)  # [n, H, D]
        v = values[r].double().repeat_interleave(per_kv, dim=1)
        for i in range(t):
            seen = n - (t - 1 - i)
            s = torch.einsum("hd,nhd->hn", q[starts[r] + i].double(), k[:seen]) * scale
            out[starts[r] + i] = torch.einsum("hn,nhd->hd", s.softmax(-1), v[:seen])
    return out


CASES = [  # dtype, per_kv, kv_heads, dim, bs, tokens per row
    (torch.bfloat16, 3, 3, 64, 32, 1),
    (torch.bfloat16, 3, 3, 64, 128, 1),
    (torch.bfloat16, 3, 3, 64, 32, 5),
    (torch.float16, 3, 3, 64, 32, 2),
    (torch.bfloat16, 1, 4, 128, 32, 1),
    (torch.bfloat16, 8, 2, 128, 64, 2),
    (torch.bfloat16, 4, 2, 64, 128, 3),
    (torch.float16, 7, 1, 128, 32, 1),
]


@pytest.mark.parametrize(("dtype", "per_kv", "kv_heads", "dim", "bs", "tokens"), CASES)
def test_decode_attention_equals_exact_attention(dtype, per_kv, kv_heads, dim, bs, tokens):
    ops, op = _ops()
    rng = np.random.default_rng(per_kv * 100 + tokens * 10 + bs)
    lens = [tokens, bs - 1, bs, bs + 1, 5 * bs + 7, int(rng.integers(2 * bs, 20 * bs))]
    cache, _, _, table, keys, values, layout = _cache(ops, dtype, kv_heads, dim, bs, lens, rng)
    heads = per_kv * kv_heads
    starts = [tokens * r for r in range(len(lens) + 1)]
    q = torch.randn(starts[-1], heads, dim).to(dtype)
    out = torch.full_like(q, float("nan"))
    scale = dim**-0.5
    op.decode_attention(
        q, out, cache, layout, table, torch.tensor(lens), torch.tensor(starts), kv_heads, bs, scale
    )
    want = _exact(q, keys, values, lens, starts, per_kv, scale)
    # the op's float math, rounded once to the cache dtype
    torch.testing.assert_close(out.double(), want, atol=1e-2, rtol=1e-2)
    assert (out.double() - want).abs().mean() < 2e-3


@pytest.mark.parametrize("tokens", [1, 3])
def test_decode_attention_equals_vllms_kernel(tokens: int):
    """The same output as vLLM's CPU kernel over the same cache and block table (within
    bf16 rounding of each), including a block table restricted to some of a row's blocks."""
    ops, op = _ops()
    bs, kv_heads, per_kv, dim = 32, 3, 3, 64
    rng = np.random.default_rng(tokens)
    lens = [40, 130, 33 * bs + 5, 64 * bs]
    cache, key_cache, value_cache, table, *_, layout = _cache(
        ops, torch.bfloat16, kv_heads, dim, bs, lens, rng
    )
    # restrict the long rows to a few blocks (as select does): first, 3 middle, last two
    sparse, sparse_lens = table.clone(), list(lens)
    for r in (2, 3):
        nb = -(-lens[r] // bs)
        keep = [0, 9, 14, 20, nb - 2, nb - 1]
        sparse[r, : len(keep)] = table[r, keep]
        sparse_lens[r] = bs * (len(keep) - 1) + (lens[r] - bs * (nb - 1))
    heads = per_kv * kv_heads
    starts = torch.arange(len(lens) + 1, dtype=torch.int32) * tokens
    q = torch.randn(int(starts[-1]), heads, dim).to(torch.bfloat16)
    seq = torch.tensor(sparse_lens, dtype=torch.int32)
    meta = ops.cpu_attn_get_scheduler_metadata(
        len(lens), heads, kv_heads, dim, seq, q.dtype, starts, True, -1, "vec", False
    )
    want = torch.empty_like(q)
    ops.cpu_attention_with_kv_cache(
        q, key_cache, value_cache, want, starts, seq, dim**-0.5, True, None, -1, sparse, 0.0,
        meta, None,
    )  # fmt: skip
    got = torch.empty_like(q)
    op.decode_attention(q, got, cache, layout, sparse, seq, starts, kv_heads, bs, dim**-0.5)
    torch.testing.assert_close(got.float(), want.float(), atol=8e-3, rtol=1e-2)


def test_decode_attention_refuses_what_it_cannot_do():
    ops, op = _ops()
    rng = np.random.default_rng(0)
    cache, _, _, table, _, _, layout = _cache(ops, torch.bfloat16, 1, 64, 32, [40], rng)
    lens, one = torch.tensor([40]), torch.tensor([0, 1])
    q = torch.randn(1, 3, 64).to(torch.bfloat16)
    with pytest.raises(RuntimeError, match="one dtype"):
        op.decode_attention(q.float(), q.float(), cache, layout, table, lens, one, 1, 32, 1.0)
    q6 = torch.randn(6, 3, 64).to(torch.bfloat16)  # 6 tokens x 3 heads: 18 vectors
    with pytest.raises(RuntimeError, match="at most 16 query vectors"):
        op.decode_attention(
            q6, torch.empty_like(q6), cache, layout, table, lens, torch.tensor([0, 6]), 1, 32, 1.0
        )


@pytest.mark.parametrize(("bs", "tokens"), [(32, 5), (64, 1), (128, 3)])
def test_bf16_dot_products_equal_float_products(bs: int, tokens: int):
    """bf16 caches run on AVX512-BF16 dot products (scores exact, softmax weights rounded to
    bf16): the same output as the op with every product in float, within bf16 rounding, and
    a cache slot past a row's last token (stale, here NaN) never reaches the output."""
    ops, op = _ops()
    if not op.decode_attention_has_dot():
        pytest.skip("this CPU has no AVX512-BF16")
    kv_heads, per_kv, dim = 3, 3, 64
    rng = np.random.default_rng(bs + tokens)
    lens = [tokens, bs + 1, 3 * bs - 1, 9 * bs + 7, 40 * bs]  # odd tails and a full block
    cache, *_, table, keys, values, layout = _cache(
        ops, torch.bfloat16, kv_heads, dim, bs, lens, rng
    )
    per_block = cache.view(cache.shape[0], kv_heads, 2 * bs * dim)
    k_part = per_block[..., : bs * dim].unflatten(-1, (dim, bs))  # K [D][bs]
    v_part = per_block[..., bs * dim :].unflatten(-1, (bs, dim))  # V [bs][D]
    for r, n in enumerate(lens):  # K and V of every slot after a row's last token
        if n % bs:
            blk = int(table[r, n // bs])
            k_part[blk, :, :, n % bs :] = float("nan")
            v_part[blk, :, n % bs :] = float("nan")
    heads = per_kv * kv_heads
    starts = [tokens * r for r in range(len(lens) + 1)]
    q = torch.randn(starts[-1], heads, dim).to(torch.bfloat16)
    args = (cache, layout, table, torch.tensor(lens), torch.tensor(starts), kv_heads, bs, dim**-0.5)
    dot, flt = torch.empty_like(q), torch.empty_like(q)
    op.decode_attention(q, dot, *args)
    op.decode_attention(q, flt, *args, bf16_dot=False)
    want = _exact(q, keys, values, lens, starts, per_kv, dim**-0.5)
    assert torch.isfinite(dot).all() and torch.isfinite(flt).all()
    torch.testing.assert_close(dot.double(), want, atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(dot.float(), flt.float(), atol=8e-3, rtol=1e-2)
    # the weights' bf16 rounding adds well under one bf16 step on average
    assert (dot.double() - want).abs().mean() < 1.5 * (flt.double() - want).abs().mean() + 1e-4
