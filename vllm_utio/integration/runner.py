"""UTIO's model-runner mixin, shared by the CPU and GPU runner subclasses.

Per step (``execute_model``):
1. ``_may_reorder_batch`` (inside ``_update_states``): score each request from its
   previous step, route it to a depth level, apply bucketing rules, and (prefix
   execution) reorder the persistent batch deepest first with vLLM's own swap, so
   logits and sampling follow the new order without an un-permute.
2. ``_build_attention_metadata`` runs as usual; a recorder keeps the step's common
   attention metadata so sub-batches can be built from it.
3. ``_model_forward``: a step with nothing UTIO-specific (every row full depth and dense,
   no signal needed mid-forward; :mod:`vllm_utio.step_path`) runs vLLM's own compiled
   model; any other step runs the :class:`~vllm_utio.executor.DepthExecutor`'s layer loop.
4. ``sample_tokens``: before sampling, this step's logits and hidden states become the
   next step's importance signals.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Any

import numpy as np
import torch

from vllm_utio.attention_policy import (
    Selection,
    apply_selections,
    block_attention_mass,
    rank_blocks,
    throttled_blocks,
    vslash_blocks,
)
from vllm_utio.config import AttentionPolicy, UtioConfig, utio_config_from_additional
from vllm_utio.corrections import Correction, load_correction
from vllm_utio.executor import DepthExecutor, StepPlan, StepResult
from vllm_utio.integration.attention import (
    StepMetadataRecorder,
    SubBatch,
    build_metadata,
    build_sub_batch,
)
from vllm_utio.integration.decode_kernel import install_for_all_steps
from vllm_utio.integration.draft_handoff import attach_drafts, reads_drafts_from_reply
from vllm_utio.integration.layer_body import make_layer_body
from vllm_utio.integration.model_stack import DecoderStack, UnsupportedModelError
from vllm_utio.integration.select_attention import QueryAwareSelector
from vllm_utio.integration.self_draft import SelfDrafter
from vllm_utio.log import get_logger
from vllm_utio.plans import PlanSet
from vllm_utio.request_controls import pinned_bucket, wants_dense
from vllm_utio.routing import signals
from vllm_utio.routing.bucketing import (
    deepest_first_order,
    finalize_levels,
    swaps_for_permutation,
    tokens_per_level,
)
from vllm_utio.routing.payoff import RoutingPayoff
from vllm_utio.routing.probe import load_checked_probe
from vllm_utio.routing.routers import RoutingBatch, levels_by_name, make_router
from vllm_utio.speculation import SpeculationStats
from vllm_utio.stats import StatsLogger, UtioStats
from vllm_utio.step_path import StepFacts, layer_loop_reason, needs_heat

logger = get_logger(__name__)


@dataclasses.dataclass
class VerticalEstimate:
    """This step's vslash decode rows, whose block ranking is re-estimated after the forward."""

    rows: np.ndarray  # persistent-batch rows
    req_ids: list[str]
    blocks: torch.Tensor  # [rows, max blocks] physical blocks in logical order (padded)
    seq_lens: np.ndarray


