"""Entropy and varentropy of softmax(logits) in one fused pass over the vocabulary.

With ``y = logits - max``, ``e = exp(y)``, ``Z = sum e``, ``S1 = sum e*y``, ``S2 = sum e*y^2``:

    H = log Z - S1 / Z,    Var_p[-log p] = Var_p[y] = S2 / Z - (S1 / Z)^2

the same quantities as the ``log_softmax`` form (``signals.entropy_and_varentropy_exact``),
equal in real arithmetic. ``torch.compile`` turns this into one max pass and one pass of
exp and three sums, with no ``[N, V]`` temporary; the eager form allocates five ``[N, V]``
float tensors, and on CPU their page faults, not the arithmetic, dominate at large batch.
Error: float32 rounding of the sums only (tests/test_entropy.py measures it on the default
model's logits against a float64 reference: ~1e-6 of the normalised components).

Compiled once per dtype for every batch size (dynamic shapes; a single row is padded to
two, since dynamic shapes would give size 1 a graph of its own); where compiling fails,
the eager form runs (in 8-row chunks, bounding its temporaries).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from vllm_utio.log import get_logger

logger = get_logger(__name__)

Moments = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
EAGER_ROWS = 8  # eager chunks: bounded temporaries (each [8, V] float)
WARM_UP_VOCAB = 65536  # compiles the graph every vocabulary above 4096 shares


def entropy_moments(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(H, Var_p[-log p]) in nats per row of ``logits`` [N, V]; one pass after the max."""
    x = logits.float()
    y = x - x.amax(-1, keepdim=True)
    e = y.exp()
    z = e.sum(-1)
    y = torch.where(e > 0, y, 0.0)  # -inf logits: 0 * -inf would be NaN
    ey = e * y
    m1 = ey.sum(-1) / z
    m2 = (ey * y).sum(-1) / z
    return z.log() - m1, (m2 - m1 * m1).clamp_min(0.0)


def eager_moments(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`entropy_moments` eagerly, 8 rows at a time (the fallback)."""
    parts = [entropy_moments(logits[i : i + EAGER_ROWS]) for i in range(0, len(logits), EAGER_ROWS)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


_compiled: Moments | None = None
_compile_failed = False
_enabled = True  # UtioConfig.entropy_pass == "compiled" (set per worker by make_router)


def _fused() -> Moments | None:
    global _compiled, _compile_failed
    if _compiled is None and not _compile_failed:
        try:
            _compiled = torch.compile(entropy_moments, dynamic=True)
        except Exception as exc:  # no compiler backend on this platform
            _compile_failed = True
            logger.warning("UTIO: entropy runs eagerly (torch.compile unavailable: %s)", exc)
    return _compiled


def entropy_varentropy_nats(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(H, Var_p[-log p]) in nats per row; the compiled pass where it is available."""
    global _compile_failed
    if logits.shape[0] == 0:
        empty = logits.new_zeros(0, dtype=torch.float32)
        return empty, empty.clone()
    fused = _fused()
    if fused is not None:
        try:
            # dynamo guards on grad and inference mode, which differ between callers (the
            # engine samples under inference mode, calibration under no_grad): one mode
            # for all keeps one graph; the clones are ordinary tensors again
            with torch.inference_mode():
                h, var = fused(_two_rows(logits) if logits.shape[0] == 1 else logits)
            n = logits.shape[0]
            return h[:n].clone(), var[:n].clone()
        except Exception as exc:  # a compile error surfaces at the first call
            _compile_failed = True
            logger.warning("UTIO: entropy runs eagerly (compiling it failed: %s)", exc)
    return eager_moments(logits)


def _two_rows(logits: torch.Tensor) -> torch.Tensor:
    return torch.cat([logits, torch.zeros_like(logits)])


def compiled_in_use() -> bool:
    """Whether batches take the compiled pass (tests, diagnostics)."""
    return _enabled and _compiled is not None and not _compile_failed


def enabled() -> bool:
    """Whether the score uses this pass (else the exact log_softmax form)."""
    return _enabled


def configure(compiled: bool) -> None:
    """Use the compiled pass (compiling it now, while the engine loads) or not."""
    global _enabled
    _enabled = compiled
    if compiled:
        warm_up()


def warm_up(dtypes: Iterable[torch.dtype] = (torch.bfloat16, torch.float32)) -> None:
    """Compile now (at engine load) rather than at the first routed step, for logits like
    the engine's: made under inference mode (dynamo guards on it) and of a large vocabulary
    (dynamic shapes still specialise it to <= 4096 or above)."""
    for dtype in dtypes:
        with torch.inference_mode():
            logits = torch.zeros(2, WARM_UP_VOCAB, dtype=dtype)
        entropy_varentropy_nats(logits)
