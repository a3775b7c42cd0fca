"""The UTIO worker and model runner for vLLM's GPU platform, with sparse decode rows read
through UTIO's Triton kernels.

Sparse decode rows (``throttle``; ``select`` with ``heads: "bound"``, no ``top_p``, no
``hold_steps``; ``vslash`` without vertical blocks) of a step that runs vLLM's own model
(every row full depth, no signal taken mid-forward) go to
:class:`vllm_utio.kernels.decoder.SparseDecoder` over vLLM 0.32's FlashAttention K/V cache
views; every other row stays with vLLM's backend. vLLM's backend sees those rows with a
sequence length of 1 (it reads one position for them, nearly free), then each layer's
wrapped ``impl.forward`` overwrites their output with the kernel's. ``select`` rows are
scored per layer on the device from the layer's own query against the selector's block
summaries, which a Triton fold keeps current at every K/V write (replacing the torch
fold). Every other step, and these policies' other settings, take the mixin's paths
(block-table restriction through vLLM's backend; ``select`` in the layer loop).

The kernel path needs attention to run outside CUDA graphs (vLLM's ``cudagraph_mode``
``NONE`` or ``PIECEWISE``, or ``enforce_eager``): a full graph would replay whatever
attention its capture saw. It is off under full graphs, fp8 KV, sliding windows, ALiBi,
soft caps, attention sinks, or ``VLLM_UTIO_GPU_KERNELS=0``.

UNTESTED on a GPU: this project has no GPU machine with vLLM (docs/gpu.md). On CPU, the
tests build the kernel inputs from real ``CommonAttentionMetadata`` objects and run the
wrapped forward (Triton interpreter) over a cache in this layout; nothing here has run
inside a vLLM GPU engine.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np
import torch
from vllm.v1.worker.gpu_model_runner import GPUModelRunner
from vllm.v1.worker.gpu_worker import Worker

from vllm_utio.config import AttentionPolicy
from vllm_utio.integration.attention import build_metadata
from vllm_utio.integration.runner import UtioRunnerMixin
from vllm_utio.integration.version import check_vllm_version
from vllm_utio.integration.worker_rpc import UtioWorkerRpcMixin
from vllm_utio.kernels.reference import range_blocks
from vllm_utio.log import get_logger
from vllm_utio.step_path import StepFacts, layer_loop_reason

logger = get_logger(__name__)
KERNELS_ENV = "VLLM_UTIO_GPU_KERNELS"  # "0": never use UTIO's kernels


def kernel_policy(policy: AttentionPolicy) -> Any | None:
    """The device decoder's policy for a UTIO attention policy (None: not on the kernels)."""
    from vllm_utio.kernels import decoder as d

    if policy.policy == "throttle":
        return d.Throttle(policy.sink_tokens, policy.recent_tokens)
    if policy.policy == "vslash" and policy.vertical_blocks == 0:
        return d.Vslash(policy.sink_tokens, policy.recent_tokens, policy.slash_offsets, 0)
    if (
        policy.policy == "select"
        and policy.heads == "bound"
        and policy.top_p is None
        and policy.hold_steps == 0
        and policy.select_every_steps == 1
    ):
        # one block set per row, as the CPU engine's 'select' (the spec) chooses
        return d.QueryAware(
            policy.sink_tokens, policy.recent_tokens, policy.budget_tokens, per_kv_head=False
        )
    return None


def kernel_path_blocker(impls: list[Any], cudagraph_mode: Any, device: torch.device) -> str | None:
    """Why the kernel path cannot serve these attention impls (None: it can)."""
    if os.environ.get(KERNELS_ENV, "1") == "0":
        return f"{KERNELS_ENV}=0"
    if device.type != "cuda":
        return f"device {device} is not CUDA"
    if cudagraph_mode is not None and cudagraph_mode.has_full_cudagraphs():
        return f"cudagraph_mode {cudagraph_mode} captures attention in full CUDA graphs"
    for impl in impls:
        name = type(impl).__name__
        if name != "FlashAttentionImpl":
            return f"attention backend {name} (the kernels read FlashAttention's cache layout)"
        if impl.kv_cache_dtype != "auto":
            return f"KV cache dtype {impl.kv_cache_dtype}"
        if tuple(impl.sliding_window) != (-1, -1) or impl.alibi_slopes is not None:
            return "sliding window or ALiBi"
        if impl.logits_soft_cap or getattr(impl, "sinks", None) is not None:
            return "logits soft cap or attention sinks"
    return None


