"""Sparse decode attention (vllm_utio.kernels): Triton kernels vs the torch reference.

The kernels run in Triton's interpreter on CPU. TRITON_INTERPRET=1 is set only while
this module imports the kernels (Triton chooses interpreted vs compiled when a kernel
is defined) and during these tests (the interpreter imports lazily on first launch),
so other test modules and the vLLM processes they start never inherit it. Nothing here
runs compiled Triton; kernels/README.md lists what that leaves untested.

Chain of checks: position helpers vs plain-Python set semantics; the reference vs a
naive float64 masked softmax over contiguous K/V (independent of paging and of the
helpers); the dense case vs torch's SDPA; the kernels vs the reference.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from vllm_utio.kernels import reference as ref


@contextlib.contextmanager
def _interpreter_env() -> Iterator[None]:
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old


try:
    with _interpreter_env():
        from vllm_utio.kernels import sparse_decode as sd
except ImportError as exc:  # no triton in this environment
    sd = None
    SKIP_REASON: str | None = f"triton is not importable: {exc}"
else:
    SKIP_REASON = (
        None
        if sd.INTERPRETED
        else "vllm_utio.kernels.sparse_decode was imported without TRITON_INTERPRET=1 "
        "earlier in this process, so its kernels are compiled-only and cannot run on CPU"
    )

needs_kernels = pytest.mark.skipif(SKIP_REASON is not None, reason=SKIP_REASON or "")

# (rtol, atol) of kernel vs reference, both outputs in the input dtype. Beyond the
# output rounding, the kernel rounds softmax probabilities to the value dtype before
# P @ V (FlashAttention's convention), worth ~1 ulp of the dtype on O(1) outputs.
TOLERANCES = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (2e-2, 2e-2),
}
DTYPES = list(TOLERANCES)
SCALE = 1 / math.sqrt(64)


@pytest.fixture(autouse=True)
def _light_cpu(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    # The interpreter is numpy on tiny tiles: one thread, and the env it needs at launch.
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------- test data


@dataclass
class Case:
    """A paged cache holding known per-sequence K/V, and one decode query per sequence."""

    q: torch.Tensor  # [num_seqs, num_q_heads, head_dim]
    key_cache: torch.Tensor  # NHD, [num_blocks, block_size, num_kv_heads, head_dim]
    value_cache: torch.Tensor
    block_table: torch.Tensor  # int32 [num_seqs, max_blocks]
    seq_lens: torch.Tensor  # int32 [num_seqs]
    keys: list[torch.Tensor]  # contiguous [seq_len, num_kv_heads, head_dim] per sequence
    values: list[torch.Tensor]

    @property
    def kv_heads(self) -> int:
        return self.key_cache.shape[2]


def make_case(
    seed: int,
    seq_lens: list[int],
    num_q_heads: int = 8,
    num_kv_heads: int = 2,
    head_dim: int = 64,
    block_size: int = 16,
    dtype: torch.dtype = torch.float32,
) -> Case:
    gen = torch.Generator().manual_seed(seed)
    counts = [-(-n // block_size) for n in seq_lens]
    max_blocks = max(counts) + 1  # one padding column the kernel must never read
    num_blocks = sum(counts) + 2  # spare blocks: the padding entries point at one
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    # Loud garbage everywhere first: a read of an unused slot or block shows up.
    key_cache = 50 * torch.randn(shape, generator=gen)
    value_cache = 50 * torch.randn(shape, generator=gen)
    physical = torch.randperm(num_blocks, generator=gen).tolist()  # scattered blocks
    table = torch.full((len(seq_lens), max_blocks), physical[-1], dtype=torch.int32)
    keys, values = [], []
    for b, n in enumerate(seq_lens):
        table[b, : counts[b]] = torch.tensor(physical[: counts[b]], dtype=torch.int32)
        physical = physical[counts[b] :]
        k = torch.randn(n, num_kv_heads, head_dim, generator=gen).to(dtype)
        v = torch.randn(n, num_kv_heads, head_dim, generator=gen).to(dtype)
        pos = torch.arange(n)
        key_cache[table[b, pos // block_size].long(), pos % block_size] = k.float()
        value_cache[table[b, pos // block_size].long(), pos % block_size] = v.float()
        keys.append(k)
        values.append(v)
    q = torch.randn(len(seq_lens), num_q_heads, head_dim, generator=gen).to(dtype)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    return Case(q, key_cache.to(dtype), value_cache.to(dtype), table, lens, keys, values)


def random_lens(rng: random.Random, count: int, longest: int) -> list[int]:
    """Lengths mixing 1, exact block multiples and partial last blocks."""
    return [1, 32, *(rng.randint(2, longest) for _ in range(count - 2))]


def random_verticals(rng: random.Random, lens: list[int], heads: int, k: int) -> torch.Tensor:
    """[num_seqs, heads, k]: in range, repeated, -1 padding and past-the-end entries."""
    rows = []
    for n in lens:
        per_head = []
        for _ in range(heads):
            picks = [rng.randrange(n) for _ in range(k - 3)]
            per_head.append([*picks, picks[0], -1, n + rng.randrange(5)])
        rows.append(per_head)
    return torch.tensor(rows, dtype=torch.int32)


SLASHES = [0, 1, 5, 5, 16, 40, 200]  # 0 = the token itself, repeats, past the start


# ---------------------------------------------------------- plain-Python spec


def throttle_set(n: int, sinks: int, window: int) -> set[int]:
    return {p for p in range(n) if p < sinks or p >= n - window}


def vslash_set(n: int, sinks: int, window: int, verts: list[int], offsets: list[int]) -> set[int]:
    extra = {p for p in verts if 0 <= p < n} | {n - 1 - o for o in offsets if o < n}
    return throttle_set(n, sinks, window) | extra


def naive_attention(case: Case, selected: list[list[set[int]]], scale: float) -> torch.Tensor:
    """float64 softmax over `selected[b][kv_head]`, from the contiguous K/V (no paging)."""
    num_seqs, num_q_heads, _ = case.q.shape
    group = num_q_heads // case.kv_heads
    out = torch.zeros(case.q.shape, dtype=torch.float64)
    for b in range(num_seqs):
        for h in range(num_q_heads):
            idx = sorted(selected[b][h // group])
            if not idx:
                continue
            k = case.keys[b][idx, h // group].double()
            v = case.values[b][idx, h // group].double()
            probs = torch.softmax(k @ case.q[b, h].double() * scale, dim=0)
            out[b, h] = probs @ v
    return out


def sdpa_dense(case: Case, scale: float) -> torch.Tensor:
    """Plain dense decode attention (torch SDPA, fp32) over all positions of each sequence."""
    outs = []
    for b in range(case.q.shape[0]):
        q = case.q[b].float()[None, :, None, :]  # [1, Hq, 1, D]
        k = case.keys[b].float().permute(1, 0, 2)[None]  # [1, Hkv, n, D]
        v = case.values[b].float().permute(1, 0, 2)[None]
        outs.append(F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True)[0, :, 0])
    return torch.stack(outs)


def per_head_sets(
    lens: list[int], heads: int, sinks: int, window: int, verts=None, offsets=None
) -> list[list[set[int]]]:
    if verts is None:
        return [[throttle_set(n, sinks, window)] * heads for n in lens]
    v3 = verts if verts.dim() == 3 else verts[:, None].expand(-1, heads, -1)
    return [
        [vslash_set(n, sinks, window, v3[b, h].tolist(), offsets) for h in range(heads)]
        for b, n in enumerate(lens)
    ]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(actual.float(), expected.float(), rtol=rtol, atol=atol)


# ------------------------------------------------------------- position sets


def test_position_helpers_examples():
    assert ref.throttle_positions(10, 2, 3).tolist() == [0, 1, 7, 8, 9]
    assert ref.throttle_positions(5, 2, 3).tolist() == [0, 1, 2, 3, 4]  # S + W == n: dense
    assert ref.throttle_positions(4, 10, 1).tolist() == [0, 1, 2, 3]
    assert ref.throttle_positions(6, 0, 1).tolist() == [5]  # the token itself
    got = ref.vslash_positions(20, 1, 2, [5, 5, 18, -1, 25], [0, 3, 3, 19, 30])
    # sinks {0}, window {18, 19}, verticals {5, 18}, slashes {19, 16, 0}
    assert got.tolist() == [0, 5, 16, 18, 19]


def test_position_helpers_match_set_semantics():
    rng = random.Random(0)
    for _ in range(300):
        n, sinks, window = rng.randint(1, 60), rng.randint(0, 8), rng.randint(1, 20)
        verts = [rng.randint(-2, n + 2) for _ in range(rng.randint(0, 6))]
        offsets = [rng.randint(0, n + 2) for _ in range(rng.randint(0, 4))]
        assert ref.throttle_positions(n, sinks, window).tolist() == sorted(
            throttle_set(n, sinks, window)
        )
        got = ref.vslash_positions(n, sinks, window, verts, offsets).tolist()
        assert got == sorted(vslash_set(n, sinks, window, verts, offsets))


@needs_kernels
@pytest.mark.parametrize("per_head", [False, True])
def test_extra_positions_complete_the_ranges(per_head: bool):
    rng = random.Random(1)
    lens = random_lens(rng, 6, 70)
    verts = random_verticals(rng, lens, 2 if per_head else 1, 8)
    verts = verts if per_head else verts[:, 0]
    pos, counts = sd.extra_positions(torch.tensor(lens), 3, 6, verts, SLASHES)
    sets = per_head_sets(lens, 2, 3, 6, verts, SLASHES)
    for b, n in enumerate(lens):
        for h in range(pos.shape[1]):
            row = pos[b, h, : counts[b, h]].tolist()
            assert row == sorted(set(row)), "sorted and unique"
            assert set(row).isdisjoint(throttle_set(n, 3, 6)), "ranges are not repeated"
            assert set(row) | throttle_set(n, 3, 6) == sets[b][h]


# ----------------------------------------------------------------- reference


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_reference_matches_naive(seed: int, layout: str):
    rng = random.Random(seed)
    lens = random_lens(rng, 5, 90)
    case = make_case(seed, lens)
    to_layout = (lambda c: c) if layout == "NHD" else (lambda c: c.transpose(1, 2).contiguous())
    kc, vc = to_layout(case.key_cache), to_layout(case.value_cache)
    verts = random_verticals(rng, lens, 2, 6)
    checks = [
        (ref.throttle_mask(case.seq_lens, 3, 10), per_head_sets(lens, 2, 3, 10)),
        (
            ref.vslash_mask(case.seq_lens, 2, 4, verts, SLASHES),
            per_head_sets(lens, 2, 2, 4, verts, SLASHES),
        ),
    ]
    for mask, sets in checks:
        got = ref.sparse_decode_attention_ref(
            case.q, kc, vc, case.block_table, case.seq_lens, SCALE, mask, layout=layout
        )
        torch.testing.assert_close(
            got.double(), naive_attention(case, sets, SCALE), rtol=1e-5, atol=1e-5
        )


def test_reference_dense_is_plain_attention():
    case = make_case(3, [1, 16, 29, 50])
    mask = ref.throttle_mask(case.seq_lens, 4, 46)  # S + W >= every seq_len
    got = ref.sparse_decode_attention_ref(
        case.q, case.key_cache, case.value_cache, case.block_table, case.seq_lens, SCALE, mask
    )
    torch.testing.assert_close(got, sdpa_dense(case, SCALE), rtol=1e-5, atol=1e-5)


def test_reference_rejects_bad_masks():
    case = make_case(0, [5, 9])
    args = (case.q, case.key_cache, case.value_cache, case.block_table, case.seq_lens, SCALE)
    with pytest.raises(ValueError, match="mask length 4 < longest sequence 9"):
        ref.sparse_decode_attention_ref(*args, torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask has 3 heads"):
        ref.sparse_decode_attention_ref(*args, torch.ones(2, 3, 9, dtype=torch.bool))


# -------------------------------------------------------------------- kernels


def run_throttle(case: Case, sinks: int, window: int, **kw) -> torch.Tensor:
    return sd.throttle_decode_attention(
        case.q, case.key_cache, case.value_cache, case.block_table, case.seq_lens,
        SCALE, sinks, window, **kw,
    )  # fmt: skip


def run_vslash(case: Case, sinks: int, window: int, verts, offsets, **kw) -> torch.Tensor:
    return sd.vslash_decode_attention(
        case.q, case.key_cache, case.value_cache, case.block_table, case.seq_lens,
        SCALE, sinks, window, verts, offsets, **kw,
    )  # fmt: skip


def run_ref(case: Case, mask: torch.Tensor) -> torch.Tensor:
    return ref.sparse_decode_attention_ref(
        case.q, case.key_cache, case.value_cache, case.block_table, case.seq_lens, SCALE, mask
    )


@needs_kernels
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_throttle_kernel_matches_reference(dtype: torch.dtype, seed: int):
    rng = random.Random(seed)
    case = make_case(seed, random_lens(rng, 5, 80), dtype=dtype)
    # (S, W): window only, both < seq_len, window crossing tiles, dense for all.
    for sinks, window in [(0, 1), (2, 8), (4, 37), (1, 200)]:
        got = run_throttle(case, sinks, window)
        assert got.dtype == dtype and got.shape == case.q.shape
        assert_close(got, run_ref(case, ref.throttle_mask(case.seq_lens, sinks, window)), dtype)


@needs_kernels
@pytest.mark.parametrize("per_head", [False, True], ids=["per_seq", "per_kv_head"])
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_vslash_kernel_matches_reference(dtype: torch.dtype, seed: int, per_head: bool):
    rng = random.Random(10 + seed)
    lens = random_lens(rng, 5, 100)
    case = make_case(seed, lens, dtype=dtype)
    verts = random_verticals(rng, lens, case.kv_heads if per_head else 1, 40)
    verts = verts if per_head else verts[:, 0]
    # 40 verticals + 7 slashes: more than one tile of extra positions per row.
    got = run_vslash(case, 3, 5, verts, SLASHES, block_n=16)
    expected = run_ref(case, ref.vslash_mask(case.seq_lens, 3, 5, verts, SLASHES))
    assert_close(got, expected, dtype)


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dense_kernels_are_plain_attention(dtype: torch.dtype):
    case = make_case(4, [1, 15, 16, 17, 61], dtype=dtype)
    dense = sdpa_dense(case, SCALE)
    assert_close(run_throttle(case, 8, 53), dense, dtype)  # S + W == longest
    verts = torch.tensor([[0, 3, -1]] * 5, dtype=torch.int32)
    assert_close(run_vslash(case, 0, 64, verts, [2, 2]), dense, dtype)


@needs_kernels
@pytest.mark.parametrize(
    ("q_heads", "kv_heads", "head_dim", "block_size"),
    [(4, 4, 64, 16), (6, 2, 80, 16), (8, 1, 32, 8)],
    ids=["mha", "group3_dim80", "mqa_block8"],
)
def test_kernels_other_shapes(q_heads: int, kv_heads: int, head_dim: int, block_size: int):
    lens = [3, 24, 45]
    case = make_case(5, lens, q_heads, kv_heads, head_dim, block_size, torch.float16)
    assert_close(
        run_throttle(case, 2, 9),
        run_ref(case, ref.throttle_mask(case.seq_lens, 2, 9)),
        torch.float16,
    )
    verts = random_verticals(random.Random(5), lens, kv_heads, 6)
    expected = run_ref(case, ref.vslash_mask(case.seq_lens, 1, 3, verts, SLASHES))
    assert_close(run_vslash(case, 1, 3, verts, SLASHES, block_n=64), expected, torch.float16)


@needs_kernels
@pytest.mark.parametrize("layout", ["HND", "vllm_packed"])
def test_kernels_cache_layouts(layout: str):
    case = make_case(6, [7, 33, 50], dtype=torch.bfloat16)
    if layout == "HND":
        kc, vc = (c.transpose(1, 2).contiguous() for c in (case.key_cache, case.value_cache))
    else:  # vLLM 0.32: one [blocks, kv_heads, block_size, 2 * D] tensor, strided views
        packed = torch.cat([case.key_cache, case.value_cache], dim=-1).transpose(1, 2).contiguous()
        kc, vc = ref.split_vllm_kv_cache(packed, 64)
        assert not kc.is_contiguous() and torch.equal(kc, case.key_cache)
        layout = "NHD"
    args = (case.q, kc, vc, case.block_table, case.seq_lens, SCALE)
    mask = ref.throttle_mask(case.seq_lens, 2, 11)
    expected = run_ref(case, mask)
    assert_close(
        sd.throttle_decode_attention(*args, 2, 11, layout=layout), expected, torch.bfloat16
    )
    assert torch.equal(ref.sparse_decode_attention_ref(*args, mask, layout=layout), expected), (
        "the reference reads every layout alike"
    )
    verts = torch.tensor([[5, 1, 1], [30, 0, 9], [12, 44, 44]], dtype=torch.int32)
    expected = run_ref(case, ref.vslash_mask(case.seq_lens, 2, 11, verts, SLASHES))
    got = sd.vslash_decode_attention(*args, 2, 11, verts, SLASHES, layout=layout)
    assert_close(got, expected, torch.bfloat16)


@needs_kernels
def test_kernel_empty_sequence_and_out_buffer():
    case = make_case(7, [0, 20], dtype=torch.float32)  # seq_len 0: padding row
    out = torch.full_like(case.q, float("nan"))
    got = run_throttle(case, 1, 4, out=out)
    assert got is out
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    assert_close(out[1:], run_ref(case, ref.throttle_mask(case.seq_lens, 1, 4))[1:], torch.float32)


# ----------------------------------------------------------------- validation


def _valid_args() -> dict:
    case = make_case(8, [9, 20])
    return {
        "q": case.q,
        "key_cache": case.key_cache,
        "value_cache": case.value_cache,
        "block_table": case.block_table,
        "seq_lens": case.seq_lens,
        "scale": SCALE,
        "num_sinks": 1,
        "window": 4,
    }


_INPUT_ERRORS = [
    ("q", lambda a: a["q"][0], ValueError, r"q must be \[num_seqs, num_q_heads, head_dim\]"),
    ("q", lambda a: a["q"].double(), TypeError, "q dtype must be one of"),
    (
        "key_cache",
        lambda a: a["key_cache"].half(),
        TypeError,
        "key_cache dtype torch.float16 != q dtype",
    ),
    (
        "value_cache",
        lambda a: a["value_cache"][:-1],
        ValueError,
        "key_cache .* and value_cache .* differ",
    ),
    ("q", lambda a: a["q"][..., :32], ValueError, "key_cache head_dim 64 != q head_dim 32"),
    ("q", lambda a: a["q"][:, :7], ValueError, "num_q_heads 7 is not a multiple of num_kv_heads 2"),
    (
        "q",
        lambda a: torch.cat([a["q"], a["q"]], -1)[..., ::2],
        ValueError,
        "q must have a contiguous head_dim",
    ),
    ("block_table", lambda a: a["block_table"].long(), TypeError, "block_table must be int32"),
    ("block_table", lambda a: a["block_table"][:1], ValueError, "block_table must be"),
    ("seq_lens", lambda a: a["seq_lens"][:, None], ValueError, "seq_lens must be"),
    ("scale", lambda a: 0.0, ValueError, "scale must be a positive finite number"),
    ("scale", lambda a: float("nan"), ValueError, "scale must be a positive finite number"),
    ("num_sinks", lambda a: -1, ValueError, "num_sinks must be >= 0"),
    ("window", lambda a: 0, ValueError, r"window must be >= 1 \(the token attends to itself\)"),
    ("window", lambda a: True, TypeError, "window must be an int"),
    (
        "seq_lens",
        lambda a: torch.tensor([9, 99], dtype=torch.int32),
        ValueError,
        r"seq_lens must lie in \[0, 48\]",
    ),
    (
        "block_table",
        lambda a: a["block_table"] + 100,
        ValueError,
        "block_table entries in use must lie in",
    ),
]


@needs_kernels
@pytest.mark.parametrize(("name", "mutate", "exc", "match"), _INPUT_ERRORS)
def test_throttle_rejects_bad_inputs(name, mutate, exc, match):
    args = _valid_args()
    args[name] = mutate(args)
    with pytest.raises(exc, match=match):
        sd.throttle_decode_attention(**args)


@needs_kernels
def test_rejects_bad_options():
    args = _valid_args()
    with pytest.raises(ValueError, match="block_n must be a power of two >= 16"):
        sd.throttle_decode_attention(**args, block_n=24)
    with pytest.raises(ValueError, match="layout must be one of"):
        sd.throttle_decode_attention(**args, layout="BHSD")
    with pytest.raises(ValueError, match="out must match q"):
        sd.throttle_decode_attention(**args, out=torch.empty_like(args["q"]).half())
    verts = torch.zeros(2, 3, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"slash offsets must be >= 0 \(0 is the current token\)"):
        sd.vslash_decode_attention(**args, verticals=verts, slash_offsets=[1, -2])
    with pytest.raises(TypeError, match="slash_offsets must be a sequence of ints"):
        sd.vslash_decode_attention(**args, verticals=verts, slash_offsets=torch.tensor([1]))
    with pytest.raises(TypeError, match="verticals must be an integer tensor"):
        sd.vslash_decode_attention(**args, verticals=verts.float(), slash_offsets=[])
    with pytest.raises(ValueError, match=r"verticals must be \[num_seqs=2, K\] or"):
        sd.vslash_decode_attention(
            **args, verticals=torch.zeros(2, 3, 4, dtype=torch.int32), slash_offsets=[]
        )
