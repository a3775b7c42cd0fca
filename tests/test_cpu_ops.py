"""UTIO's C++ CPU op for select's 'sparq' scoring equals its torch spec
(``kv_selection.sparq_block_mass``) over paged caches in two key layouts."""

from __future__ import annotations

import pytest
import torch

from vllm_utio.kv_selection import sparq_block_mass

G, D, BS = 3, 64, 32


def _paged(lens: torch.Tensor, dtype: torch.dtype, layout: str, seed: int):
    """A cache ``[blocks, G, BS, 2D]`` with K at ``(start, s_tok, s_head, s_chan)`` in each
    block, scattered block tables, and the rows' keys in logical order ``[R, T, G, D]``."""
    gen = torch.Generator().manual_seed(seed)
    nbs = (lens + BS - 1) // BS
    total = int(nbs.sum()) + 3
    cache = torch.randn(total, G, BS, 2 * D, generator=gen).to(dtype)
    # 'token-inner': the CPU backend's 'vec' layout, K per head as [D, BS]; else channels
    # innermost, K in the first half of each token's row
    token_inner = (0, 1, 2 * BS * D, BS)
    strides = token_inner if layout == "token-inner" else (0, 2 * D, BS * 2 * D, 1)
    start, s_tok, s_head, s_chan = strides
    width = int(nbs.max()) + 1
    perm = torch.randperm(total, generator=gen)
    table = torch.zeros(len(lens), width, dtype=torch.long)
    used = 0
    for r, n in enumerate(nbs.tolist()):
        table[r, :n] = perm[used : used + n]
        used += n
    tok, head, chan = torch.meshgrid(
        torch.arange(BS), torch.arange(G), torch.arange(D), indexing="ij"
    )
    offsets = (start + tok * s_tok + head * s_head + chan * s_chan).reshape(-1)
    keys = cache.reshape(total, -1)[table.reshape(-1)][:, offsets]
    keys = keys.reshape(len(lens), width * BS, G, D)
    return cache, strides, table, keys


@pytest.mark.parametrize("layout", ["token-inner", "channel-inner"])
# bf16/fp16 keys stored tokens-innermost take the op's AVX-512 tiled path (where the CPU
# has it); float32 and the channels-innermost layout take its general path
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("channels", [1, 16, 64])
def test_sparq_op_equals_the_spec(layout: str, dtype: torch.dtype, channels: int):
    from vllm_utio.cpu_ops import load

    op = load()
    lens = torch.tensor([1, BS - 1, BS, 7 * BS + 3, 25 * BS])  # partial and full last blocks
    cache, strides, table, keys = _paged(lens, dtype, layout, seed=channels)
    query = torch.randn(len(lens), 3 * G, D, generator=torch.Generator().manual_seed(1)) * 3
    scale = D**-0.5
    want = sparq_block_mass(query, keys, lens, BS, channels, scale)
    got = op.sparq_block_mass(
        query, cache, cache.stride(0), *strides, table, lens, G, BS, channels, scale
    )
    assert got.shape == want.shape == (len(lens), 25)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    # a row's blocks hold its whole attention for each head: the best block's share is
    # at least 1 / blocks, and nothing past the row's end is ranked
    blocks = (lens + BS - 1) // BS
    for r, n in enumerate(blocks.tolist()):
        assert got[r, :n].max() >= 1.0 / n - 1e-6
        assert (got[r, n:] == 0).all()


@pytest.mark.parametrize("per_kv", [1, 5, 8])
def test_sparq_op_other_query_head_groups(per_kv: int):
    """Other GQA ratios: 1 (registers), 5 (tile, heads one by one), 8 (tile, by 4)."""
    from vllm_utio.cpu_ops import load

    lens = torch.tensor([BS + 5, 9 * BS])
    cache, strides, table, keys = _paged(lens, torch.bfloat16, "token-inner", seed=per_kv)
    query = torch.randn(len(lens), per_kv * G, D, generator=torch.Generator().manual_seed(2))
    want = sparq_block_mass(query, keys, lens, BS, 16, D**-0.5)
    got = load().sparq_block_mass(
        query, cache, cache.stride(0), *strides, table, lens, G, BS, 16, D**-0.5
    )
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_sparq_spec_with_every_channel_is_the_true_attention_mass():
    """With all channels kept, the estimate is exact: each block's largest per-head share
    of the true softmax attention."""
    lens = torch.tensor([5 * BS + 2, 3 * BS])
    _, _, _, keys = _paged(lens, torch.float32, "token-inner", seed=3)
    query = torch.randn(2, 3 * G, D)
    got = sparq_block_mass(query, keys, lens, BS, D, D**-0.5)
    for r, n in enumerate(lens.tolist()):
        k = keys[r, :n].repeat_interleave(3, dim=1)  # [n, H, D], head h reads KV head h // 3
        probs = torch.softmax((query[r][None] * k).sum(-1) * D**-0.5, dim=0)  # [n, H]
        padded = torch.nn.functional.pad(probs, (0, 0, 0, -n % BS))
        mass = padded.reshape(-1, BS, 3 * G).sum(1).amax(-1)
        torch.testing.assert_close(got[r, : len(mass)], mass, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])  # fast and general paths