def kernel_positions(
    policy: AttentionPolicy, seq_len: int, block_size: int, num_layers: int
) -> int:
    """KV positions a kernel row reads per layer, averaged over layers (stats)."""
    nb = -(-seq_len // block_size)
    sink = policy.sink_tokens // block_size
    base = range_blocks(seq_len, block_size, min(sink, nb), policy.recent_tokens)
    if policy.policy == "select":
        budget = max(1, -(-policy.budget_tokens // block_size))
        count = nb if nb <= budget else max(budget, len(base))
        read = count * block_size - (nb * block_size - seq_len)  # the last block is kept
        dense = min(policy.dense_layers, num_layers)
        return (dense * seq_len + (num_layers - dense) * read) // num_layers
    extra = {(seq_len - 1 - o) // block_size for o in policy.slash_offsets if o < seq_len}
    blocks = set(base) | extra
    return sum(min(block_size, seq_len - j * block_size) for j in blocks)


@dataclasses.dataclass
class KernelStep:
    """A step's decode rows that read through the kernels (one policy)."""

    policy: AttentionPolicy
    rows: np.ndarray  # rows of the step's CommonAttentionMetadata
    token_idx: torch.Tensor  # [R] int64, each row's query token in the step's flat tokens
    seq_lens: torch.Tensor  # [R] int32 (device, exact)
    block_table: torch.Tensor  # [R, W] int32
    num_tokens: int  # the step's num_actual_tokens: which forward this belongs to


def kernel_step(cm: Any, rows: np.ndarray, policy: AttentionPolicy) -> KernelStep:
    """Device inputs of ``rows`` (decode rows of ``cm``) for the kernels; no host sync."""
    device = cm.block_table_tensor.device
    index = torch.as_tensor(rows, dtype=torch.long).to(device)
    tokens = cm.query_start_loc_cpu[torch.as_tensor(rows, dtype=torch.long)].to(torch.long)
    return KernelStep(
        policy,
        rows,
        tokens.to(device),
        cm.seq_lens[index].to(torch.int32),
        cm.block_table_tensor[index].to(torch.int32),
        int(cm.num_actual_tokens),
    )


def backend_metadata_cm(cm: Any, rows: np.ndarray) -> Any:
    """``cm`` where ``rows`` have sequence length 1: vLLM's backend reads one position for
    them (their output is the kernels'), the other rows are untouched."""
    upper = cm.seq_lens_cpu_upper_bound.clone()
    upper[torch.as_tensor(rows, dtype=torch.long)] = 1
    lens = cm.seq_lens.clone()
    lens[torch.as_tensor(rows, dtype=torch.long).to(lens.device)] = 1
    return dataclasses.replace(
        cm, seq_lens=lens, seq_lens_cpu_upper_bound=upper, max_seq_len=int(upper.max())
    )


class DeviceFold:
    """:meth:`BlockSummaries.fold` (same signature and semantics) by the Triton fold."""

    def __init__(self, summaries: Any) -> None:
        self.summaries = summaries

    def __call__(self, layer: int, keys: torch.Tensor, slots: torch.Tensor) -> None:
        from vllm_utio.kernels.block_summaries import fold_block_summaries

        # float32 summaries hold any key dtype's min/max exactly
        fold_block_summaries(self.summaries.packed[layer], keys, slots, self.summaries.block_size)


class KernelAttention:
    """Wraps attention impls: vLLM's backend, then the kernel rows' output overwritten."""

    def __init__(self, layer_index: dict[str, int], max_seqs: int, summaries: Any | None) -> None:
        self.layer_index = layer_index  # attention layer name -> decoder layer index
        self.max_seqs = max_seqs
        self.summaries = summaries  # the selector's BlockSummaries ('select'), else None
        self.step: KernelStep | None = None
        self._decoders: dict[tuple, Any] = {}

    def wrap(self, impl: Any) -> None:
        forward = impl.forward

        def utio_forward(layer, query, key, value, kv_cache, attn_metadata, *args, **kwargs):
            result = forward(layer, query, key, value, kv_cache, attn_metadata, *args, **kwargs)
            output = kwargs["output"] if "output" in kwargs else args[0]
            step = self.step
            if (
                step is not None
                and attn_metadata is not None
                and getattr(attn_metadata, "num_actual_tokens", None) == step.num_tokens
            ):
                self.attend(layer, impl, query, kv_cache, output, step)
            return result

        impl.forward = utio_forward

    def decoder(
        self, policy: Any, impl: Any, block_size: int, width: int, device: torch.device
    ) -> Any:
        """The decoder of (policy, geometry), made once (its buffers are reused)."""
        from vllm_utio.kernels import decoder as d

        key = (policy, impl.num_heads, impl.num_kv_heads, impl.head_size, block_size, width)
        if key not in self._decoders:
            shape = d.DecodeShape(
                self.max_seqs, impl.num_heads, impl.num_kv_heads, impl.head_size, block_size, width
            )
            self._decoders[key] = d.SparseDecoder(policy, shape, device)
        return self._decoders[key]

    def attend(
        self,
        layer: Any,
        impl: Any,
        query: torch.Tensor,
        kv_cache: torch.Tensor,
        output: torch.Tensor,
        step: KernelStep,
    ) -> None:
        """The kernel rows' attention at this layer, written into ``output``."""
        from vllm_utio.kernels import decoder as d
        from vllm_utio.kernels.reference import split_vllm_kv_cache

        index = self.layer_index[layer.layer_name]
        key_cache, value_cache = split_vllm_kv_cache(kv_cache, impl.head_size)
        block_size = kv_cache.shape[2]
        policy = kernel_policy(step.policy)
        summaries = None
        if isinstance(policy, d.QueryAware):
            if index < step.policy.dense_layers:
                policy = d.Dense()
            else:
                summaries = self.summaries.packed[index]
        width = step.block_table.shape[1]
        dec = self.decoder(policy, impl, block_size, width, query.device)
        heads, dim = impl.num_heads, impl.head_size
        q = query.view(-1, heads, dim).index_select(0, step.token_idx)
        rows = dec(
            q, key_cache, value_cache, step.block_table, step.seq_lens, impl.scale,
            summaries=summaries,
        )  # fmt: skip
        output.view(-1, heads, dim).index_copy_(0, step.token_idx, rows.to(output.dtype))


class UtioGPUModelRunner(UtioRunnerMixin, GPUModelRunner):
    def __init__(self, vllm_config: Any, device: Any) -> None:
        super().__init__(vllm_config, device)
        self._utio_init()
        self._utio_kernels: KernelAttention | None = None

    def initialize_kv_cache(self, *args: Any, **kwargs: Any) -> None:
        super().initialize_kv_cache(*args, **kwargs)
        if self._utio_executor is None or not any(
            kernel_policy(p) is not None for _, p in self.utio_cfg.policies()
        ):
            return
        stack = self._utio_executor.stack
        attns = [layer.self_attn.attn for layer in stack.layers]
        mode = getattr(self.compilation_config, "cudagraph_mode", None)
        reason = kernel_path_blocker([a.impl for a in attns], mode, torch.device(self.device))
        selector = self._utio_selector
        block_size = attns[0].kv_cache.shape[2]
        if reason is None and selector is not None and block_size != self.cache_config.block_size:
            reason = "the kernel block size differs from the summaries' (cache) block size"
        if reason is not None:
            logger.warning("UTIO GPU kernels off (%s): sparse rows use vLLM's backend", reason)
            return
        summaries = selector.summaries if selector is not None else None
        if summaries is not None:
            summaries.fold = DeviceFold(summaries)  # the Triton fold, same semantics
        layer_index = {a.layer_name: i for i, a in enumerate(attns)}
        kernels = KernelAttention(layer_index, self.scheduler_config.max_num_seqs, summaries)
        for impl in {id(a.impl): a.impl for a in attns}.values():
            kernels.wrap(impl)
        self._utio_kernels = kernels
        logger.info("UTIO GPU kernels on: sparse decode rows read through vllm_utio.kernels")

    def execute_model(self, *args: Any, **kwargs: Any) -> Any:
        if self._utio_kernels is not None:
            self._utio_kernels.step = None
        try:
            return super().execute_model(*args, **kwargs)
        finally:
            if self._utio_kernels is not None:
                self._utio_kernels.step = None

    def _utio_throttle(self, cm: Any, levels: np.ndarray, qsl: np.ndarray) -> Any | None:
        kernels = self._utio_kernels
        step = self._utio_kernel_step(cm, levels, qsl) if kernels is not None else None
        if kernels is not None:
            kernels.step = step
        if step is None:
            return super()._utio_throttle(cm, levels, qsl)
        self._utio_estimate = None
        if self._utio_selector is not None:  # no per-layer restriction by the selector
            self._utio_selector.begin_step(
                {}, lambda c: build_metadata(c, self.attn_groups), self._utio_req_ids()
            )
        seq_lens = cm.seq_lens_cpu_upper_bound.numpy()[: cm.num_reqs]
        decode = self._utio_decode_rows(cm, qsl)
        dense = int(seq_lens[decode].sum())
        bs, layers = self.cache_config.block_size, len(kernels.layer_index)
        saved = sum(
            int(seq_lens[r]) - kernel_positions(step.policy, int(seq_lens[r]), bs, layers)
            for r in step.rows.tolist()
        )
        self._utio_kv_read = (dense - saved, dense)
        return backend_metadata_cm(cm, step.rows)

    def _utio_decode_rows(self, cm: Any, qsl: np.ndarray) -> np.ndarray:
        return (np.diff(qsl) == 1) & ~cm.is_prefilling.numpy()[: cm.num_reqs].astype(bool)

    def _utio_kernel_step(self, cm: Any, levels: np.ndarray, qsl: np.ndarray) -> KernelStep | None:
        """This step's kernel rows, or None: the mixin's path (a row whose plan skips layers, a
        signal taken mid-forward, several sparse policies, or one the kernels lack)."""
        shallow = ~np.array([p.is_full for p in self.utio_plans.plans])[levels]
        if layer_loop_reason(self.utio_cfg, StepFacts(shallow, False, self._utio_routable[0])):
            return None
        rows, policies = [], set()
        for row in np.flatnonzero(self._utio_decode_rows(cm, qsl)).tolist():
            policy = self._utio_policy_of_row(row, int(levels[row]))
            if policy.policy != "dense":
                rows.append(row)
                policies.add(policy)
        if len(policies) != 1 or kernel_policy(next(iter(policies))) is None:
            return None
        return kernel_step(cm, np.asarray(rows), policies.pop())


class UtioGPUWorker(UtioWorkerRpcMixin, Worker):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        check_vllm_version()
        super().__init__(*args, **kwargs)

    def _make_model_runner(self) -> GPUModelRunner:
        if self.use_v2_model_runner:
            raise RuntimeError("UTIO needs vLLM's V1 model runner; unset VLLM_USE_V2_MODEL_RUNNER")
        return UtioGPUModelRunner(self.vllm_config, self.device)


__all__ = [
    "DeviceFold",
    "KernelAttention",
    "KernelStep",
    "UtioGPUModelRunner",
    "UtioGPUWorker",
    "backend_metadata_cm",
    "kernel_path_blocker",
    "kernel_policy",
    "kernel_positions",
    "kernel_step",
]
