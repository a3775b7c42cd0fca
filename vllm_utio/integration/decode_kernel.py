"""UTIO's own decode attention kernel in place of vLLM's CPU kernel, for steps whose rows
carry a few query tokens each (the C++ op in :mod:`vllm_utio.cpu_ops`).

vLLM 0.32's CPU kernel reads the KV cache at about 6-9 GB/s here, and once per query token
of a row: with select's restricted block tables attention is most of what a sparse step
still costs, and a verification of 4 drafts costs 3x a decode step. The op reads a block
of a KV head once for all of the row's query vectors (query heads of the group x query
tokens, at most 16). It only runs where it computes what vLLM's kernel would: the
backend's 'vec' block layout (learned through the backend's own cache write, not
assumed), a bf16/fp16 cache, head size 64 or 128, no sliding window, soft cap, ALiBi or
attention sinks, causal metadata whose rows fit.

Two users: sub-batches of select rows only, at every layer (:mod:`select_attention`, per
policy ``kernel``), and, with ``decode_kernel: "utio"``, every fitting attention call
(:func:`route_short_queries`: decode, drafts and verification alike, so the drafts and
the model verifying them are one model).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from vllm_utio.integration.model_stack import affine_strides, cache_offsets, offsets_shape
from vllm_utio.log import get_logger

logger = get_logger(__name__)


class DecodeKernel:
    """The op bound to one model's KV-cache layout (every layer shares it)."""

    MAX_VECTORS = 16  # query vectors per row and KV head (the op's register budget)

    def __init__(
        self, op: Any, layout: list[int], kv_heads: int, block_size: int, per_kv: int
    ) -> None:
        self.op = op
        self.layout = layout
        self.kv_heads = kv_heads
        self.block_size = block_size
        self.per_kv = per_kv  # query heads per KV head

    @classmethod
    def for_layer(cls, attn: Any) -> DecodeKernel | None:
        """The kernel for ``attn``'s cache (every layer of the model has its layout), or
        None, logged with the reason, where it would not compute what vLLM's does."""
        reason = unsupported(attn)
        if reason is None:
            try:  # compiled on first use (set-up builds it once)
                from vllm_utio.cpu_ops import load

                op = load()
                if not op.decode_attention_available():
                    reason = "this CPU has no AVX-512"
            except Exception as err:  # a failed build: vLLM's kernel runs instead
                reason = f"UTIO's CPU ops did not build ({type(err).__name__}: {err})"
        layout = None if reason else _vec_layout(attn)
        if reason is None and layout is None:
            reason = "the KV cache is not in the 'vec' layout (K channel-major, V token-major)"
        if reason is not None:
            logger.info("UTIO: vLLM's attention kernel stays in use: %s", reason)
            return None
        block_size, kv_heads, _ = offsets_shape(attn, attn.kv_cache)
        return cls(op, layout, kv_heads, block_size, int(attn.num_heads) // kv_heads)

    def fits(self, metadata: Any) -> bool:
        """Whether the op takes this backend metadata: causal, and every row's query
        tokens x query heads per KV head within the op's 16 vectors."""
        tokens = getattr(metadata, "max_query_len", None)
        return (
            tokens is not None
            and 1 <= tokens * self.per_kv <= self.MAX_VECTORS
            and bool(getattr(metadata, "causal", True))
            and getattr(metadata, "dynamic_causal", None) is None
        )

    def attend(
        self, impl: Any, query: torch.Tensor, kv_cache: torch.Tensor, metadata: Any, output: Any
    ) -> torch.Tensor:
        """vLLM's ``impl.forward`` for rows of a few query tokens: ``output``
        ``[tokens, heads * D]`` (or ``[tokens, heads, D]``) filled from ``query``
        ``[tokens, heads, D]``."""
        n = int(metadata.num_actual_tokens)
        rows = int(metadata.seq_lens.shape[0])
        q = query[:n]
        out = output[:n].view(q.shape)
        self.op.decode_attention(
            q if q.is_contiguous() else q.contiguous(),
            out,
            kv_cache,
            self.layout,
            metadata.block_table,
            metadata.seq_lens[:rows],
            metadata.query_start_loc[: rows + 1],
            self.kv_heads,
            self.block_size,
            float(impl.scale),
        )
        return output


def output_arg(args: tuple, kwargs: dict) -> Any:
    """The ``output`` argument of an attention impl's ``forward`` after ``attn_metadata``
    (positional or by name), or None."""
    return kwargs.get("output", args[0] if args else None)


def install_for_all_steps(stack: Any, counted: Callable[[], None]) -> bool:
    """``decode_kernel: "utio"``: every fitting attention call of ``stack``'s
    layers goes to UTIO's kernel; False (logged) where the kernel cannot run here."""
    attn0 = stack.layers[0].self_attn.attn
    kernel = DecodeKernel.for_layer(attn0)
    if kernel is None:
        return False
    route_short_queries([layer.self_attn.attn.impl for layer in stack.layers], kernel, counted)
    return True


def route_short_queries(
    impls: list[Any], kernel: DecodeKernel, counted: Callable[[], None]
) -> None:
    """Wrap each attention impl's ``forward`` (once per impl): calls whose metadata the
    kernel fits go to it (``counted`` is called for each), the rest to vLLM's kernel.
    Install before select's wrappers, so that select's restricted calls it leaves to
    vLLM's kernel pass through here."""
    wrapped: set[int] = set()
    for impl in impls:
        if id(impl) in wrapped:
            continue
        wrapped.add(id(impl))
        forward = impl.forward

        def attend(layer, query, key, value, kv_cache, attn_metadata, *a, _impl=impl,
                   _forward=forward, **kw):  # fmt: skip
            output = output_arg(a, kw)
            if attn_metadata is not None and output is not None and kernel.fits(attn_metadata):
                counted()
                return kernel.attend(_impl, query, kv_cache, attn_metadata, output)
            return _forward(layer, query, key, value, kv_cache, attn_metadata, *a, **kw)

        impl.forward = attend


def unsupported(attn: Any) -> str | None:
    """Why the op would not compute what vLLM's kernel computes for ``attn`` (None: it
    would)."""
    impl, cache = attn.impl, attn.kv_cache
    checks = {
        "the KV cache is not on the CPU": cache.device.type == "cpu",
        f"the KV cache dtype is {cache.dtype}, not bf16/fp16": cache.dtype
        in (torch.bfloat16, torch.float16),
        f"kv_cache_dtype {getattr(impl, 'kv_cache_dtype', '?')!r} is quantized": getattr(
            impl, "kv_cache_dtype", "auto"
        )
        == "auto",
        f"head size {attn.head_size} is not 64 or 128": int(attn.head_size) in (64, 128),
        "the layer has a sliding window": getattr(impl, "sliding_window", -1) in (-1, None),
        "the layer has a logits soft cap": not getattr(impl, "logits_soft_cap", 0),
        "the layer has ALiBi slopes": getattr(impl, "alibi_slopes", None) is None,
        "the layer has attention sinks": getattr(impl, "sinks", None) is None,
        "the KV-cache blocks are not contiguous": cache[0].is_contiguous(),
        "the layer is not decoder self-attention": str(getattr(impl, "attn_type", "decoder"))
        in ("decoder", "AttentionType.DECODER"),
    }
    return next((why for why, ok in checks.items() if not ok), None)


def _vec_layout(attn: Any) -> list[int] | None:
    """[block_stride, k_start, k_head, k_chan, v_start, v_head, v_tok] when K is stored
    channel-major and V token-major per block and KV head; None otherwise."""
    cache = attn.kv_cache
    keys, values = cache_offsets(attn, cache, value=False), cache_offsets(attn, cache, value=True)
    k = affine_strides(keys) if keys is not None else None
    v = affine_strides(values) if values is not None else None
    if k is None or v is None:
        return None
    (k_start, (k_tok, k_head, k_chan)), (v_start, (v_tok, v_head, v_chan)) = k, v
    block_size, _, dim = offsets_shape(attn, cache)
    # a head's K of a block one run of bytes, then its V another (the op prefetches them)
    if k_tok != 1 or k_chan != block_size or v_chan != 1 or v_tok != dim:
        return None
    return [int(cache.stride(0)), k_start, k_head, k_chan, v_start, v_head, v_tok]
