"""Query-aware KV block selection (policy ``select``): the spec, in plain torch.

Per decode row and layer, the blocks of the paged cache it reads are chosen from that
layer's own post-RoPE query (Quest, Tang et al., ICML 2024):

- **Summaries**: per physical block, KV head and channel, the minimum and maximum of
  the block's post-RoPE keys (:class:`BlockSummaries`). They are folded in as keys are
  written (prefill and decode alike); a write at a block's first slot starts the block
  over (a recycled block forgets its previous owner); a prefix-cache hit shares blocks
  that were not rewritten, so their summaries stay valid.
- **Bound**: for query head ``h`` reading KV head ``g``, ``sum_c max(q_c * min_c,
  q_c * max_c)`` is >= ``q . k`` for every key of the block (:func:`block_bound`). One
  block table serves every head, so heads are combined by the maximum (a block one head
  retrieves sharply must not be averaged away).
- **Selection** (:func:`select_blocks`): sinks and the recent window are always kept;
  the remaining budget goes to the blocks with the highest bound, optionally stopping
  early once the estimated attention share of the kept blocks reaches ``top_p``.
- **Restriction** (:func:`restrict_rows`): the kept blocks in logical order become the
  row's block table and its sequence length ``block_size * (kept - 1) + last block's
  tokens``: exact attention over exactly those positions (keys are stored after RoPE).

Everything is batched over rows (no Python loop per row), so a Triton counterpart can be
checked against these functions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


class BlockSummaries:
    """Channel-wise min/max of the cached keys, per layer, physical block and KV head."""

    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_size: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ) -> None:
        shape = (num_layers, num_blocks, num_kv_heads, head_size)
        # min/max of stored (already rounded) keys are exact in the cache dtype
        self.kmin = torch.full(shape, float("inf"), dtype=dtype, device=device)
        self.kmax = torch.full(shape, float("-inf"), dtype=dtype, device=device)
        self.block_size = block_size

    @property
    def nbytes(self) -> int:
        return self.kmin.numel() * self.kmin.element_size() * 2

    def fold(self, layer: int, keys: torch.Tensor, slots: torch.Tensor) -> None:
        """Fold keys ``[T, kv_heads, head_size]`` written at cache ``slots`` ``[T]``."""
        keep = slots >= 0  # vLLM marks padding with negative slots; they are not written
        if not bool(keep.all()):
            keys, slots = keys[keep], slots[keep]
        if not len(slots):
            return
        slots = slots.to(self.kmin.device, torch.long)
        keys = keys.to(self.kmin.device, self.kmin.dtype)
        blocks = slots // self.block_size
        kmin, kmax = self.kmin[layer], self.kmax[layer]
        fresh = blocks[slots % self.block_size == 0]
        if len(fresh):  # the block starts over: its first slot is being (re)written
            kmin[fresh] = float("inf")
            kmax[fresh] = float("-inf")
        index = blocks.reshape(-1, 1, 1).expand_as(keys)
        kmin.scatter_reduce_(0, index, keys, "amin", include_self=True)
        kmax.scatter_reduce_(0, index, keys, "amax", include_self=True)


def block_bound(
    query: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, num_kv_heads: int
) -> torch.Tensor:
    """Upper bound of ``q . k`` per row and block, max over query heads.

    ``query`` ``[R, num_heads, D]``; ``kmin``/``kmax`` ``[R, NB, num_kv_heads, D]`` (the
    row's blocks in logical order). Query head ``h`` reads KV head ``h // (num_heads /
    num_kv_heads)``. Returns fp32 ``[R, NB]``.

    ``max(q_c * min_c, q_c * max_c)`` is ``q_c * max_c`` where ``q_c >= 0`` and
    ``q_c * min_c`` elsewhere, so the bound is one batched matmul of ``[max | min]``
    against ``[q+ ; q-]`` (no ``[R, NB, heads, D]`` temporary).
    """
    rows, heads, dim = query.shape
    nb = kmin.shape[1]
    q = query.float().reshape(rows, num_kv_heads, heads // num_kv_heads, dim)
    q_split = torch.cat([q.clamp(min=0), q.clamp(max=0)], dim=-1)  # [R, G, H/G, 2D]
    k_split = torch.cat([kmax, kmin], dim=-1).float().transpose(1, 2)  # [R, G, NB, 2D]
    bound = torch.matmul(k_split, q_split.transpose(-1, -2))  # [R, G, NB, H/G]
    return bound.permute(0, 2, 1, 3).reshape(rows, nb, heads).amax(-1)


@dataclass(frozen=True)
class SelectRule:
    """How many blocks a row keeps (all counts in blocks of the cache)."""

    sink_blocks: int
    recent_tokens: int
    budget_tokens: int
    top_p: float | None = None
    scale: float = 1.0  # softmax scale of the attention, for the top-p mass estimate


def always_kept(seq_lens: torch.Tensor, block_size: int, rule: SelectRule) -> torch.Tensor:
    """``[R, NB]`` mask of the sink blocks and the blocks holding the recent window."""
    num_blocks = (seq_lens + block_size - 1) // block_size
    width = int(num_blocks.max()) if len(seq_lens) else 0
    idx = torch.arange(width).reshape(1, -1)
    last_len = seq_lens - block_size * (num_blocks - 1)
    # blocks holding the last `recent_tokens` positions, counted back from the last one
    recent = 1 + torch.clamp((rule.recent_tokens - last_len + block_size - 1) // block_size, min=0)
    nb = num_blocks.reshape(-1, 1)
    return (idx < rule.sink_blocks) | ((idx >= nb - recent.reshape(-1, 1)) & (idx < nb))


def select_blocks(
    bound: torch.Tensor, seq_lens: torch.Tensor, block_size: int, rule: SelectRule
) -> torch.Tensor:
    """``[R, NB]`` bool mask of the logical blocks each row reads.

    ``bound`` ``[R, NB]`` from :func:`block_bound` (padding past a row's blocks is
    ignored). Sinks and recent blocks are always kept; then blocks in descending bound
    until ``budget_tokens`` worth of blocks are kept (at least the always-kept ones), or,
    with ``top_p``, until the kept blocks hold that share of the estimated attention
    mass (softmax of ``scale * bound`` weighted by tokens per block).
    """
    seq_lens = seq_lens.to(torch.long).cpu()
    rows, width = bound.shape
    num_blocks = (seq_lens + block_size - 1) // block_size
    idx = torch.arange(width).reshape(1, -1)
    valid = idx < num_blocks.reshape(-1, 1)
    kept = always_kept(seq_lens, block_size, rule)
    if kept.shape[1] < width:
        kept = torch.nn.functional.pad(kept, (0, width - kept.shape[1]))
    kept &= valid
    budget = max(1, -(-rule.budget_tokens // block_size))
    extra = (budget - kept.sum(1)).clamp(min=0)  # [R] blocks left for the ranking
    score = bound.float().cpu().masked_fill(~valid | kept, float("-inf"))
    order = torch.argsort(score, dim=1, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(width).expand(rows, -1).contiguous())
    candidate = valid & ~kept
    take = candidate & (rank < extra.reshape(-1, 1))
    if rule.top_p is not None:
        take &= _within_top_p(bound.float().cpu(), valid, kept, order, seq_lens, block_size, rule)
    return kept | take


def _within_top_p(
    bound: torch.Tensor,
    valid: torch.Tensor,
    kept: torch.Tensor,
    order: torch.Tensor,
    seq_lens: torch.Tensor,
    block_size: int,
    rule: SelectRule,
) -> torch.Tensor:
    """Candidates ranked before the point where kept + taken reach ``top_p`` of the mass."""
    num_blocks = (seq_lens + block_size - 1) // block_size
    tokens = torch.full(bound.shape, float(block_size))
    last = (num_blocks - 1).clamp(min=0).reshape(-1, 1)
    tokens.scatter_(1, last, (seq_lens - block_size * (num_blocks - 1)).float().reshape(-1, 1))
    logits = (rule.scale * bound).masked_fill(~valid, float("-inf"))
    mass = torch.softmax(logits + tokens.log(), dim=1).nan_to_num(0.0)
    base = (mass * kept).sum(1, keepdim=True)
    ranked_mass = torch.gather(mass * (~kept), 1, order)  # candidates in rank order
    before = torch.cumsum(ranked_mass, 1) - ranked_mass  # mass of better-ranked candidates
    need = (base + before) < rule.top_p  # still short of p before taking this one
    out = torch.zeros_like(valid)
    out.scatter_(1, order, need)
    return out


def restrict_rows(
    block_table: torch.Tensor, seq_lens: torch.Tensor, kept: torch.Tensor, block_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Restricted block-table rows and sequence lengths for ``kept`` ``[R, NB]``.

    ``block_table`` ``[R, W]`` physical ids (W >= NB). The kept blocks move to the front in
    logical order; the row's last block (partial or full) is always kept, so the new length
    is ``block_size * (kept - 1)`` plus that block's tokens.
    """
    rows, width = kept.shape
    idx = torch.arange(width).expand(rows, -1)
    # kept blocks first, in logical order: sort by (not kept, index)
    key = torch.where(kept, idx, idx + width)
    order = torch.argsort(key, dim=1)
    table = block_table.clone()
    table[:, :width] = torch.gather(block_table[:, :width], 1, order.to(block_table.device))
    seq_lens = seq_lens.to(torch.long).cpu()
    num_blocks = (seq_lens + block_size - 1) // block_size
    last_len = seq_lens - block_size * (num_blocks - 1)
    count = kept.sum(1)
    return table, block_size * (count - 1) + last_len
