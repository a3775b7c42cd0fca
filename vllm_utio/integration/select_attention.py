"""Policy ``select`` inside vLLM: summaries at every K/V write, a restricted block table
per layer from that layer's own query (the spec is :mod:`vllm_utio.kv_selection`).

- Every K/V write of a layer (the model's own attention and UTIO's skipped-layer fill)
  goes through the backend's ``impl.do_kv_cache_update``; wrapping it folds the written
  keys into the block summaries, so they follow prefill, decode, recycling and prefix
  hits without a second code path.
- Each attention impl's ``forward`` from the first layer any ``select`` policy selects in
  is wrapped too. vLLM calls it at run time from its attention op, with the layer's
  post-RoPE query, also inside its compiled model (the op is opaque to the graph). There
  the wrapper scores the running batch's select rows, restricts their block-table rows
  and hands the kernel that layer's metadata instead of the step's. A later layer whose
  restricted lengths are the same (a fixed budget) reuses that metadata with only its
  block table swapped. With ``select_every`` N only every N-th layer chooses; the layers
  between get the last choosing layer's metadata as it is (one block table serves every
  layer's cache).
- Where every row of the running sub-batch is a select row whose policy keeps ``kernel``
  'utio', each of its attention calls (restricted layers and dense ones) runs UTIO's own
  decode kernel (:mod:`vllm_utio.integration.decode_kernel`) instead of vLLM's.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

from vllm_utio.config import AttentionPolicy
from vllm_utio.integration.attention import with_block_table
from vllm_utio.integration.decode_kernel import DecodeKernel, output_arg
from vllm_utio.integration.model_stack import (
    DecoderStack,
    UnsupportedModelError,
    affine_strides,
    key_offsets,
    offsets_shape,
)
from vllm_utio.kv_selection import (
    BlockSummaries,
    HeldBlocks,
    SelectPlan,
    SelectRule,
    budget_blocks,
    combine_heads,
    head_bounds,
    held_mask,
    plan_selection,
    restrict_rows,
    select_blocks,
)
from vllm_utio.stats import UtioStats

# builds backend metadata (layer name -> metadata) from a CommonAttentionMetadata
BuildMetadata = Callable[[Any], dict[str, Any]]


@dataclasses.dataclass
class _Current:
    """The running sub-batch and its select rows (sub-batch positions and policies)."""

    common: Any  # its CommonAttentionMetadata
    local: list[int]
    rules: list[AttentionPolicy]
    # [rows, L, max_blocks] HeldBlocks state, if a rule holds blocks or reuses choices
    held: torch.Tensor | None = None
    over: list[bool] | None = None  # per select row: more context than its budget buys


@dataclasses.dataclass
class _Built:
    """The last restricted metadata built this step, and what it was built for."""

    common: Any  # the sub-batch's CommonAttentionMetadata
    rows: list[int]  # its restricted (sub-batch-local) rows
    table: torch.Tensor  # the sub-batch's restricted block table
    lens: torch.Tensor  # [rows] restricted sequence lengths
    metadata: Any  # backend metadata (one KV-cache group: every layer shares it)
    saved: int  # KV positions its rows leave out


@dataclasses.dataclass
class _Rows:
    """The select rows one layer restricts and what depends only on their lengths (the
    same for every layer until a rule's ``dense_layers`` changes the set)."""

    common: Any  # the sub-batch's CommonAttentionMetadata
    chosen: list[int]  # positions in _Current.local / rules
    local: list[int]  # sub-batch rows
    local_t: torch.Tensor
    seq_lens: torch.Tensor  # [R] long, CPU
    table: torch.Tensor  # [R, NB] their physical blocks in logical order (int64, CPU)
    query_rows: torch.Tensor | slice  # each row's query token in the sub-batch
    held_rows: torch.Tensor | slice  # positions in _Current.held
    total: int  # sum of seq_lens
    # per distinct policy: its rows (a bool mask, or all of them), policy and plan
    groups: list[tuple[torch.Tensor | slice, AttentionPolicy, SelectPlan]]
    # every group is 'sparq' without held blocks: the op chooses and restricts in one call
    fused: bool = False

    def chooses(self, index: int) -> bool:
        """Whether layer ``index`` chooses afresh: a choosing layer of some row's policy
        (every ``select_every`` layers from its ``dense_layers``); else it reads what the
        last choosing layer picked."""
        return any((index - p.dense_layers) % p.select_every == 0 for _, p, _ in self.groups)


class QueryAwareSelector:
    """Owns the block summaries and the per-layer selection of one model runner."""

    def __init__(
        self,
        stack: DecoderStack,
        block_size: int,
        max_model_len: int,
        stats: Callable[[], UtioStats],
    ):
        self.stack = stack
        self.block_size = block_size
        self._stats = stats
        self.summaries: BlockSummaries | None = None  # scoring 'bound'
        self._sparq: SparqScorer | None = None  # scoring 'sparq'
        self._kernel: DecodeKernel | None = None  # UTIO's decode kernel (policies' 'kernel')
        self.held = HeldBlocks(stack.num_layers, -(-max_model_len // block_size))
        self._layer_of: dict[str, int] = {}
        # per layer: (head size, attention scale); read once, not through nn.Module lookups
        self._heads: list[tuple[int, float]] = []
        self._first_layer = 0
        # this step: persistent row -> its select policy (decode rows only)
        self.policies: dict[int, AttentionPolicy] = {}
        self._req_ids: list[str] = []
        self._current: _Current | None = None
        self._build: BuildMetadata | None = None
        self._reuse: _Built | None = None
        self._rows: _Rows | None = None
        self.saved_tokens = 0  # KV positions not read by select rows this step, over layers

    # --- set-up -------------------------------------------------------------------
    def install(self, first_layer: int, policies: list[AttentionPolicy]) -> None:
        """Set up what the engine's ``select`` ``policies`` score with (block summaries for
        the live KV cache, or the SparQ op and the cache's key layout) and wrap every
        layer's writes and the attention calls of layers >= ``first_layer``."""
        attn0 = self.stack.layers[0].self_attn.attn
        cache = attn0.kv_cache
        if any(p.scoring == "bound" for p in policies):
            backend = getattr(attn0, "attn_backend", None)
            if getattr(backend, "forward_includes_kv_cache_update", False):
                raise UnsupportedModelError(
                    f"UTIO attention policy 'select' (scoring 'bound') keeps block summaries "
                    f"at the backend's K/V write; {getattr(backend, '__name__', backend)} "
                    "writes K/V inside its attention kernel. Use scoring 'sparq', or policy "
                    "'throttle' or 'vslash', with this backend"
                )
            self.summaries = BlockSummaries(
                self.stack.num_layers,
                int(cache.shape[0]),
                self.block_size,
                int(attn0.num_kv_heads),
                int(attn0.head_size),
                cache.device,
                summary_dtype(cache.dtype),
            )
        sparq = [p.sparq_channels for p in policies if p.scoring == "sparq"]
        if sparq:
            self._sparq = SparqScorer(attn0, max(sparq))
        if any(p.kernel == "utio" for p in policies):
            self._kernel = DecodeKernel.for_layer(attn0)
        self._first_layer = first_layer
        self._heads = [
            (int(layer.self_attn.attn.head_size), self.stack.attention_scale(i))
            for i, layer in enumerate(self.stack.layers)
        ]
        wrapped: set[int] = set()
        for index, layer in enumerate(self.stack.layers):
            attn = layer.self_attn.attn
            self._layer_of[attn.layer_name] = index
            if id(attn.impl) not in wrapped:  # an impl shared by layers is wrapped once
                wrapped.add(id(attn.impl))
                attn.impl.do_kv_cache_update = self._folding(attn.impl.do_kv_cache_update)
                attn.impl.forward = self._selecting(attn.impl, attn.impl.forward)

    def _folding(self, write: Callable[..., Any]) -> Callable[..., Any]:
        def do_kv_cache_update(layer, key, value, kv_cache, slot_mapping, *args, **kwargs):
            out = write(layer, key, value, kv_cache, slot_mapping, *args, **kwargs)
            index = self._layer_of.get(getattr(layer, "layer_name", ""))
            # only the layer's own cache (not, e.g., a layout probe's scratch block)
            if self.summaries is not None and index is not None and kv_cache is layer.kv_cache:
                t0 = time.perf_counter()
                n = slot_mapping.shape[0]
                keys = key[:n].reshape(n, -1, self.summaries.head_size)
                self.summaries.fold(index, keys, slot_mapping)
                self._stats().summary_s += time.perf_counter() - t0
            return out

        return do_kv_cache_update

    # --- per step -----------------------------------------------------------------
    def begin_step(
        self, policies: dict[int, AttentionPolicy], build: BuildMetadata, req_ids: list[str]
    ) -> None:
        """This step's select rows (persistent row -> policy) and the batch's requests."""
        self.policies = policies
        self._build = build
        self._req_ids = req_ids
        self._reuse = None
        self._rows = None

    def restricts_any(self, seq_lens: torch.Tensor) -> bool:
        """Whether a select row of this step has more context than its budget (``seq_lens``
        per persistent row); if none has, every layer reads everything, unscored."""
        return any(self._over_budget(int(seq_lens[row]), p) for row, p in self.policies.items())

    def _over_budget(self, seq_len: int, policy: AttentionPolicy) -> bool:
        """Whether a row of ``seq_len`` positions has more than ``policy``'s budget buys."""
        bs = self.block_size
        return seq_len > bs * budget_blocks(policy.budget_tokens, bs)

    def forget(self, req_id: str) -> None:
        """A finished request's held blocks go (summaries belong to blocks, not requests)."""
        self.held.forget(req_id)

    def take_saved_tokens(self) -> int:
        """KV positions the select rows did not read since the last call, summed over
        layers (the runner divides by the layer count for per-token figures)."""
        saved, self.saved_tokens = self.saved_tokens, 0
        return saved

    @contextmanager
    def running(self, rows: np.ndarray, common: Any):
        """The sub-batch whose layers run inside this block."""
        before = self._current
        local = [i for i, row in enumerate(rows.tolist()) if row in self.policies]
        rules = [self.policies[int(rows[i])] for i in local]
        req_ids = [self._req_ids[int(rows[i])] for i in local]
        cur = _Current(common, local, rules) if local else None
        if cur is not None and any(r.hold_steps or r.select_every_steps > 1 for r in rules):
            cur.held = self.held.rows(req_ids)
        self._current = cur
        try:
            yield
        finally:
            self._current = before
            if cur is not None and cur.held is not None:
                self.held.store(req_ids, cur.held)

    # --- the attention call ---------------------------------------------------------
    def _selecting(self, impl: Any, forward: Callable[..., Any]) -> Callable[..., Any]:
        def select_then_attend(layer, query, key, value, kv_cache, attn_metadata, *a, **kw):
            cur = self._current
            index = self._layer_of.get(getattr(layer, "layer_name", ""), -1)
            if cur is None or attn_metadata is None:
                return forward(layer, query, key, value, kv_cache, attn_metadata, *a, **kw)
            if index >= self._first_layer:
                t0 = time.perf_counter()
                # [tokens, ...] as vLLM passes it (a view into qkv: reshaping every token's
                # query here would copy them all; the select rows' are taken first)
                restricted = self._layer_metadata(index, query, kv_cache, cur)
                self._stats().select_s += time.perf_counter() - t0
                if restricted is not None:
                    attn_metadata = restricted
            # a sub-batch of select rows only: its dense layers too (they read whole tables)
            output = output_arg(a, kw)
            if output is not None and self._own_kernel(cur, attn_metadata):
                self._stats().select_kernel_calls += 1
                return self._kernel.attend(impl, query, kv_cache, attn_metadata, output)
            return forward(layer, query, key, value, kv_cache, attn_metadata, *a, **kw)

        return select_then_attend

    def _own_kernel(self, cur: _Current, metadata: Any) -> bool:
        """Whether UTIO's decode kernel attends this sub-batch at a layer (restricted or
        not): it is built, takes the metadata (one query token per row: select rows are
        decode rows), every row is a select row (a dense or opted-out row keeps vLLM's
        kernel, so its tokens stay vanilla's) and no select policy asks for vLLM's."""
        return (
            self._kernel is not None
            and len(cur.local) == cur.common.num_reqs
            and all(rule.kernel == "utio" for rule in cur.rules)
            and self._kernel.fits(metadata)
        )

    def _rows_at(self, index: int, cur: _Current) -> _Rows | None:
        """The select rows restricted at layer ``index`` (None: none), with everything
        that depends only on their lengths; reused by every layer with the same rows."""
        cm = cur.common
        upper_all = cm.seq_lens_cpu_upper_bound
        bs = self.block_size
        if cur.over is None:  # lengths do not change within a step: decided once
            lens = upper_all[torch.as_tensor(cur.local, dtype=torch.long)].tolist()
            cur.over = [self._over_budget(n, r) for n, r in zip(lens, cur.rules, strict=True)]
        # rows past their dense layers whose context exceeds the budget (others read all)
        chosen = [
            j for j, rule in enumerate(cur.rules) if cur.over[j] and index >= rule.dense_layers
        ]
        if not chosen:
            return None
        last = self._rows
        if last is not None and last.common is cm and last.chosen == chosen:
            return last
        local = [cur.local[j] for j in chosen]
        rules = [cur.rules[j] for j in chosen]
        local_t = torch.as_tensor(local, dtype=torch.long)
        seq_lens = upper_all.index_select(0, local_t).to(torch.long)
        width = int(((seq_lens + bs - 1) // bs).max())
        table = cm.block_table_tensor[local_t.to(cm.block_table_tensor.device), :width]
        table = table.to("cpu", torch.long)  # as the scorers and the restriction take it
        groups = []
        distinct = list(dict.fromkeys(rules))  # distinct policies, in first-seen order
        for policy in distinct:
            # one policy: a slice of every row (views, no copies at each layer)
            mask = slice(None) if len(distinct) == 1 else torch.tensor([r == policy for r in rules])
            rule = _rule(policy, bs, 1.0)
            groups.append((mask, policy, plan_selection(seq_lens[mask], bs, rule, width)))
        self._rows = _Rows(
            cm,
            chosen,
            local,
            local_t,
            seq_lens,
            table,
            _rows_or_view(cm.query_start_loc_cpu.index_select(0, local_t)),
            _rows_or_view(torch.as_tensor(chosen, dtype=torch.long)),
            int(seq_lens.sum()),
            groups,
            # the op writes the restricted rows into a copy of the sub-batch's table
            fused=self._sparq is not None
            and cm.block_table_tensor.device.type == "cpu"
            and all(p.scoring == "sparq" and not p.hold_steps for _, p, _ in groups),
        )
        if not self._rows.fused and any(p.select_every_steps > 1 for _, p, _ in groups):
            # only the op keeps each layer's last choice
            raise UnsupportedModelError(
                "UTIO select field 'select_every_steps' needs scoring 'sparq' over the CPU "
                "backend's cache, and no other select policy with 'hold_steps' or scoring "
                "'bound' in the same step; set select_every_steps=1"
            )
        return self._rows

    def _layer_metadata(
        self, index: int, query: torch.Tensor, kv_cache: torch.Tensor, cur: _Current
    ) -> Any | None:
        """Backend metadata of this layer with the select rows restricted (None: none)."""
        rows = self._rows_at(index, cur)
        if rows is None:
            return None
        cm = cur.common
        last = self._reuse
        same_rows = last is not None and last.common is cm and last.rows == rows.local
        if same_rows and not rows.chooses(index):
            # between choosing layers: the blocks the last choosing layer picked
            self.saved_tokens += last.saved
            return last.metadata
        self._stats().select_choices += 1
        head_size, scale = self._heads[index]
        query = _take_rows(query, rows.query_rows).reshape(len(rows.local), -1, head_size)
        local, local_t = rows.local, rows.local_t
        full_table = cm.block_table_tensor.clone()
        if rows.fused:
            new_lens = self._restrict_in_op(index, query, scale, kv_cache, rows, cur, full_table)
        else:
            kept = self._kept(index, query, scale, kv_cache, rows, cur)
            new_rows, new_lens = restrict_rows(rows.table, rows.seq_lens, kept, self.block_size)
            full_table[local_t.to(full_table.device), : kept.shape[1]] = new_rows.to(
                full_table.device, full_table.dtype
            )
        saved = rows.total - int(new_lens.sum())
        self.saved_tokens += saved
        if same_rows and torch.equal(last.lens, new_lens):
            if torch.equal(last.table, full_table):
                return last.metadata
            # same lengths, other blocks (the usual case: a fixed budget): swap the table
            patched = with_block_table(last.metadata, full_table)
            if patched is not None:
                self._reuse = _Built(cm, local, full_table, new_lens, patched, saved)
                return patched
        # only the select rows change; the others keep their exact lengths
        upper = cm.seq_lens_cpu_upper_bound.clone()
        upper[local_t] = new_lens.to(upper.dtype)
        lens = cm.seq_lens.clone()
        lens[local_t.to(lens.device)] = new_lens.to(lens.device, lens.dtype)
        restricted = dataclasses.replace(
            cm,
            block_table_tensor=full_table,
            seq_lens=lens,
            seq_lens_cpu_upper_bound=upper,
            max_seq_len=int(upper.max()),
        )
        metadata = self._build(restricted)[self.stack.layer_name(index)]
        self._reuse = _Built(cm, local, full_table, new_lens, metadata, saved)
        return metadata

    def _restrict_in_op(
        self,
        index: int,
        query: torch.Tensor,
        scale: float,
        kv_cache: torch.Tensor,
        rows: _Rows,
        cur: _Current,
        table_out: torch.Tensor,
    ) -> torch.Tensor:
        """The fused route: per policy group, the op scores, chooses and writes the rows'
        restricted table rows into ``table_out``; returns their restricted lengths. Rows
        of a ``select_every_steps`` policy choose only on their turn at this layer."""
        new_lens = torch.empty(len(rows.local), dtype=torch.long)
        shared = self.held.num_layers  # the held row the request's layers share
        for mask, policy, plan in rows.groups:
            held_rows = stamps = focus = None
            if policy.select_every_steps > 1:
                # views the op updates in place where the rows are held's own, in order;
                # else copies, written back below
                held_rows = _sub_rows(rows.held_rows, mask)
                stamps = cur.held[held_rows, index]
                focus = cur.held[held_rows, shared, HeldBlocks.FOCUS]
            new_lens[mask], chose = self._sparq.restrict(
                query[mask],
                kv_cache,
                rows.table[mask],
                plan.seq_lens,
                policy,
                scale,
                table_out,
                rows.local_t[mask],
                None if stamps is None else (stamps, focus),
                choice_turn(index, policy.select_every),
            )
            if stamps is not None:
                if not isinstance(held_rows, slice):
                    cur.held[held_rows, index] = stamps
                    cur.held[held_rows, shared, HeldBlocks.FOCUS] = focus
                stats = self._stats()
                stats.select_rows_reused += int((chose == 0).sum())
                stats.select_rows_focused += int((chose == 2).sum())
        return new_lens

    def _kept(
        self,
        index: int,
        query: torch.Tensor,
        scale: float,
        kv_cache: torch.Tensor,
        rows: _Rows,
        cur: _Current,
    ) -> torch.Tensor:
        """``[R, NB]`` kept-block mask of the select rows (grouped by policy); records
        the ranked blocks of rows that hold them."""
        bs = self.block_size
        width = rows.table.shape[1]
        kept = torch.zeros((len(rows.local), width), dtype=torch.bool)
        per_head = None  # every row's q.k bounds, when a 'bound' group needs them
        for mask, policy, plan in rows.groups:
            rule = _rule(policy, bs, scale)
            if policy.scoring == "sparq":
                rank = self._sparq.rank(
                    query[mask], kv_cache, rows.table[mask], plan.seq_lens, policy, scale, width
                )
            else:
                if per_head is None:
                    per_head = head_bounds(query, self.summaries.gather(index, rows.table))
                rank = combine_heads(per_head[:, mask], policy.heads, plan.valid, scale).cpu()
            held = None
            if rule.hold_steps and cur.held is not None:
                held_rows = _sub_rows(rows.held_rows, mask)
                last = cur.held[held_rows, index, :width]  # [r, NB]
                held = held_mask(last, plan.seq_lens, rule.hold_steps)
            kept[mask], ranked = select_blocks(rank, plan.seq_lens, bs, rule, held, plan)
            if held is not None:
                stamp = torch.where(ranked, plan.seq_lens.to(torch.int32).reshape(-1, 1), last)
                cur.held[held_rows, index, :width] = stamp
        return kept


class SparqScorer:
    """Scoring 'sparq' over vLLM's paged CPU cache: the C++ op of :mod:`vllm_utio.cpu_ops`
    (spec: :func:`vllm_utio.kv_selection.sparq_block_mass`) reading each key's chosen
    channels where the backend stored them (layout learned through its own write)."""

    def __init__(self, attn: Any, channels: int) -> None:
        from vllm_utio.cpu_ops import load

        cache = attn.kv_cache
        self.head_size, self.kv_heads = int(attn.head_size), int(attn.num_kv_heads)
        if channels > self.head_size:
            raise UnsupportedModelError(
                f"UTIO config field 'sparq_channels': value {channels} exceeds the model's "
                f"head size; allowed: 1..{self.head_size}"
            )
        if cache.device.type != "cpu" or not cache[0].is_contiguous():
            raise UnsupportedModelError(
                "UTIO select scoring 'sparq' runs on the CPU backend's paged cache only; "
                "use scoring 'bound' here"
            )
        offsets = key_offsets(attn, cache)
        layout = affine_strides(offsets) if offsets is not None else None
        if layout is None:
            raise UnsupportedModelError(
                "UTIO select scoring 'sparq' could not learn where this KV cache stores each "
                f"key channel ({cache.dtype}); use scoring 'bound'"
            )
        start, (self.s_tok, self.s_head, self.s_chan) = layout
        self.start = start
        self.block_size = offsets_shape(attn, cache)[0]
        try:  # compiled on first use (set-up builds it once)
            self.op = load()
        except Exception as err:  # no compiler, no ninja, a failed build: say what to do
            raise UnsupportedModelError(
                f"UTIO select scoring 'sparq' needs UTIO's C++ CPU op, which did not build "
                f"({type(err).__name__}: {err}); install a C++ compiler and run "
                "`python -m vllm_utio.cpu_ops`, or use scoring 'bound'"
            ) from err

    def rank(
        self,
        query: torch.Tensor,
        kv_cache: torch.Tensor,
        table: torch.Tensor,
        seq_lens: torch.Tensor,
        policy: AttentionPolicy,
        scale: float,
        width: int,
    ) -> torch.Tensor:
        """``[r, width]`` block ranks of rows ``query`` ``[r, H, D]`` (0 past a row's end)."""
        mass = self.op.sparq_block_mass(
            *self._op_args(query, kv_cache, table, seq_lens, policy, scale)
        )
        return torch.nn.functional.pad(mass, (0, width - mass.shape[1]))

    def restrict(
        self,
        query: torch.Tensor,
        kv_cache: torch.Tensor,
        table: torch.Tensor,
        seq_lens: torch.Tensor,
        policy: AttentionPolicy,
        scale: float,
        table_out: torch.Tensor,
        rows_out: torch.Tensor,
        steps: tuple[torch.Tensor, torch.Tensor] | None = None,
        layer: int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The rows' kept blocks (sinks, recent window, the top masses up to the budget:
        :func:`~vllm_utio.kv_selection.select_blocks` without ``top_p`` or held blocks)
        written in logical order into ``table_out`` at rows ``rows_out``, in one op call.
        With ``steps`` = (stamps ``[r, max_blocks]``, focus ``[r]``), both int32 and updated
        in place (``select_every_steps`` > 1), a row chooses only on its turn at ``layer``
        and otherwise reads the blocks its last choice there kept (spec:
        :func:`~vllm_utio.kv_selection.chooses_now` and
        :func:`~vllm_utio.kv_selection.reused_blocks`); focus is the rows' shared focus
        length (``focus_mass``, spec: :func:`~vllm_utio.kv_selection.finds_focus`).
        Returns the rows' restricted lengths
        (:func:`~vllm_utio.kv_selection.restrict_rows`) and, with ``steps``, per row 0
        (reused its last choice), 1 (chose on its turn) or 2 (chose, focused)."""
        args = (
            *self._op_args(query, kv_cache, table, seq_lens, policy, scale),
            *self._choice_args(policy),
            table_out,
            rows_out,
        )
        if steps is None:
            return self.op.sparq_restrict(*args), None
        stamps, focus = steps
        return self.op.sparq_restrict_steps(
            *args, stamps, policy.select_every_steps, layer, focus, policy.focus_mass or 0.0
        )

    def _choice_args(self, policy: AttentionPolicy) -> tuple[int, int, int]:
        """The op's sink blocks, recent-window tokens and budget blocks of ``policy``."""
        bs = self.block_size
        return (
            policy.sink_tokens // bs,
            policy.recent_tokens,
            budget_blocks(policy.budget_tokens, bs),
        )

    def _op_args(
        self,
        query: torch.Tensor,
        kv_cache: torch.Tensor,
        table: torch.Tensor,
        seq_lens: torch.Tensor,
        policy: AttentionPolicy,
        scale: float,
    ) -> tuple:
        return (
            query.float().contiguous(),
            kv_cache,
            kv_cache.stride(0),
            self.start,
            self.s_tok,
            self.s_head,
            self.s_chan,
            table.to(torch.long),  # no copy when it already is
            seq_lens.to(torch.long),
            self.kv_heads,
            self.block_size,
            policy.sparq_channels,
            scale,
        )


def choice_turn(index: int, select_every: int) -> int:
    """The stagger of layer ``index`` for ``select_every_steps``: its rank among the
    choosing layers (the layer index when every layer chooses). Consecutive choosing
    layers get consecutive turns, so with ``select_every`` 4 they do not all choose on
    the same steps."""
    return index // select_every


def _rows_or_view(index: torch.Tensor) -> torch.Tensor | slice:
    """``index`` (sorted row positions), or the slice it equals when it is ``0..n-1``
    (decode rows in order, the usual case): taking rows then is a view, not a gather."""
    n = len(index)
    if n and int(index[0]) == 0 and int(index[-1]) == n - 1 and bool((index.diff() == 1).all()):
        return slice(0, n)
    return index


def _take_rows(t: torch.Tensor, rows: torch.Tensor | slice) -> torch.Tensor:
    """``t``'s rows ``rows`` (a slice: a view; positions: a copy)."""
    return t[rows] if isinstance(rows, slice) else t.index_select(0, rows)


def _sub_rows(rows: torch.Tensor | slice, mask: torch.Tensor | slice) -> torch.Tensor | slice:
    """The entries of ``rows`` (positions, or a slice of them) under a group's ``mask``
    (a bool mask, or ``slice(None)`` for all)."""
    if isinstance(mask, slice):
        return rows
    if isinstance(rows, slice):
        rows = torch.arange(rows.start, rows.stop)
    return rows[mask]


def summary_dtype(cache_dtype: torch.dtype) -> torch.dtype:
    """The summaries' dtype for a KV cache of ``cache_dtype``: the keys' own where min/max
    of them are exact in it (bf16, fp16), else float32 (e.g. an fp8 cache)."""
    return cache_dtype if cache_dtype in (torch.bfloat16, torch.float16) else torch.float32


def _rule(policy: AttentionPolicy, block_size: int, scale: float) -> SelectRule:
    return SelectRule(
        policy.sink_tokens // block_size,
        policy.recent_tokens,
        policy.budget_tokens,
        policy.top_p,
        scale,
        policy.hold_steps,
    )
