"""Policy ``select`` inside vLLM: summaries at every K/V write, a restricted block table
per layer from that layer's own query (the spec is :mod:`vllm_utio.kv_selection`).

- Every K/V write of a layer (the model's own attention and UTIO's skipped-layer fill)
  goes through the backend's ``impl.do_kv_cache_update``; wrapping it folds the written
  keys into the block summaries, so they follow prefill, decode, recycling and prefix
  hits without a second code path.
- A forward pre-hook on each attention layer from the first layer any ``select`` policy
  selects in: between the query projection (+RoPE) and the attention call it scores the
  current sub-batch's select rows, restricts their block-table rows, builds the backend
  metadata for that layer (reused while consecutive layers keep the same blocks) and
  swaps it into the forward context; a post-hook puts the step's metadata back.
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
from vllm_utio.integration.model_stack import DecoderStack, UnsupportedModelError
from vllm_utio.kv_selection import (
    BlockSummaries,
    HeldBlocks,
    SelectRule,
    budget_blocks,
    held_mask,
    packed_bound,
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
    held: torch.Tensor | None = None  # [rows, L, max_blocks] HeldBlocks state, if any holds


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
        self.summaries: BlockSummaries | None = None
        self.held = HeldBlocks(stack.num_layers, -(-max_model_len // block_size))
        self._layer_of: dict[str, int] = {}
        self._hooks: list[Any] = []
        # this step: persistent row -> its select policy (decode rows only)
        self.policies: dict[int, AttentionPolicy] = {}
        self._req_ids: list[str] = []
        self._current: _Current | None = None
        self._build: BuildMetadata | None = None
        self._saved: dict[int, Any] = {}
        self._reuse: tuple[Any, torch.Tensor, dict[str, Any]] | None = None
        self.saved_tokens = 0  # KV positions not read by select rows this step, over layers

    # --- set-up -------------------------------------------------------------------
    def install(self, first_layer: int) -> None:
        """Allocate summaries for the live KV cache and hook every layer's writes and the
        attention calls of layers >= ``first_layer``."""
        attn0 = self.stack.layers[0].self_attn.attn
        backend = getattr(attn0, "attn_backend", None)
        if getattr(backend, "forward_includes_kv_cache_update", False):
            raise UnsupportedModelError(
                f"UTIO attention policy 'select' keeps block summaries at the backend's K/V "
                f"write; {getattr(backend, '__name__', backend)} writes K/V inside its "
                "attention kernel. Use policy 'throttle' or 'vslash' with this backend"
            )
        cache = attn0.kv_cache
        self.summaries = BlockSummaries(
            self.stack.num_layers,
            int(cache.shape[0]),
            self.block_size,
            int(attn0.num_kv_heads),
            int(attn0.head_size),
            cache.device,
        )
        wrapped: set[int] = set()
        for index, layer in enumerate(self.stack.layers):
            attn = layer.self_attn.attn
            self._layer_of[attn.layer_name] = index
            if id(attn.impl) not in wrapped:
                wrapped.add(id(attn.impl))
                attn.impl.do_kv_cache_update = self._folding(attn.impl.do_kv_cache_update)
            if index >= first_layer:
                self._hooks.append(attn.register_forward_pre_hook(self._pre_hook(index)))
                self._hooks.append(attn.register_forward_hook(self._post_hook(index)))

    def _folding(self, write: Callable[..., Any]) -> Callable[..., Any]:
        def do_kv_cache_update(layer, key, value, kv_cache, slot_mapping, *args, **kwargs):
            out = write(layer, key, value, kv_cache, slot_mapping, *args, **kwargs)
            index = self._layer_of.get(getattr(layer, "layer_name", ""))
            # only the layer's own cache (not, e.g., a layout probe's scratch block)
            if index is not None and kv_cache is layer.kv_cache and self.summaries is not None:
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
        if cur is not None and any(rule.hold_steps for rule in rules):
            cur.held = self.held.rows(req_ids)
        self._current = cur
        try:
            yield
        finally:
            self._current = before
            if cur is not None and cur.held is not None:
                self.held.store(req_ids, cur.held)

    # --- hooks --------------------------------------------------------------------
    def _pre_hook(self, index: int):
        def hook(module, args):
            cur = self._current
            if cur is None:
                return None
            t0 = time.perf_counter()
            md = self._layer_metadata(index, args[0], cur)
            if md is not None:
                from vllm.forward_context import get_forward_context

                ctx = get_forward_context()
                self._saved[index] = ctx.attn_metadata
                ctx.attn_metadata = {**ctx.attn_metadata, module.layer_name: md}
            self._stats().select_s += time.perf_counter() - t0
            return None

        return hook

    def _post_hook(self, index: int):
        def hook(module, args, output):
            saved = self._saved.pop(index, None)
            if saved is not None:
                from vllm.forward_context import get_forward_context

                get_forward_context().attn_metadata = saved
            return None

        return hook

    def _layer_metadata(self, index: int, query: torch.Tensor, cur: _Current) -> Any | None:
        """Backend metadata of this layer with the select rows restricted (None: none)."""
        cm = cur.common
        upper_all = cm.seq_lens_cpu_upper_bound
        bs = self.block_size
        # rows past their dense layers whose context exceeds the budget (others read all)
        chosen = [
            j
            for j, rule in enumerate(cur.rules)
            if index >= rule.dense_layers
            and int(upper_all[cur.local[j]]) > bs * budget_blocks(rule.budget_tokens, bs)
        ]
        if not chosen:
            return None
        local = [cur.local[j] for j in chosen]
        rules = [cur.rules[j] for j in chosen]
        local_t = torch.as_tensor(local, dtype=torch.long)
        qsl = cm.query_start_loc_cpu
        seq_lens = upper_all[local_t].to(torch.long)
        table = cm.block_table_tensor[local_t.to(cm.block_table_tensor.device)]
        rows_q = query[qsl[local_t].to(query.device)]
        kept = self._kept(index, rows_q, table, seq_lens, rules, cur, chosen)
        width = kept.shape[1]
        new_rows, new_lens = restrict_rows(table[:, :width].cpu(), seq_lens, kept, self.block_size)
        self.saved_tokens += int((seq_lens - new_lens).sum())
        if self._reuse is not None and self._reuse[0] is cm and torch.equal(self._reuse[1], kept):
            return self._reuse[2][self.stack.layer_name(index)]
        full_table = cm.block_table_tensor.clone()
        full_table[local_t.to(full_table.device), :width] = new_rows.to(full_table.device)
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
        metadata = self._build(restricted)
        self._reuse = (cm, kept, metadata)
        return metadata[self.stack.layer_name(index)]

    def _kept(
        self,
        index: int,
        query: torch.Tensor,
        table: torch.Tensor,
        seq_lens: torch.Tensor,
        rules: list[AttentionPolicy],
        cur: _Current,
        chosen: list[int],
    ) -> torch.Tensor:
        """``[R, NB]`` kept-block mask of the select rows (grouped by policy); records
        the ranked blocks of rows that hold them."""
        bs = self.block_size
        width = int(((seq_lens + bs - 1) // bs).max())
        summaries = self.summaries
        packed = summaries.gather(index, table[:, :width])  # [G, R, NB, 2D]
        heads = query.shape[-1] // summaries.head_size
        bound = packed_bound(query.reshape(len(seq_lens), heads, -1), packed).cpu()
        scale = self.stack.attention_scale(index)
        kept = torch.zeros(bound.shape, dtype=torch.bool)
        held_rows = torch.as_tensor(chosen, dtype=torch.long)
        for policy in set(rules):
            mask = torch.tensor([r == policy for r in rules])
            rule = SelectRule(
                policy.sink_tokens // bs,
                policy.recent_tokens,
                policy.budget_tokens,
                policy.top_p,
                scale,
                policy.hold_steps,
            )
            held = None
            if rule.hold_steps and cur.held is not None:
                last = cur.held[held_rows[mask], index, :width]  # [r, NB]
                held = held_mask(last, seq_lens[mask], rule.hold_steps)
            kept[mask], ranked = select_blocks(bound[mask], seq_lens[mask], bs, rule, held)
            if held is not None:
                stamp = torch.where(ranked, seq_lens[mask].to(torch.int32).reshape(-1, 1), last)
                cur.held[held_rows[mask], index, :width] = stamp
        return kept
