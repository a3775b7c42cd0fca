"""The GPU runner's kernel path (vllm_utio.integration.gpu_worker), what CPU can check.

Real vLLM 0.32 objects where they run on CPU: ``CommonAttentionMetadata`` (kernel inputs
and the metadata vLLM's backend gets), ``CUDAGraphMode`` (when the path is off), the
FlashAttention cache layout ``[num_blocks, num_kv_heads, block_size, 2 * head_dim]``.
The wrapped ``impl.forward`` runs over a stand-in for vLLM's backend (FlashAttention has
no CPU build), with the kernels in Triton's interpreter. Not checked here: anything inside
a vLLM GPU engine (docs/gpu.md).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from test_kernels_env import (
    DEVICE,
    assert_close,
    light_cpu,  # noqa: F401 (a fixture)
    needs_kernels,
)

pytestmark = [needs_kernels, pytest.mark.usefixtures("light_cpu")]

gw = pytest.importorskip("vllm_utio.integration.gpu_worker")
from vllm.config.compilation import CUDAGraphMode  # noqa: E402
from vllm.v1.attention.backend import CommonAttentionMetadata  # noqa: E402

from vllm_utio import kv_selection as spec  # noqa: E402
from vllm_utio.attention_policy import throttled_blocks, vslash_blocks  # noqa: E402
from vllm_utio.config import AttentionPolicy  # noqa: E402
from vllm_utio.kernels import decoder as d  # noqa: E402
from vllm_utio.kernels import reference as ref  # noqa: E402
from vllm_utio.kernels.paged_cases import make_paged_case  # noqa: E402


class FlashAttentionImpl:
    """Stand-in with FlashAttentionImpl's name and fields; its forward plays vLLM's backend
    (writes 7 everywhere: the rows the kernels own must be overwritten)."""

    def __init__(self, heads=4, kv_heads=2, dim=32, **overrides):
        self.num_heads, self.num_kv_heads, self.head_size = heads, kv_heads, dim
        self.scale = 1 / math.sqrt(dim)
        self.kv_cache_dtype = "auto"
        self.sliding_window, self.alibi_slopes, self.logits_soft_cap, self.sinks = (
            (-1, -1),
            None,
            0,
            None,
        )
        self.__dict__.update(overrides)

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output=None, **kw):
        output.fill_(7.0)
        return output


def common_metadata(
    q_lens: list[int], seq_lens: list[int], table: torch.Tensor
) -> CommonAttentionMetadata:
    qsl = torch.tensor([0, *np.cumsum(q_lens)], dtype=torch.int32)
    return CommonAttentionMetadata(
        query_start_loc=qsl.to(DEVICE),
        query_start_loc_cpu=qsl,
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE),
        num_reqs=len(q_lens),
        num_actual_tokens=int(qsl[-1]),
        max_query_len=max(q_lens),
        max_seq_len=max(seq_lens),
        block_table_tensor=table,
        slot_mapping=torch.zeros(int(qsl[-1]), dtype=torch.long, device=DEVICE),
        seq_lens_cpu_upper_bound=torch.tensor(seq_lens, dtype=torch.int32),
        is_prefilling=torch.tensor([q > 1 for q in q_lens]),
    )


def test_kernel_policy_mapping():
    assert gw.kernel_policy(
        AttentionPolicy(policy="throttle", sink_tokens=64, recent_tokens=256)
    ) == d.Throttle(64, 256)
    select = AttentionPolicy(policy="select", budget_tokens=2048)
    assert gw.kernel_policy(select) == d.QueryAware(128, 512, 2048, per_kv_head=False)
    for unsupported in (
        AttentionPolicy(policy="select", top_p=0.9),
        AttentionPolicy(policy="select", hold_steps=2),
        AttentionPolicy(policy="select", heads="share"),
        AttentionPolicy(policy="vslash", vertical_blocks=4),
        AttentionPolicy(),
    ):
        assert gw.kernel_policy(unsupported) is None
    assert gw.kernel_policy(
        AttentionPolicy(policy="vslash", vertical_blocks=0, slash_offsets=(5,))
    ) == d.Vslash(128, 512, (5,), 0)


def test_kernel_path_blocker(monkeypatch: pytest.MonkeyPatch):
    cuda = torch.device("cuda")
    ok = [FlashAttentionImpl()]
    assert gw.kernel_path_blocker(ok, CUDAGraphMode.PIECEWISE, cuda) is None
    assert gw.kernel_path_blocker(ok, CUDAGraphMode.NONE, cuda) is None
    assert "full CUDA graphs" in gw.kernel_path_blocker(ok, CUDAGraphMode.FULL_AND_PIECEWISE, cuda)
    assert "not CUDA" in gw.kernel_path_blocker(ok, CUDAGraphMode.NONE, torch.device("cpu"))
    assert "fp8" in gw.kernel_path_blocker([FlashAttentionImpl(kv_cache_dtype="fp8")], None, cuda)
    assert "sliding" in gw.kernel_path_blocker(
        [FlashAttentionImpl(sliding_window=(127, 0))], None, cuda
    )
    assert "soft cap" in gw.kernel_path_blocker(
        [FlashAttentionImpl(logits_soft_cap=30.0)], None, cuda
    )

    class TritonAttentionImpl(FlashAttentionImpl):
        pass

    assert "TritonAttentionImpl" in gw.kernel_path_blocker([TritonAttentionImpl()], None, cuda)
    monkeypatch.setenv(gw.KERNELS_ENV, "0")
    assert gw.KERNELS_ENV in gw.kernel_path_blocker(ok, None, cuda)


def test_kernel_step_and_backend_metadata_from_real_metadata():
    """A prefill row (3 tokens) and three decode rows; rows 1 and 3 go to the kernels."""
    table = torch.arange(4 * 6, dtype=torch.int32, device=DEVICE).reshape(4, 6)
    cm = common_metadata([3, 1, 1, 1], [3, 40, 17, 90], table)
    policy = AttentionPolicy(policy="throttle", sink_tokens=16, recent_tokens=16)
    step = gw.kernel_step(cm, np.array([1, 3]), policy)
    assert step.token_idx.tolist() == [3, 5]  # each decode row's token in the flat batch
    assert step.seq_lens.tolist() == [40, 90] and step.seq_lens.dtype == torch.int32
    assert torch.equal(step.block_table, table[[1, 3]])
    assert step.num_tokens == 6
    restricted = gw.backend_metadata_cm(cm, np.array([1, 3]))
    assert isinstance(restricted, CommonAttentionMetadata)
    assert restricted.seq_lens.tolist() == [3, 1, 17, 1]
    assert restricted.seq_lens_cpu_upper_bound.tolist() == [3, 1, 17, 1]
    assert restricted.max_seq_len == 17
    assert cm.seq_lens.tolist() == [3, 40, 17, 90], "the step's own metadata is not modified"
    assert torch.equal(restricted.block_table_tensor, table)


def test_wrapped_forward_overwrites_kernel_rows_only():
    """Throttle rows 0 and 2 of three: the kernels' output (= the reference over the kept
    blocks of vLLM's cache layout) replaces the backend's; row 1 keeps the backend's; a
    forward of another batch (other token count) is left alone."""
    case = make_paged_case([60, 33, 90], num_q_heads=4, num_kv_heads=2, head_dim=32, block_size=8,
                           dtype=torch.float16, device=DEVICE, garbage=50.0)  # fmt: skip
    policy = AttentionPolicy(policy="throttle", sink_tokens=8, recent_tokens=12)
    cm = common_metadata([1, 1, 1], case.lens, case.block_table)
    impl = FlashAttentionImpl()
    kernels = gw.KernelAttention({"layer.0": 0}, 4, None)
    kernels.wrap(impl)
    kernels.step = gw.kernel_step(cm, np.array([0, 2]), policy)
    layer = type("Layer", (), {"layer_name": "layer.0"})()
    query = case.q.reshape(3, -1)  # vLLM hands the impl [tokens, heads * dim] views too
    output = torch.empty_like(query)
    metadata = type("Md", (), {"num_actual_tokens": 3})()
    impl.forward(layer, query, None, None, case.kv_cache, metadata, output=output)
    sets = [[ref.range_blocks(n, 8, 1, 12)] * 2 for n in case.lens]
    want = ref.sparse_decode_attention_ref(
        case.q, case.key_cache, case.value_cache, case.block_table, case.seq_lens, impl.scale,
        ref.blocks_mask(sets, case.lens, 8),
    )  # fmt: skip
    got = output.view(3, 4, 32)
    assert_close(got[[0, 2]], want[[0, 2]], torch.float16)
    assert (got[1] == 7.0).all()
    other = type("Md", (), {"num_actual_tokens": 5})()
    impl.forward(layer, query, None, None, case.kv_cache, other, output=output)
    assert (output == 7.0).all()


def test_select_rows_through_summaries_and_dense_layers():
    """'select' rows: layers below dense_layers read everything; later ones the spec's
    one-set-per-row choice from the selector's (float32) summaries, kept by DeviceFold."""
    case = make_paged_case([70, 100], num_q_heads=4, num_kv_heads=2, head_dim=32, block_size=8,
                           dtype=torch.bfloat16, device=DEVICE, garbage=50.0)  # fmt: skip
    num_blocks = case.kv_cache.shape[0]
    summaries = spec.BlockSummaries(2, num_blocks, 8, 2, 32, DEVICE)
    summaries.fold = gw.DeviceFold(summaries)
    want_summaries = spec.BlockSummaries(2, num_blocks, 8, 2, 32, DEVICE)
    for b, n in enumerate(case.lens):
        pos = torch.arange(n, device=DEVICE)
        blocks = case.block_table[b].long()[pos // 8]
        keys, slots = case.key_cache[blocks, pos % 8], blocks * 8 + pos % 8
        for layer in range(2):
            summaries.fold(layer, keys, slots)
            spec.BlockSummaries.fold(want_summaries, layer, keys, slots)
    assert torch.equal(summaries.packed, want_summaries.packed)

    policy = AttentionPolicy(
        policy="select", sink_tokens=8, recent_tokens=8, budget_tokens=32, dense_layers=1
    )
    cm = common_metadata([1, 1], case.lens, case.block_table)
    impl = FlashAttentionImpl()
    kernels = gw.KernelAttention({"l0": 0, "l1": 1}, 2, summaries)
    kernels.wrap(impl)
    kernels.step = gw.kernel_step(cm, np.array([0, 1]), policy)
    metadata = type("Md", (), {"num_actual_tokens": 2})()
    args = (case.q, case.key_cache, case.value_cache, case.block_table, case.seq_lens, impl.scale)
    for index in (0, 1):
        output = torch.empty_like(case.q)
        layer = type("Layer", (), {"layer_name": f"l{index}"})()
        impl.forward(layer, case.q, None, None, case.kv_cache, metadata, output=output)
        if index == 0:
            mask = ref.blocks_mask(
                [[ref.range_blocks(n, 8, 0, None)] * 2 for n in case.lens], case.lens, 8
            )
        else:
            gathered = summaries.gather(1, case.block_table)
            bound = spec.packed_bound(case.q.float().cpu(), gathered.cpu())
            kept, _ = spec.select_blocks(bound, case.seq_lens.cpu(), 8, spec.SelectRule(1, 8, 32))
            mask = ref.blocks_mask(
                [[torch.nonzero(k).flatten().tolist()] * 2 for k in kept], case.lens, 8
            )
            assert not mask.all()
        assert_close(output, ref.sparse_decode_attention_ref(*args, mask), torch.bfloat16)


@pytest.mark.parametrize("seq_len", [1, 8, 9, 64, 77, 300])
def test_kernel_positions_match_the_block_rules(seq_len: int):
    bs = 8
    throttle = AttentionPolicy(policy="throttle", sink_tokens=16, recent_tokens=20)
    cut = throttled_blocks(seq_len, bs, 16, 20)
    assert gw.kernel_positions(throttle, seq_len, bs, 4) == (seq_len if cut is None else cut[1])
    vslash = AttentionPolicy(
        policy="vslash",
        sink_tokens=8,
        recent_tokens=9,
        vertical_blocks=0,
        slash_offsets=(0, 30, 100),
    )
    cut = vslash_blocks(seq_len, bs, 8, 9, (0, 30, 100))
    assert gw.kernel_positions(vslash, seq_len, bs, 4) == (seq_len if cut is None else cut[1])
    select = AttentionPolicy(
        policy="select", sink_tokens=8, recent_tokens=9, budget_tokens=40, dense_layers=0
    )
    bound = torch.randn(1, -(-seq_len // bs))
    kept, _ = spec.select_blocks(bound, torch.tensor([seq_len]), bs, spec.SelectRule(1, 9, 40))
    _, new_len = spec.restrict_rows(
        torch.zeros(1, kept.shape[1], dtype=torch.int32), torch.tensor([seq_len]), kept, bs
    )
    assert gw.kernel_positions(select, seq_len, bs, 1) == int(new_len[0])


class _RunnerState:
    """What UtioGPUModelRunner._utio_kernel_step reads of a runner (no GPU runner on CPU)."""

    def __init__(self, cfg: dict, dense_rows: set[int] = frozenset()):
        from vllm_utio.config import parse_utio_config
        from vllm_utio.plans import PlanSet

        self.utio_cfg = parse_utio_config({"enabled": True, **cfg})
        self.utio_plans = PlanSet.from_config(self.utio_cfg, 30)
        self._utio_routable = (np.zeros(4, dtype=bool), np.ones(4, dtype=np.int64))
        self.dense_rows = dense_rows

    def _utio_policy_of_row(self, row: int, level: int) -> AttentionPolicy:
        return AttentionPolicy() if row in self.dense_rows else self.utio_cfg.attention_all

    _utio_decode_rows = gw.UtioGPUModelRunner._utio_decode_rows


def test_kernel_step_choice():
    """Which rows of a step the kernels take: the sparse decode rows of one supported
    policy on a full-depth step; otherwise none (the mixin's paths)."""
    table = torch.zeros((4, 8), dtype=torch.int32, device=DEVICE)
    cm = common_metadata([3, 1, 1, 1], [3, 40, 17, 90], table)
    qsl = cm.query_start_loc_cpu.numpy()
    levels = np.zeros(4, dtype=np.int64)
    choose = gw.UtioGPUModelRunner._utio_kernel_step
    throttle = {"attention_all": {"policy": "throttle", "sink_tokens": 16, "recent_tokens": 16}}
    step = choose(_RunnerState(throttle), cm, levels, qsl)
    assert step.rows.tolist() == [1, 2, 3] and step.token_idx.tolist() == [3, 4, 5]
    step = choose(_RunnerState(throttle, dense_rows={2}), cm, levels, qsl)
    assert step.rows.tolist() == [1, 3]  # a request that opted out stays with vLLM's backend
    assert choose(_RunnerState(throttle, dense_rows={1, 2, 3}), cm, levels, qsl) is None
    assert (
        choose(_RunnerState({"attention_all": {"policy": "select"}}), cm, levels, qsl) is not None
    )
    top_p = {"attention_all": {"policy": "select", "top_p": 0.9}}
    assert choose(_RunnerState(top_p), cm, levels, qsl) is None  # not on the kernels
    shallow = {"name": "shallow", "max_score": 0.3, "keep_first": 12, "keep_last": 10}
    full = {"name": "full", "max_score": 0.6, "keep_first": 20, "keep_last": 10}  # all 30
    routed = {**throttle, "router": "forced", "buckets": [shallow, full]}  # levels 2, 1
    assert choose(_RunnerState(routed), cm, np.array([0, 1, 0, 0]), qsl) is not None
    assert choose(_RunnerState(routed), cm, np.array([0, 2, 0, 0]), qsl) is None  # shallow row


def test_runner_mixin_contract():
    """The mixin members the GPU runner overrides or calls (others edit runner.py)."""
    import inspect

    from vllm_utio.integration.runner import UtioRunnerMixin

    params = list(inspect.signature(UtioRunnerMixin._utio_throttle).parameters)
    assert params == ["self", "cm", "levels", "qsl"]
    for name in ("_utio_policy_of_row", "_utio_req_ids", "execute_model", "initialize_kv_cache"):
        assert callable(getattr(UtioRunnerMixin, name)), name
    assert gw.UtioGPUModelRunner.__mro__[1] is UtioRunnerMixin
