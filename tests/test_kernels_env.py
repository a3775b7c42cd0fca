"""Shared set-up of the split-KV kernel tests (test_kernels_*.py); holds no tests itself.

Where the kernels run: ``UTIO_KERNEL_DEVICE=cuda`` runs them compiled on a GPU (what
scripts/gpu_check.sh does); otherwise on CPU in Triton's interpreter, which Triton
chooses when a kernel is *defined*, so the Triton modules are imported here with
TRITON_INTERPRET=1 set for the import only (other test modules and the vLLM processes
they start never inherit it). Interpreted launches are slow (a numpy program per grid
cell), so the cases are tiny: a few sequences, 1-3 KV heads, block sizes 4-16.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import pytest
import torch

DEVICE = torch.device(os.environ.get("UTIO_KERNEL_DEVICE", "cpu"))
ON_GPU = DEVICE.type == "cuda"


@contextlib.contextmanager
def interpreter_env() -> Iterator[None]:
    """TRITON_INTERPRET=1 while the block runs (CPU only), the old value restored."""
    if ON_GPU:
        yield
        return
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old


SKIP_REASON: str | None = None
try:
    with interpreter_env():
        from vllm_utio.kernels import (
            block_lists,
            block_select,
            block_summaries,
            decode_attention,
            decoder,
        )
except ImportError as exc:  # no triton here
    SKIP_REASON = f"triton is not importable: {exc}"
    block_lists = block_select = block_summaries = decode_attention = decoder = None
else:
    if ON_GPU and not torch.cuda.is_available():
        SKIP_REASON = "UTIO_KERNEL_DEVICE=cuda but no CUDA device"
    elif not ON_GPU and not decode_attention.INTERPRETED:
        SKIP_REASON = (
            "vllm_utio.kernels' Triton modules were imported without TRITON_INTERPRET=1 "
            "earlier in this process: compiled-only, they cannot run on CPU"
        )
    elif not ON_GPU:
        import triton.language.standard as _standard

        from vllm_utio.kernels.common import is_interpreted

        if not is_interpreted(_standard.zeros):  # e.g. `import vllm` came first
            SKIP_REASON = (
                "triton.language was first imported without TRITON_INTERPRET=1 in this "
                "process (importing vllm does that): its jit helpers cannot run interpreted"
            )

needs_kernels = pytest.mark.skipif(SKIP_REASON is not None, reason=SKIP_REASON or "")
needs_gpu = pytest.mark.skipif(not ON_GPU, reason="needs UTIO_KERNEL_DEVICE=cuda and a GPU")

# (rtol, atol) of kernel vs reference, both in the input dtype: the kernel rounds P to
# the value dtype before P @ V (FlashAttention's convention) and sums in another order.
TOLERANCES = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (2e-2, 2e-2),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(actual.float(), expected.float(), rtol=rtol, atol=atol)


@pytest.fixture
def light_cpu(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The interpreter runs numpy on tiny tiles: one torch thread; and the env it reads at
    launch (it imports lazily on the first launch)."""
    if ON_GPU:
        yield
        return
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
