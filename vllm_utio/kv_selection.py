"""Query-aware KV block selection (policy ``select``): the spec, in plain torch.

Per decode row and layer, the blocks of the paged cache it reads are chosen from that
layer's own post-RoPE query. Two ways to rank blocks (``scoring``):

- ``"sparq"`` (:func:`sparq_block_mass`, after SparQ, Ribar et al. 2024): every cached
  key of the row is scored on the few channels where the query is largest, each head's
  scores softmaxed; a block ranks by the largest share of one head's attention it is
  estimated to take. It reads ``channels / head_size`` of the row's K bytes (a CPU op does
  it in place over the paged cache, :mod:`vllm_utio.cpu_ops`).
- ``"bound"`` (Quest, Tang et al., ICML 2024), from block summaries:

  - **Summaries**: per physical block, KV head and channel, the minimum and maximum of
    the block's post-RoPE keys (:class:`BlockSummaries`, in the keys' dtype). They are
    folded in as keys are written (prefill and decode alike); a write at a block's first
    slot starts the block over (a recycled block forgets its previous owner); a
    prefix-cache hit shares blocks that were not rewritten, so their summaries stay valid.
  - **Bound**: for query head ``h`` reading KV head ``g``, ``sum_c max(q_c * min_c,
    q_c * max_c)`` is >= ``q . k`` for every key of the block (:func:`block_bound`, and
    :func:`packed_bound`, the same in one matmul). One block table serves every head, so
    heads are combined by the maximum; ``heads: "share"`` takes the maximum of each
    head's estimated attention share instead (:func:`combine_heads`).

- **Selection** (:func:`select_blocks`): rows whose whole context fits the budget read
  everything (no scoring). Otherwise sinks and the recent window are always kept; the
  remaining budget goes to the best-ranked blocks, optionally stopping early
  once the estimated attention share of the kept blocks reaches ``top_p``; blocks ranked
  in on one of the request's last ``hold_steps`` steps are kept too (:class:`HeldBlocks`).
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
    """Channel-wise min/max of the cached keys, per layer, KV head and physical block.

    Stored packed as ``[max | -min]`` along the channel axis, ``[L, kv_heads, blocks,
    2 * head_size]``: one ``amax`` scatter folds both halves and one gather feeds the
    bound's matmul in its layout. ``dtype`` is the keys' own (bf16 for a bf16 cache: the
    min/max of bf16 values, and their negation, are bf16 values, so it is exact), which
    halves the bytes the scoring reads against float32; float32 holds any key dtype.
    """

    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_size: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        shape = (num_layers, num_kv_heads, num_blocks, 2 * head_size)
        self.packed = torch.full(shape, float("-inf"), dtype=dtype, device=device)
        self.block_size = block_size
        self.head_size = head_size

    @property
    def nbytes(self) -> int:
        return self.packed.numel() * self.packed.element_size()

    def kmax(self, layer: int) -> torch.Tensor:
        """``[blocks, kv_heads, D]`` float32 maximum of one layer (a copy: for checks, not
        the hot path)."""
        return self.packed[layer, :, :, : self.head_size].transpose(0, 1).float()

    def kmin(self, layer: int) -> torch.Tensor:
        """``[blocks, kv_heads, D]`` float32 minimum of one layer (a copy, as kmax)."""
        return -self.packed[layer, :, :, self.head_size :].transpose(0, 1).float()

    def fold(self, layer: int, keys: torch.Tensor, slots: torch.Tensor) -> None:
        """Fold keys ``[T, kv_heads, head_size]`` written at cache ``slots`` ``[T]``."""
        keep = slots >= 0  # vLLM marks padding with negative slots; they are not written
        if not bool(keep.all()):
            keys, slots = keys[keep], slots[keep]
        if not len(slots):
            return
        packed = self.packed[layer]  # [G, NB, 2D]
        slots = slots.to(packed.device, torch.long)
        keys = keys.to(packed.device, packed.dtype).transpose(0, 1)  # [G, T, D]
        blocks = slots // self.block_size
        fresh = blocks[slots % self.block_size == 0]
        if len(fresh):  # the block starts over: its first slot is being (re)written
            packed[:, fresh] = float("-inf")
        both = torch.cat([keys, -keys], dim=-1)
        if packed.dtype == torch.float32:
            index = blocks.reshape(1, -1, 1).expand_as(both)
            packed.scatter_reduce_(1, index, both, "amax", include_self=True)
            return
        # torch's amax scatter has no fast path below float32 (~50x slower in bf16): fold
        # the touched blocks in float32 and write them back (exact: maxima of bf16 values)
        touched, inverse = torch.unique(blocks, return_inverse=True)
        acc = packed[:, touched].float()
        index = inverse.reshape(1, -1, 1).expand_as(both)
        acc.scatter_reduce_(1, index, both.float(), "amax", include_self=True)
        packed[:, touched] = acc.to(packed.dtype)

    def gather(self, layer: int, blocks: torch.Tensor) -> torch.Tensor:
        """``[kv_heads, R, NB, 2D]`` packed summaries of ``blocks`` ``[R, NB]`` (ids)."""
        flat = blocks.reshape(-1).to(self.packed.device, torch.long)
        # index_select, not advanced indexing: ~10x faster on CPU for this gather
        return (
            self.packed[layer]
            .index_select(1, flat)
            .reshape(self.packed.shape[1], *blocks.shape, -1)
        )


def block_bound(
    query: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, num_kv_heads: int
) -> torch.Tensor:
    """Upper bound of ``q . k`` per row and block, max over query heads (the reference).

    ``query`` ``[R, num_heads, D]``; ``kmin``/``kmax`` ``[R, NB, num_kv_heads, D]`` (the
    row's blocks in logical order). Query head ``h`` reads KV head ``h // (num_heads /
    num_kv_heads)``. Returns fp32 ``[R, NB]``.
    """
    rows, heads, dim = query.shape
    q = query.float().reshape(rows, 1, num_kv_heads, heads // num_kv_heads, dim)
    lo, hi = kmin.float().unsqueeze(3), kmax.float().unsqueeze(3)  # [R, NB, G, 1, D]
    return torch.maximum(q * lo, q * hi).sum(-1).amax(dim=(2, 3))


def head_bounds(query: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """``[G, R, H/G, NB]``: each query head's q.k bound per block, from
    :meth:`BlockSummaries.gather`'s ``[G, R, NB, 2D]`` and ``query`` ``[R, H, D]``.

    ``max(q_c * min_c, q_c * max_c)`` is ``q_c * max_c`` where ``q_c >= 0`` and
    ``(-q_c) * (-min_c)`` elsewhere, so the bound is one batched matmul of
    ``[max | -min]`` against ``[relu(q) ; relu(-q)]`` (no ``[R, NB, heads, D]``
    temporary). It runs in the summaries' dtype: with bf16 summaries the matmul is bf16
    (products accumulated in float32, the result rounded to bf16, ~0.4% relative; about
    10x faster on CPU than float32 here), returned as float32.
    """
    kv_heads, rows = packed.shape[:2]
    heads, dim = query.shape[1:]
    q = query.to(packed.dtype).reshape(rows, kv_heads, heads // kv_heads, dim).transpose(0, 1)
    q_split = torch.cat([q.clamp(min=0), (-q).clamp(min=0)], dim=-1)  # [G, R, H/G, 2D]
    # queries on the left: a wide [H/G, NB] output is ~4x faster than [NB, H/G] on CPU
    return torch.matmul(q_split, packed.transpose(-1, -2)).float()


def packed_bound(query: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """:func:`block_bound` (max over query heads) from the packed summaries."""
    return head_bounds(query, packed).amax(2).amax(0)


def combine_heads(
    per_head: torch.Tensor, heads: str, valid: torch.Tensor, scale: float
) -> torch.Tensor:
    """``[R, NB]`` rank of each block from :func:`head_bounds`' ``[G, R, H/G, NB]``.

    - ``"bound"``: the highest bound over the query heads (:func:`packed_bound`).
    - ``"share"``: the largest share of one head's attention the block is estimated to
      take: each head's ``scale * bound`` softmaxed over the row's ``valid`` ``[R, NB]``
      blocks. A bound overestimates a block's logit, so this is an estimate, not a bound;
      what it buys is that every head's sharpest blocks compete, whatever the size of
      that head's queries.
    """
    if heads == "bound":
        return per_head.amax(2).amax(0)
    if heads != "share":
        raise ValueError(f"heads must be 'bound' or 'share', not {heads!r}")
    logits = (scale * per_head).masked_fill(
        ~valid.to(per_head.device)[None, :, None, :], float("-inf")
    )
    return torch.softmax(logits, dim=-1).amax(2).amax(0)


def sparq_block_mass(
    query: torch.Tensor,
    keys: torch.Tensor,
    seq_lens: torch.Tensor,
    block_size: int,
    channels: int,
    scale: float,
) -> torch.Tensor:
    """``[R, NB]`` rank of each block from approximate per-key scores (SparQ, Ribar et al.
    2024; the spec of the CPU op in :mod:`vllm_utio.cpu_ops`).

    ``query`` ``[R, H, D]``; ``keys`` ``[R, T, G, D]``: each row's cached keys in logical
    order (``T`` a multiple of ``block_size``, at least the longest of ``seq_lens``). Per
    row and KV head, the ``channels`` channels with the largest ``|q|`` summed over that
    head's query heads are kept; each query head scores every key on those alone, times
    the attention ``scale`` over SparQ's temperature ``sqrt(kept share of |q|_1)``, and
    softmaxes over the row's positions; a block's mass is the sum over its positions, its
    rank the largest mass over all query heads (0 past the row's blocks).
    """
    rows, heads, dim = query.shape
    width, kv_heads = keys.shape[1], keys.shape[2]
    per_kv = heads // kv_heads
    q = query.float().reshape(rows, kv_heads, per_kv, dim)
    chans = q.abs().sum(2).topk(channels, -1).indices[:, :, None].expand(-1, -1, per_kv, -1)
    kept = torch.zeros_like(q).scatter_(-1, chans, q.gather(-1, chans))
    ratio = (kept.abs().sum(-1) / q.abs().sum(-1)).clamp(min=1e-6)  # [R, G, H/G]
    scores = torch.einsum("rgkd,rtgd->rgkt", kept, keys.float())
    scores = scores * (scale / ratio.sqrt())[..., None]
    future = torch.arange(width)[None, :] >= seq_lens.reshape(-1, 1).cpu()  # [R, T]
    probs = torch.softmax(scores.masked_fill(future[:, None, None], float("-inf")), -1)
    mass = probs.reshape(rows, heads, width // block_size, block_size).sum(-1).amax(1)
    num_blocks = -(-int(seq_lens.max()) // block_size) if rows else 0
    return mass[:, :num_blocks]


@dataclass(frozen=True)
class SelectRule:
    """How many blocks a row keeps (all counts in blocks of the cache)."""

    sink_blocks: int
    recent_tokens: int
    budget_tokens: int
    top_p: float | None = None
    scale: float = 1.0  # softmax scale of the attention, for the top-p mass estimate
    hold_steps: int = 0  # see HeldBlocks


def budget_blocks(budget_tokens: int, block_size: int) -> int:
    """Blocks a budget of ``budget_tokens`` positions buys (whole blocks, at least one);
    a row of at most that many blocks reads them all, unscored."""
    return max(1, -(-budget_tokens // block_size))


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


def _blocks_of(seq_lens: torch.Tensor, block_size: int, width: int | None = None) -> torch.Tensor:
    """``[R, width]`` mask of each row's logical blocks (default width: the longest row's)."""
    num_blocks = (seq_lens.to(torch.long) + block_size - 1) // block_size
    if width is None:
        width = int(num_blocks.max()) if len(seq_lens) else 0
    return torch.arange(width).reshape(1, -1) < num_blocks.reshape(-1, 1)


@dataclass(frozen=True)
class SelectPlan:
    """The layer-independent part of :func:`select_blocks` for a set of rows: built once
    per step, reused at every selecting layer (only the bounds change per layer)."""

    seq_lens: torch.Tensor  # [R] long, CPU
    valid: torch.Tensor  # [R, NB] the row's blocks
    base: torch.Tensor  # [R, NB] sinks + recent window (always kept)
    take_slots: torch.Tensor  # [R, k] whether the row takes its i-th ranked candidate
    k: int  # ranked candidates per row at most


def plan_selection(
    seq_lens: torch.Tensor, block_size: int, rule: SelectRule, width: int | None = None
) -> SelectPlan:
    """What :func:`select_blocks` can decide from the rows' lengths alone; ``width``: the
    bounds' block axis (default: the longest row's blocks)."""
    seq_lens = seq_lens.to(torch.long).cpu()
    valid = _blocks_of(seq_lens, block_size, width)
    width = valid.shape[1]
    base = always_kept(seq_lens, block_size, rule)
    if base.shape[1] < width:
        base = torch.nn.functional.pad(base, (0, width - base.shape[1]))
    base &= valid
    extra = (budget_blocks(rule.budget_tokens, block_size) - base.sum(1)).clamp(min=0)
    k = min(int(extra.max()) if len(seq_lens) else 0, width)
    take_slots = torch.arange(k).reshape(1, -1) < extra.reshape(-1, 1)
    return SelectPlan(seq_lens, valid, base, take_slots, k)


def select_blocks(
    bound: torch.Tensor,
    seq_lens: torch.Tensor,
    block_size: int,
    rule: SelectRule,
    held: torch.Tensor | None = None,
    plan: SelectPlan | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``[R, NB]`` bool masks: the logical blocks each row reads, and the ranked ones.

    ``bound`` ``[R, NB]`` from :func:`block_bound` (padding past a row's blocks is
    ignored). Sinks and recent blocks are always kept; then blocks in descending bound
    ("ranked") until ``budget_tokens`` worth of blocks are kept (at least the always-kept
    ones), or, with ``top_p``, until the kept blocks hold that share of the estimated
    attention mass (softmax of ``scale * bound`` weighted by tokens per block). ``held``
    ``[R, NB]`` (blocks ranked on a recent step, see :class:`HeldBlocks`) are read too,
    on top of the budget. ``plan``: :func:`plan_selection` of the same rows and rule,
    when the caller reuses it across layers.
    """
    if plan is None:
        plan = plan_selection(seq_lens, block_size, rule, bound.shape[1])
    bound = bound.float().cpu()
    valid, kept = plan.valid, plan.base
    ranked = torch.zeros_like(valid)
    if plan.k > 0:
        score = bound.masked_fill(~valid | kept, float("-inf"))
        top_score, top = torch.topk(score, plan.k, dim=1)  # best first
        take = plan.take_slots & (top_score > -1e38)
        if rule.top_p is not None:
            take &= _within_top_p(bound, valid, kept, top, plan.seq_lens, block_size, rule)
        ranked.scatter_(1, top, take)
    out = kept | ranked
    if held is not None:
        out |= held[:, : out.shape[1]] & valid
    return out, ranked