@pytest.mark.parametrize("table_dtype", [torch.int32, torch.int64])
def test_sparq_restrict_equals_select_then_restrict(dtype: torch.dtype, table_dtype):
    """The fused op (masses, the choice, the restricted rows in place) gives what the
    torch spec's ``select_blocks`` and ``restrict_rows`` give on the op's masses, and
    touches no other row of the table."""
    from vllm_utio.cpu_ops import load
    from vllm_utio.kv_selection import SelectRule, budget_blocks, restrict_rows, select_blocks

    op = load()
    # short rows (all kept), a partial last block, rows longer than the budget
    lens = torch.tensor([BS - 3, 4 * BS, 9 * BS + 7, 25 * BS, 18 * BS + 1])
    cache, strides, table, _ = _paged(lens, dtype, "token-inner", seed=4)
    query = torch.randn(len(lens), 3 * G, D, generator=torch.Generator().manual_seed(5)) * 3
    scale, sink_tokens, recent, budget = D**-0.5, 2 * BS, 3 * BS - 5, 8 * BS
    rule = SelectRule(sink_tokens // BS, recent, budget)
    mass = op.sparq_block_mass(
        query, cache, cache.stride(0), *strides, table, lens, G, BS, 16, scale
    )
    assert len(set(mass[mass > 0].tolist())) == int((mass > 0).sum())  # no ties to break
    kept, _ = select_blocks(mass, lens, BS, rule)
    want_rows, want_lens = restrict_rows(table, lens, kept, BS)
    out_rows = torch.tensor([6, 0, 3, 2, 5])  # where each row's table row sits in the batch
    before = torch.randint(0, 1000, (8, table.shape[1] + 2), dtype=table_dtype)
    out = before.clone()
    got_lens = op.sparq_restrict(
        query, cache, cache.stride(0), *strides, table, lens, G, BS, 16, scale,
        sink_tokens // BS, recent, budget_blocks(budget, BS), out, out_rows,
    )  # fmt: skip
    assert torch.equal(got_lens, want_lens)
    assert torch.equal(want_lens[:2], lens[:2]) and (want_lens[2:] < lens[2:]).all()
    for r, dst in enumerate(out_rows.tolist()):
        n = int((lens[r] + BS - 1) // BS)
        assert torch.equal(out[dst, :n], want_rows[r, :n].to(table_dtype)), r
        assert torch.equal(out[dst, n:], before[dst, n:])
    untouched = [i for i in range(len(out)) if i not in out_rows.tolist()]
    assert torch.equal(out[untouched], before[untouched])


@pytest.mark.parametrize("focused", [False, True])
def test_sparq_restrict_steps_equals_the_spec_over_steps(focused: bool):
    """``select_every_steps``: over consecutive decode steps at one layer, the op's choice
    (rows on their turn, or with no or a stale last choice) equals ``select_blocks`` on
    the op's masses, and a reusing row reads ``reused_blocks`` of its stamps; the stamps
    it leaves equal the spec's, and only choosing rows change them. With ``focus_mass``,
    a row whose choice ``finds_focus`` chooses off its turn on that step and the next,
    as the spec says, and the shared focus length it leaves equals the spec's."""
    from vllm_utio.cpu_ops import load
    from vllm_utio.kv_selection import (
        SelectRule,
        always_kept,
        budget_blocks,
        chooses_now,
        finds_focus,
        last_choice,
        restrict_rows,
        reused_blocks,
        select_blocks,
    )

    op = load()
    every, layer = 3, 5
    # grown by one position per step below; the longest crosses a block boundary
    start_lens = torch.tensor([BS - 3, 9 * BS + 7, 25 * BS - 2, 18 * BS + 1])
    cache, strides, table, _ = _paged(start_lens + 8, torch.bfloat16, "token-inner", seed=6)
    scale, sink_tokens, recent, budget = D**-0.5, 2 * BS, 3 * BS - 5, 8 * BS
    rule = SelectRule(sink_tokens // BS, recent, budget)
    stamps = torch.full((len(start_lens), table.shape[1]), -(2**30), dtype=torch.int32)
    stamps[3, :4] = 10**6  # a choice from a longer sequence (rejected speculation): ignored
    never = torch.full((len(start_lens),), -(2**30), dtype=torch.int32)
    focus, want_focus = never.clone(), never.clone()
    share = 0.0  # off; when focused, set from the first step's masses (below)
    chose_steps, focus_steps = [], []
    for step in range(9):
        lens = start_lens + step
        gen = torch.Generator().manual_seed(10 + step)
        query = torch.randn(len(lens), 3 * G, D, generator=gen) * 3
        mass = op.sparq_block_mass(
            query, cache, cache.stride(0), *strides, table, lens, G, BS, 16, scale
        )
        if focused and step == 0:  # between the rows' largest far masses: some focus
            far = mass.masked_fill(always_kept(lens, BS, rule), 0).amax(1)
            share = float(far[1:].median())
        last = last_choice(stamps, lens, BS)
        on_turn = chooses_now(last, lens, layer, every)
        choose = chooses_now(last, lens, layer, every, want_focus if focused else None)
        fresh, _ = select_blocks(mass, lens, BS, rule)
        kept = torch.where(
            choose.reshape(-1, 1), fresh, reused_blocks(stamps, last, lens, BS, rule)
        )
        want_rows, want_lens = restrict_rows(table, lens, kept, BS)
        want_stamps = stamps.clone()
        want_stamps[:, : kept.shape[1]][choose.reshape(-1, 1) & kept] = lens.repeat_interleave(
            kept.sum(1) * choose
        ).to(torch.int32)
        if focused:
            found = choose & finds_focus(mass, lens, BS, rule, share)
            want_focus = torch.where(found, lens.to(torch.int32), want_focus)
        out = torch.zeros(len(lens), table.shape[1], dtype=torch.int32)
        got_lens, got_chose = op.sparq_restrict_steps(
            query, cache, cache.stride(0), *strides, table, lens, G, BS, 16, scale,
            sink_tokens // BS, recent, budget_blocks(budget, BS), out,
            torch.arange(len(lens)), stamps, every, layer, focus, share,
        )  # fmt: skip
        want_chose = torch.where(on_turn, 1, torch.where(choose, 2, 0)).to(torch.int8)
        assert torch.equal(got_chose, want_chose), step
        assert torch.equal(got_lens, want_lens), step
        for r, n in enumerate(((lens + BS - 1) // BS).tolist()):
            assert torch.equal(out[r, :n], want_rows[r, :n].to(torch.int32)), (step, r)
        assert torch.equal(stamps, want_stamps), step
        assert torch.equal(focus, want_focus), step
        chose_steps.append(choose.tolist())
        focus_steps.append(int((got_chose == 2).sum()))
    # every row chose on its first step; a row over its budget then chose once in
    # `every` steps (the first row fits its budget: its choice is everything, every step)
    assert all(chose_steps[0])
    if not focused:
        for r in (1, 2, 3):
            assert sum(steps[r] for steps in chose_steps) in (3, 4), r
        assert not all(chose_steps[1]) and not all(chose_steps[2])
        assert sum(focus_steps) == 0
    else:  # some rows chose off their turn, not every row at every step
        assert 0 < sum(focus_steps) < 3 * 8


def test_a_lock_left_by_a_killed_build_does_not_hang_the_next_load():
    """torch's loader waits while its build 'lock' file exists; one left by a killed build
    must be cleared, not waited on forever (a fresh process loads the ops within a bound)."""
    import subprocess
    import sys

    from vllm_utio import cpu_ops
    from vllm_utio.paths import cache_dir

    cpu_ops.load()  # built (or loaded) here first, so the child only loads
    stale = cache_dir() / "ops" / cpu_ops.build_name() / "lock"
    stale.touch()
    code = "from vllm_utio import cpu_ops; cpu_ops.load(); print('loaded')"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "loaded" in done.stdout
    assert not stale.exists()
