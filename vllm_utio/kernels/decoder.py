"""One decode-attention policy, all in one call, with every buffer preallocated.

:class:`SparseDecoder` turns a policy (:class:`Dense`, :class:`Throttle`,
:class:`Vslash`, :class:`QueryAware`) into the selection the split-KV kernel reads and
runs it: dense and throttle as implicit ranges (no list, no extra launch); vslash
through the list builder; query-aware through scoring + top-k over the layer's block
summaries. Buffers (lists, scores, split workspace) are sized once from host integers,
so a call never allocates, never reads device values on the host, and can be captured
in a CUDA graph (replayed with new contents in ``q``, ``seq_lens``, ``block_table``,
the caches and the summaries).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_utio.kernels.block_lists import vslash_block_lists, vslash_width
from vllm_utio.kernels.block_select import block_scores, select_width, topk_block_lists
from vllm_utio.kernels.decode_attention import (
    KernelConfig,
    SplitWorkspace,
    choose_num_splits,
    device_num_sms,
    paged_decode_attention,
)
from vllm_utio.kernels.reference import KVLayout
from vllm_utio.kernels.selection import DENSE, BlockLists, BlockRanges


@dataclass(frozen=True)
class Dense:
    """Every block."""


@dataclass(frozen=True)
class Throttle:
    """Sink blocks (``sink_tokens // block_size``) + the blocks of the recent window."""

    sink_tokens: int
    recent_tokens: int


@dataclass(frozen=True)
class Vslash:
    """Throttle + each slash offset's block + ``vertical_blocks`` blocks of a ranking."""

    sink_tokens: int
    recent_tokens: int
    slash_offsets: tuple[int, ...] = ()
    vertical_blocks: int = 0


@dataclass(frozen=True)
class QueryAware:
    """Sinks + recent window + the highest Quest bounds, ``budget_tokens`` in all."""

    sink_tokens: int
    recent_tokens: int
    budget_tokens: int
    per_kv_head: bool = True  # False: one block set per row (the CPU engine's 'select')


Policy = Dense | Throttle | Vslash | QueryAware


@dataclass(frozen=True)
class DecodeShape:
    """The largest batch a decoder serves and the attention/cache geometry."""

    max_seqs: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    table_width: int  # block-table columns (max model length / block size)


class SparseDecoder:
    """A policy's decode attention over the paged cache, buffers preallocated."""

    def __init__(
        self,
        policy: Policy,
        shape: DecodeShape,
        device: torch.device | str,
        *,
        config: KernelConfig | None = None,
        num_sms: int | None = None,
        num_splits: int | None = None,
    ) -> None:
        self.policy = policy
        self.shape = shape
        self.device = torch.device(device)
        self.config = config or KernelConfig()
        self.num_sms = num_sms if num_sms is not None else device_num_sms(self.device)
        self._num_splits = num_splits
        bs = shape.block_size
        sink_blocks = getattr(policy, "sink_tokens", 0) // bs
        self.sink_blocks = sink_blocks
        self.lists: BlockLists | None = None
        self.scores: torch.Tensor | None = None
        self.offsets: torch.Tensor | None = None
        if isinstance(policy, Vslash):
            width = vslash_width(
                bs, sink_blocks, policy.recent_tokens, len(policy.slash_offsets),
                policy.vertical_blocks,
            )  # fmt: skip
            self.offsets = torch.tensor(policy.slash_offsets, dtype=torch.int32, device=device)
            # room for a list per KV head; a per-row ranking uses the first (see select)
            self.lists = BlockLists.allocate(shape.max_seqs, shape.num_kv_heads, width, device)
        elif isinstance(policy, QueryAware):
            width = select_width(
                bs, sink_blocks, policy.recent_tokens, policy.budget_tokens, shape.table_width
            )
            heads = shape.num_kv_heads if policy.per_kv_head else 1
            self.lists = BlockLists.allocate(shape.max_seqs, heads, width, device)
            self.scores = torch.empty(
                (shape.max_seqs, shape.num_kv_heads, shape.table_width),
                dtype=torch.float32,
                device=device,
            )
        self.ranges = _ranges(policy, sink_blocks)
        splits = self.num_splits(1)  # the most any batch size uses
        self.workspace = SplitWorkspace.allocate(
            shape.max_seqs, shape.num_q_heads, shape.head_dim, splits, device
        )

    def max_blocks(self) -> int:
        """The most blocks a row reads (the split heuristic's work size)."""
        if self.lists is not None:
            return self.lists.width
        return self.ranges.max_blocks(self.shape.block_size, self.shape.table_width)

    def num_splits(self, num_seqs: int) -> int:
        """Splits per (sequence, KV head) for a batch of ``num_seqs`` (host integers only)."""
        if self._num_splits is not None:
            return self._num_splits
        positions = self.max_blocks() * self.shape.block_size
        return choose_num_splits(num_seqs, self.shape.num_kv_heads, positions, self.num_sms)

    def select(
        self,
        q: torch.Tensor,
        block_table: torch.Tensor,
        seq_lens: torch.Tensor,
        *,
        summaries: torch.Tensor | None = None,
        ranked: torch.Tensor | None = None,
    ) -> BlockRanges | BlockLists:
        """The selection of this call: ranges, or lists built on the device."""
        n = q.shape[0]
        bs = self.shape.block_size
        policy = self.policy
        if isinstance(policy, Vslash):
            heads = 1 if ranked is None or ranked.dim() == 2 else ranked.shape[1]
            out = BlockLists(self.lists.blocks[:n, :heads], self.lists.counts[:n, :heads])
            return vslash_block_lists(
                seq_lens, bs, self.sink_blocks, policy.recent_tokens, self.offsets, ranked,
                policy.vertical_blocks, out=out,
            )  # fmt: skip
        if isinstance(policy, QueryAware):
            if summaries is None:
                raise ValueError("the query-aware policy needs the layer's block summaries")
            scores = block_scores(q, summaries, block_table, seq_lens, bs, out=self.scores[:n])
            return topk_block_lists(
                scores, seq_lens, bs, self.sink_blocks, policy.recent_tokens,
                policy.budget_tokens, per_kv_head=policy.per_kv_head,
                width=block_table.shape[1], out=self.lists.rows(n),
            )  # fmt: skip
        return self.ranges

    def __call__(
        self,
        q: torch.Tensor,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        block_table: torch.Tensor,
        seq_lens: torch.Tensor,
        scale: float,
        *,
        out: torch.Tensor | None = None,
        summaries: torch.Tensor | None = None,
        ranked: torch.Tensor | None = None,
        layout: KVLayout = "NHD",
    ) -> torch.Tensor:
        """Selection (if any) + attention; ``summaries``: the layer's packed block
        summaries (query-aware), ``ranked``: vslash's vertical ranking."""
        n = q.shape[0]
        if n > self.shape.max_seqs:
            raise ValueError(f"{n} sequences > the decoder's max_seqs {self.shape.max_seqs}")
        selection = self.select(q, block_table, seq_lens, summaries=summaries, ranked=ranked)
        return paged_decode_attention(
            q, key_cache, value_cache, block_table, seq_lens, scale, selection,
            out=out, num_splits=self.num_splits(n), config=self.config,
            workspace=self.workspace, layout=layout,
        )  # fmt: skip


def _ranges(policy: Policy, sink_blocks: int) -> BlockRanges:
    if isinstance(policy, Throttle):
        return BlockRanges(sink_blocks, policy.recent_tokens)
    return DENSE
