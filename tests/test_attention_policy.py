"""Sparse attention policies (throttle, vslash): block selection and the vertical estimate
(pure), vLLM's CPU attention op over restricted block tables (no engine), and the engine
path (one engine with throttle and vslash buckets, plus the shared vanilla engine)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_llm, shutdown

from vllm_utio.attention_policy import (
    apply_selections,
    block_attention_mass,
    rank_blocks,
    restrict_block_table,
    throttled_blocks,
    vslash_blocks,
)
from vllm_utio.config import UtioConfigError, parse_utio_config
from vllm_utio.kernels import reference as ref


def positions_read(seq_len: int, bs: int, sink: int, recent: int) -> list[int]:
    cut = throttled_blocks(seq_len, bs, sink, recent)
    if cut is None:
        return list(range(seq_len))
    kept, new_len = cut
    out = [b * bs + o for b in kept[:-1] for o in range(bs)]
    last = kept[-1]
    out += [last * bs + o for o in range(new_len - bs * (len(kept) - 1))]
    return out


@pytest.mark.parametrize("seq_len", [1, 5, 16, 17, 40, 64, 65, 100])
@pytest.mark.parametrize(("sink", "recent"), [(0, 1), (16, 1), (16, 10), (32, 20), (0, 64)])
def test_throttle_keeps_sinks_and_recent_window(seq_len, sink, recent):
    bs = 16
    read = positions_read(seq_len, bs, sink, recent)
    want = set(range(min(sink, seq_len))) | set(range(max(0, seq_len - recent), seq_len))
    assert want <= set(read), "every sink and recent position is read"
    assert read == sorted(set(read)) and read[-1] == seq_len - 1  # ends at the token itself
    extra = set(read) - want
    assert len(extra) < bs, "widening to whole blocks adds less than one block"
    if sink + recent >= seq_len + bs:
        assert read == list(range(seq_len))  # nothing cut


def test_restrict_block_table_rows_and_counts():
    table = np.arange(40, dtype=np.int32).reshape(2, 20) + 100
    lens = np.array([70, 30], dtype=np.int32)
    t, new_lens, read, dense = restrict_block_table(table, lens, np.array([0]), 16, 16, 20)
    # row 0: 5 blocks; keep block 0 (sink) + blocks 3,4 (last 20 tokens: 6 in block 4, 14 in 3)
    assert t[0, :3].tolist() == [100, 103, 104] and new_lens[0] == 16 * 2 + 6
    assert t[1].tolist() == table[1].tolist() and new_lens[1] == 30  # untouched row
    assert (read, dense) == (38, 70)
    assert table[0, 1] == 101  # the input is not modified


def test_sink_tokens_must_be_whole_blocks():
    cfg = parse_utio_config(
        {"attention_all": {"policy": "throttle", "sink_tokens": 100, "recent_tokens": 64}}
    )
    with pytest.raises(UtioConfigError, match=r"attention_all\.sink_tokens.*multiple.*128"):
        cfg.check_against_model(30, 128)
    parse_utio_config({"attention_all": {"sink_tokens": 100}}).check_against_model(30, 128)


def kept_positions(cut, seq_len: int, bs: int) -> list[int]:
    """Logical positions read under a block selection (None: all)."""
    if cut is None:
        return list(range(seq_len))
    kept, new_len = cut
    assert kept == sorted(set(kept)) and kept[-1] == (seq_len - 1) // bs  # ends at the token
    out = [b * bs + o for b in kept for o in range(bs) if b * bs + o < seq_len]
    assert len(out) == new_len, "the new length counts exactly the kept positions"
    return out


@pytest.mark.parametrize("seed", range(6))
def test_vslash_blocks_random(seed):
    rng = np.random.default_rng(seed)
    bs = int(rng.choice([16, 32, 128]))
    for _ in range(200):
        seq_len = int(rng.integers(1, 20 * bs))
        total = -(-seq_len // bs)
        sink = bs * int(rng.integers(0, 3))
        recent = int(rng.integers(1, 4 * bs))
        offsets = tuple(int(o) for o in rng.choice(25 * bs, size=rng.integers(0, 4), replace=False))
        ranked = rng.permutation(total + 3) - 1  # stale/out-of-range entries are skipped
        k = int(rng.integers(0, 6))
        cut = vslash_blocks(seq_len, bs, sink, recent, offsets, ranked, k)
        read = set(kept_positions(cut, seq_len, bs))
        base = set(kept_positions(throttled_blocks(seq_len, bs, sink, recent), seq_len, bs))
        slash = {seq_len - 1 - o for o in offsets if o < seq_len}
        assert base | slash <= read
        # token-granular vslash semantics (kernels/reference.py) are covered by the blocks
        assert set(ref.vslash_positions(seq_len, sink, recent, [], offsets).tolist()) <= read
        blocks = {p // bs for p in read}
        extra = blocks - {p // bs for p in base | slash}
        # the extras are the first ranked blocks not kept otherwise, exactly k when possible
        want = [b for b in ranked if 0 <= b < total and b not in {p // bs for p in base | slash}]
        assert sorted(extra) == sorted(want[:k])
        assert (cut is None) == (len(blocks) == total)


def test_vslash_blocks_dedup_and_counts():
    bs = 16
    # 10 blocks, last holds 4 tokens (seq_len 148); sinks block 0, window blocks 8-9
    base = throttled_blocks(148, bs, 16, 10)
    assert base == ([0, 8, 9], 36)
    # slash offsets inside the window or sinks add nothing; offset 60 -> position 87, block 5
    assert vslash_blocks(148, bs, 16, 10, (0, 3, 60, 140, 147, 500)) == ([0, 5, 8, 9], 52)
    # verticals skip kept blocks (0, 9) and out-of-range entries (12, -1) and stop at k
    got = vslash_blocks(148, bs, 16, 10, (60,), [0, 9, 12, -1, 3, 5, 1, 7], 2)
    assert got == ([0, 1, 3, 5, 8, 9], 84)
    assert vslash_blocks(148, bs, 16, 10, (), [3, 1, 2, 4, 5, 6, 7], 100) is None  # all kept
    assert vslash_blocks(148, bs, 16, 10, (), [3], 0) == base  # k = 0: throttle
    table = np.arange(20, dtype=np.int32).reshape(2, 10) + 100
    lens = np.array([148, 150], dtype=np.int32)
    t, new_lens, read, dense = apply_selections(table, lens, {0: got, 1: None})
    assert t[0, :6].tolist() == [100, 101, 103, 105, 108, 109] and new_lens[0] == 84
    assert t[1].tolist() == table[1].tolist() and new_lens[1] == 150
    assert (read, dense) == (84 + 150, 148 + 150)


def test_block_attention_mass_and_ranking():
    torch.manual_seed(0)
    rows, nb, bs, kv_heads, group, dim = 3, 4, 8, 3, 3, 16
    keys = torch.randn(rows, nb, bs, kv_heads, dim)
    query = torch.randn(rows, kv_heads * group, dim)
    lens = torch.tensor([32, 17, 9])
    keys[0, 2, 5, 1] = query[0, 4] * 4.0  # query head 4 (KV head 1) locks onto block 2
    mass = block_attention_mass(query, keys, lens, dim**-0.5)
    for r in range(rows):
        n = int(lens[r])
        k = keys[r].reshape(nb * bs, kv_heads, dim)[:n]
        per_head = []
        for h in range(kv_heads * group):
            p = torch.softmax(k[:, h // group] @ query[r, h] * dim**-0.5, dim=0)
            per_head.append(torch.zeros(nb * bs).index_put_((torch.arange(n),), p))
        want = torch.stack(per_head).reshape(-1, nb, bs).sum(-1).amax(0)
        torch.testing.assert_close(mass[r], want)
    assert mass[2, 2:].eq(0).all() and mass[1, 3].eq(0)  # blocks past seq_len
    # the engine's bf16 cache: logits rounded to bf16, still close (ranking is approximate)
    low = block_attention_mass(query.bfloat16(), keys.bfloat16(), lens, dim**-0.5)
    torch.testing.assert_close(low, mass, rtol=0.0, atol=0.03)
    ranked = rank_blocks(mass, lens.tolist(), bs)
    assert ranked[0][0] == 2 and len(ranked[1]) == 3 and len(ranked[2]) == 2
    assert sorted(ranked[0].tolist()) == [0, 1, 2, 3]


def test_captured_query_rows():
    """The runner finds each decode row's captured query in slice and index-set captures."""
    from vllm_utio.integration.runner import _captured_rows

    q = torch.arange(10.0)[:, None].expand(10, 4)
    caps = [
        {"query": q[0:3], "tokens": slice(0, 3)},
        {"query": q[[7, 5, 9]], "tokens": torch.tensor([7, 5, 9])},  # gather: any order
        {"query": q[:0], "tokens": torch.tensor([], dtype=torch.long)},
    ]
    got, ran = _captured_rows(caps, "query", np.array([9, 4, 1, 5, 12]))
    assert ran.tolist() == [True, False, True, True, False]
    assert got[:, 0].tolist() == [9.0, 1.0, 5.0]


