"""A workaround for vLLM 0.32's CPU stand-in of the rejection sampler's ``expand_kernel``.

Without a Triton CPU backend, vLLM replaces the rejection sampler's Triton kernels with C++
ones (``vllm/utils/cpu_triton_utils.py``). The stand-in for ``expand_kernel``, which spreads
each request's temperature, top-k and top-p over its draft positions, converts the output
buffer to int64 and fills the converted copy, so the caller's float32/int32 buffer is never
written (and float values would be truncated anyway). Every speculative step with a sampled
(non-greedy) request then divides its logits by uninitialised memory: drafts are rejected
and the "recovered" tokens follow a garbage temperature. Greedy requests never reach it.
Reported upstream as vllm-project/vllm#55005.

:func:`fix_expand_kernel` probes the registered kernel and, only if it loses its output,
registers a dtype-preserving implementation through vLLM's own override registry
(``vllm.triton_utils.dispatcher.register_kernels``), the one the CPU platform used.
"""

from __future__ import annotations

import torch

from vllm_utio.log import get_logger

logger = get_logger(__name__)

KERNEL = "vllm.v1.sample.rejection_sampler.expand_kernel"


def expand_in_dtype(
    output: torch.Tensor,
    input: torch.Tensor,
    cu_num_tokens: torch.Tensor,
    replace_from: float | int,
    replace_to: float | int,
    MAX_NUM_TOKENS: int | None = None,
) -> None:
    """``output[cu[i-1]:cu[i]] = input[i]`` (``replace_from`` rewritten to ``replace_to``),
    in the caller's dtype."""
    del MAX_NUM_TOKENS
    values = torch.where(input == replace_from, replace_to, input).to(output.dtype)
    counts = torch.diff(cu_num_tokens.to(torch.int64), prepend=cu_num_tokens.new_zeros(1))
    spread = torch.repeat_interleave(values, counts)
    output[: spread.numel()].copy_(spread)


def expand_is_broken() -> bool:
    """Whether vLLM's registered ``expand_kernel`` fails to spread a float32 batch."""
    from vllm.v1.sample.rejection_sampler import expand_batch_to_tokens

    x = torch.tensor([0.5, 2.0], dtype=torch.float32)
    cu = torch.tensor([1, 3], dtype=torch.int32)
    got = expand_batch_to_tokens(x, cu, 3, replace_from=0, replace_to=1)
    return not torch.equal(got, torch.tensor([0.5, 2.0, 2.0]))


def fix_expand_kernel() -> bool:
    """Replace the CPU ``expand_kernel`` stand-in where it loses its output; whether it
    did. Call after vLLM registered its CPU overrides (the worker's construction)."""
    if not expand_is_broken():
        return False
    from vllm.triton_utils.dispatcher import register_kernels

    register_kernels({KERNEL: expand_in_dtype})
    if expand_is_broken():
        raise RuntimeError(f"could not replace vLLM's CPU {KERNEL}")
    logger.info("UTIO: replaced vLLM's CPU expand_kernel (vllm-project/vllm#55005)")
    return True