def _within_top_p(
    bound: torch.Tensor,
    valid: torch.Tensor,
    kept: torch.Tensor,
    top: torch.Tensor,
    seq_lens: torch.Tensor,
    block_size: int,
    rule: SelectRule,
) -> torch.Tensor:
    """``[R, k]``: whether the candidates ``top`` (best first) are taken before kept +
    taken reach ``top_p`` of the estimated attention mass."""
    num_blocks = (seq_lens + block_size - 1) // block_size
    tokens = torch.full(bound.shape, float(block_size))
    last = (num_blocks - 1).clamp(min=0).reshape(-1, 1)
    tokens.scatter_(1, last, (seq_lens - block_size * (num_blocks - 1)).float().reshape(-1, 1))
    logits = (rule.scale * bound).masked_fill(~valid, float("-inf"))
    mass = torch.softmax(logits + tokens.log(), dim=1).nan_to_num(0.0)
    base = (mass * kept).sum(1, keepdim=True)
    ranked_mass = torch.gather(mass * (~kept), 1, top)  # candidates in rank order
    before = torch.cumsum(ranked_mass, 1) - ranked_mass  # mass of better-ranked candidates
    return (base + before) < rule.top_p  # still short of p before taking this one


class HeldBlocks:
    """Per request and layer, the blocks ranked on one of its last ``hold_steps`` steps.

    A multi-token copy needs its source block for every token of the copy, but its
    later tokens' queries may rank it below the budget once the first tokens sit in the
    recent window. Holding a ranked block for a few steps keeps the source read. The
    clock is the sequence length (one more per decode step, no counter to keep), so the
    state is one int32 per layer and logical block of the request, and one row more for
    what the request's layers share: at column :attr:`FOCUS`, the length at which a
    choice last :func:`finds_focus` (``focus_mass``).
    """

    FOCUS = 0  # column of the shared row (index num_layers) holding the focus length

    def __init__(self, num_layers: int, max_blocks: int) -> None:
        self.num_layers = num_layers
        self.max_blocks = max_blocks
        self._last: dict[str, torch.Tensor] = {}  # request -> [L + 1, max_blocks] seq_len

    def request_ids(self) -> set[str]:
        return set(self._last)

    def rows(self, req_ids: list[str]) -> torch.Tensor:
        """``[R, L + 1, max_blocks]`` state of ``req_ids`` (a copy; see :meth:`store`):
        per layer, then the row the layers share."""
        never = torch.full((self.num_layers + 1, self.max_blocks), -(2**30), dtype=torch.int32)
        return torch.stack([self._last.get(r, never) for r in req_ids])

    def store(self, req_ids: list[str], state: torch.Tensor) -> None:
        for req_id, row in zip(req_ids, state, strict=True):
            self._last[req_id] = row

    def forget(self, req_id: str) -> None:
        self._last.pop(req_id, None)