def test_vslash_config_errors():
    def err(attention: dict, **more) -> str:
        with pytest.raises(UtioConfigError) as info:
            cfg = parse_utio_config({"attention_all": attention, **more})
            cfg.check_against_model(30, 128)
        return str(info.value)

    msg = err({"policy": "vslash", "slash_offsets": [3, -4]})
    assert "'attention_all.slash_offsets': value [3, -4]" in msg and ">= 0" in msg
    msg = err({"policy": "vslash", "slash_offsets": [3, 3]})
    assert "'attention_all.slash_offsets': value [3, 3]" in msg and "distinct" in msg
    assert "'attention_all.vertical_blocks': value -1" in err(
        {"policy": "vslash", "vertical_blocks": -1}
    )
    msg = err({"policy": "throttle", "vertical_blocks": 2})
    assert "vertical_blocks only apply to policy 'vslash'" in msg
    assert "'attention_all.sink_tokens': value 100" in err({"policy": "vslash", "sink_tokens": 100})
    assert "'dense', 'throttle', 'vslash' or 'select'" in err({"policy": "sparse"})
    msg = err({"policy": "throttle", "budget_tokens": 512})
    assert "budget_tokens only apply to policy 'select'" in msg
    msg = err({"policy": "select", "dense_layers": 30})
    assert "'attention_all.dense_layers': value 30" in msg and "0..29" in msg
    assert "'attention_all.top_p': value 1.5" in err({"policy": "select", "top_p": 1.5})
    msg = err({"policy": "select", "heads": "mean"})
    assert "'attention_all.heads': value 'mean'" in msg and "'bound' or 'share'" in msg
    assert "heads only apply to policy 'select'" in err({"policy": "throttle", "heads": "share"})
    msg = err({"policy": "select", "heads": "share", "top_p": 0.9})
    assert "needs heads='bound'" in msg
    msg = err({"policy": "select", "scoring": "exact"})
    assert "'attention_all.scoring': value 'exact'" in msg and "'bound' or 'sparq'" in msg
    msg = err({"policy": "select", "scoring": "sparq", "top_p": 0.9})
    assert "top_p only applies to scoring 'bound', not 'sparq'" in msg
    msg = err({"policy": "select", "sparq_channels": 8})
    assert "sparq_channels only applies to scoring 'sparq'" in msg
    assert "'attention_all.sparq_channels': value 0" in err(
        {"policy": "select", "scoring": "sparq", "sparq_channels": 0}
    )
    assert "scoring only apply to policy 'select'" in err(
        {"policy": "throttle", "scoring": "sparq"}
    )
    msg = err({"policy": "select", "select_every": 0})
    assert "'attention_all.select_every': value 0" in msg and "greater than or equal to 1" in msg
    assert "select_every only apply to policy 'select'" in err(
        {"policy": "throttle", "select_every": 2}
    )
    msg = err({"policy": "select", "select_every_steps": 2})
    assert "select_every_steps only applies to scoring 'sparq'" in msg
    msg = err({"policy": "select", "scoring": "sparq", "select_every_steps": 4, "hold_steps": 2})
    assert "set one of them" in msg and "not both" in msg
    assert "'attention_all.select_every_steps': value 0" in err(
        {"policy": "select", "scoring": "sparq", "select_every_steps": 0}
    )
    sparq_steps = {"policy": "select", "scoring": "sparq", "select_every_steps": 8}
    msg = err({**sparq_steps, "focus_mass": 0})
    assert "'attention_all.focus_mass': value 0" in msg and "greater than 0" in msg
    assert "'attention_all.focus_mass': value 1.5" in err({**sparq_steps, "focus_mass": 1.5})
    msg = err({**sparq_steps, "select_every_steps": 1, "focus_mass": 0.4})
    assert "focus_mass only applies with select_every_steps > 1" in msg
    assert "focus_mass only applies to scoring 'sparq'" in err(
        {"policy": "select", "focus_mass": 0.4}
    )
    assert "focus_mass only apply to policy 'select'" in err(
        {"policy": "throttle", "focus_mass": 0.4}
    )
    parse_utio_config({"attention_all": {**sparq_steps, "focus_mass": 0.4}})
    bucket = {"name": "b", "max_score": 0.5, "keep_first": 10, "keep_last": 10}
    msg = err({"policy": "vslash"}, buckets=[bucket], routing_layer=12)
    assert "'attention_all.policy': value 'vslash'" in msg and "routing_layer=12" in msg
    ok = {"policy": "vslash", "slash_offsets": [0, 500], "vertical_blocks": 0}
    parse_utio_config({"attention_all": ok}).check_against_model(30, 128)
    parse_utio_config({"attention_all": ok, "buckets": [bucket], "routing_layer": 9})


