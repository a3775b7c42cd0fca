"""Per-step UTIO statistics, accumulated in the worker and read through an RPC."""

from __future__ import annotations

import bisect
import time
from dataclasses import asdict, dataclass, field

from vllm_utio.log import get_logger

logger = get_logger(__name__)


@dataclass
class UtioStats:
    """Totals since engine start (or the last reset)."""

    steps: int = 0
    routed_steps: int = 0  # steps where at least one row ran below full depth
    # steps run by vLLM's own (compiled) model: nothing to skip, restrict or observe
    vllm_model_steps: int = 0
    # router 'probe', routing_payoff 'measured': steps with a routable row that vLLM's
    # model ran unrouted (routing had measured slower there, or the model was re-measured)
    routing_declined_steps: int = 0
    rows_per_level: list[int] = field(default_factory=list)
    tokens_per_level: list[int] = field(default_factory=list)
    layer_tokens_run: int = 0
    layer_tokens_full: int = 0
    kv_fill_layer_tokens: int = 0  # K/V written for skipped layers
    # cached positions decode tokens attended to, per step (per layer; layer-weighted when
    # a mid-forward router restricts only the layers after its routing layer)
    kv_tokens_read: int = 0
    kv_tokens_dense: int = 0  # ... and what dense attention would have read
    kv_estimate_tokens: int = 0  # K positions read at one layer to rank vslash verticals
    estimate_s: float = 0.0  # the vslash vertical estimate (after the forward)
    select_s: float = 0.0  # select policy: bounds, top-k and per-layer metadata (in forward_s)
    summary_s: float = 0.0  # select policy: folding written keys into block summaries
    # select policy: layers (of a sub-batch, per step) that chose blocks afresh; the
    # layers between choices ('select_every') reuse the last choice and are not counted
    select_choices: int = 0
    # select policy, 'select_every_steps': rows (per choosing layer and step) that read
    # their last choice at that layer again instead of choosing
    select_rows_reused: int = 0
    # ... and rows that chose off their turn because a recent choice of theirs found a far
    # block holding a head's attention ('focus_mass')
    select_rows_focused: int = 0
    # select policy: attention calls of select-only sub-batches (every layer) that UTIO's
    # own decode kernel ran
    select_kernel_calls: int = 0
    # decode_kernel 'utio': attention calls UTIO's decode kernel ran (select's not counted)
    decode_kernel_calls: int = 0
    routing_s: float = 0.0  # signal + router + bucketing + batch reorder
    metadata_s: float = 0.0  # sub-batch attention metadata builds
    forward_s: float = 0.0  # the forward (layer loop with KV fill, or vLLM's model)
    level_names: list[str] = field(default_factory=list)
    # per level, how many steps had a sub-batch of each size (non-cumulative histogram;
    # the last slot counts sizes above the top bound; steps without the level not counted)
    bucket_size_bounds: list[int] = field(
        default_factory=lambda: [1, 2, 4, 8, 16, 32, 64, 128, 256]
    )
    bucket_size_counts: list[list[int]] = field(default_factory=list)

    @classmethod
    def for_levels(cls, level_names: list[str]) -> UtioStats:
        n = len(level_names)
        stats = cls(rows_per_level=[0] * n, tokens_per_level=[0] * n, level_names=list(level_names))
        stats.bucket_size_counts = [[0] * (len(stats.bucket_size_bounds) + 1) for _ in range(n)]
        return stats

    def record_step(
        self,
        rows_per_level: list[int],
        tokens_per_level: list[int],
        layer_tokens: tuple[int, int],
        kv_fill: int,
    ) -> None:
        self.steps += 1
        self.routed_steps += int(any(rows_per_level[1:]))
        for i, n in enumerate(rows_per_level):
            self.rows_per_level[i] += n
            if n:
                self.bucket_size_counts[i][bisect.bisect_left(self.bucket_size_bounds, n)] += 1
        for i, n in enumerate(tokens_per_level):
            self.tokens_per_level[i] += n
        self.layer_tokens_run += layer_tokens[0]
        self.layer_tokens_full += layer_tokens[1]
        self.kv_fill_layer_tokens += kv_fill

    @property
    def saved_fraction(self) -> float:
        if not self.layer_tokens_full:
            return 0.0
        return 1.0 - self.layer_tokens_run / self.layer_tokens_full

    def as_dict(self) -> dict:
        d = asdict(self)
        d["layer_tokens_saved"] = self.layer_tokens_full - self.layer_tokens_run
        d["saved_fraction"] = self.saved_fraction
        return d


class StatsLogger:
    """Logs a one-line summary at most every ``interval_s`` seconds (0 = never)."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self._last = time.monotonic()

    def maybe_log(self, stats: UtioStats) -> None:
        if self.interval_s <= 0 or time.monotonic() - self._last < self.interval_s:
            return
        self._last = time.monotonic()
        per_level = ", ".join(
            f"{name}={n}"
            for name, n in zip(stats.level_names, stats.tokens_per_level, strict=False)
        )
        logger.info(
            "UTIO: %d steps (%d routed), tokens per level [%s], layer-tokens saved %.1f%%, "
            "routing %.1f ms, metadata %.1f ms, forward %.1f ms",
            stats.steps,
            stats.routed_steps,
            per_level,
            100 * stats.saved_fraction,
            1e3 * stats.routing_s,
            1e3 * stats.metadata_s,
            1e3 * stats.forward_s,
        )