def held_mask(last: torch.Tensor, seq_lens: torch.Tensor, hold_steps: int) -> torch.Tensor:
    """``[R, NB]``: blocks last ranked at most ``hold_steps`` steps before ``seq_lens``;
    ``last`` ``[R, NB]`` is the sequence length of that step."""
    return last >= (seq_lens.to(last.dtype).reshape(-1, 1) - hold_steps)


def last_choice(stamps: torch.Tensor, seq_lens: torch.Tensor, block_size: int) -> torch.Tensor:
    """``[R]``: the length at which each row last chose at a layer. ``stamps``
    ``[R, >= NB]``: per logical block, the row's length when a choice last kept it (see
    ``select_every_steps``). Stamps past a row's blocks, or past its length (a choice made
    on speculative tokens that were rejected), are ignored."""
    valid = _blocks_of(seq_lens, block_size)
    stamps = stamps[:, : valid.shape[1]]
    valid &= stamps <= seq_lens.to(stamps.dtype).reshape(-1, 1)
    return stamps.masked_fill(~valid, torch.iinfo(stamps.dtype).min).amax(1)


def chooses_now(
    last: torch.Tensor,
    seq_lens: torch.Tensor,
    layer: int,
    every_steps: int,
    focus: torch.Tensor | None = None,
) -> torch.Tensor:
    """``[R]``: rows that choose afresh at ``layer`` this step; the others read their
    last choice again. A row chooses when its length, offset by the layer, is a multiple
    of ``every_steps`` (so about 1/every_steps of the layers choose at each step, rather
    than all of them at one step in every_steps), and whenever its last choice is that
    old or absent. With ``focus`` (``[R]``: the length at which a choice of the row last
    :func:`finds_focus`), a row also chooses on that step and the next."""
    seq = seq_lens.to(torch.long)
    stale = seq - last.to(torch.long) >= every_steps
    chosen = stale | ((seq + layer) % every_steps == 0)
    if focus is not None:
        found = focus.to(torch.long)
        chosen |= (found <= seq) & (found >= seq - 1)
    return (seq > 0) & chosen