class UtioRunnerMixin:
    """Mixed in before vLLM's runner class: ``class X(UtioRunnerMixin, CPUModelRunner)``."""

    # --- set-up ------------------------------------------------------------------
    def _utio_init(self) -> None:
        self.utio_cfg: UtioConfig = utio_config_from_additional(self.vllm_config.additional_config)
        self.utio_stats = UtioStats()
        self._utio_log = StatsLogger(self.utio_cfg.stats_log_interval_s)
        self._utio_signals: dict[str, dict[str, float]] = {}
        self._utio_levels: np.ndarray | None = None
        # this step's rows a router may move below full depth, and their scheduled tokens
        self._utio_routable = (np.zeros(0, dtype=bool), np.zeros(0, dtype=np.int64))
        self._utio_recorder = StepMetadataRecorder()
        self._utio_executor: DepthExecutor | None = None
        self._utio_route_s = 0.0
        self._utio_payoff = RoutingPayoff(self.utio_cfg.routing_payoff)
        # this step: probe routes mid-forward (True), routing declined (False), no choice
        self._utio_probing: bool | None = None
        self._utio_mid_metadata_s = 0.0
        self._utio_kv_read = (0, 0)  # decode KV tokens read this step, and dense would read
        # vslash: per request, its logical blocks ranked by attention mass (latest estimate)
        self._utio_ranked: dict[str, np.ndarray] = {}
        self._utio_estimate: VerticalEstimate | None = None
        self._utio_estimate_warned = False
        self._utio_selector: QueryAwareSelector | None = None  # policy 'select'
        self._utio_drafter: SelfDrafter | None = None  # 'speculate'
        # whether the engine's executor reads drafts off each step's reply (draft_handoff)
        self._utio_drafts_on_reply = reads_drafts_from_reply(self.vllm_config)
        self._utio_decode_kernel = False  # decode_kernel 'utio' installed
        # while drafting: the draft plan's policy and the draft batch's request ids
        self._utio_policy_override: AttentionPolicy | None = None
        self._utio_draft_req_ids: list[str] | None = None
        self.utio_kv_huge_page_bytes = 0  # set by a CPU runner that put the cache on them

    def load_model(self, *args: Any, **kwargs: Any) -> None:
        super().load_model(*args, **kwargs)
        self._utio_setup_model()

    def _utio_setup_model(self) -> None:
        cfg = self.utio_cfg
        stack = DecoderStack.from_causal_lm(self.model)
        num_layers = stack.num_layers
        cfg.check_against_model(num_layers)
        self.utio_plans = PlanSet.from_config(cfg, num_layers)
        stack.body = make_layer_body(stack.layers, cfg.layer_loop, self.vllm_config)
        self.utio_stats = UtioStats.for_levels([p.name for p in self.utio_plans.plans])
        corrections: list[Correction | None] = [None]
        hidden_size = self.model_config.get_hidden_size()
        for bucket in reversed(cfg.buckets):
            corrections.append(
                load_correction(
                    bucket.correction, hidden_size, self.model_config.dtype, self.device
                )
                if bucket.correction
                else None
            )
        self._utio_executor = DepthExecutor(
            stack, self.utio_plans, corrections, cfg.schedule, self._utio_heat_layer(num_layers)
        )
        self._utio_num_kv_heads = stack.num_kv_heads()
        self._utio_router = make_router(cfg)
        self._utio_pin_levels = levels_by_name(cfg)
        self._utio_probe = (
            load_checked_probe(cfg, hidden_size, num_layers) if cfg.router == "probe" else None
        )
        if stack.body is not None:
            route_layer = self._utio_probe.layer if self._utio_probe is not None else None
            segments = self._utio_executor.segments(route_layer)
            seconds = stack.body.warm_up(
                stack.layers, segments, self.model_config.dtype, self.device
            )
            logger.info(
                "UTIO: compiled the layer loop (segments of %s layers) in %.1f s",
                sorted({len(r) for r in segments}),
                seconds,
            )
        # bucket policies a mid-forward router must apply once it has decided
        self._utio_mid_sparse = cfg.attention_all is None and any(
            b.attention.policy != "dense" for b in cfg.buckets
        )
        if cfg.speculate is not None:
            bucket = cfg.speculate.draft.bucket
            level = self._utio_pin_levels[bucket] if bucket is not None else 0
            self._utio_drafter = SelfDrafter(self, cfg.speculate, level)
            self._utio_draft_stats = UtioStats.for_levels(self.utio_stats.level_names)
        logger.info(
            "UTIO enabled: %d layers, levels %s, router=%s, schedule=%s, execution=%s, "
            "layer loop=%s",
            num_layers,
            [(p.name, p.num_run) for p in self.utio_plans.plans],
            cfg.router,
            cfg.schedule,
            self._utio_execution(),
            "compiled" if stack.body is not None else "eager",
        )

    def _utio_route_mid(self, stream: torch.Tensor) -> np.ndarray:
        """Levels from the probe on each row's last token (mid-forward)."""
        desired = self._utio_probe.levels(stream, [b.max_score for b in self.utio_cfg.buckets])
        desired = self._utio_pin(desired)
        routable, tokens = self._utio_routable
        return finalize_levels(desired, routable, tokens, self.utio_plans, self.utio_cfg)

    def _utio_heat_layer(self, num_layers: int) -> int:
        """The attention-heat layer: configured, else the last layer every level runs."""
        if self.utio_cfg.routing_layer is not None:
            return self.utio_cfg.routing_layer
        if not self.utio_cfg.buckets:
            return num_layers // 2
        return max(0, min(b.keep_first for b in self.utio_cfg.buckets) - 1)

    def initialize_kv_cache(self, *args: Any, **kwargs: Any) -> None:
        super().initialize_kv_cache(*args, **kwargs)
        if len(self.kv_cache_config.kv_cache_groups) != 1:
            raise UnsupportedModelError(
                "UTIO supports models with one KV-cache group (uniform full attention); this "
                f"model has {len(self.kv_cache_config.kv_cache_groups)}"
            )
        self._utio_recorder.install(self.attn_groups)
        if self.utio_cfg.decode_kernel == "utio" and self._utio_executor is not None:
            self._utio_decode_kernel = install_for_all_steps(
                self._utio_executor.stack, self._utio_count_decode_kernel
            )
        first = self.utio_cfg.first_select_layer()
        if first is not None and self._utio_executor is not None:
            self._utio_selector = QueryAwareSelector(
                self._utio_executor.stack,
                self.cache_config.block_size,
                self.max_model_len,
                lambda: self.utio_stats,
            )
            selects = [p for _, p in self.utio_cfg.policies() if p.policy == "select"]
            self._utio_selector.install(first, selects)

    def _utio_count_decode_kernel(self) -> None:
        self.utio_stats.decode_kernel_calls += 1

    def _utio_execution(self) -> str:
        mode = self.utio_cfg.execution
        if self.utio_cfg.router == "probe":
            return "gather"  # levels are decided mid-forward, after the order is fixed
        if mode == "auto":
            # Backends that reorder decodes first keep their order: gather/scatter then.
            return "gather" if self.reorder_batch_threshold is not None else "prefix"
        return mode

    # --- routing (before the step) ------------------------------------------------
    def _may_reorder_batch(self, scheduler_output: Any) -> None:
        super()._may_reorder_batch(scheduler_output)
        t0 = time.perf_counter()
        levels = self._utio_route(scheduler_output)
        if self._utio_execution() == "prefix" and levels.any():
            order = deepest_first_order(levels)
            for a, b in swaps_for_permutation(order):
                self.input_batch.swap_states(a, b)
            levels = levels[order]
        self._utio_levels = levels
        self._utio_route_s = time.perf_counter() - t0

    def _utio_route(self, scheduler_output: Any) -> np.ndarray:
        cfg = self.utio_cfg
        n = self.input_batch.num_reqs
        req_ids = list(self.input_batch.req_ids[:n])
        scheduled = scheduler_output.num_scheduled_tokens
        tokens = np.array([scheduled.get(r, 0) for r in req_ids], dtype=np.int64)
        if not cfg.buckets or n == 0 or cfg.speculate is not None:
            # (with 'speculate', buckets are draft plans: target steps run full depth)
            return np.zeros(n, dtype=np.int64)
        routable = np.zeros(n, dtype=bool)
        extra: list[dict[str, Any] | None] = []
        for i, req_id in enumerate(req_ids):
            state = self.requests[req_id]
            decoding = state.num_computed_tokens >= state.num_prompt_tokens and tokens[i] == 1
            routable[i] = decoding or cfg.route_prefill
            params = state.sampling_params
            extra.append(params.extra_args if params is not None else None)
        scores = self._utio_scores(req_ids) if cfg.router == "surrogate" else np.full(n, np.nan)
        self._utio_routable = (routable, tokens)
        if cfg.router == "probe":
            self._utio_probing = (
                self._utio_payoff.route(int(tokens.sum())) if routable.any() else None
            )
            if self._utio_probing is not False:
                return np.zeros(n, dtype=np.int64)  # decided mid-forward
            # routing does not pay at this step size: pinned buckets only, no probe
            self.utio_stats.routing_declined_steps += 1
            self._utio_routable = (np.zeros(n, dtype=bool), tokens)
            desired = self._utio_pin(np.zeros(n, dtype=np.int64))
            return finalize_levels(desired, routable, tokens, self.utio_plans, cfg)
        desired = self._utio_pin(self._utio_router.route(RoutingBatch(req_ids, scores, extra)))
        return finalize_levels(desired, routable, tokens, self.utio_plans, cfg)

    def _utio_pin(self, desired: np.ndarray) -> np.ndarray:
        """Requests that pin a bucket (``utio_bucket``) get it, whatever the router says."""
        level_of = self._utio_pin_levels
        for row, req_id in enumerate(self.input_batch.req_ids[: len(desired)]):
            params = self.requests[req_id].sampling_params
            name = pinned_bucket(params.extra_args if params is not None else None)
            if name in level_of:
                desired[row] = level_of[name]
        return desired

    def _utio_scores(self, req_ids: list[str]) -> np.ndarray:
        """Surrogate score per request from its previous step (NaN: none yet)."""
        comps = {c: np.full(len(req_ids), np.nan) for c in signals.COMPONENTS}
        for i, req_id in enumerate(req_ids):
            for name, value in self._utio_signals.get(req_id, {}).items():
                comps[name][i] = value
        tensors = {k: torch.from_numpy(v) for k, v in comps.items()}
        return signals.combine(tensors, self.utio_cfg.signal).numpy()

    # --- the step ----------------------------------------------------------------
    def execute_model(self, scheduler_output: Any, *args: Any, **kwargs: Any) -> Any:
        self._utio_recorder.reset()
        self._utio_levels = None
        self._utio_probing = None
        return super().execute_model(scheduler_output, *args, **kwargs)

    def _model_forward(
        self,
        input_ids: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        intermediate_tensors: Any = None,
        inputs_embeds: torch.Tensor | None = None,
        **model_kwargs: Any,
    ) -> Any:
        cm = self._utio_recorder.common
        levels = self._utio_levels
        if (
            self._utio_executor is None
            or levels is None
            or cm is None
            or model_kwargs
            or intermediate_tensors is not None
            or len(levels) != cm.num_reqs
        ):
            return super()._model_forward(
                input_ids=input_ids,
                positions=positions,
                intermediate_tensors=intermediate_tensors,
                inputs_embeds=inputs_embeds,
                **model_kwargs,
            )
        self._utio_mid_metadata_s = 0.0  # sparse metadata built after mid-forward routing
        qsl = cm.query_start_loc_cpu.numpy()[: cm.num_reqs + 1]
        throttled = self._utio_throttle(cm, levels, qsl)
        if self._utio_path_reason(cm, levels, throttled) is None:
            # nothing the layer loop must do: vLLM's own (compiled) model computes the step,
            # reading the restricted blocks of throttle rows through swapped metadata
            t0 = time.perf_counter()
            with self._utio_restricted(throttled), self._utio_selecting(cm, throttled):
                hidden = super()._model_forward(
                    input_ids=input_ids, positions=positions, inputs_embeds=inputs_embeds
                )
            self._utio_heat = None
            self.utio_stats.vllm_model_steps += 1
            forward_s = time.perf_counter() - t0
            self._utio_record(levels, qsl, StepResult(hidden), forward_s)
            if self._utio_probing is False:
                self._utio_payoff.observe_step(int(qsl[-1]), False, forward_s)
            return hidden
        plan = self._utio_step_plan(cm, levels, qsl, throttled)
        t0 = time.perf_counter()
        result = self._utio_executor.run(input_ids, positions, inputs_embeds, plan)
        forward_s = time.perf_counter() - t0
        if self._utio_probing:
            self._utio_payoff.observe_step(int(qsl[-1]), True, forward_s)
        self._utio_estimate_verticals(result.heat_inputs, plan.query_start_loc)
        self._utio_heat = self._utio_heat_per_row(result.heat_inputs, plan.query_start_loc)
        self._utio_record(plan.levels, plan.query_start_loc, result, forward_s)
        return result.hidden

    def _utio_path_reason(self, cm: Any, levels: np.ndarray, throttled: Any | None) -> str | None:
        """Why this step needs UTIO's layer loop (None: vLLM's model), see step_path."""
        # vslash estimates its verticals from a layer's captured query: the loop captures;
        # 'select' chooses inside the attention call, which vLLM's model makes too
        full = np.array([p.is_full for p in self.utio_plans.plans])
        facts = StepFacts(~full[levels], self._utio_estimate is not None, self._utio_routable[0])
        return layer_loop_reason(self.utio_cfg, facts)

    def _utio_selecting(self, cm: Any, throttled: Any | None) -> contextlib.AbstractContextManager:
        """'select' rows choose their blocks per layer inside vLLM's model too (every row of
        the step is one batch: the step's CM, or the throttled one when rows are throttled)."""
        selector = self._utio_selector
        if selector is None or not selector.restricts_any(cm.seq_lens_cpu_upper_bound):
            return contextlib.nullcontext()
        source = throttled if throttled is not None else cm
        return selector.running(np.arange(cm.num_reqs), source)

    def _utio_restricted(self, throttled: Any | None) -> contextlib.AbstractContextManager:
        """The step's forward context with the throttle rows' restricted metadata (the same
        for every layer), or nothing to change."""
        if throttled is None:
            return contextlib.nullcontext()
        from vllm.forward_context import get_forward_context, override_forward_context

        t0 = time.perf_counter()
        with self._utio_recorder.paused():
            metadata = build_metadata(throttled, self.attn_groups)
        self._utio_mid_metadata_s += time.perf_counter() - t0
        ctx = get_forward_context()
        return override_forward_context(dataclasses.replace(ctx, attn_metadata=metadata))

    def _utio_step_plan(
        self, cm: Any, levels: np.ndarray, qsl: np.ndarray, throttled: Any | None
    ) -> StepPlan:
        """The executor's view of the step; ``throttled``: the CM with the throttle/vslash
        rows restricted (None: no such row), from :meth:`_utio_throttle`."""
        from vllm.forward_context import get_forward_context, override_forward_context

        ctx = get_forward_context()
        step_slots = ctx.slot_mapping
        source = {"cm": cm}  # sub-batches derive from this CM (restricted if rows are sparse)

        def make_sub_batch(rows: np.ndarray) -> SubBatch:
            with self._utio_recorder.paused():
                return build_sub_batch(source["cm"], rows, self.attn_groups, step_slots)

        if throttled is not None:
            # sparse rows: every sub-batch (the full one too) derives from the restricted CM
            source["cm"] = throttled
            full = make_sub_batch(np.arange(cm.num_reqs))
        else:
            full = SubBatch(
                np.arange(cm.num_reqs),
                slice(0, int(qsl[-1])),
                int(qsl[-1]),
                ctx.attn_metadata,
                step_slots,
                cm,
            )
        selector = self._utio_selector

        def use_sub_batch(sub: SubBatch):
            stack = contextlib.ExitStack()
            if selector is not None:  # 'select' rows of this sub-batch restrict per layer
                stack.enter_context(selector.running(sub.rows, sub.common))
            if sub.attn_metadata is not ctx.attn_metadata:  # else: the step's own metadata
                swapped = dataclasses.replace(
                    ctx, attn_metadata=sub.attn_metadata, slot_mapping=sub.slot_mapping
                )
                stack.enter_context(override_forward_context(swapped))
            return stack

        plan = StepPlan(levels, qsl, make_sub_batch, use_sub_batch, full, step_slots)
        plan.capture_heat = self._utio_estimate is not None or needs_heat(self.utio_cfg)
        if self._utio_probe is not None and self._utio_probing:
            plan.route_layer, plan.route_mid = self._utio_probe.layer, self._utio_route_mid
            if self._utio_mid_sparse:

                def route_mid(stream: torch.Tensor) -> np.ndarray:
                    routed = self._utio_route_mid(stream)
                    self._utio_sparse_after_routing(cm, routed, qsl, plan, source)
                    return routed

                plan.route_mid = route_mid
        return plan

    def _utio_sparse_after_routing(
        self, cm: Any, levels: np.ndarray, qsl: np.ndarray, plan: StepPlan, source: dict
    ) -> None:
        """Per-bucket sparse attention for rows routed mid-forward: the layers after the
        routing layer read the restricted blocks (those up to it ran dense, before the
        decision existed); KV reads are counted layer-weighted."""
        t0 = time.perf_counter()
        throttled = self._utio_throttle(cm, levels, qsl)
        if throttled is not None:
            source["cm"] = throttled
            plan.full = plan.make_sub_batch(np.arange(cm.num_reqs))
            read, dense = self._utio_kv_read
            layers = self._utio_executor.stack.num_layers
            after = layers - 1 - plan.route_layer
            self._utio_kv_read = ((dense * (layers - after) + read * after) // layers, dense)
        self._utio_mid_metadata_s += time.perf_counter() - t0

    def _utio_req_ids(self) -> list[str]:
        """Request id of each row of the step's CM (the draft batch's while drafting)."""
        if self._utio_draft_req_ids is not None:
            return self._utio_draft_req_ids
        return list(self.input_batch.req_ids)

    def _utio_policy_of_row(self, row: int, level: int) -> AttentionPolicy:
        """The row's policy: dense if its request opted out (``utio_attention``); a draft
        row's is the draft plan's (drafts are verified, so the opt-out does not apply)."""
        if self._utio_policy_override is not None:
            return self._utio_policy_override
        params = self.requests[self.input_batch.req_ids[row]].sampling_params
        if wants_dense(params.extra_args if params is not None else None):
            return AttentionPolicy()
        return self._utio_policy_of_level(level)

    def _utio_policy_of_level(self, level: int) -> AttentionPolicy:
        cfg = self.utio_cfg
        if cfg.attention_all is not None:
            return cfg.attention_all
        if level == 0:
            return AttentionPolicy()
        return cfg.buckets[len(cfg.buckets) - level].attention

    def _utio_throttle(self, cm: Any, levels: np.ndarray, qsl: np.ndarray) -> Any | None:
        """A CM whose sparse (throttle/vslash) decode rows read only their kept blocks, or
        None; 'select' rows are handed to the selector, which restricts them per layer."""
        self._utio_estimate = None
        decode = (np.diff(qsl) == 1) & ~cm.is_prefilling.numpy()[: cm.num_reqs].astype(bool)
        seq_lens = cm.seq_lens_cpu_upper_bound.numpy()[: cm.num_reqs]
        dense_read = int(seq_lens[decode].sum())
        policies: dict[int, AttentionPolicy] = {}
        selected: dict[int, AttentionPolicy] = {}
        for row in np.flatnonzero(decode).tolist():
            policy = self._utio_policy_of_row(row, int(levels[row]))
            if policy.policy == "select":
                selected[row] = policy
            elif policy.policy != "dense":
                policies[row] = policy
        if self._utio_selector is not None:
            self._utio_selector.begin_step(selected, self._utio_build, self._utio_req_ids())
        if not policies:
            self._utio_kv_read = (dense_read, dense_read)
            return None
        table = cm.block_table_tensor.cpu().numpy()
        req_ids = self._utio_req_ids()
        selections = {
            row: self._utio_blocks(policy, int(seq_lens[row]), req_ids[row])
            for row, policy in policies.items()
        }
        vslash = [
            row
            for row, policy in policies.items()
            if self._utio_needs_estimate(policy, int(seq_lens[row]))
        ]
        if vslash:
            self._utio_estimate = self._utio_estimate_rows(np.array(vslash), table, seq_lens)
        table, lens, got, full = apply_selections(table, seq_lens, selections)
        self._utio_kv_read = (dense_read - (full - got), dense_read)
        device = cm.block_table_tensor.device
        lens_t = torch.from_numpy(lens)
        return dataclasses.replace(
            cm,
            block_table_tensor=torch.from_numpy(table).to(device),
            seq_lens=lens_t.to(cm.seq_lens.device, dtype=cm.seq_lens.dtype),
            seq_lens_cpu_upper_bound=lens_t,
            max_seq_len=int(lens.max()),
        )

    def _utio_build(self, cm: Any) -> dict[str, Any]:
        """Backend metadata UTIO derives itself (not recorded as the step's CM)."""
        with self._utio_recorder.paused():
            return build_metadata(cm, self.attn_groups)

    def _utio_blocks(self, policy: AttentionPolicy, seq_len: int, req_id: str) -> Selection | None:
        """The blocks a decode row of ``policy`` keeps (None: all of them)."""
        bs = self.cache_config.block_size
        if policy.policy == "throttle":
            return throttled_blocks(seq_len, bs, policy.sink_tokens, policy.recent_tokens)
        # vslash; without an estimate yet (first decode step) the verticals are empty
        return vslash_blocks(
            seq_len,
            bs,
            policy.sink_tokens,
            policy.recent_tokens,
            policy.slash_offsets,
            self._utio_ranked.get(req_id, ()),
            policy.vertical_blocks,
        )

    def _utio_needs_estimate(self, policy: AttentionPolicy, seq_len: int) -> bool:
        """Whether verticals could matter on the row's next step (else skip the K read)."""
        if policy.policy != "vslash" or policy.vertical_blocks == 0:
            return False
        bs = self.cache_config.block_size
        base = (policy.sink_tokens, policy.recent_tokens, policy.slash_offsets)
        return vslash_blocks(seq_len + 1, bs, *base) is not None  # something left to add

    def _utio_estimate_rows(
        self, rows: np.ndarray, table: np.ndarray, seq_lens: np.ndarray
    ) -> VerticalEstimate:
        """The vslash rows' unrestricted block lists, read after the forward for the estimate."""
        bs = self.cache_config.block_size
        lens = seq_lens[rows].astype(np.int64)
        num_blocks = -(-lens // bs)
        blocks = table[rows, : int(num_blocks.max())].astype(np.int64)
        pad = np.arange(blocks.shape[1])[None, :] >= num_blocks[:, None]
        blocks[pad] = np.broadcast_to(blocks[:, :1], blocks.shape)[pad]  # any valid block
        req_ids = [self._utio_req_ids()[r] for r in rows.tolist()]
        return VerticalEstimate(rows, req_ids, torch.from_numpy(blocks), lens)

    def _utio_estimate_verticals(self, captures: list[dict[str, Any]], qsl: np.ndarray) -> None:
        """Rank the vslash rows' blocks by attention mass at the estimate layer (next step's
        verticals): this step's post-RoPE query against that layer's cached K."""
        est = self._utio_estimate
        if est is None or self._utio_executor is None:
            return
        t0 = time.perf_counter()
        query, ran = _captured_rows(captures, "query", qsl[est.rows])
        stack, layer = self._utio_executor.stack, self._utio_executor.heat_layer
        keys = stack.read_keys(layer, est.blocks[torch.from_numpy(ran)]) if ran.any() else None
        if keys is None:
            if ran.any() and not self._utio_estimate_warned:
                logger.warning("UTIO vslash: unknown KV-cache layout, no vertical blocks")
                self._utio_estimate_warned = True
            return
        lens = est.seq_lens[ran]
        query = query.reshape(len(lens), -1, keys.shape[-1])
        scale = stack.attention_scale(layer)
        mass = block_attention_mass(query, keys, torch.from_numpy(lens), scale)
        ranked = rank_blocks(mass, lens.tolist(), self.cache_config.block_size)
        for req_id, order in zip(np.array(est.req_ids)[ran].tolist(), ranked, strict=True):
            self._utio_ranked[req_id] = order
        self.utio_stats.kv_estimate_tokens += int(lens.sum())
        self.utio_stats.estimate_s += time.perf_counter() - t0

    def _utio_heat_per_row(self, captures: list[dict[str, Any]], qsl: np.ndarray) -> np.ndarray:
        """Attention heat of each row's last token (NaN where it did not run the layer)."""
        heat = np.full(len(qsl) - 1, np.nan)
        if not captures or self.utio_cfg.signal.attention_heat == 0.0:
            return heat
        per_token = np.full(int(qsl[-1]), np.nan)
        for cap in captures:
            values = signals.attention_heat(cap["output"], cap["value"], self._utio_num_kv_heads)
            tokens = cap["tokens"]
            idx = np.arange(int(qsl[-1]))[tokens] if isinstance(tokens, slice) else tokens.numpy()
            per_token[idx] = values.cpu().numpy()
        return per_token[qsl[1:] - 1]

    def _utio_record(self, levels, qsl, result, forward_s: float) -> None:
        stats = self.utio_stats
        tokens = np.diff(qsl)
        per_level = tokens_per_level(levels, tokens, self.utio_plans)
        rows = [int((levels == k).sum()) for k in range(self.utio_plans.num_levels)]
        stats.record_step(
            rows, per_level, self.utio_plans.layer_tokens(per_level), result.kv_fill_layer_tokens
        )
        read = self._utio_kv_read[0]
        if self._utio_selector is not None:  # layer-weighted, like the mid-forward case
            read -= self._utio_selector.take_saved_tokens() // self._utio_executor.stack.num_layers
        stats.kv_tokens_read += read
        stats.kv_tokens_dense += self._utio_kv_read[1]
        stats.routing_s += self._utio_route_s
        metadata_s = result.metadata_s + self._utio_mid_metadata_s
        stats.metadata_s += metadata_s
        stats.forward_s += forward_s - metadata_s
        self._utio_log.maybe_log(stats)

    # --- signals (after the step, before sampling) ----------------------------------
    def sample_tokens(self, grammar_output: Any) -> Any:
        state = self.execute_model_state
        cfg = self.utio_cfg
        if state is not None and self._utio_executor and cfg.buckets and not cfg.speculate:
            t0 = time.perf_counter()
            self._utio_update_signals(state)
            self.utio_stats.routing_s += time.perf_counter() - t0
        output = super().sample_tokens(grammar_output)
        if self._utio_drafter is not None and self._utio_drafts_on_reply:
            # the drafts ride on the step's reply: no third RPC per step (draft_handoff.py);
            # another executor (in-process) asks take_draft_token_ids, so none are attached
            attach_drafts(output, super().take_draft_token_ids())
        return output

    def _utio_update_signals(self, state: Any) -> None:
        if self.utio_cfg.router != "surrogate" or state.spec_decode_metadata is not None:
            return  # only the surrogate score uses the previous step's signals
        w = self.utio_cfg.signal
        n = self.input_batch.num_reqs
        logits = state.logits[:n]
        comps: dict[str, np.ndarray] = {}
        if w.entropy or w.varentropy:
            ent, var = signals.entropy_and_varentropy(logits)
            comps["entropy"], comps["varentropy"] = ent.cpu().numpy(), var.cpu().numpy()
        if w.outlier:
            comps["outlier"] = signals.outlierness(state.sample_hidden_states[:n]).cpu().numpy()
        heat = getattr(self, "_utio_heat", None)
        if w.attention_heat and heat is not None and len(heat) == n:
            comps["attention_heat"] = heat
        for i, req_id in enumerate(self.input_batch.req_ids[:n]):
            self._utio_signals[req_id] = {k: float(v[i]) for k, v in comps.items()}

    def _on_request_state_removed(self, req_id: str, req_state: Any) -> None:
        super()._on_request_state_removed(req_id, req_state)
        self._utio_signals.pop(req_id, None)
        self._utio_ranked.pop(req_id, None)
        if self._utio_selector is not None:
            self._utio_selector.forget(req_id)
        if self._utio_drafter is not None:
            self._utio_drafter.forget(req_id)

    # --- self-speculation (speculate): vLLM asks for drafts after its bookkeeping -----
    def propose_draft_token_ids(self, scheduler_output: Any, sampled_token_ids: Any, *a, **k):
        if self._utio_drafter is None:
            return super().propose_draft_token_ids(scheduler_output, sampled_token_ids, *a, **k)
        return self._utio_drafter.propose(scheduler_output, sampled_token_ids)

    def take_draft_token_ids(self) -> Any:
        # the engine core's RPC: made where its executor does not take the drafts from the
        # step's reply (an in-process executor, or a reply without them)
        if self._utio_drafter is not None:
            self._utio_drafter.stats.drafts_fetched += 1
        return super().take_draft_token_ids()

    def _sample(self, logits: Any, spec_decode_metadata: Any) -> Any:
        # with speculation configured vLLM sends every step through its rejection sampler,
        # drafts or not; a step whose requests carry no draft samples exactly as a plain
        # step, so it takes the plain sampler (the rejection pass cost ~0.8 ms a step here)
        if (
            self._utio_drafter is not None
            and spec_decode_metadata is not None
            and spec_decode_metadata.max_spec_len == 0
        ):
            self._utio_drafter.stats.plain_sampled_steps += 1
            spec_decode_metadata = None
        return super()._sample(logits, spec_decode_metadata)

    @contextlib.contextmanager
    def _utio_drafting(self, cm: Any, levels: np.ndarray, req_ids: list[str]):
        """Make ``_model_forward`` run a draft batch: its CM, levels, request ids and the
        draft policy; its step counters go to the draft's stats, not the engine's."""
        saved = (self._utio_recorder.common, self._utio_levels, self.utio_stats)
        self._utio_recorder.common, self._utio_levels = cm, levels
        self._utio_draft_req_ids = req_ids
        self._utio_policy_override = self.utio_cfg.speculate.draft.attention
        self.utio_stats = self._utio_draft_stats
        try:
            yield
        finally:
            self._utio_recorder.common, self._utio_levels, self.utio_stats = saved
            self._utio_draft_req_ids = None
            self._utio_policy_override = None

    # --- RPC-facing ----------------------------------------------------------------
    def utio_stats_dict(self, reset: bool = False) -> dict[str, Any]:
        out = self.utio_stats.as_dict()
        summaries = self._utio_selector.summaries if self._utio_selector else None
        out["summary_bytes"] = summaries.nbytes if summaries is not None else 0  # a gauge
        # gauge: requests with UTIO per-request state (0 once no request is live)
        held = self._utio_selector.held.request_ids() if self._utio_selector else set()
        drafter = self._utio_drafter
        if drafter is not None:
            held |= drafter.request_ids()
            out.update(drafter.stats.as_dict())
            out["spec_payoff"] = drafter.payoff.as_dict()  # since start (not reset)
            draft = self._utio_draft_stats
            out["spec_draft_kv_tokens_read"] = draft.kv_tokens_read
            out["spec_draft_kv_tokens_dense"] = draft.kv_tokens_dense
        out["request_state_entries"] = len(set(self._utio_signals) | set(self._utio_ranked) | held)
        out["kv_huge_page_bytes"] = self.utio_kv_huge_page_bytes  # a gauge
        out["runner_class"] = type(self).__name__
        out["routing_payoff"] = self._utio_payoff.as_dict()  # since start (not reset)
        if reset:
            self.utio_stats = UtioStats.for_levels(self.utio_stats.level_names)
            if drafter is not None:
                drafter.stats = SpeculationStats()
                self._utio_draft_stats = UtioStats.for_levels(self.utio_stats.level_names)
        return out


def _captured_rows(
    captures: list[dict[str, Any]], key: str, tokens: np.ndarray
) -> tuple[torch.Tensor, np.ndarray]:
    """``capture[key]`` rows of flat step ``tokens``, and which tokens were captured at all."""
    tokens = np.asarray(tokens, dtype=np.int64)
    cap_of = np.full(len(tokens), -1)
    local = np.zeros(len(tokens), dtype=np.int64)
    for c, cap in enumerate(captures):
        sel = cap["tokens"]
        if isinstance(sel, slice):
            hit = (tokens >= sel.start) & (tokens < sel.stop)
            pos = tokens - sel.start
        else:
            idx = sel.cpu().numpy()
            if not len(idx):
                continue
            order = np.argsort(idx, kind="stable")
            at = np.minimum(np.searchsorted(idx[order], tokens), len(idx) - 1)
            hit, pos = idx[order][at] == tokens, order[at]
        cap_of[hit], local[hit] = c, pos[hit]
    ran = cap_of >= 0
    picked = [captures[c][key][i] for c, i in zip(cap_of[ran], local[ran], strict=True)]
    return (torch.stack(picked) if picked else torch.empty(0)), ran
