"""Sparse attention policies: block selection (pure) and the throttled engine path."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import make_llm, shutdown

from vllm_utio.attention_policy import restrict_block_table, throttled_blocks
from vllm_utio.config import UtioConfigError, parse_utio_config


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


THROTTLE_BUCKETS = [
    {
        "name": "narrow",
        "max_score": 0.3,
        "keep_first": 30,
        "attention": {"policy": "throttle", "sink_tokens": 128, "recent_tokens": 100},
    },
    {
        "name": "wide",
        "max_score": 0.6,
        "keep_first": 30,
        "attention": {"policy": "throttle", "sink_tokens": 128, "recent_tokens": 100_000},
    },
]
LONG = " ".join(
    f"Fact {i}: the river town number {i} exports {i * 7 % 13} goods." for i in range(60)
)


@pytest.mark.engine
def test_throttled_decode_in_the_engine(vanilla_llm):
    from test_engine_foundation import greedy

    llm = make_llm({"enabled": True, "router": "forced", "buckets": THROTTLE_BUCKETS})
    try:
        prompts = [LONG, LONG[: len(LONG) // 2]]
        dense = greedy(vanilla_llm, prompts, max_tokens=32)
        wide = greedy(llm, prompts, [{"utio_bucket": "wide"}] * 2, max_tokens=32)
        s_wide = llm.collective_rpc("utio_stats", kwargs={"reset": True})[0]
        narrow = greedy(llm, prompts, [{"utio_bucket": "narrow"}] * 2, max_tokens=32)
        s_narrow = llm.collective_rpc("utio_stats", kwargs={"reset": True})[0]
    finally:
        shutdown(llm)
    assert len(llm.get_tokenizer().encode(LONG)) > 600  # several 128-token blocks
    assert wide == dense, "a window larger than the context is dense attention"
    assert s_wide["kv_tokens_read"] == s_wide["kv_tokens_dense"] > 0
    assert s_narrow["kv_tokens_read"] < 0.6 * s_narrow["kv_tokens_dense"]
    assert narrow != dense, "reading ~1/3 of a long context should change the continuation"
    assert s_narrow["layer_tokens_saved"] == 0  # the buckets run every layer