def finds_focus(
    mass: torch.Tensor, seq_lens: torch.Tensor, block_size: int, rule: SelectRule, share: float
) -> torch.Tensor:
    """``[R]``: rows whose block masses (``[R, >= NB]``, e.g. :func:`sparq_block_mass`)
    put at least ``share`` of a head's attention on a block outside the sinks and the
    recent window: the row is reading something far back (a fact, a copy's source), so
    its layers should not reuse choices made before (``focus_mass``)."""
    valid = _blocks_of(seq_lens, block_size)
    far = valid & ~always_kept(seq_lens, block_size, rule)
    return ((mass[:, : far.shape[1]] >= share) & far).any(1)


def reused_blocks(
    stamps: torch.Tensor,
    last: torch.Tensor,
    seq_lens: torch.Tensor,
    block_size: int,
    rule: SelectRule,
) -> torch.Tensor:
    """``[R, NB]`` blocks a reusing row reads: those its last choice kept (stamped with
    ``last``) and today's sinks and recent window (which may have moved on by one block
    since, so a row reads at most one block over its budget)."""
    valid = _blocks_of(seq_lens, block_size)
    width = valid.shape[1]
    chosen = stamps[:, :width] == last.reshape(-1, 1).to(stamps.dtype)
    return (always_kept(seq_lens, block_size, rule) | chosen) & valid


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