# --- the real CPU attention op over restricted block tables -------------------------------
HEADS, KV_HEADS, HEAD_DIM = 9, 3, 64


def _cpu_ops():
    ops = pytest.importorskip("vllm._custom_ops")
    if not hasattr(torch.ops._C, "cpu_attention_with_kv_cache"):
        pytest.skip("this vLLM build has no CPU attention op")
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    return ops, _get_attn_isa


def _paged_cache(ops, isa, dtype, bs, seq_lens, rng):
    """vLLM CPU cache [blocks, kv_heads, bs, 2 * D] written through the backend's op, random
    physical blocks per sequence, and the same K/V in the reference's NHD layout."""
    need = [-(-n // bs) for n in seq_lens]
    num_blocks = sum(need) + 3
    perm = torch.from_numpy(rng.permutation(num_blocks)).to(torch.int32)
    table = torch.zeros(len(seq_lens), max(need) + 2, dtype=torch.int32)
    cache = torch.zeros(num_blocks, KV_HEADS, bs, 2 * HEAD_DIM, dtype=dtype)
    key_cache, value_cache = cache.view(num_blocks, KV_HEADS, 2 * bs, HEAD_DIM).chunk(2, dim=2)
    k_nhd = torch.zeros(num_blocks, bs, KV_HEADS, HEAD_DIM, dtype=dtype)
    v_nhd = torch.zeros_like(k_nhd)
    start = 0
    for r, n in enumerate(seq_lens):
        table[r, : need[r]] = perm[start : start + need[r]]
        start += need[r]
        pos = torch.arange(n)
        blk, off = table[r].long()[pos // bs], pos % bs
        k = torch.randn(n, KV_HEADS, HEAD_DIM).to(dtype)
        v = torch.randn(n, KV_HEADS, HEAD_DIM).to(dtype)
        ops.cpu_attn_reshape_and_cache(k, v, key_cache, value_cache, blk * bs + off, isa)
        k_nhd[blk, off], v_nhd[blk, off] = k, v
    return cache, key_cache, value_cache, table, k_nhd, v_nhd


def _cpu_decode(ops, isa, q, key_cache, value_cache, table, lens, split: bool):
    """Decode attention through vLLM's CPU op, with metadata built as the backend does."""
    qsl = torch.arange(len(lens) + 1, dtype=torch.int32)
    lens = torch.as_tensor(lens, dtype=torch.int32)
    meta = ops.cpu_attn_get_scheduler_metadata(
        len(lens), HEADS, KV_HEADS, HEAD_DIM, lens, q.dtype, qsl, True, -1, isa, split
    )
    out = torch.empty_like(q)
    ops.cpu_attention_with_kv_cache(
        q, key_cache, value_cache, out, qsl, lens, HEAD_DIM**-0.5, True, None, -1,
        torch.as_tensor(table, dtype=torch.int32), 0.0, meta, None,
    )  # fmt: skip
    return out


OP_TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (1e-2, 1e-2)}  # ~1 bf16 ulp


@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("bs", [32, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("seed", [0, 1])
def test_restricted_block_table_through_cpu_op(seed, dtype, bs, split):
    """Outputs equal the torch reference over exactly the kept positions, for random paged
    layouts (sinks, verticals, slash, window, partial last block), via vLLM's CPU op."""
    ops, get_isa = _cpu_ops()
    rng = np.random.default_rng(seed)
    isa = get_isa(dtype, bs, HEAD_DIM)
    lens = [1, bs, bs + 1, 3 * bs - 1, 7 * bs + 5, int(rng.integers(2 * bs, 12 * bs))]
    _, key_cache, value_cache, table, k_nhd, v_nhd = _paged_cache(ops, isa, dtype, bs, lens, rng)
    q = torch.randn(len(lens), HEADS, HEAD_DIM).to(dtype)
    cuts = {}
    for r, n in enumerate(lens):
        total = -(-n // bs)
        offsets = tuple(int(o) for o in rng.choice(n, size=min(n, 2), replace=False))
        cuts[r] = vslash_blocks(
            n, bs, bs * int(rng.integers(0, 2)), int(rng.integers(1, bs + 9)), offsets,
            rng.permutation(total), int(rng.integers(0, 3)),
        )  # fmt: skip
    assert sum(c is not None for c in cuts.values()) >= 2, "the layout cuts something"
    sparse_table, sparse_lens, read, dense = apply_selections(table.numpy(), np.array(lens), cuts)
    assert read < dense
    got = _cpu_decode(ops, isa, q, key_cache, value_cache, sparse_table, sparse_lens, split)
    mask = ref.positions_mask(
        [torch.tensor(kept_positions(cuts[r], n, bs)) for r, n in enumerate(lens)], max(lens)
    )
    want = ref.sparse_decode_attention_ref(
        q, k_nhd, v_nhd, table, torch.tensor(lens), HEAD_DIM**-0.5, mask
    )
    rtol, atol = OP_TOL[dtype]
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol)
    # the harness itself: the unrestricted table is dense attention
    full = _cpu_decode(ops, isa, q, key_cache, value_cache, table, lens, split)
    dense_mask = torch.ones(len(lens), max(lens), dtype=torch.bool)
    want_full = ref.sparse_decode_attention_ref(
        q, k_nhd, v_nhd, table, torch.tensor(lens), HEAD_DIM**-0.5, dense_mask
    )
    torch.testing.assert_close(full, want_full, rtol=rtol, atol=atol)
    assert not torch.allclose(got.float(), full.float(), atol=atol), "restriction has effect"


@pytest.mark.parametrize("strided", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_read_keys_learns_the_cpu_cache_layout(dtype, strided, monkeypatch):
    """DecoderStack.read_keys reads K back from the backend's packed blocks exactly, through
    a strided view of the learned layout and through the generic per-element gather."""
    from types import SimpleNamespace

    from vllm_utio.integration import model_stack
    from vllm_utio.integration.model_stack import DecoderStack, key_offsets

    if not strided:
        monkeypatch.setattr(model_stack, "affine_strides", lambda offsets: None)

    ops, get_isa = _cpu_ops()
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl

    bs, lens = 32, [70, 5]
    isa = get_isa(dtype, bs, HEAD_DIM)
    cache, _, _, table, k_nhd, _ = _paged_cache(ops, isa, dtype, bs, lens, np.random.default_rng(3))
    impl = object.__new__(CPUAttentionBackendImpl)  # only its cache-write method is used
    impl.attn_type, impl.kv_cache_dtype = "decoder", "auto"
    attn = SimpleNamespace(
        num_kv_heads=KV_HEADS, head_size=HEAD_DIM, kv_cache=cache, impl=impl, isa=isa,
        _k_scale_float=1.0, _v_scale_float=1.0,
    )  # fmt: skip
    layer = SimpleNamespace(self_attn=SimpleNamespace(attn=attn))
    stack = DecoderStack(model=None, layers=[layer])  # type: ignore[arg-type]
    blocks = table[:, :3].long()
    got = stack.read_keys(0, blocks)
    assert got is not None and got.shape == (2, 3, bs, KV_HEADS, HEAD_DIM)
    assert torch.equal(got, k_nhd[blocks])
    assert key_offsets(attn, cache.to(torch.float8_e4m3fn)) is None  # fp8 does not round-trip


SINK, NARROW = 128, 100
VSLASH_NARROW = {"sink_tokens": SINK, "recent_tokens": NARROW}
VSLASH_NARROW |= {"policy": "vslash", "vertical_blocks": 1, "slash_offsets": [300]}
THROTTLE_BUCKETS = [
    {
        "name": "narrow",
        "max_score": 0.2,
        "keep_first": 30,
        "attention": {"policy": "throttle", "sink_tokens": SINK, "recent_tokens": NARROW},
    },
    {
        "name": "wide",
        "max_score": 0.4,
        "keep_first": 30,
        "attention": {"policy": "throttle", "sink_tokens": SINK, "recent_tokens": 100_000},
    },
    {"name": "vs_narrow", "max_score": 0.6, "keep_first": 30, "attention": VSLASH_NARROW},
    {
        "name": "vs_wide",
        "max_score": 0.8,
        "keep_first": 30,
        "attention": {**VSLASH_NARROW, "recent_tokens": 100_000, "vertical_blocks": 4},
    },
]
LONG = " ".join(
    f"Fact {i}: the river town number {i} exports {i * 7 % 13} goods." for i in range(60)
)
MAX_TOKENS = 32


def _vertical_state(wrapper) -> dict:
    runner = getattr(wrapper, "worker", wrapper).model_runner
    return {"ranked": len(runner._utio_ranked), "requests": len(runner.requests)}


def _expected_reads(
    prompt_lens: list[int], out_lens: list[int], policy: dict | None
) -> tuple[int, int]:
    """(KV tokens the decode steps read, K positions the vertical estimate read).

    Decode steps have seq_len P + i for output tokens i = 1..len(output) - 1 (the long
    prompt stops early at max_model_len). A vslash row is
    estimated when its next step could cut something, and uses the estimate (so exactly
    `vertical_blocks` extra full blocks, as many as exist) from its second decode step.
    """
    read = estimated = 0
    for p, out in zip(prompt_lens, out_lens, strict=True):
        for i in range(1, out):
            n = p + i
            if policy is None:
                read += n
                continue
            base = (policy["sink_tokens"], policy["recent_tokens"], policy["slash_offsets"])
            ranked = range(-(-n // 128)) if i > 1 else ()
            cut = vslash_blocks(n, 128, *base, ranked, policy["vertical_blocks"])
            read += n if cut is None else cut[1]
            estimated += n if vslash_blocks(n + 1, 128, *base) is not None else 0
    return read, estimated


def _natural_prompts(tokenizer) -> list[str]:
    """Two held-out-Wikipedia prompts, ~900 and ~450 tokens (room for MAX_TOKENS in 1024)."""
    from vllm_utio.assets.data import load_wiki_documents

    doc = next(d["text"] for d in load_wiki_documents() if len(d["text"]) > 8000)
    text = tokenizer.decode(tokenizer.encode(doc)[:900])
    return [text, text[: len(text) // 2]]


@pytest.mark.engine
def test_throttled_decode_in_the_engine(vanilla_llm):
    from test_engine_foundation import greedy

    llm = make_llm({"enabled": True, "router": "forced", "buckets": THROTTLE_BUCKETS})
    runs = {}
    try:
        # natural text: on the repetitive LONG, vslash's verticals can keep every token
        # dense's, depending on which requests shared a step
        prompts = _natural_prompts(llm.get_tokenizer())
        dense = greedy(vanilla_llm, prompts, max_tokens=MAX_TOKENS)
        for name in ("wide", "narrow", "vs_wide", "vs_narrow"):
            extra = [{"utio_bucket": name}] * 2
            tokens = greedy(llm, prompts, extra, max_tokens=MAX_TOKENS)
            runs[name] = tokens, llm.collective_rpc("utio_stats", kwargs={"reset": True})[0]
        state = llm.collective_rpc(_vertical_state)[0]
        tokenizer = llm.get_tokenizer()
    finally:
        shutdown(llm)
    prompt_lens = [len(tokenizer.encode(p)) for p in prompts]
    assert prompt_lens[0] > 600  # several 128-token blocks
    (wide, s_wide), (narrow, s_narrow) = runs["wide"], runs["narrow"]
    (vs_wide, s_vs_wide), (vs_narrow, s_vs_narrow) = runs["vs_wide"], runs["vs_narrow"]
    assert wide == dense, "a window larger than the context is dense attention"
    assert vs_wide == dense, "vslash keeping everything is dense attention"
    out_lens = [len(t) for t in dense]
    assert all(len(t) == out for t, out in zip(vs_narrow, out_lens, strict=True))
    dense_reads = _expected_reads(prompt_lens, out_lens, None)[0]
    vs_reads, vs_estimated = _expected_reads(prompt_lens, out_lens, VSLASH_NARROW)
    for s in (s_wide, s_vs_wide):
        assert s["kv_tokens_read"] == s["kv_tokens_dense"] == dense_reads
    assert s_narrow["kv_tokens_read"] < 0.6 * s_narrow["kv_tokens_dense"]
    assert narrow != dense, "reading ~1/3 of a long context should change the continuation"
    assert s_narrow["layer_tokens_saved"] == 0  # the buckets run every layer
    # vslash reads its exact block count: more than throttle (slash + vertical), less than dense
    assert s_vs_narrow["kv_tokens_dense"] == dense_reads
    assert s_vs_narrow["kv_tokens_read"] == vs_reads
    assert s_narrow["kv_tokens_read"] < s_vs_narrow["kv_tokens_read"] < dense_reads
    # the estimate reads one layer's K of vslash rows that could cut (none when all is kept)
    assert s_vs_narrow["kv_estimate_tokens"] == vs_estimated > 0
    assert s_vs_wide["kv_estimate_tokens"] == s_narrow["kv_estimate_tokens"] == 0
    assert vs_narrow != dense, "dropping a third of a long context changes the continuation"
    assert state["ranked"] == 0 and state["requests"] == 0, "per-request estimates released"


@pytest.mark.engine
def test_bucket_policy_applies_after_mid_forward_routing(vanilla_llm, tmp_path):
    """router='probe' decides levels at its layer r: the routed rows' bucket policy then
    restricts layers r+1.. (layers up to r ran dense, before the decision existed)."""
    from test_engine_foundation import greedy

    from vllm_utio.routing.probe import Probe, save_probe

    layer, num_layers = 11, 30
    path = tmp_path / "low.safetensors"
    score = 0.1  # below the bucket's max_score: every decode row goes to "narrow"
    save_probe(path, Probe(torch.zeros(576), torch.tensor([np.log(score / (1 - score))]), layer))
    bucket = {**THROTTLE_BUCKETS[0], "max_score": 0.5}
    llm = make_llm(
        {
            "enabled": True,
            "router": "probe",
            "probe_path": str(path),
            "buckets": [bucket],
            "routing_payoff": "always",  # every step routes (the counts below assume it)
        }
    )
    prompts = [LONG, LONG[: len(LONG) // 2]]
    try:
        routed = greedy(llm, prompts, max_tokens=MAX_TOKENS)
        stats = llm.collective_rpc("utio_stats")[0]
        prompt_lens = [len(llm.get_tokenizer().encode(p)) for p in prompts]
    finally:
        shutdown(llm)
    dense = greedy(vanilla_llm, prompts, max_tokens=MAX_TOKENS)
    assert routed != dense, "throttling layers 12-29 of a long context changes the continuation"
    out_lens = [len(t) for t in dense]
    assert stats["rows_per_level"][1] == sum(out - 1 for out in out_lens)  # every decode row
    # KV read per step, layer-weighted: 12 dense layers, 18 restricted ones
    after = num_layers - 1 - layer
    dense_reads = weighted = 0.0
    for p, out in zip(prompt_lens, out_lens, strict=True):
        for i in range(1, out):
            n = p + i
            cut = throttled_blocks(n, 128, SINK, NARROW)
            dense_reads += n
            weighted += n * (num_layers - after) + (n if cut is None else cut[1]) * after
    weighted /= num_layers
    assert stats["kv_tokens_dense"] == dense_reads
    steps = stats["steps"]
    assert weighted - steps <= stats["kv_tokens_read"] <= weighted  # floored once per step
    assert stats["kv_tokens_read"] < 0.75 * dense_reads
